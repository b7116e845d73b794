"""Benchmark report: saved pytest-benchmark JSONs (and loadtest JSONs) -> a Markdown page with
tables and PNG plots.

    pytest benchmarks --benchmark-only --benchmark-json=results/bench.json
    python -m ryzen_llm.loadtest --url http://127.0.0.1:8000 --rate 5 --stream --json results/lt.json
    python -m ryzen_llm.bench_report results/*.json --out results/report

writes results/report/report.md and its PNGs: speedup per op (fused vs reference vs
torch.compile), the training micro-step per level beside the plain-PyTorch peers, generation
throughput against batch size (ryzen_llm vs Hugging Face generate()), and server latency
(p50/p95/p99 per scenario). Every number comes from the JSON files; what they lack reads "not
measured" (a benchmark that was skipped, or a peer whose package was missing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NOT_MEASURED = "not measured"
OP_COLUMNS = {"fused": ("fused",), "reference": ("reference",),
              "torch.compile": ("compile", "compiled_reference")}
SCENARIO_KINDS = ("generate", "serve")


def _fmt(x: Any, spec: str = ",.1f", suffix: str = "") -> str:
    if x is None:
        return NOT_MEASURED
    return f"{x:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


# -- loading ---------------------------------------------------------------------------------
def load(paths: list[Path]) -> tuple[list[dict], list[dict], list[str]]:
    """(pytest-benchmark entries, loadtest results, notes on files that were neither)."""
    benches, loadtests, notes = [], [], []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"{path}: not read ({exc})")
            continue
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            for b in data["benchmarks"]:
                benches.append({**b, "_source": str(path),
                                "_machine": data.get("machine_info", {})})
        elif isinstance(data, dict) and data.get("kind") == "loadtest":
            loadtests.append({**data, "name": data.get("name") or Path(path).stem})
        elif isinstance(data, dict) and any(
                isinstance(v, dict) and "latency_ms" in v for v in data.values()):
            for name, v in data.items():  # benchmarks/bench_serve.py --json: scenario -> result
                if isinstance(v, dict) and "latency_ms" in v:
                    loadtests.append({**v, "name": f"{Path(path).stem}: {name}"})
        else:
            notes.append(f"{path}: neither a pytest-benchmark nor a loadtest JSON; ignored")
    return benches, loadtests, notes


def _info(b: dict) -> dict:
    return b.get("extra_info") or {}


def _median_ms(b: dict) -> float | None:
    m = (b.get("stats") or {}).get("median")
    return None if m is None else m * 1e3


# -- sections --------------------------------------------------------------------------------
def op_rows(benches: list[dict]) -> dict[str, dict]:
    """group -> {fused, reference, torch.compile: median ms or None; "other": {impl: ms}} for
    the op benchmarks (those recording an impl), other peers (SDPA, torch's AdamW) aside."""
    groups: dict[str, dict] = {}
    for b in benches:
        info = _info(b)
        impl = info.get("impl") or (b.get("params") or {}).get("impl")
        if impl is None or info.get("scenario") in SCENARIO_KINDS or "kind" in info:
            continue
        row = groups.setdefault(b.get("group") or b["name"],
                                {**dict.fromkeys(OP_COLUMNS), "other": {}})
        col = next((c for c, names in OP_COLUMNS.items() if impl in names), None)
        if col is None:
            row["other"][str(impl)] = _median_ms(b)
        else:
            row[col] = _median_ms(b)
    return {g: r for g, r in groups.items() if any(r[c] is not None for c in OP_COLUMNS)}


def ops_section(benches, out: Path, plt) -> list[str]:
    lines = ["## Fused ops: fused vs reference vs torch.compile", ""]
    rows = op_rows(benches)
    if not rows:
        return lines + [f"Op benchmarks: {NOT_MEASURED}.", ""]

    def ratio(a, b):
        return None if a is None or b is None else a / b

    table = []
    for g, r in sorted(rows.items()):
        table.append([g, *(_fmt(r[c], ",.3f") for c in OP_COLUMNS),
                      _fmt(ratio(r["reference"], r["fused"]), ".2f", "x"),
                      _fmt(ratio(r["torch.compile"], r["fused"]), ".2f", "x"),
                      ", ".join(f"{k} {v:,.3f}" for k, v in r["other"].items()) or "-"])
    lines += ["Median ms per call; speedup = the other's time / fused time (> 1: fused faster).",
              "", *_table(["benchmark", "fused ms", "reference ms", "torch.compile ms",
                           "fused vs reference", "fused vs torch.compile", "other peers, ms"],
                          table), ""]
    names = sorted(n for n in rows if rows[n]["reference"] is not None)
    if not names:
        return lines + [f"Speedup plot: {NOT_MEASURED} (no reference timings).", ""]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5))
    for k, (col, color) in enumerate((("fused", "tab:green"), ("torch.compile", "tab:orange"))):
        pts = [(y + 0.4 * k, ratio(rows[n]["reference"], rows[n][col]))
               for y, n in enumerate(names)]
        pts = [(y, v) for y, v in pts if v is not None]  # no bar: not measured
        ax.barh([y for y, _ in pts], [v for _, v in pts], height=0.4, color=color,
                label=f"{col} (no bar: not measured)")
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", lw=1)
    ax.set_yticks([y + 0.2 for y in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the plain-PyTorch reference (log scale; > 1: faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ops_speedup.png", dpi=110)
    plt.close(fig)
    return lines + ["![speedup per op](ops_speedup.png)", ""]


def train_section(benches, out: Path, plt) -> list[str]:
    lines = ["## Training micro-step (seed model, 16 x 128) per level beside the peers", ""]
    rows = [b for b in benches if _info(b).get("kind") in ("peer", "candidate")
            and "ms_per_step" in _info(b)]
    if not rows:
        return lines + [f"Training micro-step: {NOT_MEASURED}.", ""]
    peers = [b for b in rows if _info(b)["kind"] == "peer"]
    best = min((_info(b)["ms_per_step"] for b in peers), default=None)
    table = []
    for b in rows:
        i = _info(b)
        note = ("fell back to reference: " + ", ".join(i["fell_back_to_reference"])
                if i.get("fell_back_to_reference") else "")
        table.append([i.get("name") or b["name"], i["kind"], _fmt(i["ms_per_step"]),
                      _fmt(i.get("tokens_per_s"), ",.0f"),
                      _fmt(None if i.get("mfu_vs_matmul_peak") is None
                           else 100 * i["mfu_vs_matmul_peak"], ".0f", "%"),
                      _fmt(None if i.get("mfu_vs_int8_peak") is None
                           else 100 * i["mfu_vs_int8_peak"], ".0f", "%"),
                      _fmt(None if best is None else best / i["ms_per_step"], ".2f", "x"),
                      _fmt(i.get("peak_rss_mb"), ",.0f", " MB"), note])
    lines += _table(["configuration", "kind", "ms/step", "tokens/s", "MFU", "MFU vs int8 peak",
                     "vs best peer",
                     "peak RSS", "note"], table)
    if best is None:
        lines += ["", f"Peers: {NOT_MEASURED}."]
    names = [r[0] for r in table]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    colors = ["tab:gray" if _info(b)["kind"] == "peer" else "tab:green" for b in rows]
    ax.barh(names, [_info(b)["ms_per_step"] for b in rows], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("ms per micro-step (median; gray: plain-PyTorch peers)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "train_step.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![micro-step per level](train_step.png)", ""]


# The engine's weight formats benchmarked (benchmarks/bench_generate.py), bfloat16 first: its
# impl is "ryzen_llm" (the engine's default at level 3), the others "ryzen_llm_<format>".
ENGINE_WEIGHTS = ("bfloat16", "int8", "int4")


def engine_impl(weights: str) -> str:
    return "ryzen_llm" if weights == "bfloat16" else f"ryzen_llm_{weights}"


def generate_section(benches, out: Path, plt) -> list[str]:
    lines = ["## Generation throughput against batch size (in-process)", ""]
    rows = [b for b in benches if _info(b).get("scenario") == "generate"]
    if not rows:
        return lines + [f"Generation: {NOT_MEASURED}.", ""]
    by = {(_info(b)["impl"], _info(b)["batch"]): _info(b) for b in rows}
    hf_impls = {"hf_transformers": "HF generate() float32",
                "hf_transformers_bf16": "HF generate() bfloat16"}
    quantized = [w for w in ENGINE_WEIGHTS[1:] if any(k[0] == engine_impl(w) for k in by)]
    impls = {"ryzen_llm": "ryzen_llm Engine (bfloat16)",
             **{engine_impl(w): f"ryzen_llm Engine ({w})" for w in quantized}, **hf_impls}
    batches = sorted({k[1] for k in by})
    table = []
    for n in batches:
        ours = by.get(("ryzen_llm", n))
        cells = [str(n), _fmt(ours and ours.get("tokens_per_s"), ",.0f"),
                 _fmt(ours and ours.get("ms_per_token"), ".2f")]
        for w in quantized:
            q = by.get((engine_impl(w), n))
            cells += [_fmt(q and q.get("tokens_per_s"), ",.0f"),
                      _fmt(q["tokens_per_s"] / ours["tokens_per_s"] if q and ours else None,
                           ".2f", "x")]
        hf = [by[(impl, n)] for impl in hf_impls if (impl, n) in by]
        cells += [_fmt(by.get((impl, n), {}).get("tokens_per_s"), ",.0f") for impl in hf_impls]
        best = max((i["tokens_per_s"] for i in hf if "tokens_per_s" in i), default=None)
        cells.append(_fmt(ours["tokens_per_s"] / best if ours and best else None, ".2f", "x"))
        table.append(cells)
    any_i = next(iter(by.values()))
    lines += [f"{any_i.get('prompt_tokens', '?')}-token prompts, {any_i.get('new_tokens', '?')} "
              "new tokens, greedy; ms/token = batch time / new tokens. ryzen_llm = the engine "
              "with bfloat16 weights; int8 and int4 are the engine with those weights, their "
              "ratio to it. The HF peer runs in both dtypes; the last ratio is bfloat16 "
              "ryzen_llm to the faster of the two at each batch.", "",
              *_table(["batch", "ryzen_llm tokens/s", "ryzen_llm ms/token",
                       *(h for w in quantized for h in (f"{w} tokens/s", f"{w} vs bfloat16")),
                       "HF fp32 tokens/s", "HF bf16 tokens/s", "ryzen_llm vs faster HF"],
                      table)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, label in impls.items():
        pts = [(n, by[(impl, n)]["tokens_per_s"]) for n in batches if (impl, n) in by]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
        else:
            ax.plot([], [], label=f"{label}: {NOT_MEASURED}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(n) for n in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens/s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "generate_throughput.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![throughput against batch size](generate_throughput.png)", ""]


def serve_section(benches, loadtests, out: Path, plt) -> list[str]:
    lines = ["## Server latency (end to end, over HTTP on loopback)", ""]
    runs = [{**_info(b), "name": _info(b).get("name") or b["name"]} for b in benches
            if _info(b).get("scenario") == "serve"] + loadtests
    if not runs:
        return lines + [f"Server scenarios: {NOT_MEASURED}.", ""]
    table = []
    for r in runs:
        lat, ttft = r.get("latency_ms") or {}, r.get("ttft_ms") or {}
        errors = ", ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items()) or "0"
        table.append([r["name"], str(r.get("completed", NOT_MEASURED)), errors,
                      *(_fmt(lat.get(q)) for q in ("p50", "p95", "p99")),
                      *(_fmt(ttft.get(q)) for q in ("p50", "p95")),
                      _fmt(r.get("requests_per_s"), ".2f"), _fmt(r.get("tokens_per_s"), ",.0f"),
                      _fmt(r.get("cpu_percent"), ".0f", "%"),
                      _fmt(r.get("peak_rss_mb"), ",.0f", " MB")])
    lines += ["Latency in ms; TTFT = time to the first streamed token (streaming runs only); "
              "CPU % of one core and peak RSS of the server process.", "",
              *_table(["scenario", "ok", "errors", "p50", "p95", "p99", "TTFT p50", "TTFT p95",
                       "requests/s", "tokens/s", "CPU", "peak RSS"], table)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 2), 4))
    for k, q in enumerate(("p50", "p95", "p99")):
        vals = [(r.get("latency_ms") or {}).get(q) or 0.0 for r in runs]
        ax.bar([x + 0.27 * (k - 1) for x in range(len(runs))], vals, width=0.27, label=q)
    ax.set_xticks(range(len(runs)), [r["name"] for r in runs], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("end-to-end latency, ms")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serve_latency.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![latency percentiles per scenario](serve_latency.png)", ""]


def build(paths: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    benches, loadtests, notes = load(paths)
    machine = next((b["_machine"] for b in benches if b.get("_machine")), {})
    cpu = machine.get("cpu", {})
    lines = ["# ryzen_llm benchmark report", "",
             "Sources: " + (", ".join(f"`{p}`" for p in paths) or "none") + ".", ""]
    if machine:
        lines += [f"Machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, "
                  f"{cpu.get('count', '?')} logical CPUs, Python {machine.get('python_version', '?')}.",
                  ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ops_section(benches, out, plt)
    lines += train_section(benches, out, plt)
    lines += generate_section(benches, out, plt)
    lines += serve_section(benches, loadtests, out, plt)
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ryzen_llm.bench_report",
                                description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", type=Path, help="pytest-benchmark or loadtest JSON files")
    p.add_argument("--out", type=Path, default=Path("results/report"),
                   help="folder for report.md and the PNGs (default: results/report)")
    args = p.parse_args(argv)
    missing = [str(x) for x in args.json if not x.is_file()]
    if missing:
        p.error("no such file: " + ", ".join(missing))
    report = build(args.json, args.out)
    print(f"wrote {report} and {len(list(args.out.glob('*.png')))} plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
