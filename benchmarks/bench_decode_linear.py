"""decode_linear: the linear layers of one decode step of the seed-size model (per layer qkv,
proj, fc1 + GELU, fc2; then the LM head: 17 matrices, 10.5 M weights) at M = 1, 4, 8 and 32 rows,
fused vs the plain-PyTorch reference (ATen's GEMM, the weights in the same dtype; for bfloat16
weights on bfloat16 activations, as autocast runs it) vs torch.compile of the reference. The fused
bfloat16 run reads the weights packed (pack_decode_weight), as generation does; "fused-rows" is
the same op on the (N, K) bfloat16 weights (its dot-product kernel).
GB/s counts the weight bytes read once per step; decode at small M is bound by them.

Run: PYTHONPATH=. pytest benchmarks/bench_decode_linear.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks._common import compiled
from ryzen_llm.config import ModelConfig
from ryzen_llm.ops._extension import extension_error, extension_loaded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = [1, 4, 8, 32]


def layers(dtype):
    """(weight, bias, gelu) of every linear of the seed model's decode step, in call order."""
    c = ModelConfig()
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * c.d_model, c.d_model, False), (c.d_model, c.d_model, False),
              (c.d_ff, c.d_model, True), (c.d_model, c.d_ff, False)] * c.n_layers
    out = [(torch.randn(n, k, generator=g).div(k**0.5).to(dtype), torch.randn(n, generator=g),
            gelu) for n, k, gelu in shapes]
    return out + [(torch.randn(c.vocab_size, c.d_model, generator=g).to(dtype), None, False)]


def reference_one(x, w, b, gelu: bool):
    """ATen: activations in the weights' dtype (autocast's rule for bf16), float32 out."""
    y = F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))
    return (F.gelu(y) if gelu else y).float()


def fused_one(x, w, b, gelu: bool, n: int = -1):
    from ryzen_llm.ops.decode_linear import decode_linear

    return decode_linear(x, w, b, gelu, n)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "fused-rows", "reference", "compile"])
def test_decode_step_linears(benchmark, name, dtype, rows):
    if name.startswith("fused") and not extension_loaded():
        pytest.skip(f"FUSED decode_linear UNAVAILABLE ({extension_error()}): not timed")
    if name == "fused-rows" and dtype != "bf16":
        pytest.skip("float32 weights have one layout")
    fn = {"fused": fused_one, "fused-rows": fused_one, "reference": reference_one,
          "compile": compiled(reference_one)}[name]
    weights = layers(DTYPES[dtype])
    if name == "fused" and dtype == "bf16":
        from ryzen_llm.ops.decode_linear import pack_decode_weight

        weights = [(pack_decode_weight(w), b, gelu, w.shape) for w, b, gelu in weights]
        fn = lambda x, w, b, gelu, shape: fused_one(x, w, b, gelu, shape[0])  # noqa: E731
        xs = {s[1]: torch.randn(rows, s[1]) for *_, s in weights}

        def step():
            with torch.inference_mode():
                for w, b, gelu, shape in weights:
                    fn(xs[shape[1]], w, b, gelu, shape)

        weights_bytes = sum(w.numel() * w.element_size() for w, *_ in weights)
        return _measure(benchmark, step, name, dtype, rows, weights_bytes)
    xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w, _, _ in weights}}  # x per width

    def step():
        with torch.inference_mode():
            for w, b, gelu in weights:
                fn(xs[w.shape[1]], w, b, gelu)

    return _measure(benchmark, step, name, dtype, rows,
                    sum(w.numel() * w.element_size() for w, _, _ in weights))


def _measure(benchmark, step, name, dtype, rows, nbytes):
    step()
    step()
    benchmark.group = f"decode step linears {dtype} M={rows}"
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(impl=name, dtype=dtype, rows=rows,
                                median_ms=round(median * 1e3, 3),
                                **{"GB/s": round(nbytes / median / 1e9, 2)})
