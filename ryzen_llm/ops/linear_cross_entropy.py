"""Fused, chunked linear + cross-entropy: the Python face of
torch.ops.ryzen_llm.linear_cross_entropy_forward and of its level-4 form,
int8_linear_cross_entropy_forward, whose logits GEMM runs on int8 codes."""
from __future__ import annotations

import torch

from ryzen_llm.ops._autograd import first_order_only
from ryzen_llm.ops._extension import extension_loaded, kernel_devices
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf
from ryzen_llm.ops.linear import given_row_codes, weight_codes

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::linear_cross_entropy_forward")
    def _(h, weight, targets, ignore_index, need_grad_h, need_grad_weight):
        loss_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        loss = h.new_empty((), dtype=loss_dtype)
        grad_h = torch.empty_like(h) if need_grad_h else h.new_empty((0,))
        grad_weight = torch.empty_like(weight) if need_grad_weight else weight.new_empty((0,))
        return loss, grad_h, grad_weight

    @torch.library.register_fake(f"{_LIB}::int8_linear_cross_entropy_forward")
    def _(h, weight, w_codes, w_scales, targets, ignore_index, need_grad_h, need_grad_weight,
          h_codes=None, h_scales=None, int8_grad_h=False, int8_grad_weight=False):
        return torch.ops.ryzen_llm.linear_cross_entropy_forward.default(
            h, weight, targets, ignore_index, need_grad_h, need_grad_weight)

    # Both ops: inputs (h, weight, ..., need_grad_h, need_grad_weight[, h_codes, h_scales]),
    # outputs (loss, grad_h, grad_weight); only h and weight have gradients.
    def _setup_context(ctx, inputs, output):
        loss, grad_h, grad_weight = output
        ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody differentiates
        last = 8 if len(inputs) > 8 else len(inputs)  # after need_grad_weight: h's codes
        ctx.need = inputs[last - 2:last]
        ctx.rest = len(inputs) - 2
        ctx.mark_non_differentiable(grad_h, grad_weight)
        ctx.save_for_backward(grad_h, grad_weight)

    def _backward(ctx, grad_loss, _grad_h, _grad_weight):
        first_order_only("linear_cross_entropy")
        if grad_loss is None:
            return (None,) * (ctx.rest + 2)
        grad_h, grad_weight = ctx.saved_tensors
        need_h, need_w = ctx.need
        # The gradients were computed for d(loss) = 1 during the forward: only scale them.
        gh = grad_h * grad_loss.to(grad_h.dtype) if need_h else None
        gw = grad_weight * grad_loss.to(grad_weight.dtype) if need_w else None
        return (gh, gw) + (None,) * ctx.rest

    for _op in ("linear_cross_entropy_forward", "int8_linear_cross_entropy_forward"):
        torch.library.register_autograd(f"{_LIB}::{_op}", _backward, setup_context=_setup_context)


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
    h, weight = _autocast(h, weight)
    return _loss(torch.ops.ryzen_llm.linear_cross_entropy_forward, h, weight, (), targets,
                 ignore_index)


def _autocast(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h and weight in the autocast dtype of h's device (as F.linear would take them), contiguous."""
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    return h.to(dtype).contiguous(), weight.to(dtype).contiguous()


def _loss(op, h, weight, codes: tuple, targets, ignore_index: int,
          h_codes: tuple = ()) -> torch.Tensor:
    """The loss of one of the two ops, asking for the gradients autograd will want."""
    grad_on = torch.is_grad_enabled()
    loss, _, _ = op(h, weight, *codes, targets.contiguous(), ignore_index,
                    grad_on and h.requires_grad, grad_on and weight.requires_grad, *h_codes)
    return loss


# Per device type: whether this build has the int8 LM head.
INT8_KERNEL = kernel_devices("int8_linear_cross_entropy_forward")

# Whether the int8 LM head's input gradient (grad_h) is an int8 GEMM too, as the blocks' linears'
# input gradients are; False: the float GEMM of the logits' gradient and the weight.
INT8_GRAD_H = True

# Whether its weight gradient (G.T @ h) is an int8 GEMM too, as the blocks' linears' weight
# gradients are: G times h's row scales under one scale bounding every entry (|G| <= 1 / n_valid:
# per-column scales would need the logits whole), stochastically rounded, times h's row codes;
# False: the float GEMM of G and h in h's dtype.
INT8_GRAD_WEIGHT = True


def int8_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """linear_cross_entropy with the logits GEMM on int8 codes (level 4; the math of
    reference.int8_linear_cross_entropy): h quantized per row, the weight per vocabulary row from
    its float values (ops.linear.weight_codes: once per optimizer step). The gradients are the
    float linear's at those logits, computed from h and weight in the autocast dtype as in
    linear_cross_entropy, except grad_h with INT8_GRAD_H: an int8 GEMM of the logits' gradient
    (times the weight's scales, quantized per row) and the weight's codes, and grad_weight with
    INT8_GRAD_WEIGHT: an int8 GEMM of the logits' gradient (times h's row scales, under one
    bound scale) and h's row codes, both stochastically rounded. h must be float32 or bfloat16
    (after autocast); CPU only (INT8_KERNEL): elsewhere the KernelSet runs
    linear_cross_entropy."""
    codes = weight_codes(weight)
    h_in = h
    h, weight = _autocast(h, weight)
    if h.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"int8_linear_cross_entropy: h must be float32 or bfloat16 (or autocast "
                        f"to one), got {h.dtype}")
    return _loss(torch.ops.ryzen_llm.int8_linear_cross_entropy_forward, h, weight, codes, targets,
                 ignore_index, (*given_row_codes(h_in, h), INT8_GRAD_H, INT8_GRAD_WEIGHT))


def _sample(device, g):
    targets = torch.randint(0, 97, (11,), generator=g).to(device)
    return (leaf(g, device, 11, 40), leaf(g, device, 97, 40), targets, -100)


SPECS = (OpSpec("linear_cross_entropy", 1, linear_cross_entropy, reference.linear_cross_entropy,
                "LM head + cross-entropy in chunks, the logits never whole",
                sample_inputs=_sample),
         OpSpec("int8_linear_cross_entropy", 4, int8_linear_cross_entropy,
                reference.linear_cross_entropy,
                "LM head + cross-entropy in chunks, its three GEMMs on int8 codes (the gradients' "
                "stochastically rounded)"))
