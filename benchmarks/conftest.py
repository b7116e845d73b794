"""Summary tables printed after a benchmark session, from what the benchmarks recorded."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    try:
        from benchmarks.bench_train_step import RESULTS
    except ImportError:
        return
    rows = {k: v for k, v in RESULTS.items() if not k.startswith("_")}
    if not rows:
        return
    peers = {k: v for k, v in rows.items() if v["kind"] == "peer"}
    best_peer = min(peers, key=lambda k: peers[k]["ms_per_step"]) if peers else None
    w = terminalreporter
    w.section("training micro-step, seed model, batch 16 x 128 (medians, same process)")
    peak = RESULTS.get("_matmul_peak_gflops", {})
    w.write_line(
        "matmul peak measured now: "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peak.items())
    )
    w.write_line(f"{'configuration':<36} {'ms/step':>9} {'spread':>8} {'tokens/s':>9} "
                 f"{'MFU':>6} {'vs best peer':>12}")
    for name, r in rows.items():
        ratio = peers[best_peer]["ms_per_step"] / r["ms_per_step"] if best_peer else float("nan")
        note = ""
        if r.get("fell_back_to_reference"):
            note = "  FELL BACK to reference: " + ", ".join(r["fell_back_to_reference"])
        w.write_line(
            f"{name:<36} {r['ms_per_step']:>9.1f} {r['spread_ms']:>8.1f} "
            f"{r['tokens_per_s']:>9,.0f} {r['mfu_vs_matmul_peak']:>6.0%} {ratio:>11.2f}x{note}"
        )
    if best_peer:
        w.write_line(f"best peer: {best_peer}")
