"""Block-wise quantize / dequantize speed against the machine's memory bandwidth (a large copy
timed in the same run), saved-activation bytes of the seed model at 16 x 128 per level with
compression on and off, and the bytes all-reduced per step with and without the int8 hook.

Run: PYTHONPATH=. pytest benchmarks/bench_quantize.py --benchmark-only -s"""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.config import ModelConfig
from ryzen_llm.model import ScaledTransformerModel, measure_saved_activation_bytes
from ryzen_llm.ops._extension import extension_error, extension_loaded
from ryzen_llm.ops.quantize import compressed_ratio, quantize_blockwise
from tests.ops.test_quantize import make_x

N = 16 * 1024 * 1024  # values: 64 MiB of fp32, far beyond the caches
BLOCK = 64


def _gbps(benchmark, nbytes: float, **info):
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info, median_ms=round(median * 1e3, 3),
                                **{"GB/s": round(nbytes / median / 1e9, 2)})
    print(f"{benchmark.name}: {nbytes / median / 1e9:.2f} GB/s")


def test_copy_bandwidth(benchmark):
    """The peer: a plain copy reads and writes 4 bytes per value."""
    src, dst = torch.randn(N), torch.empty(N)
    benchmark.group = "quantize vs memory bandwidth"
    benchmark.pedantic(dst.copy_, args=(src,), rounds=5, warmup_rounds=1)
    _gbps(benchmark, 8 * N, impl="copy fp32")


def test_clone_bandwidth(benchmark):
    """The peer of dequantize, which allocates its output like clone() does: 64 MiB is above
    glibc's largest mmap threshold (32 MiB), so every call maps fresh pages and pays a page
    fault per 4 KiB; the preallocated copy above does not."""
    src = torch.randn(N)
    benchmark.group = "quantize vs memory bandwidth"
    benchmark.pedantic(src.clone, rounds=5, warmup_rounds=1)
    _gbps(benchmark, 8 * N, impl="clone fp32 (fresh output)")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bits, stochastic", [(8, False), (8, True), (4, False)])
def test_quantize(benchmark, dtype, bits, stochastic):
    if not extension_loaded():
        pytest.skip(f"FUSED quantize UNAVAILABLE ({extension_error()}): not timed")
    x = torch.randn(N).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    benchmark.group = "quantize vs memory bandwidth"
    benchmark.pedantic(quantize_blockwise, args=(x, BLOCK, bits, stochastic), rounds=5, warmup_rounds=1)
    moved = x.element_size() * N + compressed_ratio(N, BLOCK, bits) * 4 * N  # read x, write codes
    _gbps(benchmark, moved, impl=f"quantize {dtype} {bits}-bit{' stochastic' if stochastic else ''}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize(benchmark, dtype, bits):
    if not extension_loaded():
        pytest.skip(f"FUSED dequantize UNAVAILABLE ({extension_error()}): not timed")
    x = torch.randn(N).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    qt = quantize_blockwise(x, BLOCK, bits)
    benchmark.group = "quantize vs memory bandwidth"
    benchmark.pedantic(qt.dequantize, rounds=5, warmup_rounds=1)
    _gbps(benchmark, qt.nbytes + x.element_size() * N, impl=f"dequantize {dtype} {bits}-bit")


def test_reference_quantize(benchmark):
    """The plain-PyTorch oracle, for scale."""
    from ryzen_llm.ops import reference

    x = make_x((N // 1024, 1024), torch.float32)
    benchmark.group = "quantize vs memory bandwidth"
    benchmark.pedantic(reference.quantize_blockwise, args=(x, BLOCK, 8, False, 0, 0), rounds=3,
                       warmup_rounds=1)
    _gbps(benchmark, 4 * N * (1 + compressed_ratio(N, BLOCK, 8)), impl="reference quantize fp32 8-bit")


@pytest.mark.parametrize("level", [0, 3])
def test_saved_activation_bytes(benchmark, level):
    """Seed model, 16 x 128: bytes saved for backward with compression off, int8 and 4-bit."""
    from ryzen_llm.compression import ActivationCompressor
    from ryzen_llm.train_step import TrainStep

    torch.manual_seed(0)
    model = ScaledTransformerModel(ModelConfig())
    step = TrainStep(model, level=level)
    idx = torch.randint(0, 2048, (16, 128))
    row = {}
    for name, ratio in (("off", 0.0), ("int8", 0.3), ("4-bit", 0.2)):
        hooks = ActivationCompressor(model, ratio).pack_fn(idx.numel())[:2] if ratio else None
        with step.autocast():
            row[name], _ = measure_saved_activation_bytes(model, lambda: model.loss(idx, idx), hooks)
    benchmark.group = "saved activations (seed model 16 x 128)"
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(level=level, **{f"MiB {k}": round(v / 2**20, 1) for k, v in row.items()})
    print(f"level {level}: saved activations " + ", ".join(
        f"{k} {v / 2**20:.1f} MiB ({v / row['off']:.2f})" for k, v in row.items()))


def test_allreduce_bytes_per_step(benchmark):
    """Bytes each rank sends per step at world size 2: fp32 ring all-reduce vs the int8 hook
    (the hook's own count: codes + scales of a reduce-scatter and an all-gather)."""
    P = ScaledTransformerModel(ModelConfig()).count_parameters()
    world = 2
    fp32 = 2 * (world - 1) * 4 * P / world
    int8 = 2 * (world - 1) * compressed_ratio(P // world, BLOCK, 8) * 4 * (P // world)
    benchmark.group = "all-reduce bytes per step"
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(params=P, fp32_bytes=int(fp32), int8_bytes=int(int8),
                                ratio=round(int8 / fp32, 3))
    print(f"all-reduce per step, world 2: fp32 {fp32 / 2**20:.1f} MiB, int8 hook {int8 / 2**20:.1f} MiB "
          f"({int8 / fp32:.3f})")
