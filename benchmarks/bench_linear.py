"""The level-4 int8 linear (ryzen_llm.ops.linear) against the bf16 linear a PyTorch user runs
(F.linear on bf16 tensors: ATen/oneDNN, eager and torch.compile), at the seed model's shapes:
2048 rows (16 x 128 tokens) through qkv 512->1536, proj 512->512, fc1 512->1024, fc2 1024->512
and 512->2048, forward, backward and both. The int8 weight codes are made once (as once per
optimizer step in training) and the bf16 peer's weight is bf16 already, so neither pays for
its weight's preparation in the timed calls. Rates are GFLOP/s of the layer's GEMMs (int8
ops counted the same).

test_int8_gemm times the GEMM alone, the own AVX512-VNNI kernel against at::_int_mm, for each
of the layer's three GEMMs (the int8 linear itself runs the faster per shape).

Run: pytest benchmarks/bench_linear.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from benchmarks._common import compiled
from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded

M = 16 * 128
SHAPES = {"qkv": (512, 1536), "proj": (512, 512), "fc1": (512, 1024), "fc2": (1024, 512),
          "512x2048": (512, 2048)}
MODES = ["fwd", "bwd", "full"]


def impl(name: str):
    if name == "reference":
        return reference.linear
    if name == "compile":
        return compiled(reference.linear)
    if not extension_loaded():
        pytest.skip(f"FUSED linear UNAVAILABLE (ryzen_llm._C: {extension_error()}): not timed")
    from ryzen_llm.ops.linear import int8_linear

    return int8_linear


ROUNDS = 15


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", SHAPES)
# fused: the int8 linear; reference and compile: F.linear in bf16, eager and torch.compile
@pytest.mark.parametrize("name", ["fused", "reference", "compile"])
def test_linear(benchmark, name, layer, mode):
    """fwd: the forward with autograd recording; bwd: backward from a fixed bf16 grad_y (the
    forward untimed); full: both. No loss function around the layer: the timed work is the
    layer's alone."""
    K, N = SHAPES[layer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(N, K, generator=g) * K**-0.5).requires_grad_()
    b = torch.zeros(N).requires_grad_()
    if name != "fused":  # the bf16 peer's parameters are bf16 (no cast in the timed call)
        w = w.detach().bfloat16().requires_grad_()
        b = b.detach().bfloat16().requires_grad_()
    grad_y = torch.randn(M, N, generator=g).bfloat16()
    fn = impl(name)
    benchmark.group = f"linear {layer} ({K}->{N}) {mode}"

    def clear():
        x.grad = w.grad = b.grad = None

    def forward():
        return fn(x, w, b)

    for _ in range(2):  # warm-up (and compile)
        forward().backward(grad_y)
    clear()
    if mode == "fwd":
        benchmark.pedantic(forward, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    elif mode == "bwd":

        def setup():
            clear()
            return (forward(),), {}

        benchmark.pedantic(lambda y: y.backward(grad_y), setup=setup, rounds=ROUNDS,
                           warmup_rounds=1)
    else:

        def full():
            clear()
            forward().backward(grad_y)

        benchmark.pedantic(full, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    gemm = 2 * M * K * N
    work = {"fwd": gemm, "bwd": 2 * gemm, "full": 3 * gemm}[mode]
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        impl=name, mode=mode, shape=[M, K, N], gflops=work / median / 1e9,
        dtype="int8 GEMMs, bf16 activations" if name == "fused" else "bf16")


def gemm_operands(K: int, N: int, gemm: str, g: torch.Generator):
    """The int8 GEMM of one of the linear's passes, as the kernels call it: forward x (M, K) @
    W.T; input gradient g (M, N) @ W (N, K); weight gradient g.T (N, M) @ x (M, K)."""
    def codes(*shape):
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    if gemm == "forward":
        return codes(M, K), codes(N, K).t()
    if gemm == "grad_input":
        return codes(M, N), codes(N, K)
    return codes(M, N).t(), codes(M, K)


@pytest.mark.parametrize("gemm", ["forward", "grad_input", "grad_weight"])
@pytest.mark.parametrize("layer", SHAPES)
# own: csrc/cpu/int8_gemm.cpp's AVX512-VNNI kernel; onednn: at::_int_mm. Each result goes to
# the same int32 output (a copy per block of rows): what the linear's epilogue would read.
@pytest.mark.parametrize("name", ["own", "onednn"])
def test_int8_gemm(benchmark, name, layer, gemm):
    if not extension_loaded():
        pytest.skip(f"int8 GEMM UNAVAILABLE (ryzen_llm._C: {extension_error()}): not timed")
    from ryzen_llm.ops.linear import set_int8_gemm

    K, N = SHAPES[layer]
    a, b = gemm_operands(K, N, gemm, torch.Generator().manual_seed(0))
    benchmark.group = f"int8 GEMM {layer} ({K}->{N}) {gemm}"
    old = set_int8_gemm(name)
    try:
        benchmark.pedantic(torch.ops.ryzen_llm.int8_mm, args=(a, b), rounds=ROUNDS,
                           iterations=1, warmup_rounds=2)
    finally:
        set_int8_gemm(old)
    work = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    # the report's columns: the own kernel as "fused", torch._int_mm (PyTorch's) as "reference"
    benchmark.extra_info.update(impl="fused" if name == "own" else "reference", kernel=name,
                                gops=work / benchmark.stats.stats.median / 1e9,
                                shape=[a.shape[0], a.shape[1], b.shape[1]])
