"""Block-wise int8 / 4-bit quantization against its plain-PyTorch reference, the error bounds it
promises, and its special cases (NaN/inf, empty, short last block, non-contiguous, bad input)."""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.ops import reference
from ryzen_llm.ops.quantize import QuantizedTensor, compressed_ratio, quantize_blockwise
from tests.ops.conftest import DEVICES, requires_extension

pytestmark = requires_extension

# Awkward on purpose: one value, odd numel (short last block), T = 97, a KV cache (B, nh, T, hs).
SHAPES = [(1,), (97,), (3, 97, 80), (2, 128, 512), (2, 4, 97, 48)]


def make_x(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    # Per-row scales spread over orders of magnitude, so blocks have very different absmax.
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if x.dim() >= 2:
        x = x * torch.logspace(-3, 2, x.shape[-2], dtype=torch.float64)[:, None]
    return x.to(dtype)


def block_view(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n_blocks, block_size) float64 view of t flattened, padded with zeros."""
    flat = t.reshape(-1).double()
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits, block_size", [(8, 64), (8, 48), (8, 1), (4, 64), (4, 32)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_bit_for_bit(device, dtype, shape, bits, block_size, stochastic):
    x = make_x(shape, dtype).to(device)
    qt = quantize_blockwise(x, block_size, bits, stochastic, seed=7)
    data, scales = reference.quantize_blockwise(x, block_size, bits, stochastic, 7, 0)
    assert qt.data.dtype == torch.uint8 and qt.scales.dtype == torch.float32
    assert torch.equal(qt.scales, scales), (qt.scales - scales).abs().max()
    mismatched = (qt.data != data).sum().item()
    print(f"{dtype} {shape} bits {bits} block {block_size} stochastic {stochastic}: "
          f"{mismatched} codes differ from the reference")
    assert mismatched == 0
    y = qt.dequantize()
    assert y.shape == x.shape and y.dtype == x.dtype
    y_ref = reference.dequantize_blockwise(data, scales, list(shape), block_size, bits, dtype)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_to_nearest_error_is_at_most_half_a_step_per_block(bits, dtype):
    block = 64
    x = make_x((3, 97, 80), dtype)
    qt = quantize_blockwise(x, block, bits)
    err = block_view(qt.dequantize().float() - x.float(), block).abs().amax(dim=1)
    half_step = qt.scales.double() / 2
    # bf16 output adds its own rounding of the restored value: half an ulp of the block's absmax.
    slack = 0.0 if dtype == torch.float32 else block_view(x, block).abs().amax(dim=1) * 2.0**-8
    ratio = (err / (half_step + slack + 1e-30)).max().item()
    print(f"bits {bits} {dtype}: max |x - deq| / (scale / 2) = {ratio:.4f}")
    assert (err <= half_step * (1 + 1e-6) + slack).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    x = make_x((4, 257), torch.float32, seed=3)
    n_seeds = 400
    mean = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(n_seeds):
        qt = quantize_blockwise(x, 64, bits, stochastic=True, seed=seed)
        y = qt.dequantize().double()
        step = block_view(torch.ones_like(x), 64) * qt.scales.double()[:, None]
        step = step.reshape(-1)[: x.numel()].view_as(x)
        assert ((y - x.double()).abs() < step * (1 + 1e-6)).all()  # within one step, never more
        mean += y / n_seeds
    # Each code is x/scale rounded up with probability frac(x/scale): a Bernoulli per seed, so the
    # mean over seeds has standard deviation <= step / (2 sqrt(n)). Allow 5 of those.
    step = block_view(torch.ones_like(x), 64) * quantize_blockwise(x, 64, bits).scales.double()[:, None]
    step = step.reshape(-1)[: x.numel()].view_as(x)
    z = ((mean - x.double()) / (step / (2 * n_seeds**0.5))).abs().max().item()
    rtn_bias = (quantize_blockwise(x, 64, bits).dequantize().double() - x.double()).abs().mean()
    print(f"bits {bits}: max |mean - x| = {z:.2f} sigma; RTN mean |err| {rtn_bias:.3e}, "
          f"stochastic mean-of-{n_seeds} |err| {(mean - x.double()).abs().mean():.3e}")
    assert z < 5.0


def test_stochastic_is_reproducible_and_seeded():
    x = make_x((3, 97, 80), torch.float32)
    a = quantize_blockwise(x, 64, stochastic=True, seed=11)
    b = quantize_blockwise(x, 64, stochastic=True, seed=11)
    c = quantize_blockwise(x, 64, stochastic=True, seed=12)
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    # Independent of the thread count: the random number is a hash of the element index.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d = quantize_blockwise(x, 64, stochastic=True, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.data, d.data)


def test_offset_continues_the_random_stream():
    x = make_x((4, 128), torch.float32)
    whole = quantize_blockwise(x, 64, stochastic=True, seed=5)
    second = quantize_blockwise(x[2:], 64, stochastic=True, seed=5, offset=2 * 128)
    assert torch.equal(whole.data[2 * 128:], second.data)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_nan_and_inf_poison_only_their_block(bits, device):
    x = make_x((5, 64), torch.float32).to(device)
    x[1, 3] = float("nan")
    x[3, 60] = float("inf")
    x[4, 0] = float("-inf")
    qt = quantize_blockwise(x, 64, bits)
    d, s = reference.quantize_blockwise(x, 64, bits, False, 0, 0)
    assert torch.equal(qt.data, d) and torch.equal(qt.scales.isnan(), s.isnan())
    y = qt.dequantize()
    bad_rows = [1, 3, 4]
    assert y[bad_rows].isnan().all(), "a block with NaN/inf must read back as NaN everywhere"
    good = [0, 2]
    assert torch.isfinite(y[good]).all()
    assert torch.equal(y[good], quantize_blockwise(x[good], 64, bits).dequantize())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensor(device, bits, dtype):
    x = torch.empty(0, 7, dtype=dtype, device=device)
    qt = quantize_blockwise(x, 64, bits)
    assert qt.data.numel() == 0 and qt.scales.numel() == 0 and qt.nbytes == 0
    y = qt.dequantize()
    assert y.shape == (0, 7) and y.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_zero_and_tiny_blocks_restore_to_zero(device):
    x = torch.zeros(3, 64, device=device)
    x[1] = 1e-40  # subnormal: 1 / scale would overflow, so the block flushes to 0
    x[2, 5] = 2.0
    qt = quantize_blockwise(x, 64)
    assert qt.scales[0] == 0 and qt.scales[1] == 0
    y = qt.dequantize()
    assert torch.equal(y[:2], torch.zeros(2, 64, device=device)) and y[2, 5] == 2.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_short_last_block_and_odd_numel(bits, device):
    x = make_x((7, 13), torch.float32).to(device)  # 91 values: blocks of 64 and 27; odd bytes at 4 bits
    qt = quantize_blockwise(x, 64, bits)
    assert qt.scales.numel() == 2
    assert qt.data.numel() == (91 if bits == 8 else 46)
    tail = x.reshape(-1)[64:]
    assert qt.scales[1] == tail.abs().max() / (127 if bits == 8 else 7)
    assert qt.dequantize().shape == (7, 13)


def test_non_contiguous_input_is_quantized_in_logical_order():
    base = make_x((80, 97), torch.float32)
    x = base.t()  # (97, 80), not contiguous
    assert not x.is_contiguous()
    qt = quantize_blockwise(x, 64)
    ref = quantize_blockwise(x.contiguous(), 64)
    assert torch.equal(qt.data, ref.data) and torch.equal(qt.scales, ref.scales)
    y = qt.dequantize()
    assert y.shape == x.shape and y.is_contiguous()
    sliced = make_x((6, 128), torch.float32)[:, ::2]
    assert torch.equal(quantize_blockwise(sliced, 32).data, quantize_blockwise(sliced.contiguous(), 32).data)


def test_float64_goes_through_float32_and_comes_back_float64():
    x = make_x((3, 50), torch.float64)
    y = quantize_blockwise(x, 64).dequantize()
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, quantize_blockwise(x.float(), 64).dequantize().double())


@pytest.mark.parametrize("bits, expected", [(8, (64 + 4) / 256), (4, (32 + 4) / 256)])
def test_compressed_bytes_ratio(bits, expected):
    x = make_x((16, 128, 512), torch.float32)
    qt = quantize_blockwise(x, 64, bits)
    ratio = qt.nbytes / (4 * x.numel())
    print(f"bits {bits}: ratio {ratio:.4f}")
    assert ratio == pytest.approx(expected) == compressed_ratio(x.numel(), 64, bits)


def test_kv_cache_per_row_and_head_block():
    B, nh, T, hs = 2, 4, 97, 48
    cache = make_x((B, nh, T, hs), torch.bfloat16)  # (B, nh, T, hs)
    qt = quantize_blockwise(cache, block_size=hs)
    scales = qt.scales.view(B, nh, T)  # one scale per (batch, head, position) row
    expected = cache.float().abs().amax(dim=-1) / 127
    assert torch.equal(scales, expected)
    err = (qt.dequantize().float() - cache.float()).abs().amax(dim=-1)
    assert (err <= scales / 2 + cache.float().abs().amax(dim=-1) * 2.0**-8).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = make_x((5, 97), torch.float32).to(device)
    for bits in (8, 4):
        for stochastic in (False, True):
            torch.library.opcheck(torch.ops.ryzen_llm.quantize_blockwise, (x, 64, bits, stochastic, 3, 0))
        data, scales = torch.ops.ryzen_llm.quantize_blockwise(x, 64, bits, False, 0, 0)
        for dtype in (torch.float32, torch.bfloat16):
            torch.library.opcheck(
                torch.ops.ryzen_llm.dequantize_blockwise, (data, scales, [5, 97], 64, bits, dtype)
            )


def test_torch_compile_fullgraph():
    def round_trip(x):
        data, scales = torch.ops.ryzen_llm.quantize_blockwise(x, 64, 8, False, 0, 0)
        return torch.ops.ryzen_llm.dequantize_blockwise(data, scales, list(x.shape), 64, 8, x.dtype)

    x = make_x((9, 40), torch.float32)
    compiled = torch.compile(round_trip, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), round_trip(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), "bits: expected 8 or 4"),
        (dict(block_size=0), "block_size: expected a positive"),
        (dict(bits=4, block_size=33), "block_size: expected an even block size"),
        (dict(offset=-1), "offset: expected a non-negative"),
    ],
)
def test_bad_quantize_arguments_name_the_argument(kwargs, message):
    x = make_x((4, 64), torch.float32)
    args = dict(block_size=64, bits=8, stochastic=False, seed=0, offset=0) | kwargs
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.quantize_blockwise(x, *args.values())
    python_kwargs = {k: v for k, v in kwargs.items() if k != "offset"}
    if python_kwargs:
        with pytest.raises(ValueError, match=message.split(":")[0]):
            quantize_blockwise(x, **({"block_size": 64} | python_kwargs))


def test_bad_input_dtype_names_the_argument():
    with pytest.raises(RuntimeError, match="x: expected float32 or bfloat16, got Int"):
        torch.ops.ryzen_llm.quantize_blockwise(torch.ones(8, dtype=torch.int32), 64, 8, False, 0, 0)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        quantize_blockwise(torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed: expected a non-negative"):
        quantize_blockwise(torch.ones(8), seed=-3)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, s: (d[:-1], s, [5, 97]), "data: expected 485 bytes"),
        (lambda d, s: (d, s[:-1], [5, 97]), "scales: expected 8 blocks"),
        (lambda d, s: (d.float(), s, [5, 97]), "data: expected uint8"),
        (lambda d, s: (d, s.double(), [5, 97]), "scales: expected float32"),
        (lambda d, s: (d, s, [5, -97]), "shape: expected non-negative"),
    ],
)
def test_bad_dequantize_input_names_the_argument(mutate, message):
    data, scales = torch.ops.ryzen_llm.quantize_blockwise(make_x((5, 97), torch.float32), 64, 8, False, 0, 0)
    d, s, shape = mutate(data, scales)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.dequantize_blockwise(d, s, shape, 64, 8, torch.float32)
    with pytest.raises(RuntimeError, match="dtype: expected float32 or bfloat16"):
        torch.ops.ryzen_llm.dequantize_blockwise(data, scales, [5, 97], 64, 8, torch.int32)


def test_quantized_tensor_reference_path():
    x = make_x((3, 100), torch.bfloat16)
    qt = quantize_blockwise(x, 64, 4, fused=False)
    assert isinstance(qt, QuantizedTensor) and not qt.fused
    assert torch.equal(qt.dequantize(), quantize_blockwise(x, 64, 4).dequantize())
