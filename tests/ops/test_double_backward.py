"""The fused ops' gradients are first order only (ryzen_llm/ops/_autograd.py): a backward with
create_graph=True through one raises an error that names the op, where it would otherwise drop
the op's own second-order terms without a word; a plain backward is unchanged, and the
plain-PyTorch references the error points to do take second derivatives."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from ryzen_llm.ops import linear as L
from ryzen_llm.ops import linear_cross_entropy as LCE
from ryzen_llm.ops.registry import registry
from tests.ops.conftest import requires_extension

pytestmark = requires_extension

# Ops whose declaration gives sample inputs, with the name the error gives them.
SAMPLED = {"add_layer_norm": "add_layer_norm", "bias_gelu": "bias_gelu",
           "linear_cross_entropy": "linear_cross_entropy", "causal_attention": "causal_attention",
           "gelu_feed_forward": "gelu_feed_forward"}


def _int8_cases(g):
    x = torch.randn(6, 40, generator=g).requires_grad_()
    w1 = (torch.randn(24, 40, generator=g) / 7).requires_grad_()
    b1 = torch.randn(24, generator=g).requires_grad_()
    w2 = (torch.randn(40, 24, generator=g) / 5).requires_grad_()
    b2 = torch.randn(40, generator=g).requires_grad_()
    targets = torch.tensor([1, 5, 0, 23, 7, 2])
    return {
        "linear (int8)": (L.int8_linear, (x, w1, b1, True)),
        "feed-forward (int8)": (L.int8_feed_forward, (x, w1, b1, w2, b2)),
        "linear_cross_entropy": (LCE.int8_linear_cross_entropy, (x, w1, targets)),
    }


def cases():
    """(id, error name, fused fn, args, plain-PyTorch fn or None)."""
    out = []
    for op, name in SAMPLED.items():
        spec = registry()[op]
        args = spec.sample_inputs("cpu", torch.Generator().manual_seed(0))
        out.append((op, name, spec.fused, args, spec.reference))
    for i, (name, (fn, args)) in enumerate(_int8_cases(torch.Generator().manual_seed(1)).items()):
        out.append((f"int8-{i}", name, fn, args, None))
    return out


def _loss_and_inputs(fn, args):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float().sum() * (i + 1) for i, o in enumerate(outs)
                if isinstance(o, torch.Tensor) and o.requires_grad), torch.zeros(()))
    return loss, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_create_graph_through_a_fused_op_raises_naming_it(case):
    _, name, fused, args, _ = case
    loss, inputs = _loss_and_inputs(fused, args)
    with pytest.raises(RuntimeError, match=rf"ryzen_llm {re.escape(name)}: .*first order only"):
        torch.autograd.grad(loss, inputs, create_graph=True)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_a_plain_backward_is_unchanged_and_warns_nothing(case):
    _, _, fused, args, _ = case
    loss, inputs = _loss_and_inputs(fused, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.autograd.grad(loss, inputs)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", [c for c in cases() if c[4] is not None], ids=lambda c: c[0])
def test_the_plain_pytorch_reference_takes_second_derivatives(case):
    _, _, _, args, plain = case
    loss, inputs = _loss_and_inputs(plain, args)
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs, allow_unused=True)
    assert any(s is not None and s.abs().sum() > 0 for s in second)


def test_the_backward_kernel_called_directly_is_not_differentiable():
    """The kernel behind a backward has an autograd formula that refuses, rather than none
    (which torch warns about and treats as a constant)."""
    x = torch.randn(4, 24, requires_grad=True)
    w, b = torch.ones(24, requires_grad=True), torch.zeros(24)
    _, _, mean, rstd = torch.ops.ryzen_llm.add_layer_norm_forward(x, None, w, b, 1e-5)
    grad = torch.randn(4, 24)
    gx, _, _, _ = torch.ops.ryzen_llm.add_layer_norm_backward(grad, None, x, w, mean, rstd)
    with pytest.raises(RuntimeError, match="ryzen_llm add_layer_norm: .*first order only"):
        gx.sum().backward()
