"""Serving latency and throughput of `python -m ryzen_llm.serve`, beside Hugging Face generate().

    PYTHONPATH=. python benchmarks/bench_serve.py [--requests 40] [--json out.json]

The seed-size model (d_model 512, 4 layers, 8 heads, FFN 1024, vocab 2048, context 128; random
weights, a byte-level BPE trained here) is saved as a checkpoint and served by a real server
process. POST /infer with a 32-token prompt and 16 new tokens, greedy, ignore_eos (always 16),
response cache off: latency percentiles at concurrency 1, 8 and 32 (closed loop: each client
sends its next request when the previous one returns) and generated tokens/s.

Peers, measured in this run while the server is idle: the engine called in-process (no HTTP),
and transformers' GPT2LMHeadModel of the same shape (n_embd 512, 4 layers, 8 heads, n_inner
1024, vocab 2048, n_positions 128), greedy generate() of 16 tokens after 32, at batch 1, 8, 32
in fp32. When transformers is not installed the peer reads "not measured". A benchmark, not a
test: nothing asserts on time; targets are printed beside the numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ryzen_llm.checkpoint import save_checkpoint  # noqa: E402
from ryzen_llm.config import Config  # noqa: E402
from ryzen_llm.engine import Engine, SamplingParams  # noqa: E402
from ryzen_llm.model import ScaledTransformerModel  # noqa: E402
from ryzen_llm.tokenizer import Tokenizer  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 32, 16
TARGETS = {"p50_c1_ms": 15.0, "p95_c8_ms": 50.0}


def corpus(max_bytes: int = 3_000_000) -> list[str]:
    texts, total = [], 0
    for f in sorted(Path(os.__file__).parent.glob("*.py")):
        t = f.read_text(errors="ignore")
        texts.append(t)
        total += len(t)
        if total > max_bytes:
            break
    return texts


def make_checkpoint(root: Path) -> tuple[Path, list[str]]:
    texts = corpus()
    tok = Tokenizer.train(texts, vocab_size=2048)
    config = Config()
    config.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = ScaledTransformerModel(config.model)
    path = save_checkpoint(root / "ckpt", model, config.to_dict(), tokenizer_file=tok.save(root))
    # prompts of exactly 32 tokens that survive decode -> encode unchanged
    prompts, ids = [], tok.encode("\n".join(texts[1:4]))
    for start in range(0, len(ids) - PROMPT_TOKENS, 97):
        text = tok.decode(ids[start : start + PROMPT_TOKENS])
        if len(tok.encode(text)) == PROMPT_TOKENS:
            prompts.append(text)
        if len(prompts) == 64:
            break
    return path, prompts


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def load(url: str, prompts: list[str], concurrency: int, n_requests: int):
    import httpx

    body = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "use_cache": False}
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(n_requests))

    async def worker(client):
        nonlocal tokens
        for i in counter:
            t0 = time.perf_counter()
            r = await client.post("/infer", json={**body, "inputs": [prompts[i % len(prompts)]]})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            tokens += r.json()["outputs"][0]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for p in prompts[:concurrency]:  # warm connections
            await client.post("/infer", json={**body, "inputs": [p], "max_new_tokens": 1})
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ms = [x * 1e3 for x in latencies]
    return {"concurrency": concurrency, "requests": len(ms), "p50_ms": pct(ms, 50),
            "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99), "mean_ms": statistics.mean(ms),
            "tokens_per_s": tokens / wall, "requests_per_s": len(ms) / wall}


def engine_direct(path: Path, prompts: list[str], reps: int, exact: bool) -> dict:
    """The same generation called in-process: what HTTP costs on top."""
    e = Engine.from_checkpoint(path, exact=exact)
    e.wait_ready()
    p = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    out = {}
    for batch in (1, 8, 32):
        times = []
        for r in range(reps if batch == 1 else max(3, reps // 4)):
            group = [prompts[(r * batch + j) % len(prompts)] for j in range(batch)]
            t0 = time.perf_counter()
            e.generate(group, p)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[batch] = {"median_ms": med * 1e3, "tokens_per_s": batch * NEW_TOKENS / med}
    e.stop()
    return out


def hf_peer(reps: int) -> dict | str:
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return "not measured (transformers is not installed)"
    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(n_embd=512, n_layer=4, n_head=8, n_inner=1024, vocab_size=2048,
                     n_positions=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    out = {"transformers": transformers.__version__}
    with torch.inference_mode():
        for batch in (1, 8, 32):
            idx = torch.randint(1, 2048, (batch, PROMPT_TOKENS))
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                      attention_mask=torch.ones_like(idx), pad_token_id=0)
            model.generate(idx, **kw)
            times = []
            for _ in range(reps if batch == 1 else max(3, reps // 4)):
                t0 = time.perf_counter()
                model.generate(idx, **kw)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out[batch] = {"median_ms": med * 1e3, "tokens_per_s": batch * NEW_TOKENS / med}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--reps", type=int, default=12, help="repetitions of the in-process peers")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the server and the peers (0: torch's default)")
    ap.add_argument("--no-exact-batching", action="store_true",
                    help="serve without the dummy decode rows (see ryzen_llm/engine.py)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    path, prompts = make_checkpoint(tmp)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--no-exact-batching"] if args.no_exact_batching else []
    info["exact_batching"] = not args.no_exact_batching
    server = subprocess.Popen([sys.executable, "-m", "ryzen_llm.serve", "--checkpoint", str(path),
                               "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    results: dict = {"info": info, "targets": TARGETS}
    try:
        url = None
        for line in server.stdout:
            print("server:", line.rstrip())
            m = re.search(r"on (http://[\d.]+:\d+);", line)
            url = m.group(1) if m else url
            if line.startswith("ready"):
                break
        results["level"] = line
        server_runs = []
        for c in (1, 8, 32):
            r = asyncio.run(load(url, prompts, c, max(args.requests, 2 * c)))
            server_runs.append(r)
            print(f"server  c={c:>2}: p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  {r['tokens_per_s']:7.0f} tok/s  "
                  f"({r['requests']} requests)")
        results["server"] = server_runs
    finally:
        server.terminate()
        server.wait(30)
    results["engine_in_process"] = engine_direct(path, prompts, args.reps,
                                                 not args.no_exact_batching)
    for b, r in results["engine_in_process"].items():
        print(f"engine  batch {b:>2} (no HTTP): {r['median_ms']:7.1f} ms  "
              f"{r['tokens_per_s']:7.0f} tok/s")
    results["hf_generate"] = hf = hf_peer(args.reps)
    if isinstance(hf, str):
        print("HF transformers generate():", hf)
    else:
        for b in (1, 8, 32):
            print(f"HF generate() batch {b:>2}: {hf[b]['median_ms']:7.1f} ms  "
                  f"{hf[b]['tokens_per_s']:7.0f} tok/s  (transformers {hf['transformers']})")
    c1, c8 = results["server"][0], results["server"][1]
    print(f"targets: p50 at c=1 {c1['p50_ms']:.1f} ms (target <= {TARGETS['p50_c1_ms']:g}), "
          f"p95 at c=8 {c8['p95_ms']:.1f} ms (target <= {TARGETS['p95_c8_ms']:g})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
