"""Autograd rules shared by the fused ops.

The fused ops' gradients are first order only: a backward kernel computes a gradient's values,
not a differentiable expression of them. Differentiating such a gradient again (a gradient taken
with create_graph=True, as a gradient penalty or a Hessian-vector product does) would silently
drop the kernel's own terms, so it is refused with an error that names the op; the plain-PyTorch
implementation of every op (optimization level 0) supports it.
"""
from __future__ import annotations

import torch


def _error(op: str) -> RuntimeError:
    return RuntimeError(
        f"ryzen_llm {op}: the fused kernel's gradient is first order only; a backward with "
        "create_graph=True (to differentiate the gradient again) needs the plain-PyTorch "
        "implementation (optimization level 0)"
    )


def first_order_only(op: str) -> None:
    """Called first in a fused op's backward: raises when the backward runs with grad mode on,
    which in eager mode means create_graph=True (a plain backward runs without grad mode, and
    torch.compile traces the backward without it)."""
    if torch.is_grad_enabled():
        raise _error(op)


def not_differentiable(backward_op: str, op: str) -> None:
    """Gives torch.ops.ryzen_llm.<backward_op>, the kernel behind `op`'s backward, an autograd
    formula that raises. first_order_only refuses create_graph before the kernel runs, so the
    formula is for tracing (torch.compile, opcheck), which calls the kernel with inputs that
    require grad and would otherwise warn that the op has no autograd formula."""

    def backward(ctx, *grads):
        raise _error(op)

    torch.library.register_autograd(f"ryzen_llm::{backward_op}", backward)
