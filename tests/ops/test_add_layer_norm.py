"""Fused residual add + LayerNorm against its plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

import ryzen_llm.ops.add_layer_norm  # noqa: F401  (registers the fake and autograd kernels)
from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# Awkward on purpose: a single row, odd widths, 3-D with T = 97.
SHAPES = [(1, 1), (1, 48), (3, 97, 80), (2, 128, 512), (200, 33)]


def fused(x, residual, weight, bias, eps=1e-5):
    from ryzen_llm.ops.add_layer_norm import add_layer_norm

    return add_layer_norm(x, residual, weight, bias, eps)


def make_inputs(shape, dtype, device, with_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5)
    r = torch.randn(shape, generator=g, dtype=torch.float64) if with_residual else None
    w = torch.randn(C, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
    return conv(x), conv(r), conv(w), conv(b)


def run_with_grads(fn, inputs, grads):
    out_sum, out = fn(*inputs)
    torch.autograd.backward([out, out_sum], [grads[0], grads[1]])
    result = [out_sum.detach(), out.detach()] + [
        t.grad.detach() if t is not None else None for t in inputs
    ]
    for t in inputs:
        if t is not None:
            t.grad = None
    return result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_within_pytorch_error(device, with_residual, shape, dtype):
    inputs64 = make_inputs(shape, torch.float64, device, with_residual)
    inputs = make_inputs(shape, dtype, device, with_residual)
    g = torch.Generator().manual_seed(1)
    grads64 = [torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    grads = [t.to(dtype) for t in grads64]
    ref64 = run_with_grads(reference.add_layer_norm, inputs64, grads64)
    plain = run_with_grads(reference.add_layer_norm, inputs, grads)
    got = run_with_grads(fused, inputs, grads)
    names = ["sum", "out", "grad_x", "grad_residual", "grad_weight", "grad_bias"]
    for name, a, b, c in zip(names, got, plain, ref64):
        if c is None:
            assert a is None
            continue
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_within_pytorch_error(f"{name} {dtype} {shape}", a, b, c)


@pytest.mark.parametrize("with_residual", [True, False])
def test_gradcheck_fp64(with_residual):
    x, r, w, b = make_inputs((3, 7, 10), torch.float64, "cpu", with_residual)
    args = (x, r, w, b) if with_residual else (x, w, b)

    def f(*a):
        if with_residual:
            return fused(a[0], a[1], a[2], a[3])
        return fused(a[0], None, a[1], a[2])

    assert torch.autograd.gradcheck(f, args)


def test_opcheck():
    for with_residual in (True, False):
        x, r, w, b = make_inputs((4, 5, 24), torch.float32, "cpu", with_residual)
        torch.library.opcheck(torch.ops.ryzen_llm.add_layer_norm_forward, (x, r, w, b, 1e-5))
    x, _, w, b = make_inputs((6, 24), torch.float32, "cpu", False)
    out, _, mean, rstd = torch.ops.ryzen_llm.add_layer_norm_forward(x, None, w, b, 1e-5)
    grad = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.ryzen_llm.add_layer_norm_backward,
        (grad, grad.clone(), x.detach(), w.detach(), mean.detach(), rstd.detach()),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 80), (3, 97, 48), (2, 200, 64)])
def test_autocast_mixed_dtypes_are_the_casts_bit_for_bit(device, with_residual, shape):
    """Under bf16 autocast a float32 x takes the bf16 branch output and returns out in bf16: the
    same bits as widening the residual, running the float32 op and rounding out (forward and
    every gradient, the residual's in bf16)."""
    x, r, w, b = make_inputs(shape, torch.float32, device, with_residual)
    if r is not None:
        r = r.detach().bfloat16().requires_grad_()
    g = torch.Generator().manual_seed(2)
    grad_sum = torch.randn(shape, generator=g).to(device)
    grad_out = torch.randn(shape, generator=g).to(device).bfloat16()
    inputs = [t for t in (x, r, w, b) if t is not None]

    with torch.autocast(device, dtype=torch.bfloat16):
        s1, o1 = fused(x, r, w, b)
    assert (s1.dtype, o1.dtype) == (torch.float32, torch.bfloat16)
    g1 = torch.autograd.grad((s1, o1) if r is not None else (o1,),
                             inputs, (grad_sum, grad_out) if r is not None else (grad_out,))

    s2, o2 = fused(x, r.float() if r is not None else None, w, b)
    o2 = o2.bfloat16()
    g2 = torch.autograd.grad((s2, o2) if r is not None else (o2,),
                             inputs, (grad_sum, grad_out) if r is not None else (grad_out,))
    assert torch.equal(s1, s2) and torch.equal(o1, o2)
    for name, a, c in zip(["x", "residual", "weight", "bias"] if r is not None
                          else ["x", "weight", "bias"], g1, g2):
        assert a.dtype == c.dtype and torch.equal(a, c), f"grad {name}"


def test_opcheck_mixed_dtypes():
    x, r, w, b = make_inputs((4, 5, 24), torch.float32, "cpu", True)
    r = r.detach().bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.ryzen_llm.add_layer_norm_forward,
                          (x, r, w, b, 1e-5, torch.bfloat16))
    out, s, mean, rstd = torch.ops.ryzen_llm.add_layer_norm_forward(
        x.detach(), r.detach(), w.detach(), b.detach(), 1e-5, torch.bfloat16)
    torch.library.opcheck(
        torch.ops.ryzen_llm.add_layer_norm_backward,
        (torch.randn_like(out), torch.randn_like(s), s, w.detach(), mean, rstd, torch.bfloat16),
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda x, r, w, b: (x, r.half(), w, b, 1e-5), "residual: expected dtype"),
        (lambda x, r, w, b: (x, r, w, b, 1e-5, torch.float16), "out_dtype: expected dtype"),
        (lambda x, r, w, b: (x.double(), r.bfloat16(), w.double(), b.double(), 1e-5),
         "residual: expected dtype"),
        (lambda x, r, w, b: (x.bfloat16(), r, w.bfloat16(), b.bfloat16(), 1e-5),
         "residual: expected dtype"),
    ],
)
def test_mixed_dtypes_outside_float32_with_bfloat16_raise_named_error(args, message):
    x, r, w, b = [t.detach() for t in make_inputs((6, 8), torch.float32, "cpu", True)]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.add_layer_norm_forward(*args(x, r, w, b))


def test_torch_compile_fullgraph():
    x, r, w, b = make_inputs((2, 9, 40), torch.float32, "cpu", True)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    s1, o1 = compiled(x, r, w, b)
    s2, o2 = fused(x, r, w, b)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, r, w, b: (x.int(), r, w, b), "input: expected float32, float64 or bfloat16"),
        (lambda x, r, w, b: (x, r.double(), w, b), "residual: expected dtype"),
        (lambda x, r, w, b: (x, r[:, :-1].contiguous(), w, b), "residual: expected sizes"),
        (lambda x, r, w, b: (x, r, w[:-1], b), "weight: expected sizes"),
        (lambda x, r, w, b: (x, r, w, b[None]), "bias: expected sizes"),
        (lambda x, r, w, b: (x.t(), r.t(), w, b), "input: expected a contiguous tensor"),
        (lambda x, r, w, b: (x.new_empty((4, 0)), None, w[:0], b[:0]), "non-empty"),
    ],
)
def test_bad_input_raises_named_error(mutate, message):
    x, r, w, b = [t.detach() for t in make_inputs((6, 8), torch.float32, "cpu", True)]
    if message.startswith("input: expected a contiguous"):
        x, r = torch.randn(8, 6).t(), torch.randn(8, 6).t()
        args = (x, r, w[:6], b[:6])
    else:
        args = mutate(x, r, w, b)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.add_layer_norm_forward(*args, 1e-5)


def _quantized_rows(out):
    """int8_quantize's row codes and scales of out (..., C), the level-4 linear's operand."""
    return torch.ops.ryzen_llm.int8_quantize(out.reshape(-1, out.shape[-1]).contiguous(), True,
                                             False)[:2]


@pytest.mark.parametrize("with_residual", [True, False])
# C a multiple of 16 (48, 512) takes the AVX-512 quantization where the CPU has it
@pytest.mark.parametrize("shape", [(1, 1), (1, 48), (3, 97, 80), (2, 128, 512), (200, 33)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_forward_writes_the_codes_int8_quantize_makes(with_residual, shape, out_dtype):
    """add_layer_norm_int8_forward: add_layer_norm_forward's four outputs bit for bit, and the
    int8 row codes and scales of out that the int8 linear would make from it, bit for bit
    (float32 x; a bfloat16 out is autocast's mixed form, with a bfloat16 residual)."""
    x, r, w, b = [t.detach() if t is not None else None
                  for t in make_inputs(shape, torch.float32, "cpu", with_residual)]
    if r is not None:
        r = r.to(out_dtype)
    plain = torch.ops.ryzen_llm.add_layer_norm_forward(x, r, w, b, 1e-5, out_dtype)
    *outs, codes, scales = torch.ops.ryzen_llm.add_layer_norm_int8_forward(x, r, w, b, 1e-5,
                                                                          out_dtype)
    for name, a, c in zip(["out", "sum", "mean", "rstd"], outs, plain):
        assert torch.equal(a, c), name
    expect_codes, expect_scales = _quantized_rows(plain[0])
    assert torch.equal(codes, expect_codes) and torch.equal(scales, expect_scales)


def test_int8_forward_marks_a_nonfinite_row_as_int8_quantize_does():
    x, r, w, b = [t.detach() for t in make_inputs((5, 64), torch.float32, "cpu", True)]
    x[2, 7] = float("inf")  # the row's mean and variance become NaN: out's row is all NaN
    out, _, _, _, codes, scales = torch.ops.ryzen_llm.add_layer_norm_int8_forward(
        x, r, w, b, 1e-5)
    expect_codes, expect_scales = _quantized_rows(out)
    assert torch.equal(codes, expect_codes)
    torch.testing.assert_close(scales, expect_scales, rtol=0, atol=0, equal_nan=True)
    assert scales[2].isnan() and not codes[2].any() and scales[[0, 1, 3, 4]].isfinite().all()


def test_int8_forward_differentiates_as_the_plain_op():
    x, r, w, b = make_inputs((3, 9, 32), torch.float32, "cpu", True)
    gs, go = torch.randn(3, 9, 32), torch.randn(3, 9, 32)
    grads = []
    for op in ("add_layer_norm_forward", "add_layer_norm_int8_forward"):
        out, s = getattr(torch.ops.ryzen_llm, op)(x, r, w, b, 1e-5)[:2]
        grads.append(torch.autograd.grad((out, s), (x, r, w, b), (go, gs)))
    for name, a, c in zip("xrwb", *grads):
        assert torch.equal(a, c), name


def test_opcheck_int8_forward():
    for with_residual in (True, False):
        x, r, w, b = make_inputs((4, 5, 24), torch.float32, "cpu", with_residual)
        torch.library.opcheck(torch.ops.ryzen_llm.add_layer_norm_int8_forward,
                              (x, r, w, b, 1e-5))
    x, r, w, b = make_inputs((4, 5, 24), torch.float32, "cpu", True)
    torch.library.opcheck(torch.ops.ryzen_llm.add_layer_norm_int8_forward,
                          (x, r.detach().bfloat16().requires_grad_(), w, b, 1e-5, torch.bfloat16))


def test_int8_forward_refuses_a_float64_output_by_name():
    x, r, w, b = [t.detach() for t in make_inputs((6, 8), torch.float64, "cpu", True)]
    with pytest.raises(RuntimeError, match="out must be float32 or bfloat16 for int8 codes"):
        torch.ops.ryzen_llm.add_layer_norm_int8_forward(x, r, w, b, 1e-5)
    # the Python face writes no codes for float64 and returns the plain op's outputs
    from ryzen_llm.ops.add_layer_norm import add_layer_norm_with_row_codes
    from ryzen_llm.ops.linear import given_row_codes

    _, out = add_layer_norm_with_row_codes(x, r, w, b, 1e-5)
    assert given_row_codes(out, out) == (None, None)
