"""Fused bias + exact GELU: the Python face of torch.ops.ryzen_llm.bias_gelu_*."""
from __future__ import annotations

import torch

from ryzen_llm.ops._autograd import first_order_only, not_differentiable
from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::bias_gelu_forward")
    def _(x, bias):
        return torch.empty_like(x)

    @torch.library.register_fake(f"{_LIB}::bias_gelu_backward")
    def _(grad_y, x, bias):
        return torch.empty_like(x), torch.empty_like(bias)

    def _setup_context(ctx, inputs, output):
        x, bias = inputs
        ctx.save_for_backward(x, bias)

    def _backward(ctx, grad_y):
        first_order_only("bias_gelu")
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = torch.ops.ryzen_llm.bias_gelu_backward(grad_y.contiguous(), x, bias)
        return grad_x, grad_bias

    torch.library.register_autograd(
        f"{_LIB}::bias_gelu_forward", _backward, setup_context=_setup_context
    )
    not_differentiable("bias_gelu_backward", "bias_gelu")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fused GELU(x + bias), exact erf form; see reference.bias_gelu. x: (..., F), bias: (F,).

    The bias is cast to x's dtype (under autocast x is the bf16 output of a linear while the bias
    parameter is float32), so the result keeps x's dtype."""
    return torch.ops.ryzen_llm.bias_gelu_forward(x.contiguous(), bias.to(x.dtype).contiguous())


def _sample(device, g):
    return (leaf(g, device, 5, 48), leaf(g, device, 48))


SPECS = (OpSpec("bias_gelu", 1, bias_gelu, reference.bias_gelu, "bias + exact GELU",
                sample_inputs=_sample),)
