"""AdamW on the seed model's parameters (about 10.5 M): FusedAdamW vs torch.optim.AdamW in its
single-tensor, foreach and fused=True modes, float32; and on bfloat16 parameters, FusedAdamW
(float32 master copies and moments) beside torch's fused=True (moments in bfloat16, no master:
fewer bytes, less precision); and float32 parameters with bfloat16 moments (FusedAdamW's
state_dtype, the trainer's default from level 3; stochastic rounding), beside torch's fused=True
with its float32 moments. Each dtype is a group of its own, so that the report compares like
with like.

Run: PYTHONPATH=. pytest benchmarks/bench_adamw.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.config import ModelConfig
from ryzen_llm.model import ScaledTransformerModel
from ryzen_llm.ops._extension import extension_error, extension_loaded

HYPER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_optimizer(name: str, params, state_dtype=None):
    if name == "fused":
        if not extension_loaded():
            pytest.skip(f"FUSED adamw UNAVAILABLE ({extension_error()}): not timed")
        from ryzen_llm.ops.adamw import FusedAdamW

        return FusedAdamW(params, **HYPER, state_dtype=state_dtype)
    mode = {"torch-single": dict(foreach=False), "torch-foreach": dict(foreach=True),
            "torch-fused": dict(fused=True)}[name]
    return torch.optim.AdamW(params, **HYPER, **mode)


@pytest.mark.parametrize(
    "name, dtype",
    [("fused", "fp32"), ("torch-single", "fp32"), ("torch-foreach", "fp32"),
     ("torch-fused", "fp32"), ("fused", "bf16"), ("torch-fused", "bf16"),
     ("fused", "fp32-bf16-moments"), ("torch-fused", "fp32-bf16-moments")],
)
def test_adamw_step(benchmark, name, dtype):
    torch.manual_seed(0)
    model = ScaledTransformerModel(ModelConfig())
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    bf16_moments = dtype == "fp32-bf16-moments" and name == "fused"
    opt = make_optimizer(name, params, torch.bfloat16 if bf16_moments else None)
    opt.step()  # state allocation outside the timing
    benchmark.group = f"adamw step (seed model) {dtype}"
    benchmark.pedantic(opt.step, rounds=10, iterations=1, warmup_rounds=2)
    n = sum(p.numel() for p in params)
    # Memory-bound minimum per parameter: fp32 p, g, m, v read + p, m, v written = 28 bytes;
    # bf16 with fp32 master: p, g (2+2) + master, m, v (12) read, p (2) + master, m, v written;
    # fp32 with bf16 moments: p, g (8) + m, v (4) read, p (4) + m, v (4) written.
    per = {"fp32": 28, "bf16": 30}.get(dtype, 20 if bf16_moments else 28)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(impl=name, dtype=dtype, params=n, median_ms=round(median * 1e3, 3),
                                **{"GB/s": round(per * n / median / 1e9, 2)})
