"""quantized_decode_linear (int8 and int4 weights) against the plain-PyTorch reference of the same
quantized math (bit for bit before the GELU: the int32 sums are exact and every float operation
rounds the same way), against the float linear (loosely: the quantization error itself), and its
promise: a row's result does not depend on the other rows, their number, or the thread count."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ryzen_llm.ops import reference
from tests.ops.conftest import requires_extension
from tests.ops.test_decode_linear import make_inputs

pytestmark = requires_extension

FORMATS = ["int8", "int4"]
# (M, K, N): one row; K below one group and not a multiple of 4, 16, 32 or 64; N odd; the seed
# model's shapes; a prefill-sized M; the LM head of an odd vocabulary.
SHAPES = [(1, 7, 3), (3, 33, 50), (1, 512, 1536), (4, 512, 1536), (5, 1024, 512),
          (32, 512, 2048), (97, 80, 97), (8, 100, 2047), (256, 512, 512)]
# Max |y - float linear| / max |float linear| on Gaussian weights and inputs: the quantization
# error of each format (int8: 8-bit weights and activations; int4: 4-bit weights, groups of 32).
FLOAT_TOLERANCE = {"int8": 0.03, "int4": 0.25}


def fused(x, packed, b, gelu, n):
    from ryzen_llm.ops.quantized_decode_linear import quantized_decode_linear

    return quantized_decode_linear(x, packed, b, gelu, n)


def quantized(w, fmt):
    """(codes, scales, packed) of w in fmt."""
    from ryzen_llm.ops.quantized_decode_linear import pack_quantized_weight, quantize_weight

    codes, scales = quantize_weight(w, fmt)
    return codes, scales, pack_quantized_weight(w, fmt)


# -- quantizers ---------------------------------------------------------------------------------
def test_int8_weight_quantizer():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.0, 2.99]])
    codes, scales = reference.quantize_weight_int8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.tolist() == pytest.approx([1 / 127, 0.0, 3 / 127])
    assert codes[0].tolist() == [64, -127, 32, 0]  # 63.5 rounds half to even
    assert codes[1].tolist() == [0, 0, 0, 0]
    assert codes[2, 0] == 127 and codes[2, 1] == 64  # 63.5 -> 64
    w = torch.randn(64, 100)
    codes, scales = reference.quantize_weight_int8(w)
    err = (reference.dequantize_weight(codes, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest


def test_int4_weight_quantizer():
    w = torch.randn(40, 70)  # K: two whole groups and a short one of 6
    codes, scales = reference.quantize_weight_int4(w)
    assert codes.shape == (40, 70) and scales.shape == (40, 3)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    # the value of largest magnitude in every group maps to code -8 exactly
    for g, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        at = w[:, lo:hi].abs().argmax(1)
        assert (codes[:, lo:hi].gather(1, at[:, None]) == -8).all()
        assert torch.allclose(scales[:, g], w[:, lo:hi].gather(1, at[:, None])[:, 0] / -8)
    per_k = scales.abs().repeat_interleave(32, 1)[:, :70]
    err = (reference.dequantize_weight(codes, scales) - w).abs()
    # round to nearest, except values opposite the -8 one that reach +8 steps: clamped to 7
    clamped = codes == 7
    assert (err[~clamped] <= per_k[~clamped] / 2 * (1 + 1e-6)).all()
    assert (err[clamped] <= per_k[clamped] * (1 + 1e-6)).all()
    zero_codes, zero_scales = reference.quantize_weight_int4(torch.zeros(3, 5))
    assert not zero_codes.any() and not zero_scales.any()


def test_activation_quantizer_special_runs():
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.0, 0.0, 0.0, 0.0],
                      [1.0, float("nan"), 2.0, 3.0], [1e-40, 0.0, 0.0, 0.0]])
    q, s = reference.quantize_activations_int8(x, 4)
    assert q[0].tolist() == [1, -2, 0, 127] and s[0].item() == 1.0  # 0.5 rounds half to even
    assert s[1].item() == 0 and not q[1].any()
    assert torch.isnan(s[2]).all() and not q[2].any()
    assert s[3].item() == 0 and not q[3].any()  # 1 / scale overflows: flushed
    q, s = reference.quantize_activations_int8(torch.randn(3, 70), 32)
    assert q.shape == (3, 96) and s.shape == (3, 3) and not q[:, 70:].any()


def test_packed_layouts():
    from ryzen_llm.ops.quantized_decode_linear import pack_int4, pack_int8

    w = torch.randn(20, 7)
    codes, scales = reference.quantize_weight_int8(w)
    p = pack_int8(codes, scales)
    assert p.shape == (2, 2 + 2, 64) and p.dtype == torch.int8
    assert torch.equal(p[0, :, :].view(-1)[:0], p[0, :0].view(-1))
    assert torch.equal(p[0, 0, 12:16], codes[3, :4]) and torch.equal(p[0, 1, 12:15], codes[3, 4:])
    assert torch.equal(p[0, 2].view(torch.float32), scales[:16])
    assert torch.equal(p[1, 3].view(torch.int32)[:4], 128 * codes[16:].int().sum(1))
    assert not p[1, :2, 16:].any()  # outputs past N = 20: zero codes
    codes, scales = reference.quantize_weight_int4(torch.randn(20, 40))
    p = pack_int4(codes, scales)
    assert p.shape == (2, 10, 64) and p.dtype == torch.uint8
    # block 0, group 1, row z = 0, output 3, byte 1: codes 32 + 1 (low) and 32 + 5 (high)
    byte = int(p[0, 5, 4 * 3 + 1])
    assert (byte & 15) - 8 == codes[3, 33] and (byte >> 4) - 8 == codes[3, 37]
    assert torch.equal(p[0, 9].view(torch.float32), scales[:16, 1])


# -- the kernel -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_sums_are_exact(shape, fmt):
    """No bias, no GELU: y is float(exact int32 sum) times the scales (int4: summed over groups),
    so the kernel equals the reference, whose integer sums are exact, bit for bit."""
    x, w, _ = make_inputs(*shape)
    codes, scales, packed = quantized(w, fmt)
    got = fused(x, packed, None, False, shape[2])
    ref = reference.quantized_decode_linear(x, codes, scales, None, False)
    assert torch.equal(got, ref), f"max diff {(got - ref).abs().max().item():.3e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gelu", [False, True])
def test_matches_reference_and_float_linear(shape, fmt, gelu):
    x, w, b = make_inputs(*shape)
    codes, scales, packed = quantized(w, fmt)
    got = fused(x, packed, b, gelu, shape[2])
    ref = reference.quantized_decode_linear(x, codes, scales, b, gelu)
    if gelu:  # the kernel's GELU is a polynomial erf, the reference's torch's
        err = (got - ref).abs().max().item()
        print(f"{fmt} {shape} gelu: max |kernel - reference| {err:.2e}")
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    else:
        assert torch.equal(got, ref)
    pre = F.linear(x, w, b)
    y = F.gelu(pre) if gelu else pre
    # relative to the pre-activation's range (GELU can squash a 3-output layer's y to ~0)
    rel = ((got - y).abs().max() / pre.abs().max()).item()
    print(f"{fmt} {shape} gelu={gelu}: max error vs float linear {rel:.3%} of max |x w + b|")
    assert rel < FLOAT_TOLERANCE[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_are_bitwise_independent_of_the_batch(fmt):
    x, w, b = make_inputs(40, 512, 1530)  # N: a partial block of 16
    packed = quantized(w, fmt)[2]
    whole = fused(x, packed, b, True, 1530)
    for m in range(1, 41):
        for start in sorted({0, 1, 40 - m}):
            if start + m <= 40:
                assert torch.equal(fused(x[start:start + m], packed, b, True, 1530),
                                   whole[start:start + m]), (
                    f"rows {start}..{start + m - 1} differ from the same rows in a batch of 40")
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fused(x[perm], packed, b, True, 1530), whole[perm])


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_are_bitwise_independent_of_the_thread_count(fmt):
    x, w, b = make_inputs(9, 512, 1024)
    packed = quantized(w, fmt)[2]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, packed, b, False, 1024)
        torch.set_num_threads(max(2, before))
        many = fused(x, packed, b, False, 1024)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_linear_runs_the_packed_weights(fmt):
    """decode_linear (what the fused decode steps call) hands a packed quantized weight over."""
    from ryzen_llm.ops.decode_linear import decode_linear

    x, w, b = make_inputs(5, 96, 40)
    packed = quantized(w, fmt)[2]
    assert torch.equal(decode_linear(x, packed, b, True), fused(x, packed, b, True, 40))
    assert torch.equal(decode_linear(x, packed, None, False, 40), fused(x, packed, None, False, 40))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_rows_stay_in_their_row(fmt):
    x, w, b = make_inputs(3, 64, 20)
    x[1, 5] = float("inf")
    got = fused(x, quantized(w, fmt)[2], b, False, 20)
    if fmt == "int8":
        assert torch.isnan(got[1]).all()
    else:  # int4: only the group holding the inf is NaN, which makes the row's sums NaN
        assert torch.isnan(got[1]).all()
    assert torch.isfinite(got[[0, 2]]).all()


def test_leading_dimensions_and_empty():
    x, w, b = make_inputs(6, 24, 10)
    packed = quantized(w, "int8")[2]
    y = fused(x.view(2, 3, 24), packed, b, False, -1)
    assert y.shape == (2, 3, 10) and torch.equal(y.view(6, 10), fused(x, packed, b, False, -1))
    assert fused(x[:0], packed, b, False, -1).shape == (0, 10)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    x, w, b = make_inputs(5, 40, 12)
    packed = quantized(w, fmt)[2]
    torch.library.opcheck(torch.ops.ryzen_llm.quantized_decode_linear, (x, packed, b, True, -1))
    torch.library.opcheck(torch.ops.ryzen_llm.quantized_decode_linear,
                          (x, packed, None, False, 12))
    torch.library.opcheck(torch.ops.ryzen_llm.decode_linear, (x, packed, b, False, -1),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    x, w, b = make_inputs(3, 40, 12)
    packed = quantized(w, "int4")[2]
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, packed, b, True, 12), fused(x, packed, b, True, 12))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, p, b: (x.double(), p, b, -1), "x: expected float32"),
        (lambda x, p, b: (x[None], p, b, -1), "x: expected a 2-D tensor"),
        (lambda x, p, b: (x.t().contiguous().t(), p, b, -1), "x: expected a contiguous tensor"),
        (lambda x, p, b: (x, p.float(), b, -1), "weight: expected a packed quantized weight"),
        (lambda x, p, b: (x, p[:, :, :32], b, -1), "weight: expected a packed quantized weight"),
        (lambda x, p, b: (x, torch.cat([p, p], 2)[:, :, :64], b, -1),
         "weight: expected a contiguous tensor"),
        (lambda x, p, b: (x, p, None, -1), "out_features: required"),
        (lambda x, p, b: (x, p, None, 40), "out_features: 40 outputs do not fit"),
        (lambda x, p, b: (x, p, b[:-1], 5), "bias: expected sizes"),
        (lambda x, p, b: (x, p, b.bfloat16(), -1), "bias: expected float32"),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input_raises_named_error(mutate, message, fmt):
    x, w, b = make_inputs(6, 8, 5)
    packed = quantized(w, fmt)[2]
    args = mutate(x, packed, b)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.quantized_decode_linear(args[0], args[1], args[2], False, args[3])


@pytest.mark.parametrize("fmt, K, message", [("int8", 4, "an int8 weight packed for 8 input"),
                                              ("int4", 40, "an int4 weight packed for 32 input")])
def test_input_features_must_match_the_packing(fmt, K, message):
    x, w, b = make_inputs(6, 8, 5)  # packed for K = 8 (rounded up to 4, or to 32 for int4)
    with pytest.raises(RuntimeError, match=message):
        fused(torch.randn(6, K), quantized(w, fmt)[2], b, False, -1)


def test_packing_named_errors():
    from ryzen_llm.ops.quantized_decode_linear import pack_quantized_weight

    with pytest.raises(ValueError, match="fmt: expected one of int8, int4"):
        pack_quantized_weight(torch.randn(4, 4), "int3")
    with pytest.raises(ValueError, match="weight: expected a floating-point .N, K. matrix"):
        pack_quantized_weight(torch.randn(4, 4, 4), "int8")
    with pytest.raises(ValueError, match="weight: expected a floating-point"):
        pack_quantized_weight(torch.ones(4, 4, dtype=torch.int8), "int4")
