"""int8 and int4 weights against bfloat16, as ratios measured in one process, alternating, after
warm-up, medians; timed in CPU seconds of one thread (time.thread_time / process_time), so that
a machine shared with other jobs shows the work, not the waits for a core.

  PYTHONPATH=. python scripts/compare_weight_formats.py ops
      quantized_decode_linear vs packed bfloat16 decode_linear on the seed shapes at 1/8/32/256 rows
  PYTHONPATH=. python scripts/compare_weight_formats.py engine CHECKPOINT
      Engine tokens/s (32-token prompts, 16 greedy tokens, batch 1/8/32) per weight format, and
      greedy agreement of int8/int4 with bfloat16 over a fixed prompt set (32 tokens each)
  PYTHONPATH=. python scripts/compare_weight_formats.py agreement CHECKPOINT
      greedy agreement only, of float32/int8/int4 with bfloat16, over the English prompts and
      over CODE_PROMPTS (what the stdlib-trained checkpoints were trained on), 32 tokens each;
      then teacher-forced: how often each format's next-token argmax is bfloat16's, over 256
      windows of the checkpoint's validation split (free-running continuations part for good at
      their first different token; teacher-forced, every position counts on its own)
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

FORMATS = ("bfloat16", "int8", "int4")
SHAPES = [(512, 1536), (512, 512), (512, 1024), (1024, 512), (512, 2048)]  # (K, N)
PROMPTS = ["The history of the city", "Once upon a time there was", "In the beginning of the",
           "Scientists have discovered that", "The king said to his", "She opened the door and",
           "The most important thing about", "During the war the army",
           "He was born in the small", "The river flows through the", "After many years of work",
           "The first thing you need"]
CODE_PROMPTS = ["import os\nimport sys\n", "def __init__(self, ", "class Parser:\n    def ",
                "    for i in range(len(", "        return self.", "if __name__ == '__main__':\n",
                "    def __repr__(self):\n", "        raise ValueError(", "from collections import",
                "    try:\n        ", "        if not isinstance(", "def main(argv=None):\n",
                "    with open(filename", "        self.assertEqual(", "    @property\n    def ",
                '    """Return the ', "        except KeyError:\n", "        for key, value in ",
                "    if len(args) ", "        elif ", "#!/usr/bin/env python\n", "__all__ = [",
                "        while True:\n", "    lines = []\n"]


def greedy_agreement(outs: dict, reference: str, fmt: str) -> tuple[int, int, int]:
    """(tokens equal at the same position, tokens compared, sequences equal throughout) of fmt's
    greedy continuations against reference's."""
    same = total = whole = 0
    for a, b in zip(outs[reference], outs[fmt]):
        n = min(len(a["token_ids"]), len(b["token_ids"]))
        same += sum(x == y for x, y in zip(a["token_ids"][:n], b["token_ids"][:n]))
        total += n
        whole += a["token_ids"] == b["token_ids"]
    return same, total, whole


def compare_agreement(path: str, new_tokens: int = 32) -> None:
    from ryzen_llm import Engine
    from ryzen_llm.engine import SamplingParams

    formats = ("bfloat16", "float32", "int8", "int4")
    engines = {f: Engine.from_checkpoint(path, weights=f, warmup_steps=0, max_batch_size=32)
               for f in formats}
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for name, prompts in (("English prompts", PROMPTS), ("code prompts", CODE_PROMPTS)):
        outs = {f: e.generate(prompts, params) for f, e in engines.items()}
        for f in formats[1:]:
            same, total, whole = greedy_agreement(outs, "bfloat16", f)
            print(f"{name}: greedy agreement {f} vs bfloat16: {same}/{total} tokens = "
                  f"{same / total:.1%}; {whole}/{len(prompts)} continuations identical",
                  flush=True)
    for e in engines.values():
        e.stop()
    teacher_forced_agreement(path, formats)


def teacher_forced_agreement(path: str, formats: tuple[str, ...], n_windows: int = 256) -> None:
    from ryzen_llm.evaluate import evaluation_tokens, load_model, windows
    from ryzen_llm.model import KVCache

    picks = {}
    for f in formats:
        engine = load_model(path, f, None)
        model = engine.model
        tokens, _ = evaluation_tokens(engine, None, progress=False)
        batches = windows(tokens, model.config.max_seq_len, 8, n_windows // 8, "val")
        cache = KVCache(model.config, 8)
        with torch.inference_mode():
            picks[f] = torch.cat([model.forward_with_cache(idx, cache.rows(0, len(idx)),
                                                           every_position=True).argmax(-1)
                                  for idx, _ in batches]).flatten()
    for f in formats[1:]:
        same = int((picks[f] == picks["bfloat16"]).sum())
        print(f"teacher-forced next-token argmax {f} vs bfloat16: {same}/{picks[f].numel()} "
              f"= {same / picks[f].numel():.2%}", flush=True)


def compare_ops(rounds: int = 9) -> None:
    from ryzen_llm.ops.decode_linear import pack_decode_weight
    from ryzen_llm.ops.quantized_decode_linear import pack_quantized_weight

    torch.set_num_threads(1)
    op = torch.ops.ryzen_llm.decode_linear
    for M in (1, 8, 32, 256):
        for K, N in SHAPES:
            w, b, x = torch.randn(N, K) / K**0.5, torch.randn(N), torch.randn(M, K)
            packed = {"bfloat16": pack_decode_weight(w),
                      "int8": pack_quantized_weight(w, "int8"),
                      "int4": pack_quantized_weight(w, "int4")}
            reps = max(3, 300 // M)
            times = {f: [] for f in FORMATS}
            with torch.inference_mode():
                for _ in range(rounds):
                    for f in FORMATS:
                        t = time.thread_time()
                        for _ in range(reps):
                            op(x, packed[f], b, False, N)
                        times[f].append((time.thread_time() - t) / reps)
            med = {f: statistics.median(v[2:]) for f, v in times.items()}
            print(f"M={M:4d} {K}->{N}: bfloat16 {med['bfloat16'] * 1e6:8.1f} us  "
                  f"int8 x{med['bfloat16'] / med['int8']:.2f}  int4 x{med['bfloat16'] / med['int4']:.2f}",
                  flush=True)


def compare_engine(path: str, rounds: int = 7) -> None:
    from ryzen_llm import Engine
    from ryzen_llm.engine import SamplingParams

    torch.set_num_threads(1)
    engines = {f: Engine.from_checkpoint(path, weights=f, threads=1, max_batch_size=32)
               for f in FORMATS}
    for e in engines.values():
        e.wait_ready(300)
    outs = {f: e.generate(PROMPTS, SamplingParams(max_new_tokens=32)) for f, e in engines.items()}
    for f in FORMATS[1:]:
        same, total, _ = greedy_agreement(outs, "bfloat16", f)
        print(f"greedy agreement {f} vs bfloat16: {same}/{total} tokens = {same / total:.1%}")
    g = torch.Generator().manual_seed(0)
    V = engines["bfloat16"].model.config.vocab_size
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for B in (1, 8, 32):
        prompts = [torch.randint(0, V, (32,), generator=g).tolist() for _ in range(B)]
        cpu = {f: [] for f in FORMATS}
        for _ in range(rounds):
            for f, e in engines.items():
                t = time.process_time()
                e.generate(prompts, params)
                cpu[f].append(time.process_time() - t)
        med = {f: statistics.median(v[1:]) for f, v in cpu.items()}
        print(f"batch {B:2d}: bfloat16 {B * 16 / med['bfloat16']:7.0f} tokens/CPU-s  "
              f"int8 x{med['bfloat16'] / med['int8']:.2f}  int4 x{med['bfloat16'] / med['int4']:.2f}",
              flush=True)
    for e in engines.values():
        e.stop()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "ops":
        compare_ops()
    elif len(sys.argv) == 3 and sys.argv[1] == "engine":
        compare_engine(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "agreement":
        compare_agreement(sys.argv[2])
    else:
        sys.exit(__doc__)
