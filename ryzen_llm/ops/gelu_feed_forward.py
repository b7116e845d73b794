"""Fused feed-forward fc2(GELU(fc1(x))): the Python face of
torch.ops.ryzen_llm.gelu_feed_forward_*."""
from __future__ import annotations

import torch

from ryzen_llm.ops._autograd import first_order_only, not_differentiable
from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::gelu_feed_forward_forward")
    def _(x, w1, b1, w2, b2, recompute):
        N = x.numel() // x.shape[-1]
        h_pre = x.new_empty((N, w1.shape[0]))
        h_act = x.new_empty((0,)) if recompute else torch.empty_like(h_pre)
        return torch.empty_like(x), h_pre, h_act

    @torch.library.register_fake(f"{_LIB}::gelu_feed_forward_backward")
    def _(grad_y, x, w1, w2, h_pre, h_act, recompute):
        return (
            torch.empty_like(x),
            torch.empty_like(w1),
            w1.new_empty((w1.shape[0],)),
            torch.empty_like(w2),
            w2.new_empty((w2.shape[0],)),
        )

    def _setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, recompute = inputs
        y, h_pre, h_act = output
        ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody differentiates
        ctx.recompute = recompute
        ctx.save_for_backward(x, w1, w2, h_pre, h_act)

    def _backward(ctx, grad_y, grad_h_pre, grad_h_act):
        first_order_only("gelu_feed_forward")
        if grad_y is None:  # only h_pre / h_act were used, and they are not differentiable here
            return None, None, None, None, None, None
        x, w1, w2, h_pre, h_act = ctx.saved_tensors
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = torch.ops.ryzen_llm.gelu_feed_forward_backward(
            grad_y.contiguous(), x, w1, w2, h_pre, h_act, ctx.recompute
        )
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None

    torch.library.register_autograd(
        f"{_LIB}::gelu_feed_forward_forward", _backward, setup_context=_setup_context
    )
    not_differentiable("gelu_feed_forward_backward", "gelu_feed_forward")


def gelu_feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    recompute: bool = False,
) -> torch.Tensor:
    """Fused fc2(GELU(fc1(x))); see reference.gelu_feed_forward. x: (B, T, C) or (N, C);
    w1: (F, C), b1: (F,), w2: (C, F), b2: (C,).

    Saves the pre-activation (N, F) for backward, and the activation too unless recompute=True
    (then backward recomputes it in the dGELU pass: N*F elements less memory, one GELU more).
    Under autocast (for x's device type) every input is cast to the autocast dtype, as F.linear
    would do."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
    else:
        dtype = x.dtype
    x, w1, b1, w2, b2 = (t.to(dtype).contiguous() for t in (x, w1, b1, w2, b2))
    y, _, _ = torch.ops.ryzen_llm.gelu_feed_forward_forward(x, w1, b1, w2, b2, recompute)
    return y


def _sample(device, g):
    return (leaf(g, device, 2, 5, 40), leaf(g, device, 72, 40), leaf(g, device, 72),
            leaf(g, device, 40, 72), leaf(g, device, 40))


SPECS = (OpSpec("gelu_feed_forward", 3, gelu_feed_forward, reference.gelu_feed_forward,
                "the whole feed-forward: fc1, bias + GELU, fc2", sample_inputs=_sample),)
