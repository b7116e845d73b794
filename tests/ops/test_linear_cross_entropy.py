"""Fused chunked linear + cross-entropy against its plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# (N, C, V): a single row, N = 97 / 200 / the seed's 2048 tokens, C = 48 / 80 / 512, the seed's
# V = 2048 and an odd V = 1000. N = 2048 spans several row chunks.
SHAPES = [(1, 48, 1000), (97, 80, 2048), (200, 48, 1000), (2048, 512, 2048)]
NAMES = ["loss", "grad_h", "grad_weight"]


def fused(h, weight, targets, ignore_index=-100):
    from ryzen_llm.ops.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, weight, targets, ignore_index)


def make_inputs(N, C, V, dtype, device, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64) * C**-0.5 * 2
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
        targets[0] = 3  # at least one counted target
    h, w = (t.to(device=device, dtype=dtype).requires_grad_() for t in (h, w))
    return h, w, targets.to(device)


def run_with_grads(fn, h, w, targets):
    loss = fn(h, w, targets)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return [loss.detach(), gh, gw]


def reference64(h, w, targets):
    """fp64 oracle: the reference computes its loss in fp32, so write the fp64 one out."""
    return F.cross_entropy(h @ w.t(), targets, ignore_index=-100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N, C, V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_within_pytorch_error(device, N, C, V, dtype):
    h, w, targets = make_inputs(N, C, V, dtype, device)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref64 = run_with_grads(reference64, h64, w64, targets)
    plain = run_with_grads(reference.linear_cross_entropy, h, w, targets)
    got = run_with_grads(fused, h, w, targets)
    assert got[0].dtype == torch.float32, "the loss is float32 in every input dtype"
    for name, a, b, c in zip(NAMES, got, plain, ref64):
        assert_within_pytorch_error(f"{name} {dtype} {(N, C, V)}", a, b, c)


def test_backward_scales_by_grad_output():
    h, w, targets = make_inputs(33, 48, 1000, torch.float32, "cpu")
    gh1, gw1 = torch.autograd.grad(fused(h, w, targets), (h, w))
    gh3, gw3 = torch.autograd.grad(fused(h, w, targets) * 3.0, (h, w))
    torch.testing.assert_close(gh3, gh1 * 3)
    torch.testing.assert_close(gw3, gw1 * 3)


def test_no_grad_and_partial_grad():
    h, w, targets = make_inputs(40, 48, 1000, torch.float32, "cpu")
    with torch.no_grad():
        loss = fused(h, w, targets)
    torch.testing.assert_close(loss, reference.linear_cross_entropy(h, w, targets).detach())
    (gw,) = torch.autograd.grad(fused(h.detach(), w, targets), (w,))
    (gw_ref,) = torch.autograd.grad(reference.linear_cross_entropy(h.detach(), w, targets), (w,))
    torch.testing.assert_close(gw, gw_ref)


def test_all_ignored_gives_nan_loss_and_zero_grads_like_pytorch():
    h, w, _ = make_inputs(6, 48, 1000, torch.float32, "cpu")
    targets = torch.full((6,), -100)
    loss = fused(h, w, targets)
    ref = reference.linear_cross_entropy(h, w, targets)
    assert torch.isnan(loss) and torch.isnan(ref)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert (gh == 0).all() and (gw == 0).all()


def test_autocast_casts_like_linear_and_keeps_loss_float32():
    h, w, targets = make_inputs(64, 48, 1000, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused(h, w, targets)
        ref = reference.linear_cross_entropy(h, w, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_gradcheck_fp64():
    h, w, targets = make_inputs(7, 6, 11, torch.float64, "cpu", ignore_every=3)
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, targets), (h, w))


def test_opcheck():
    h, w, targets = make_inputs(9, 24, 50, torch.float32, "cpu", ignore_every=4)
    for need_h, need_w in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(
            torch.ops.ryzen_llm.linear_cross_entropy_forward, (h, w, targets, -100, need_h, need_w)
        )


def test_torch_compile_fullgraph():
    h, w, targets = make_inputs(30, 40, 100, torch.float32, "cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, w, targets), fused(h, w, targets))


@pytest.mark.parametrize(
    "index, mutate, message",
    [
        (0, lambda t: t.int(), "h: expected float32, float64 or bfloat16"),
        (0, lambda t: t[None], "h: expected a 2-D tensor"),
        (0, lambda t: t.t().contiguous().t(), "h: expected a contiguous tensor"),
        (1, lambda t: t.double(), "weight: expected dtype"),
        (1, lambda t: t[:, :-1].contiguous(), "weight: expected sizes"),
        (2, lambda t: t.int(), "targets: expected int64"),
        (2, lambda t: t[:-1], "targets: expected sizes"),
        (2, lambda t: torch.where(t == 1, 1000, t), "targets: id 1000 at position"),
        (2, lambda t: torch.where(t == 1, -5, t), "targets: id -5 at position"),
    ],
)
def test_bad_input_raises_named_error(index, mutate, message):
    h, w, targets = make_inputs(8, 8, 50, torch.float32, "cpu", ignore_every=0)
    targets[3] = 1
    args = [h.detach(), w.detach(), targets]
    args[index] = mutate(args[index])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.linear_cross_entropy_forward(*args, -100, True, True)
