"""Benchmark session plumbing: the seed-size checkpoint shared by the generation and serving
benchmarks, CPU utilisation and peak RSS recorded for every benchmark, scenarios marked `slow`
skipped unless asked for (-m slow), the folder of --benchmark-json created, and summary tables
printed after the session from what the benchmarks recorded."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._common import ResourceMonitor


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr") or ""):
        return  # -m slow, -m "not slow": the marker expression decides
    skip = pytest.mark.skip(reason="slow scenario: run it with -m slow")
    here = Path(__file__).parent
    for item in items:
        if "slow" in item.keywords and here in item.path.parents:
            item.add_marker(skip)


def pytest_sessionstart(session):
    path = session.config.getoption("benchmark_json", None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def seed_checkpoint(tmp_path_factory):
    """(checkpoint path, 32-token prompts) of the seed-size model with random weights."""
    from benchmarks._serving import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("seed_checkpoint"))


@pytest.fixture(autouse=True)
def _resources(request):
    """CPU utilisation and peak RSS of this process during each benchmark, in extra_info
    (a scenario that measured another process, the server, has already recorded its own)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    with ResourceMonitor() as monitor:
        yield
    for k, v in monitor.result().items():
        benchmark.extra_info.setdefault(k, v)


def _train_step_summary(w):
    try:
        from benchmarks.bench_train_step import RESULTS
    except ImportError:
        return
    rows = {k: v for k, v in RESULTS.items() if not k.startswith("_") and "not_measured" not in v}
    missing = {k: v["not_measured"] for k, v in RESULTS.items() if "not_measured" in v}
    if not rows:
        return
    peers = {k: v for k, v in rows.items() if v["kind"] == "peer"}
    best_peer = min(peers, key=lambda k: peers[k]["ms_per_step"]) if peers else None
    w.section("training micro-step, seed model, batch 16 x 128 (medians, same process)")
    peak = RESULTS.get("_matmul_peak_gflops", {})
    w.write_line(
        "matmul peak measured now: "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peak.items())
    )
    w.write_line(f"{'configuration':<52} {'ms/step':>9} {'spread':>8} {'tokens/s':>9} "
                 f"{'MFU':>6} {'MFU int8':>8} {'vs best peer':>12}")
    for name, r in rows.items():
        ratio = peers[best_peer]["ms_per_step"] / r["ms_per_step"] if best_peer else float("nan")
        note = ""
        if r.get("fell_back_to_reference"):
            note = "  FELL BACK to reference: " + ", ".join(r["fell_back_to_reference"])
        int8 = f"{r['mfu_vs_int8_peak']:.0%}" if "mfu_vs_int8_peak" in r else "-"
        w.write_line(
            f"{name:<52} {r['ms_per_step']:>9.1f} {r['spread_ms']:>8.1f} "
            f"{r['tokens_per_s']:>9,.0f} {r['mfu_vs_matmul_peak']:>6.0%} {int8:>8} "
            f"{ratio:>11.2f}x{note}"
        )
    if best_peer:
        w.write_line(f"best peer: {best_peer}")
    for name, why in missing.items():
        w.write_line(f"{name}: not measured ({why})")


def _generate_summary(w):
    try:
        from benchmarks.bench_generate import BATCHES, RESULTS
    except ImportError:
        return
    if not RESULTS:
        return
    from ryzen_llm.bench_report import ENGINE_WEIGHTS, engine_impl

    w.section("generation, seed-size model, 32-token prompts + 16 new tokens (medians)")
    w.write_line(f"{'batch':>5} {'ryzen_llm tok/s':>16} {'ms/token':>9} "
                 + "".join(f"{wt + ' tok/s':>16}" for wt in ENGINE_WEIGHTS[1:])
                 + f"{'HF fp32 tok/s':>16} {'HF bf16 tok/s':>16}")

    def tps(r):
        return (f"{'not measured':>16}" if r is None or "not_measured" in r
                else f"{r['tokens_per_s']:>16,.0f}")

    for b in BATCHES:
        ours = RESULTS.get(("ryzen_llm", b))
        hf = [RESULTS.get((impl, b)) for impl in ("hf_transformers", "hf_transformers_bf16")]
        if ours is None and all(r is None for r in hf):
            continue
        ms = f"{ours['ms_per_token']:>9.2f}" if ours and "ms_per_token" in ours else f"{'':>9}"
        quantized = "".join(tps(RESULTS.get((engine_impl(wt), b))) for wt in ENGINE_WEIGHTS[1:])
        w.write_line(f"{b:>5} {tps(ours)} {ms}{quantized} {tps(hf[0])} {tps(hf[1])}")
    notes = {r["not_measured"] for r in RESULTS.values() if "not_measured" in r}
    for n in notes:
        w.write_line(f"HF transformers generate(): {n}")


def _serve_summary(w):
    try:
        from benchmarks.bench_serve import RESULTS
    except ImportError:
        return
    if not RESULTS:
        return
    w.section("server (subprocess on loopback), streaming /v1/completions, 16 new tokens")
    w.write_line(f"{'scenario':<22} {'requests':>8} {'err':>4} {'p50 ms':>8} {'p95 ms':>8} "
                 f"{'p99 ms':>8} {'TTFT p50':>9} {'tok/s':>7} {'CPU %':>6} {'peak RSS':>9}")

    def f(x, spec=">8.1f"):
        return format(x, spec) if x is not None else format("n/a", spec[:2] + "s")

    for name, r in RESULTS.items():
        lat, ttft = r["latency_ms"], r["ttft_ms"] or {}
        w.write_line(f"{name:<22} {r['completed']:>8} {r['error_count']:>4} {f(lat['p50'])} "
                     f"{f(lat['p95'])} {f(lat['p99'])} {f(ttft.get('p50'), '>9.1f')} "
                     f"{f(r['tokens_per_s'], '>7.0f')} {r['cpu_percent']:>6.0f} "
                     f"{r['peak_rss_mb']:>6.0f} MB")


def _kv_cache_summary(w):
    try:
        from benchmarks.bench_kv_cache import LEVEL, RESULTS
    except ImportError:
        return
    if not RESULTS:
        return
    w.section(f"KV cache, int8 vs fp32 (seed-size model, level {LEVEL}; medians, same process)")
    keys = sorted({k[:2] for k in RESULTS if isinstance(k, tuple)})
    if keys:
        w.write_line(f"{'scenario':<22} {'batch':>5} {'fp32 ms':>8} {'int8 ms':>8} "
                     f"{'int8/fp32':>9} {'fp32 B/token':>12} {'int8 B/token':>12}")
    for scenario, batch in keys:
        a, b = RESULTS.get((scenario, batch, "fp32")), RESULTS.get((scenario, batch, "int8"))
        if a is None or b is None:
            continue
        bytes_a = a.get("kv_bytes_per_token", "")
        bytes_b = b.get("kv_bytes_per_token", "")
        w.write_line(f"{scenario:<22} {batch:>5} {a['median_ms']:>8.3f} {b['median_ms']:>8.3f} "
                     f"{b['median_ms'] / a['median_ms']:>9.2f} {bytes_a:>12} {bytes_b:>12}")
        if "cache_gb_per_s" in a:
            w.write_line(f"{'':<22} cache read: fp32 {a['cache_gb_per_s']:.1f} GB/s "
                         f"({a['cache_mib_read']:.1f} MiB), int8 {b['cache_gb_per_s']:.1f} GB/s "
                         f"({b['cache_mib_read']:.1f} MiB)")
    q = RESULTS.get("quality")
    if q:
        w.write_line(f"quality ({q['model']}):")
        w.write_line(f"  greedy match {q['match_free_running']:.1%} free-running, "
                     f"{q['match_teacher_forced']:.1%} teacher-forced; perplexity through the "
                     f"cache fp32 {q['ppl_cached_fp32']:.4f}, int8 {q['ppl_cached_int8']:.4f} "
                     f"({q['ppl_rel_diff']:+.3%}), full forward {q['ppl_full_forward']:.4f}")


def pytest_terminal_summary(terminalreporter):
    for summary in (_train_step_summary, _generate_summary, _serve_summary, _kv_cache_summary):
        summary(terminalreporter)
