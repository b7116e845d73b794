"""The level-4 feed-forward as one op (ryzen_llm.ops.linear.int8_feed_forward,
csrc/cpu/int8_feed_forward.cpp), whose GEMM epilogues write the next GEMM's int8 operands: in
bfloat16 (the level-4 training dtype) bit for bit the two int8_linear calls it replaces, except
grad_b1, which sums the rounded gradient as reference.int8_linear_backward does; in float32 within
the float epilogue's rounding (the compiler contracts GELU's polynomial differently per loop)."""
import pytest
import torch

from ryzen_llm.ops import linear as L
from ryzen_llm.ops import reference
from tests.ops.conftest import requires_extension

pytestmark = requires_extension

# (M, C, F): rows 1, 3, 97, 2048; C and F not multiples of 16 or 64, and multiples of 16 (the
# quantizer's AVX-512 passes)
SHAPES = [(1, 5, 3), (3, 40, 17), (97, 77, 33), (130, 100, 70), (2048, 24, 40), (97, 32, 64)]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(M, C, F, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, C, generator=g).to(dtype)
    w1, b1 = torch.randn(F, C, generator=g) / C**0.5, torch.randn(F, generator=g)
    w2, b2 = torch.randn(C, F, generator=g) / F**0.5, torch.randn(C, generator=g)
    return (x, w1, b1, w2, b2), torch.randn(M, C, generator=g).to(dtype)


def _run(fused, args, grad_y):
    leaves = [t.clone().requires_grad_() for t in args]
    if fused:
        y = L.int8_feed_forward(*leaves)
        h_grad = None
    else:
        h = L.int8_linear(leaves[0], leaves[1], leaves[2], True)
        h.retain_grad()
        y = L.int8_linear(h, leaves[3], leaves[4])
    y.backward(grad_y)
    if not fused:
        h_grad = h.grad
    return [y.detach()] + [t.grad for t in leaves], h_grad


@pytest.fixture(params=["own", "onednn"])
def gemm(request):
    old = L.set_int8_gemm(request.param)
    yield request.param
    L.set_int8_gemm(old)


@pytest.mark.parametrize("M,C,F", SHAPES)
def test_bfloat16_is_the_two_linears_bit_for_bit(M, C, F, gemm):
    args, grad_y = _inputs(M, C, F, torch.bfloat16, M + C + F)
    fused, _ = _run(True, args, grad_y)
    two, h_grad = _run(False, args, grad_y)
    names = ["y", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"]
    for name, a, b in zip(names, fused, two):
        if name != "grad_b1":
            assert torch.equal(a, b), name
    # grad_b1: the column sums of the rounded grad_pre, as the reference sums them
    x, w1, b1 = args[:3]
    pre = reference.int8_linear_forward(x, w1, b1, False)
    _, _, ref_gb1 = reference.int8_linear_backward(h_grad, x, w1, pre, True)
    assert rel(fused[3], ref_gb1) <= 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("M,C,F", SHAPES[1:4])
def test_float32_within_the_epilogue_rounding(M, C, F):
    args, grad_y = _inputs(M, C, F, torch.float32, M * C)
    fused, _ = _run(True, args, grad_y)
    two, _ = _run(False, args, grad_y)
    for a, b in zip(fused, two):
        assert rel(a, b) <= 4e-6


def test_a_nonfinite_row_reads_back_as_the_two_linears_do():
    """A NaN in a row of x: that output row NaN, and through its scale the weight gradients."""
    args, grad_y = _inputs(9, 16, 24, torch.bfloat16, 5)
    args[0][4, 3] = float("nan")
    fused, _ = _run(True, args, grad_y)
    two, _ = _run(False, args, grad_y)
    assert fused[0][4].isnan().all() and not fused[0][[0, 1, 2, 3, 5]].isnan().any()
    for a, b in zip(fused, two):
        assert torch.equal(a.isnan(), b.isnan())


def test_the_grad_pre_nan_marks_its_column_scale():
    """An inf in grad_y: its row of grad_h and so of grad_pre is non-finite; the column scales of
    fc1's weight-gradient codes go NaN exactly where the two linears' do."""
    args, grad_y = _inputs(6, 16, 24, torch.bfloat16, 6)
    grad_y[2, 5] = float("inf")
    fused, _ = _run(True, args, grad_y)
    two, _ = _run(False, args, grad_y)
    for i in (1, 2, 4, 5):  # grad_x, grad_w1, grad_w2, grad_b2
        assert torch.equal(fused[i].isnan(), two[i].isnan()), i


def test_leading_dims_autocast_and_the_level4_model_path():
    x = torch.randn(2, 7, 24)
    w1, b1, w2, b2 = torch.randn(40, 24), torch.randn(40), torch.randn(24, 40), torch.randn(24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.int8_feed_forward(x, w1, b1, w2, b2)
        y2 = L.int8_linear(L.int8_linear(x, w1, b1, True), w2, b2)
    assert y.shape == (2, 7, 24) and y.dtype == torch.bfloat16
    assert torch.equal(y, y2)


def test_without_a_kernel_it_runs_the_two_linears(monkeypatch):
    """Where the op has no kernel (CUDA builds keep the linear's twin only) it falls back to the
    two int8_linear calls, which are what the fused op is checked against."""
    calls = []
    real = L.int8_linear
    monkeypatch.setattr(L, "FEED_FORWARD_KERNEL", {})
    monkeypatch.setattr(L, "int8_linear", lambda *a: calls.append(a[3:]) or real(*a))
    args, _ = _inputs(4, 8, 12, torch.float32, 1)
    L.int8_feed_forward(*args)
    assert calls == [(True,), ()]


def test_opcheck():
    args, _ = _inputs(5, 12, 20, torch.float32, 0)
    x, w1, b1, w2, b2 = (t.requires_grad_() for t in args)
    op_args = (x, w1, b1, *L.weight_codes(w1), w2, b2, *L.weight_codes(w2))
    torch.library.opcheck(torch.ops.ryzen_llm.int8_feed_forward_forward, op_args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_compiles_with_fullgraph():
    args, _ = _inputs(9, 20, 28, torch.float32, 2)
    leaves = [t.requires_grad_() for t in args]

    def f(*a):
        return L.int8_feed_forward(*a).sum()

    eager = f(*leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    assert torch.allclose(eager, compiled)


def test_bad_input_names_the_argument():
    args, grad_y = _inputs(4, 8, 12, torch.float32, 3)
    x, w1, b1, w2, b2 = args
    c1, c2 = L.weight_codes(w1), L.weight_codes(w2)

    def forward(x=x, w1=w1, b1=b1, c1=c1, w2=w2, b2=b2, c2=c2):
        return torch.ops.ryzen_llm.int8_feed_forward_forward(x, w1, b1, *c1, w2, b2, *c2)

    with pytest.raises(RuntimeError, match="x: expected float32 or bfloat16"):
        forward(x.double())
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        forward(torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="w1: expected sizes"):
        forward(w1=torch.randn(12, 9))
    with pytest.raises(RuntimeError, match="b1: expected sizes"):
        forward(b1=torch.randn(5))
    with pytest.raises(RuntimeError, match="w2_codes: expected int8 codes"):
        forward(c2=(w2, c2[1]))
    with pytest.raises(RuntimeError, match="w2: expected sizes"):
        forward(w2=torch.randn(8, 13))
    with pytest.raises(RuntimeError, match="w2: expected 8 output features"):
        forward(w2=torch.randn(7, 12), b2=torch.randn(7),
                c2=L.weight_codes(torch.randn(7, 12)))
    y, pre, xc, xs, hc, hs = forward()
    with pytest.raises(RuntimeError, match="h_scales: expected sizes"):
        torch.ops.ryzen_llm.int8_feed_forward_backward(grad_y, pre, xc, xs, hc, hs[:2], *c1,
                                                       *c2, True)
    with pytest.raises(RuntimeError, match="pre: expected sizes"):
        torch.ops.ryzen_llm.int8_feed_forward_backward(grad_y, pre[:3], xc, xs, hc, hs, *c1,
                                                       *c2, True)
    with pytest.raises(TypeError, match="int8_feed_forward: x must be float32 or bfloat16"):
        L.int8_feed_forward(x.half(), w1, b1, w2, b2)
