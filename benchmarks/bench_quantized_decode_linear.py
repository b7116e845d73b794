"""quantized_decode_linear: int8 and int4 weights against today's packed bfloat16 decode_linear
(the peer generation runs at level 3) on the seed model's linear shapes (K -> N: qkv 512 -> 1536,
proj 512 -> 512, fc1 512 -> 1024, fc2 1024 -> 512, LM head 512 -> 2048) at 1, 8, 32 and 256 rows.
GB/s counts the weight bytes read once per call (the limit at few rows); GOP/s counts 2 M N K
multiply-adds (the limit at many rows: vpdpbusd does 64 int8 products per instruction,
vdpbf16ps 32 bfloat16 ones). Compare the formats within one run, as ratios.

Run: PYTHONPATH=. pytest benchmarks/bench_quantized_decode_linear.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.ops._extension import extension_error, extension_loaded
from tests.ops.test_decode_linear import fused as bf16_decode_linear
from tests.ops.test_quantized_decode_linear import fused as quantized_decode_linear
from tests.ops.test_quantized_decode_linear import make_inputs, quantized

SHAPES = [(512, 1536), (512, 512), (512, 1024), (1024, 512), (512, 2048)]  # (K, N)
ROWS = [1, 8, 32, 256]
FORMATS = ["bfloat16", "int8", "int4"]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_decode_linear(benchmark, fmt, shape, rows):
    if not extension_loaded():
        pytest.skip(f"FUSED decode_linear UNAVAILABLE ({extension_error()}): not timed")
    K, N = shape
    x, w, b = make_inputs(rows, K, N)
    if fmt == "bfloat16":
        from ryzen_llm.ops.decode_linear import pack_decode_weight

        packed = pack_decode_weight(w)
        fn = lambda: torch.ops.ryzen_llm.decode_linear(x, packed, b, False, N)  # noqa: E731
        assert torch.equal(fn(), bf16_decode_linear(x, w.bfloat16(), b, False, packed=True))
    else:
        packed = quantized(w, fmt)[2]
        fn = lambda: quantized_decode_linear(x, packed, b, False, N)  # noqa: E731
    with torch.inference_mode():
        fn()
        benchmark.group = f"decode linear {K}->{N} M={rows}"
        benchmark.pedantic(fn, rounds=30, iterations=max(1, 64 // rows), warmup_rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        format=fmt, rows=rows, K=K, N=N, median_us=round(median * 1e6, 2),
        **{"GB/s": round(packed.numel() * packed.element_size() / median / 1e9, 2),
           "GOP/s": round(2 * rows * K * N / median / 1e9, 1)})
