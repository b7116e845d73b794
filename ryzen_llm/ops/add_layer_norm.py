"""Fused residual add + LayerNorm: the Python face of torch.ops.ryzen_llm.add_layer_norm_*."""
from __future__ import annotations

import torch

from ryzen_llm.ops._autograd import first_order_only, not_differentiable
from ryzen_llm.ops._extension import extension_loaded, kernel_devices
from ryzen_llm.ops.linear import attach_row_codes
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::add_layer_norm_forward")
    def _fake_forward(x, residual, weight, bias, eps, out_dtype=None):
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = x.new_empty(x.shape[:-1], dtype=stats_dtype)
        sum_ = torch.empty_like(x) if residual is not None else x.new_empty((0,))
        return torch.empty_like(x, dtype=out_dtype or x.dtype), sum_, stats, torch.empty_like(stats)

    @torch.library.register_fake(f"{_LIB}::add_layer_norm_int8_forward")
    def _(x, residual, weight, bias, eps, out_dtype=None):
        out, sum_, mean, rstd = _fake_forward(x, residual, weight, bias, eps, out_dtype)
        rows = out.numel() // out.shape[-1] if out.shape[-1] else 0
        return (out, sum_, mean, rstd, x.new_empty((rows, out.shape[-1]), dtype=torch.int8),
                x.new_empty((rows,), dtype=torch.float32))

    @torch.library.register_fake(f"{_LIB}::add_layer_norm_backward")
    def _(grad_out, grad_sum, input, weight, mean, rstd, residual_dtype=None):
        separate = residual_dtype is not None and residual_dtype != input.dtype
        grad_residual = (torch.empty_like(input, dtype=residual_dtype) if separate
                         else input.new_empty((0,)))
        return (torch.empty_like(input), torch.empty_like(weight), torch.empty_like(weight),
                grad_residual)

    def _setup_context(ctx, inputs, output):
        x, residual, weight, bias, eps = inputs[:5]
        out, sum_, mean, rstd = output[:4]
        ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody differentiates
        ctx.has_residual = residual is not None
        ctx.residual_dtype = (residual.dtype if residual is not None and residual.dtype != x.dtype
                              else None)
        ctx.save_for_backward(sum_ if residual is not None else x, weight, mean, rstd)

    def _backward(ctx, grad_out, grad_sum, *_stats_and_codes):
        first_order_only("add_layer_norm")
        input, weight, mean, rstd = ctx.saved_tensors
        if grad_out is None and grad_sum is None:
            return None, None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(input)
        if not ctx.has_residual:
            grad_sum = None  # the op's sum output is empty; x is returned by the wrapper instead
        grad_input, grad_weight, grad_bias, grad_residual = (
            torch.ops.ryzen_llm.add_layer_norm_backward(
                grad_out.contiguous(),
                grad_sum.contiguous() if grad_sum is not None else None,
                input,
                weight,
                mean,
                rstd,
                ctx.residual_dtype,
            )
        )
        if not ctx.has_residual:
            grad_residual = None
        elif ctx.residual_dtype is None:
            grad_residual = grad_input
        return grad_input, grad_residual, grad_weight, grad_bias, None, None

    for _op in ("add_layer_norm_forward", "add_layer_norm_int8_forward"):
        torch.library.register_autograd(f"{_LIB}::{_op}", _backward, setup_context=_setup_context)
    not_differentiable("add_layer_norm_backward", "add_layer_norm")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (x + residual, LayerNorm(x + residual)); see reference.add_layer_norm.

    Under autocast with a float32 x (the residual stream), the branch output `residual` may be in
    the autocast dtype and the normalised output comes back in it: every consumer of that output
    is a linear that autocast would cast to it anyway, and the kernel writes the same rounded
    values in its one pass instead of a separate cast forward and backward."""
    return _add_layer_norm(x, residual, weight, bias, eps, False)


def add_layer_norm_with_row_codes(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_layer_norm whose kernel also writes the normalised output's int8 row codes and
    scales, the ones the level-4 linear reading it would make (int8_quantize's, bit for bit),
    while each row is in cache (level 4, where the device has the kernel: ROW_CODES_KERNEL).
    They travel with the output (ryzen_llm.ops.linear.attach_row_codes), and the int8 op reading
    it takes them instead of quantizing it. A float64 output gets none."""
    return _add_layer_norm(x, residual, weight, bias, eps, True)


def _add_layer_norm(x, residual, weight, bias, eps, int8_rows: bool):
    kind = x.device.type
    mixable = _MIXABLE.get(kind, ()) if x.dtype == torch.float32 else ()
    out_dtype = None
    if mixable and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        out_dtype = dtype if dtype in mixable else None
    if residual is not None and residual.dtype != x.dtype and residual.dtype not in mixable:
        residual = residual.to(x.dtype)
    args = (x.contiguous(), residual.contiguous() if residual is not None else None,
            weight.to(x.dtype), bias.to(x.dtype), eps, out_dtype)
    if int8_rows and (out_dtype or x.dtype) in (torch.float32, torch.bfloat16):
        out, sum_, _, _, codes, scales = torch.ops.ryzen_llm.add_layer_norm_int8_forward(*args)
        attach_row_codes(out, codes, scales)
    else:
        out, sum_, _, _ = torch.ops.ryzen_llm.add_layer_norm_forward(*args)
    return (sum_ if residual is not None else x), out


# Per device type: whether this build writes the output's int8 row codes in the kernel.
ROW_CODES_KERNEL = kernel_devices("add_layer_norm_int8_forward")

# The reduced dtypes a float32 residual stream may mix with in the kernels, per device type.
_MIXABLE = {"cpu": (torch.bfloat16,), "cuda": (torch.bfloat16, torch.float16)}


def _sample(device, g):
    return (leaf(g, device, 3, 7, 40), leaf(g, device, 3, 7, 40), leaf(g, device, 40),
            leaf(g, device, 40), 1e-5)


SPECS = (OpSpec("add_layer_norm", 1, add_layer_norm, reference.add_layer_norm,
                "residual add + LayerNorm, returning both the sum and the normalised sum",
                sample_inputs=_sample),)
