"""The server as a real subprocess on loopback (`python -m ryzen_llm.serve`, 127.0.0.1, an
ephemeral port), loaded by ryzen_llm.loadtest: streaming /v1/completions, greedy, 32-token
prompts, 16 new tokens (ignore_eos), at fixed concurrency 1, 8 and 32 (closed loop), at a
Poisson arrival rate (open loop), and one client sending 8 or 32 prompts per request (the batch
of one generate() call); each with the server's linear weights in bfloat16 (today's level 3),
int8 and int4 (`--weights`), a server per format, the scenario named with it.

Each scenario records in extra_info: p50/p95/p99 end-to-end latency, time to first token,
requests/s and generated tokens/s, errors by status, and the server process's CPU utilisation
and peak RSS over the scenario. The in-process peers (the engine without HTTP, and Hugging Face
generate()) are in bench_generate.py. Nothing asserts on time; the soak scenario (`slow`, 10
minutes) asserts only on errors and on the server's RSS growth.

    pytest benchmarks/bench_serve.py --benchmark-only              # the scenarios
    pytest benchmarks/bench_serve.py --benchmark-only -m slow      # the soak
    PYTHONPATH=. python benchmarks/bench_serve.py [--json out.json] [--threads 1] [--infer]
        [--weights bfloat16 int8 int4]

The standalone script runs the same scenarios, then times the peers without HTTP in the same
run, in this process: HF generate() in float32 and bfloat16, then the engine in each weight
format, batch 1, 8, 32. The soak runs the bfloat16 server only.
The load generator (ryzen_llm.loadtest) runs on the same cores as the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

if __name__ == "__main__":  # standalone: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ResourceMonitor  # noqa: E402
from benchmarks._serving import NEW_TOKENS, make_checkpoint, server_process  # noqa: E402
from ryzen_llm.bench_report import ENGINE_WEIGHTS  # noqa: E402
from ryzen_llm.loadtest import format_result, run_load  # noqa: E402

WEIGHTS = ENGINE_WEIGHTS  # bfloat16, int8, int4

# name -> run_load arguments; each bounded in requests and in time
SCENARIOS = {
    "concurrency 1": dict(concurrency=1, max_requests=24, duration=30),
    "concurrency 8": dict(concurrency=8, max_requests=48, duration=30),
    "concurrency 32": dict(concurrency=32, max_requests=96, duration=30),
    "Poisson 8/s": dict(rate=8.0, concurrency=64, duration=10),
    # one client batching its prompts, the shape of one generate() call over a batch
    "8 prompts per request": dict(concurrency=1, prompts_per_request=8, max_requests=16,
                                  duration=30),
    "32 prompts per request": dict(concurrency=1, prompts_per_request=32, max_requests=8,
                                   duration=30),
}
SOAK_S = float(os.environ.get("RYZEN_LLM_SOAK_SECONDS", 600))  # shorten only to try it out
RESULTS: dict[str, dict] = {}  # read by benchmarks/conftest.py for the summary


def measure(url: str, pid: int, prompts: list[str], stream: bool = True,
            **load) -> tuple[dict, ResourceMonitor]:
    """Warms the connections, then runs one scenario while monitoring the server process."""
    asyncio.run(run_load(url, concurrency=load.get("concurrency", 1), duration=30,
                         max_requests=load.get("concurrency", 1), prompts=prompts,
                         max_new_tokens=1, stream=stream))
    with ResourceMonitor(pid) as monitor:
        res = asyncio.run(run_load(url, prompts=prompts, max_new_tokens=NEW_TOKENS,
                                   stream=stream, **load))
    return res, monitor


def in_process_peers(path: Path, prompts: list[str], reps: int, exact: bool,
                     weights: tuple[str, ...] = WEIGHTS) -> dict:
    """Median ms of one batch of generation without HTTP: the engine in each weight format,
    and HF generate()."""
    import statistics
    import time

    from benchmarks._serving import HF_DTYPES, hf_generate, hf_gpt2
    from ryzen_llm.engine import Engine, SamplingParams

    def median_ms(fn, n):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    # HF first: an engine, even idle, keeps an OpenMP team that would slow the HF peer's
    # parallel regions on this thread (see ryzen_llm/engine/openmp.py)
    out = {}
    for impl, dtype in HF_DTYPES.items():
        hf, out[impl] = hf_gpt2(dtype)
        for batch in (1, 8, 32) if hf is not None else ():
            n = reps if batch == 1 else max(3, reps // 4)
            name = str(dtype).removeprefix("torch.")
            out[f"HF generate() {name} batch {batch}"] = median_ms(hf_generate(hf, batch), n)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for w in weights:  # one engine at a time: an idle one keeps its OpenMP team
        e = Engine.from_checkpoint(path, exact=exact, weights=w)
        e.wait_ready()
        for batch in (1, 8, 32):
            group = [prompts[j % len(prompts)] for j in range(batch)]
            n = reps if batch == 1 else max(3, reps // 4)
            out[f"engine {w} batch {batch}"] = median_ms(lambda: e.generate(group, params), n)
        e.stop()
    return out


@pytest.fixture(scope="module")
def server(seed_checkpoint, request):
    """(url, process, banner, weights) of a server with the weights of request.param
    (indirect parametrization; bfloat16 without one)."""
    path, _ = seed_checkpoint
    weights = getattr(request, "param", "bfloat16")
    with server_process(path, "--weights", weights) as (url, proc, banner):
        yield url, proc, banner, weights


def record(benchmark, name: str, res, monitor, banner: str, weights: str) -> dict:
    d = res.to_dict(with_samples=False)
    info = {"scenario": "serve", "name": name, "weights": weights, **d, **monitor.result(),
            "server": banner}
    benchmark.extra_info.update(info)
    RESULTS[name] = info
    return info


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("server", WEIGHTS, indirect=True)
def test_serve(benchmark, server, seed_checkpoint, name):
    url, proc, banner, weights = server
    _, prompts = seed_checkpoint
    benchmark.group = "serve (subprocess, streaming /v1/completions)"
    res, monitor = benchmark.pedantic(measure, args=(url, proc.pid, prompts),
                                      kwargs=SCENARIOS[name], rounds=1, iterations=1)
    record(benchmark, f"{name}, {weights}", res, monitor, banner, weights)


@pytest.mark.slow
def test_serve_soak(benchmark, server, seed_checkpoint):
    """Closed loop at concurrency 8 for SOAK_S seconds: no errors, the server's RSS grows less
    than 5% from the end of the first minute (allocator and caches warm) to the end; p95 of the
    first and the last minute recorded (not asserted: a time)."""
    url, proc, banner, weights = server
    _, prompts = seed_checkpoint
    minute = min(60.0, SOAK_S / 3)
    benchmark.group = "serve soak"
    res, monitor = benchmark.pedantic(
        measure, args=(url, proc.pid, prompts),
        kwargs=dict(concurrency=8, duration=SOAK_S), rounds=1, iterations=1)
    info = record(benchmark, f"soak {SOAK_S:g} s, concurrency 8, {weights}", res, monitor,
                  banner, weights)
    rss_base, rss_end = monitor.rss_at(minute), monitor.samples[-1][1]
    growth = (rss_end - rss_base) / rss_base
    first, last = res.window(0, minute), res.window(SOAK_S - minute, SOAK_S)
    benchmark.extra_info.update(
        rss_after_first_minute_mb=round(rss_base / 2**20, 1),
        rss_growth=round(growth, 4), p95_first_minute_ms=first["p95_ms"],
        p95_last_minute_ms=last["p95_ms"], window_s=minute)
    assert info["error_count"] == 0, info["errors"]
    assert growth < 0.05, f"server RSS grew {growth:.1%} ({rss_base} -> {rss_end} bytes)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serving scenarios without pytest: "
                                 + __doc__.splitlines()[0])
    ap.add_argument("--json", help="write every scenario's results here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the server")
    ap.add_argument("--no-exact-batching", action="store_true")
    ap.add_argument("--infer", action="store_true",
                    help="POST /infer without streaming (no time to first token) instead of "
                         "streaming /v1/completions")
    ap.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS),
                    help="the servers' (and in-process engines') weight formats, in turn")
    ap.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS),
                    help="run only these scenarios")
    ap.add_argument("--reps", type=int, default=12,
                    help="repetitions of the in-process peers at batch 1 (0: skip them)")
    args = ap.parse_args(argv)
    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--no-exact-batching"] if args.no_exact_batching else []
    path, prompts = make_checkpoint(Path(tempfile.mkdtemp(prefix="bench_serve-")))
    results = {}
    for weights in args.weights:
        with server_process(path, *extra, "--weights", weights) as (url, proc, banner):
            print(banner)
            for name in args.scenarios:
                res, monitor = measure(url, proc.pid, prompts, stream=not args.infer,
                                       **SCENARIOS[name])
                d = {**res.to_dict(with_samples=False), **monitor.result(), "weights": weights}
                results[f"{name}, {weights}"] = d
                print(f"{name}, {weights}: {format_result(d)}\n  server CPU "
                      f"{d['cpu_percent']:.0f}% (of one core), peak RSS "
                      f"{d['peak_rss_mb']:.0f} MB")
    if args.reps:
        results["in_process_median_ms"] = peers = in_process_peers(
            path, prompts, args.reps, not args.no_exact_batching, tuple(args.weights))
        for k, v in peers.items():
            print(f"{k}: {v:.1f} ms" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
