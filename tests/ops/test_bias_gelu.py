"""Fused bias + exact GELU against its plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# Awkward on purpose: one row, odd widths, 3-D with T = 97; wide pre-activations (x * 3) so the
# GELU tails (large |x|) are exercised.
SHAPES = [(1, 1), (1, 48), (3, 97, 80), (200, 512), (2, 128, 1024)]


def fused(x, bias):
    from ryzen_llm.ops.bias_gelu import bias_gelu

    return bias_gelu(x, bias)


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, b)]


def run_with_grads(fn, inputs, grad):
    y = fn(*inputs)
    y.backward(grad)
    out = [y.detach()] + [t.grad.detach() for t in inputs]
    for t in inputs:
        t.grad = None
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_within_pytorch_error(device, shape, dtype):
    inputs64 = make_inputs(shape, torch.float64, device)
    inputs = make_inputs(shape, dtype, device)
    grad64 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad64 = grad64.to(device)
    # fp64 reference on the same (rounded) inputs, so only the op's own error is measured.
    inputs64 = [t.detach().to(dtype).double().requires_grad_() for t in inputs64]
    grad64 = grad64.to(dtype).double()
    ref64 = run_with_grads(reference.bias_gelu, inputs64, grad64)
    plain = run_with_grads(reference.bias_gelu, inputs, grad64.to(dtype))
    got = run_with_grads(fused, inputs, grad64.to(dtype))
    for name, a, b, c in zip(["y", "grad_x", "grad_bias"], got, plain, ref64):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_within_pytorch_error(f"{name} {dtype} {shape}", a, b, c)


def test_gelu_accuracy_over_range():
    """The vectorised erf against fp64 over [-12, 12]: no worse than torch's float32 GELU."""
    x = torch.linspace(-12, 12, 100_001, dtype=torch.float32)
    ref = torch.nn.functional.gelu(x.double())
    zero = torch.zeros(1)
    err_fused = (fused(x[:, None], zero).double()[:, 0] - ref).abs().max().item()
    err_torch = (torch.nn.functional.gelu(x).double() - ref).abs().max().item()
    print(f"GELU max abs error: fused {err_fused:.3e}, torch {err_torch:.3e}")
    assert err_fused <= err_torch


def test_gradcheck_fp64():
    x, b = make_inputs((3, 7, 10), torch.float64, "cpu")
    assert torch.autograd.gradcheck(fused, (x, b))


def test_opcheck():
    x, b = make_inputs((4, 5, 24), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.ryzen_llm.bias_gelu_forward, (x, b))
    grad = torch.randn(4, 5, 24)
    torch.library.opcheck(torch.ops.ryzen_llm.bias_gelu_backward, (grad, x.detach(), b.detach()))


def test_torch_compile_fullgraph():
    x, b = make_inputs((2, 9, 40), torch.float32, "cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, b), fused(x, b))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, b: (x.int(), b), "x: expected float32, float64 or bfloat16"),
        (lambda x, b: (x, b.double()), "bias: expected dtype"),
        (lambda x, b: (x, b[:-1]), "bias: expected sizes"),
        (lambda x, b: (x.t(), b[:6]), "x: expected a contiguous tensor"),
    ],
)
def test_bad_input_raises_named_error(mutate, message):
    x, b = [t.detach() for t in make_inputs((6, 8), torch.float32, "cpu")]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.bias_gelu_forward(*mutate(x, b))
