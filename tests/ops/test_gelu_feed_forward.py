"""Fused feed-forward fc2(GELU(fc1(x))) against its plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# (x shape, F): batch 1 and 3, T = 97, a single row, C = 48 / 80 / 512, the seed's F = 1024.
SHAPES = [((1, 1, 48), 96), ((3, 97, 80), 200), ((200, 48), 80), ((1, 128, 512), 1024)]
NAMES = ["y", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"]


def fused(x, w1, b1, w2, b2, recompute=False):
    from ryzen_llm.ops.gelu_feed_forward import gelu_feed_forward

    return gelu_feed_forward(x, w1, b1, w2, b2, recompute)


def make_inputs(shape, F, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w1 = torch.randn(F, C, generator=g, dtype=torch.float64) * C**-0.5
    b1 = torch.randn(F, generator=g, dtype=torch.float64) * 0.5
    w2 = torch.randn(C, F, generator=g, dtype=torch.float64) * F**-0.5
    b2 = torch.randn(C, generator=g, dtype=torch.float64) * 0.5
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]


def run_with_grads(fn, inputs, grad):
    y = fn(*inputs)
    grads = torch.autograd.grad(y, inputs, grad)
    return [y.detach()] + list(grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("shape, F", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_within_pytorch_error(device, recompute, shape, F, dtype):
    inputs = make_inputs(shape, F, dtype, device)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]  # the same values
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref64 = run_with_grads(reference.gelu_feed_forward, inputs64, grad.double())
    plain = run_with_grads(reference.gelu_feed_forward, inputs, grad)
    got = run_with_grads(lambda *a: fused(*a, recompute=recompute), inputs, grad)
    for name, a, b, c in zip(NAMES, got, plain, ref64):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_within_pytorch_error(f"{name} {dtype} {shape}", a, b, c)


def test_autocast_casts_like_linear():
    inputs = make_inputs((2, 9, 48), 96, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(*inputs)
        y_ref = reference.gelu_feed_forward(*inputs)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in inputs)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck_fp64(recompute):
    inputs = make_inputs((2, 3, 6), 10, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *a: fused(*a, recompute=recompute), inputs)


def test_opcheck():
    for recompute in (False, True):
        x, w1, b1, w2, b2 = make_inputs((2, 5, 24), 40, torch.float32, "cpu")
        torch.library.opcheck(
            torch.ops.ryzen_llm.gelu_feed_forward_forward, (x, w1, b1, w2, b2, recompute)
        )
        y, h_pre, h_act = torch.ops.ryzen_llm.gelu_feed_forward_forward(
            x, w1, b1, w2, b2, recompute
        )
        args = (torch.randn_like(y), x.detach(), w1.detach(), w2.detach(), h_pre.detach(),
                h_act.detach(), recompute)
        torch.library.opcheck(torch.ops.ryzen_llm.gelu_feed_forward_backward, args)


def test_torch_compile_fullgraph():
    inputs = make_inputs((2, 9, 40), 64, torch.float32, "cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), fused(*inputs))


@pytest.mark.parametrize(
    "index, mutate, message",
    [
        (0, lambda t: t.int(), "x: expected float32, float64 or bfloat16"),
        (0, lambda t: t[0, 0], "x: expected a \\(N, C\\) or \\(B, T, C\\) tensor"),
        (1, lambda t: t[:, :-1].contiguous(), "w1: expected sizes"),
        (1, lambda t: t.double(), "w1: expected dtype"),
        (2, lambda t: t[:-1], "b1: expected sizes"),
        (3, lambda t: t.t().contiguous(), "w2: expected sizes"),
        (3, lambda t: t.t().contiguous().t(), "w2: expected a contiguous tensor"),
        (4, lambda t: t[None], "b2: expected sizes"),
    ],
)
def test_bad_input_raises_named_error(index, mutate, message):
    args = [t.detach() for t in make_inputs((2, 3, 8), 12, torch.float32, "cpu")]
    args[index] = mutate(args[index])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.gelu_feed_forward_forward(*args, False)
