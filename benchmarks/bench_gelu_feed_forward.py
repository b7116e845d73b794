"""bias_gelu and gelu_feed_forward: fused vs reference vs torch.compile(reference), at the
seed's shapes (N = 16 * 128 tokens, C = 512, F = 1024), float32 and bfloat16.

Run: PYTHONPATH=. pytest benchmarks/bench_gelu_feed_forward.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from benchmarks._common import compiled, run
from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded

B, T, C, F = 16, 128, 512, 1024
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ["fwd", "bwd", "full"]


def impl(name: str, op: str):
    ref = getattr(reference, op)
    if name == "reference":
        return ref
    if name == "compile":
        return compiled(ref)
    if not extension_loaded():
        pytest.skip(f"FUSED {op} UNAVAILABLE (ryzen_llm._C: {extension_error()}): not timed")
    if op == "bias_gelu":
        from ryzen_llm.ops.bias_gelu import bias_gelu as fused
    else:
        from ryzen_llm.ops.gelu_feed_forward import gelu_feed_forward as fused
    return fused


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "reference", "compile"])
def test_bias_gelu(benchmark, name, dtype, mode):
    dt = DTYPES[dtype]

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B * T, F, generator=g).to(dt).requires_grad_()
        b = torch.randn(F, generator=g).to(dt).requires_grad_()
        return [x, b]

    # Bytes at the memory-bound minimum: fwd reads x, writes y; bwd reads grad, x, writes grad_x.
    n, size = B * T * F, torch.finfo(dt).bits // 8
    work = {"fwd": 2 * n * size, "bwd": 3 * n * size, "full": 5 * n * size}[mode]
    group = f"bias_gelu {dtype} {mode}"
    benchmark.group = group
    run(benchmark, impl(name, "bias_gelu"), make, mode, work, "GB/s",
        dict(impl=name, dtype=dtype, shape=[B * T, F]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "reference", "compile"])
def test_gelu_feed_forward(benchmark, name, dtype, mode):
    dt = DTYPES[dtype]

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, T, C, generator=g).to(dt).requires_grad_()
        w1 = (torch.randn(F, C, generator=g) * C**-0.5).to(dt).requires_grad_()
        b1 = torch.zeros(F).to(dt).requires_grad_()
        w2 = (torch.randn(C, F, generator=g) * F**-0.5).to(dt).requires_grad_()
        b2 = torch.zeros(C).to(dt).requires_grad_()
        return [x, w1, b1, w2, b2]

    gemm = 2 * B * T * C * F
    work = {"fwd": 2 * gemm, "bwd": 4 * gemm, "full": 6 * gemm}[mode]
    benchmark.group = f"gelu_feed_forward {dtype} {mode}"
    run(benchmark, impl(name, "gelu_feed_forward"), make, mode, work, "GFLOP/s",
        dict(impl=name, dtype=dtype, shape=[B, T, C, F]))
