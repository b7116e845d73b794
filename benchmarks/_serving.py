"""Shared pieces of the generation and serving benchmarks: the seed-size checkpoint (random
weights, a byte-level BPE trained on standard-library source), 32-token prompts, the Hugging
Face GPT-2 peer of the same shape, and the server started as a real subprocess on loopback."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ryzen_llm.checkpoint import save_checkpoint
from ryzen_llm.config import Config
from ryzen_llm.heap import keep_freed_heap
from ryzen_llm.model import ScaledTransformerModel
from ryzen_llm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, NEW_TOKENS = 32, 16


def corpus(max_bytes: int = 1_500_000) -> list[str]:
    texts, total = [], 0
    for f in sorted(Path(os.__file__).parent.glob("*.py")):
        t = f.read_text(errors="ignore")
        texts.append(t)
        total += len(t)
        if total > max_bytes:
            break
    return texts


def make_checkpoint(root: Path) -> tuple[Path, list[str]]:
    """The seed's model shape (d_model 512, 4 layers, 8 heads, FFN 1024, context 128) with a
    2048-token BPE; 64 prompts of exactly PROMPT_TOKENS tokens that survive decode -> encode."""
    texts = corpus()
    tok = Tokenizer.train(texts, vocab_size=2048)
    config = Config()
    config.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = ScaledTransformerModel(config.model)
    path = save_checkpoint(root / "ckpt", model, config.to_dict(), tokenizer_file=tok.save(root))
    prompts, ids = [], tok.encode("\n".join(texts[1:12]))
    for start in range(0, len(ids) - PROMPT_TOKENS, 97):
        text = tok.decode(ids[start : start + PROMPT_TOKENS])
        if len(tok.encode(text)) == PROMPT_TOKENS:
            prompts.append(text)
        if len(prompts) == 64:
            break
    return path, prompts


# The HF peer runs in both dtypes: on a CPU with AVX512-BF16 its bfloat16 generate() is the
# faster one (35 vs 51 ms at batch 1, 120 vs 265 ms at batch 32, measured here), and ryzen_llm's
# level 3 generates from bfloat16 weights as well. Reports compare against the faster of the two.
HF_DTYPES = {"hf_transformers": torch.float32, "hf_transformers_bf16": torch.bfloat16}


def hf_gpt2(dtype: torch.dtype = torch.float32):
    """transformers' GPT2LMHeadModel of the seed's shape (random weights, in `dtype`), or the
    reason it cannot be measured. The peer is never replaced by something else."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None, "not measured (transformers is not installed: pip install -e '.[bench]')"
    transformers.logging.set_verbosity_error()
    # The glibc thresholds an Engine sets for its process (ryzen_llm.heap.keep_freed_heap): the
    # peer runs under them too, whether or not an engine was created before it (no measurable
    # change to HF generate() here: batch 32 bf16 127-151 ms without, 137-144 with)
    keep_freed_heap()
    cfg = GPT2Config(n_embd=512, n_layer=4, n_head=8, n_inner=1024, vocab_size=2048,
                     n_positions=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return (GPT2LMHeadModel(cfg).eval().to(dtype),
            f"transformers {transformers.__version__}, {str(dtype).removeprefix('torch.')}")


def hf_generate(model, batch: int):
    """A callable running greedy generate() of NEW_TOKENS after PROMPT_TOKENS, at `batch`."""
    idx = torch.randint(1, 2048, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              attention_mask=torch.ones_like(idx), pad_token_id=0)

    def run():
        with torch.inference_mode():
            return model.generate(idx, **kw)

    return run


@contextlib.contextmanager
def server_process(checkpoint: Path, *extra: str, timeout: float = 600.0):
    """`python -m ryzen_llm.serve` on 127.0.0.1, an ephemeral port; yields (url, Popen, level
    line) once /ready would answer 200, and terminates it afterwards."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ryzen_llm.serve", "--checkpoint",
                             str(checkpoint), "--host", "127.0.0.1", "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, banner, t0 = None, "", time.time()
        for line in proc.stdout:
            m = re.search(r"on (http://127\.0\.0\.1:\d+);", line)
            if m:
                url, banner = m.group(1), line.strip()
            if line.startswith("ready") or time.time() - t0 > timeout:
                break
        if url is None or proc.poll() is not None:
            raise RuntimeError(f"the server did not start: {banner or line!r}")
        yield url, proc, banner
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
