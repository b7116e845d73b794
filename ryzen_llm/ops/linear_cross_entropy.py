"""Fused, chunked linear + cross-entropy: the Python face of
torch.ops.ryzen_llm.linear_cross_entropy_forward."""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::linear_cross_entropy_forward")
    def _(h, weight, targets, ignore_index, need_grad_h, need_grad_weight):
        loss_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        loss = h.new_empty((), dtype=loss_dtype)
        grad_h = torch.empty_like(h) if need_grad_h else h.new_empty((0,))
        grad_weight = torch.empty_like(weight) if need_grad_weight else weight.new_empty((0,))
        return loss, grad_h, grad_weight

    def _setup_context(ctx, inputs, output):
        h, weight, targets, ignore_index, need_grad_h, need_grad_weight = inputs
        loss, grad_h, grad_weight = output
        ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody differentiates
        ctx.need = (need_grad_h, need_grad_weight)
        ctx.mark_non_differentiable(grad_h, grad_weight)
        ctx.save_for_backward(grad_h, grad_weight)

    def _backward(ctx, grad_loss, _grad_h, _grad_weight):
        if grad_loss is None:
            return None, None, None, None, None, None
        grad_h, grad_weight = ctx.saved_tensors
        need_h, need_w = ctx.need
        # The gradients were computed for d(loss) = 1 during the forward: only scale them.
        gh = grad_h * grad_loss.to(grad_h.dtype) if need_h else None
        gw = grad_weight * grad_loss.to(grad_weight.dtype) if need_w else None
        return gh, gw, None, None, None, None

    torch.library.register_autograd(
        f"{_LIB}::linear_cross_entropy_forward", _backward, setup_context=_setup_context
    )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of h @ weight.T against targets; see reference.linear_cross_entropy.

    h: (N, C), weight: (V, C), targets: (N,) int64. Never holds the (N, V) logits: the gradients
    are computed chunk by chunk during the forward (only when autograd will want them), so
    calling backward twice on the same loss is not supported. The loss is float32 (float64 for
    float64 inputs). When every target is ignore_index the loss is nan (0/0, like
    F.cross_entropy) and the gradients are zero. A target outside [0, V) that is not
    ignore_index raises a RuntimeError naming targets. Under autocast (for h's device type) h and
    weight are cast to the autocast dtype, as F.linear would do; the loss stays float32."""
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    h = h.to(dtype).contiguous()
    weight = weight.to(dtype).contiguous()
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.ryzen_llm.linear_cross_entropy_forward(
        h,
        weight,
        targets.contiguous(),
        ignore_index,
        grad_on and h.requires_grad,
        grad_on and weight.requires_grad,
    )
    return loss


def _sample(device, g):
    targets = torch.randint(0, 97, (11,), generator=g).to(device)
    return (leaf(g, device, 11, 40), leaf(g, device, 97, 40), targets, -100)


SPECS = (OpSpec("linear_cross_entropy", 1, linear_cross_entropy, reference.linear_cross_entropy,
                "LM head + cross-entropy in chunks, the logits never whole",
                sample_inputs=_sample),)
