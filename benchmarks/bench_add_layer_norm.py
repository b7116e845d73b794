"""add_layer_norm: fused residual add + LayerNorm vs reference vs torch.compile(reference), at
the seed's shape (16 x 128 tokens, C = 512), float32 and bfloat16. The timed function returns
the normalised output (the sum output's gradient path is exercised by the tests).

Run: pytest benchmarks/bench_add_layer_norm.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from benchmarks._common import compiled, run
from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded

B, T, C = 16, 128, 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def normed_reference(x, r, w, b):
    return reference.add_layer_norm(x, r, w, b, 1e-5)[1]


def impl(name: str):
    if name == "reference":
        return normed_reference
    if name == "compile":
        return compiled(normed_reference)
    if not extension_loaded():
        pytest.skip(f"FUSED add_layer_norm UNAVAILABLE (ryzen_llm._C: {extension_error()}): not timed")
    from ryzen_llm.ops.add_layer_norm import add_layer_norm

    return lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5)[1]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "reference", "compile"])
def test_add_layer_norm(benchmark, name, dtype, mode):
    dt = DTYPES[dtype]

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, T, C, generator=g).to(dt).requires_grad_()
        r = torch.randn(B, T, C, generator=g).to(dt).requires_grad_()
        w = torch.randn(C, generator=g).to(dt).requires_grad_()
        b = torch.randn(C, generator=g).to(dt).requires_grad_()
        return [x, r, w, b]

    # Memory-bound minimum: fwd reads x, r and writes sum, out; bwd reads grad, sum and writes
    # grad_input (the residual's gradient is the same tensor).
    n, size = B * T * C, torch.finfo(dt).bits // 8
    work = {"fwd": 4 * n * size, "bwd": 3 * n * size, "full": 7 * n * size}[mode]
    benchmark.group = f"add_layer_norm {dtype} {mode}"
    run(benchmark, impl(name), make, mode, work, "GB/s",
        dict(impl=name, dtype=dtype, shape=[B, T, C]))
