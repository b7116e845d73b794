"""Fused causal attention vs the plain reference, F.scaled_dot_product_attention and
torch.compile(reference), at the seed's shape: forward, backward and forward+backward, fp32 and
bf16. Inputs come from the test module and the reference from ryzen_llm.ops.reference, so the
baseline and the test oracle never drift. Never asserts on time; GFLOP/s go to extra_info.

    PYTHONPATH=. python -m pytest benchmarks/bench_causal_attention.py --benchmark-only

FLOPs count only the causal half: forward 2 * B * nh * T^2 * hs (QK^T and PV), backward 2.5x that.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded
from tests.ops.test_causal_attention import make_inputs

B, NH, T, HS = 16, 8, 128, 64  # the seed's model: batch 16, 8 heads, context 128, d_model 512
SCALE = 1.0 / math.sqrt(HS)
FORWARD_FLOP = 2 * B * NH * T * T * HS
PASS_FLOP = {"forward": FORWARD_FLOP, "backward": 2.5 * FORWARD_FLOP, "forward_backward": 3.5 * FORWARD_FLOP}


def _fused(q, k, v):
    from ryzen_llm.ops.causal_attention import causal_attention

    return causal_attention(q, k, v, None, SCALE)


def _reference(q, k, v):
    return reference.causal_attention(q, k, v, None, SCALE)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)


_compiled = {}


def _compiled_reference(q, k, v):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_reference, dynamic=False)
    return _compiled["fn"](q, k, v)


def _saved_bytes(fn, q, k, v) -> int:
    """Bytes of the distinct storages autograd keeps for backward (the input qkv included)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v)
    return sum(storages.values())


IMPLS = {"fused": _fused, "reference": _reference, "sdpa": _sdpa, "compiled_reference": _compiled_reference}


@pytest.mark.parametrize("which", ["forward", "backward", "forward_backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_attention(benchmark, dtype, impl, which):
    if impl == "fused" and not extension_loaded():
        pytest.skip(f"FUSED ATTENTION UNAVAILABLE (ryzen_llm._C not built: {extension_error()})")
    fn = IMPLS[impl]
    qkv, (q, k, v) = make_inputs(B, T, NH, HS, dtype, "cpu")
    grad = torch.randn(B, NH, T, HS, dtype=dtype)
    try:
        out = fn(q, k, v)  # warm-up and, for compile, the compilation itself
        out.backward(grad)
    except Exception as exc:  # torch.compile may not handle a configuration: say so, loudly
        pytest.skip(f"{impl} {dtype} did not run: {type(exc).__name__}: {exc}")
    benchmark.group = f"causal_attention {which} {str(dtype).removeprefix('torch.')}"
    setup = None
    if which == "forward":
        def run():
            with torch.no_grad():
                fn(q, k, v)
    elif which == "backward":
        # A fresh forward before each timed backward (compiled graphs free their buffers).
        def setup():
            return (fn(q, k, v),), {}

        def run(out):
            torch.autograd.grad(out, (qkv,), grad)
    else:
        def run():
            qkv.grad = None
            fn(q, k, v).backward(grad)

    benchmark.pedantic(run, setup=setup, rounds=10, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info["shape"] = f"B={B} nh={NH} T={T} hs={HS}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["gflop"] = PASS_FLOP[which] / 1e9
    benchmark.extra_info["gflop_per_s"] = PASS_FLOP[which] / median / 1e9
    if which == "forward_backward" and impl != "compiled_reference":  # hooks would recompile
        benchmark.extra_info["saved_for_backward_mib"] = _saved_bytes(fn, q, k, v) / 2**20
