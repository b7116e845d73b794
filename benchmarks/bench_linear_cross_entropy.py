"""linear_cross_entropy: fused (chunked, gradients in the forward) vs reference vs
torch.compile(reference), at the seed's shapes (N = 2048 tokens, C = 512, V = 2048); and level 4's
int8_linear_cross_entropy ("int8": its three GEMMs on int8 codes; "int8-bf16w": the same with the
weight gradient's GEMM in h's dtype, INT8_GRAD_WEIGHT off).

Note: the fused forward under autograd already computes grad_h and grad_weight, so its 'fwd'
holds nearly all the work and its 'bwd' only scales; compare 'full'.

Run: PYTHONPATH=. pytest benchmarks/bench_linear_cross_entropy.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from benchmarks._common import compiled, run
from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded

N, C, V = 16 * 128, 512, 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def impl(name: str):
    if name == "reference":
        return reference.linear_cross_entropy
    if name == "compile":
        return compiled(reference.linear_cross_entropy)
    if not extension_loaded():
        pytest.skip(f"FUSED linear_cross_entropy UNAVAILABLE ({extension_error()}): not timed")
    from ryzen_llm.ops import linear_cross_entropy as ops

    if name == "int8-bf16w":
        def float_weight_grad(*args):
            old, ops.INT8_GRAD_WEIGHT = ops.INT8_GRAD_WEIGHT, False
            try:
                return ops.int8_linear_cross_entropy(*args)
            finally:
                ops.INT8_GRAD_WEIGHT = old

        return float_weight_grad
    return ops.int8_linear_cross_entropy if name == "int8" else ops.linear_cross_entropy


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "int8", "int8-bf16w", "reference", "compile"])
def test_linear_cross_entropy(benchmark, name, dtype, mode):
    dt = DTYPES[dtype]

    def make():
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, C, generator=g).to(dt).requires_grad_()
        w = (torch.randn(V, C, generator=g) * C**-0.5).to(dt).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g)
        return [h, w, targets]

    gemm = 2 * N * C * V
    work = {"fwd": gemm, "bwd": 2 * gemm, "full": 3 * gemm}[mode]
    benchmark.group = f"linear_cross_entropy {dtype} {mode}"
    run(benchmark, impl(name), make, mode, work, "GFLOP/s (3 GEMMs in full)",
        dict(impl=name, dtype=dtype, shape=[N, C, V]))
