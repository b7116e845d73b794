"""CUDA benchmarks in one process: each fused op against plain PyTorch eager and torch.compile of
the same reference (attention also against F.scaled_dot_product_attention at T = 128..2048), and
the seed model's training micro-step (batch 16 x 128) at level 0, level 3, eager bf16 autocast +
SDPA, and torch.compile (default and mode="reduce-overhead").

    python benchmarks/bench_cuda.py [--json out.json]

Times are medians of CUDA-event timings after warm-up, side by side in one process; every row
says what ran. A compile that fails is reported as failed, not replaced by something else."""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
from ryzen_llm.ops import reference
from ryzen_llm.ops.dispatch import KernelSet

WARMUP, REPEATS = 3, 10


class Results(list):
    """The rows measured so far, rewritten to the JSON file (if any) after each one."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(list(self), f, indent=1)


def time_ms(fn) -> float:
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn, inputs):
    """Forward + backward of fn(*inputs) (a scalar of the output is backpropagated)."""
    def step():
        out = fn(*inputs)
        (out if out.dim() == 0 else out.float().square().mean()).backward()
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
    return step


def compare(name, impls, inputs, results):
    row = {"op": name}
    for label, fn in impls.items():
        try:
            row[label] = time_ms(fwd_bwd(fn, inputs))
        except Exception as exc:  # a failed compile or kernel is reported, not hidden
            row[label] = None
            row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    base = row.get("eager")
    cells = []
    for label in impls:
        t = row.get(label)
        cells.append(f"{label} {'FAILED' if t is None else f'{t:.3f} ms'}"
                     + (f" ({base / t:.2f}x)" if t and base and label != "eager" else ""))
    print(f"{name:<44} " + " | ".join(cells), flush=True)
    results.append(row)


def rand(*shape, dtype=torch.bfloat16, grad=True, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_(grad)


def bench_attention(results):
    from ryzen_llm.ops.causal_attention import causal_attention

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=64**-0.5)  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        for T in (128, 256, 512, 1024, 2048):
            B = max(1, 16 * 128 // T)
            q, k, v = (rand(B, 8, T, 64, dtype=dtype) for _ in range(3))
            ref = lambda q, k, v: reference.causal_attention(q, k, v, None, 64**-0.5)  # noqa: E731
            compare(f"causal_attention {tag} B{B} nh8 T{T} hs64", {
                "eager": ref, "compile": torch.compile(ref), "sdpa": sdpa,
                "fused": lambda q, k, v: causal_attention(q, k, v, None, 64**-0.5)},
                [q, k, v], results)


def bench_ops(results):
    from ryzen_llm.ops.bias_gelu import bias_gelu
    from ryzen_llm.ops.gelu_feed_forward import gelu_feed_forward
    from ryzen_llm.ops.linear_cross_entropy import linear_cross_entropy

    N, C, Fh, V = 16 * 128, 512, 1024, 2048
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        x, b = rand(N, Fh, dtype=dtype), rand(Fh, dtype=dtype)
        compare(f"bias_gelu {tag} ({N}x{Fh})", {
            "eager": reference.bias_gelu, "compile": torch.compile(reference.bias_gelu),
            "fused": bias_gelu}, [x, b], results)
        ff = [rand(N, C, dtype=dtype), rand(Fh, C, dtype=dtype, scale=C**-0.5), rand(Fh, dtype=dtype),
              rand(C, Fh, dtype=dtype, scale=Fh**-0.5), rand(C, dtype=dtype)]
        compare(f"gelu_feed_forward {tag} ({N}x{C}x{Fh})", {
            "eager": reference.gelu_feed_forward, "compile": torch.compile(reference.gelu_feed_forward),
            "fused": gelu_feed_forward}, ff, results)
        h, w = rand(N, C, dtype=dtype), rand(V, C, dtype=dtype, scale=C**-0.5)
        targets = torch.randint(0, V, (N,), device="cuda")
        compare(f"linear_cross_entropy {tag} ({N}x{C}, V {V})", {
            "eager": lambda h, w: reference.linear_cross_entropy(h, w, targets),
            "compile": torch.compile(lambda h, w: reference.linear_cross_entropy(h, w, targets)),
            "fused": lambda h, w: linear_cross_entropy(h, w, targets)}, [h, w], results)
    # AdamW and quantize: no backward; time the op itself.
    from ryzen_llm.ops.adamw import FusedAdamW
    from ryzen_llm.ops.quantize import quantize_blockwise

    model = ScaledTransformerModel(ModelConfig()).cuda()
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    row = {"op": "adamw (seed model params)"}
    for label, opt in (("eager_foreach", torch.optim.AdamW(params, foreach=True)),
                       ("torch_fused", torch.optim.AdamW(params, fused=True)),
                       ("fused", FusedAdamW(params))):
        row[label] = time_ms(opt.step)
    print(f"{row['op']:<44} " + " | ".join(f"{k} {v:.3f} ms" for k, v in row.items() if k != "op"))
    results.append(row)
    x = torch.randn(16, 8, 128, 64, device="cuda")
    row = {"op": "quantize_blockwise int8 (1M values)"}
    row["eager"] = time_ms(lambda: reference.quantize_blockwise(x, 64, 8, False, 0, 0))
    row["fused"] = time_ms(lambda: quantize_blockwise(x, 64, 8))
    print(f"{row['op']:<44} eager {row['eager']:.3f} ms | fused {row['fused']:.3f} ms")
    results.append(row)


def plain_step(model, sdpa: bool, bf16: bool, compile_mode: str | None):
    model.kernels = KernelSet(0)
    if sdpa:
        model.kernels._fn["causal_attention"] = (
            lambda q, k, v, m, s: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s))
    for m in model.modules():
        if hasattr(m, "kernels"):
            m.kernels = model.kernels
    loss_fn = model.loss if compile_mode is None else torch.compile(model.loss, mode=compile_mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(idx, targets):
        with ctx():
            loss = loss_fn(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train_step(results):
    config = ModelConfig()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (16, config.max_seq_len), generator=g).cuda()
    targets = torch.roll(idx, -1, dims=1)
    runs = {
        "level 0 (fp32 eager reference)": lambda m: TrainStep(m, level=0),
        "level 3 (fused, bf16 autocast, CUDA graph)": lambda m: TrainStep(m, level=3),
        "level 3 without the CUDA graph": lambda m: TrainStep(m, level=3, cuda_graph=False),
        "eager bf16 autocast + SDPA": lambda m: plain_step(m, True, True, None),
        "torch.compile default (bf16 + SDPA)": lambda m: plain_step(m, True, True, "default"),
        "torch.compile reduce-overhead (bf16 + SDPA)": lambda m: plain_step(m, True, True, "reduce-overhead"),
    }
    for name, make in runs.items():
        torch.manual_seed(0)
        model = ScaledTransformerModel(config).cuda()
        try:
            step = make(model)
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(lambda: step(idx, targets))
            peak = torch.cuda.max_memory_allocated() / 2**20
            extra = ""
            if isinstance(step, TrainStep):
                extra = f" graph: {step.graph_status};"
                used = {op: sorted(s["calls"]) for op, s in step.kernels.summary().items() if s["calls"]}
                extra += f" ops: {used}"
            print(f"micro-step {name:<44} {ms:8.2f} ms  {16 * 128 / ms * 1e3:10.0f} tok/s  "
                  f"peak {peak:7.0f} MiB{extra}", flush=True)
            results.append({"op": f"micro-step {name}", "ms": ms, "peak_mib": peak})
        except Exception as exc:
            print(f"micro-step {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            results.append({"op": f"micro-step {name}", "error": str(exc)[:300]})
        del model
        torch.cuda.empty_cache()


def profile_level3_step(rows: int = 20) -> None:
    """The CUDA kernels of one level-3 micro-step (launched one by one), by total device time."""
    from torch.profiler import ProfilerActivity, profile

    config = ModelConfig()
    torch.manual_seed(0)
    model = ScaledTransformerModel(config).cuda()
    idx = torch.randint(0, config.vocab_size, (16, config.max_seq_len), device="cuda")
    step = TrainStep(model, level=3, cuda_graph=False)  # the kernels, not one graph replay
    for _ in range(3):
        step(idx, idx)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(idx, idx)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows), flush=True)
    del model, step
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=("train", "attention", "ops"),
                        help="run only this part (default: all three)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIPPED: CUDA unavailable; nothing was benchmarked")
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    results = Results(args.json)
    # The training step first, then attention, then the other ops: a run cut short by a time
    # limit still has the numbers that matter most, and the JSON holds every finished row.
    if args.only in (None, "train"):
        bench_train_step(results)
    if args.only is None:
        try:
            profile_level3_step()
        except Exception:  # the profile is a diagnostic: its failure must not stop the benchmarks
            traceback.print_exc()
    if args.only in (None, "attention"):
        bench_attention(results)
    if args.only in (None, "ops"):
        bench_ops(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
