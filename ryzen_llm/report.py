"""The comparison report of a training run folder: report.json, loss_curves.png, console table.

Every figure comes from the runs' measured metrics; each of the seed's criteria is PASS or FAIL
from those values, or NOT MEASURED when the run that would measure it did not happen.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ryzen_llm.config import Config
from ryzen_llm.hardware import environment


def _criterion(passed: bool | None, measured: Any, target: str) -> dict[str, Any]:
    status = "NOT MEASURED" if passed is None else ("PASS" if passed else "FAIL")
    return {"status": status, "measured": measured, "target": target}


def _fallbacks(metrics: dict) -> list[str]:
    """Ops the run's level asked to fuse that ran their reference instead (counted calls)."""
    out = []
    for op, info in metrics.get("ops", {}).items():
        if info["reason"].startswith("FELL BACK") and info["calls"].get("reference"):
            out.append(f"{op}: {info['reason']}")
    return out


def build_report(config: Config, runs: dict[str, dict], run_dir: Path) -> dict[str, Any]:
    targets = config.targets
    base, opt = runs.get("baseline"), runs.get("optimized")
    comparison: dict[str, Any] = {}
    criteria: dict[str, Any] = {}
    both = base is not None and opt is not None and base["tokens_per_s"] and opt["tokens_per_s"]
    if both:
        speedup = opt["tokens_per_s"] / base["tokens_per_s"] - 1
        comparison["speedup"] = speedup
        comparison["throughput_gain_tokens_per_s"] = opt["tokens_per_s"] - base["tokens_per_s"]
        comparison["time_ratio"] = base["train_time_s"] / opt["train_time_s"]
        criteria["speedup"] = _criterion(
            speedup >= targets.min_speedup, f"{speedup:+.1%}", f">= {targets.min_speedup:+.0%}"
        )
    else:
        criteria["speedup"] = _criterion(None, None, f">= {targets.min_speedup:+.0%}")
    if base and opt and base["final_val_loss"] is not None and opt["final_val_loss"] is not None:
        diff = opt["final_val_loss"] - base["final_val_loss"]
        comparison["final_val_loss_diff"] = diff
        criteria["final_loss_difference"] = _criterion(
            abs(diff) < targets.max_final_loss_diff, f"{diff:+.4f}",
            f"|diff| < {targets.max_final_loss_diff}",
        )
    else:
        criteria["final_loss_difference"] = _criterion(
            None, None, f"|diff| < {targets.max_final_loss_diff}"
        )
    memory_run = opt or base
    if memory_run:
        peak_mb = memory_run["memory"]["peak_rss"] / 2**20
        criteria["memory"] = _criterion(
            peak_mb < targets.max_memory_mb,
            f"{peak_mb:.0f} MiB peak RSS ({memory_run['which']})",
            f"< {targets.max_memory_mb:.0f} MiB",
        )
    final_run = opt or base
    if final_run and final_run["final_val_loss"] is not None:
        criteria["convergence"] = _criterion(
            final_run["final_val_loss"] < targets.max_final_loss,
            f"{final_run['final_val_loss']:.4f} final validation loss ({final_run['which']})",
            f"< {targets.max_final_loss}",
        )
    else:
        criteria["convergence"] = _criterion(None, None, f"< {targets.max_final_loss}")
    nonfinite = [f"{w}: {m['nonfinite']}" for w, m in runs.items() if m.get("nonfinite")]
    criteria["no_nan_or_inf"] = _criterion(not nonfinite, nonfinite or "none", "no NaN/inf")
    ckpt_ok = all("last" in m["checkpoints"] and "best" in m["checkpoints"] for m in runs.values())
    criteria["checkpoints_saved"] = _criterion(
        ckpt_ok and bool(runs), {w: m["checkpoints"] for w, m in runs.items()}, "best and last saved"
    )
    fallbacks = {w: _fallbacks(m) for w, m in runs.items()}
    env = environment()
    if config.training.num_threads > 0:  # the runs set it; the process writing the report not
        env["torch_threads"] = config.training.num_threads
    return {
        "run_dir": str(run_dir),
        "config": config.to_dict(),
        "environment": env,
        "runs": runs,
        "comparison": comparison,
        "criteria": criteria,
        "fallbacks": {w: f for w, f in fallbacks.items() if f},
        "all_passed": all(c["status"] == "PASS" for c in criteria.values()),
    }


def plot_loss_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for which, m in report["runs"].items():
        steps = range(1, len(m["step_losses"]) + 1)
        label = f"{which} (level {m['level']}{', bf16' if m['bf16_autocast'] else ''})"
        line, = ax.plot(steps, m["step_losses"], label=f"{label} train", alpha=0.8)
        if m["epochs"]:
            ax.plot([e["step"] for e in m["epochs"]], [e["val_loss"] for e in m["epochs"]], "o--",
                    color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(f"{report['config']['name']}: baseline vs optimized")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    run_dir = Path(run_dir)
    tmp = run_dir / f".report.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, run_dir / "report.json")
    plot_loss_curves(report, run_dir / "loss_curves.png")


def print_report(report: dict[str, Any]) -> None:
    env = report["environment"]
    print()
    print(f"== {report['config']['name']}: {report['run_dir']} ==")
    print(f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}; "
          f"flags: {' '.join(env['cpu_flags'])}")
    header = f"{'run':<10} {'level':>5} {'bf16':>5} {'steps':>6} {'tok/s':>9} {'time s':>8} " \
             f"{'final val':>9} {'peak RSS':>9} {'tensors':>8}"
    print(header)
    for which, m in report["runs"].items():
        mem = m["memory"]
        val = f"{m['final_val_loss']:.4f}" if m["final_val_loss"] is not None else "-"
        tps = f"{m['tokens_per_s']:,.0f}" if m["tokens_per_s"] else "-"
        print(f"{which:<10} {m['level']:>5} {str(m['bf16_autocast']):>5} {m['steps']:>6} {tps:>9} "
              f"{m['train_time_s']:>8.1f} {val:>9} {mem['peak_rss'] / 2**20:>7.0f}MB "
              f"{mem['tensor_total'] / 2**20:>6.0f}MB")
    for which, m in report["runs"].items():
        used = ", ".join(
            f"{op}={'+'.join(f'{impl}:{n}' for impl, n in info['calls'].items()) or 'not called'}"
            for op, info in m["ops"].items()
        )
        print(f"ops ({which}): {used}")
        print(f"adamw moments ({which}): {m.get('adamw_state_dtype', 'float32')}")
        if m.get("int8_gemm"):
            gemm = m["int8_gemm"]
            print(f"int8 GEMMs ({which}, {gemm['mode']}; M x K x N): " + ", ".join(
                f"{c['M']}x{c['K']}x{c['N']} {c['runs']}" for c in gemm["shapes"]))
        if m.get("cuda_graph", "off") != "off":
            print(f"cuda graph ({which}): {m['cuda_graph']}")
    for which, items in report["fallbacks"].items():
        for item in items:
            print(f"WARNING ({which}): fused op unavailable, ran the reference: {item}")
    for name, c in report["criteria"].items():
        measured = c["measured"] if not isinstance(c["measured"], dict) else "see report.json"
        print(f"[{c['status']}] {name}: {measured} (target {c['target']})")
    print(f"report: {report['run_dir']}/report.json, plot: {report['run_dir']}/loss_curves.png")
