"""The level-4 LM head (ryzen_llm.ops.linear_cross_entropy.int8_linear_cross_entropy,
csrc/cpu/linear_cross_entropy.cpp): each chunk's logits from an int8 GEMM (h per row, the weight
per vocabulary row), the gradients those of the float linear at those logits, grad_h's and
grad_weight's GEMMs in int8 too by default (stochastically rounded). Checked against
reference.int8_linear_cross_entropy (the same quantized math in plain PyTorch) and an fp64 oracle
of that math, within 2x PyTorch's own error in the dtype."""
import pytest
import torch
import torch.nn.functional as F

from ryzen_llm.ops import linear_cross_entropy as LCE
from ryzen_llm.ops import reference
from ryzen_llm.ops.linear import weight_codes
from tests.ops.conftest import assert_within_pytorch_error, requires_extension
from tests.ops.test_linear_cross_entropy import make_inputs as lce_inputs, run_with_grads

pytestmark = requires_extension

# (N, C, V): one row, rows 3 / 97 / the seed's 2048 (several row chunks); C 40 / 77 (not
# multiples of 16), 48 and the seed's 512; V 1000 and 2048
SHAPES = [(1, 48, 1000), (3, 40, 1000), (97, 77, 2048), (2048, 512, 2048)]
NAMES = ["loss", "grad_h", "grad_weight"]


def make_inputs(N, C, V, dtype, seed=0, ignore_every=5):
    return lce_inputs(N, C, V, dtype, "cpu", seed, ignore_every)


def oracle64(h, w, h64, w64, targets):
    """The quantized math in float64: the codes of h and w as the op makes them (h's in its dtype,
    the weight's from its float32 values), the logits unrounded, gradients straight through to
    h64 and w64."""
    hq, hs = reference.int8_quantize(h.detach(), 1)
    wq, ws = reference.int8_quantize(w.detach().float(), 1)
    q = (hq.double() @ wq.double().t()) * (hs.double()[:, None] * ws.double()[None, :])
    exact = h64 @ w64.t()
    return F.cross_entropy(exact + (q - exact).detach(), targets, ignore_index=-100)


@pytest.mark.parametrize("N, C, V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_quantized_math_within_pytorch_error(N, C, V, dtype, monkeypatch):
    """With the float gradients (INT8_GRAD_H and INT8_GRAD_WEIGHT off): every output within 2x
    PyTorch's error."""
    monkeypatch.setattr(LCE, "INT8_GRAD_H", False)
    monkeypatch.setattr(LCE, "INT8_GRAD_WEIGHT", False)
    h, w, targets = make_inputs(N, C, V, dtype)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref64 = run_with_grads(lambda a, b, t: oracle64(h, w, a, b, t), h64, w64, targets)
    plain = run_with_grads(reference.int8_linear_cross_entropy, h, w, targets)
    got = run_with_grads(LCE.int8_linear_cross_entropy, h, w, targets)
    assert got[0].dtype == torch.float32
    for name, a, b, c in zip(NAMES, got, plain, ref64):
        assert_within_pytorch_error(f"{name} {dtype} {(N, C, V)}", a, b, c)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("N, C, V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_grad_h_is_the_stochastically_rounded_int8_math(N, C, V, dtype, monkeypatch):
    """INT8_GRAD_H (the default): grad_h from the int8 GEMM of the logits' gradient rounded
    stochastically, as reference.int8_linear_cross_entropy(int8_grad_h=True) computes it with the
    same hash and seed: the same values but where the two roundings of the gradient itself
    differ (far under the int8 noise, which sets it apart from the float grad_h); loss and
    grad_weight as with the float input gradient (INT8_GRAD_WEIGHT off)."""
    monkeypatch.setattr(LCE, "INT8_GRAD_H", True)
    monkeypatch.setattr(LCE, "INT8_GRAD_WEIGHT", False)
    h, w, targets = make_inputs(N, C, V, dtype)
    got = run_with_grads(LCE.int8_linear_cross_entropy, h, w, targets)
    ref = run_with_grads(lambda a, b, t: reference.int8_linear_cross_entropy(a, b, t,
                                                                             int8_grad_h=True),
                         h, w, targets)
    floating = run_with_grads(reference.int8_linear_cross_entropy, h, w, targets)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    assert rel(got[2], ref[2]) < 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel(got[1], ref[1]) < 1e-3
    assert rel(got[1], floating[1]) > 1e-2  # the int8 noise: the int8 GEMM is what ran


def test_int8_grad_h_is_unbiased_where_rounding_to_nearest_is_not():
    """Identical rows draw different roundings: their mean grad_h comes to the gradient of the
    dequantized weight, while rounding to nearest zeroes every small probability of a row (all
    of them here: the target's entry sets the row's scale) and misses by far more."""
    N, C, V = 2048, 64, 1000
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, C, generator=g).expand(N, C).contiguous().requires_grad_()
    # rows sharing a direction, as trained embeddings do: the small probabilities' share of
    # grad_h, sum_j p_j w_j, is then as large as the target's row
    w = (torch.randn(V, C, generator=g) * 0.1 + torch.randn(1, C, generator=g)).requires_grad_()
    targets = torch.full((N,), 7)
    (grad_h,) = torch.autograd.grad(LCE.int8_linear_cross_entropy(h, w, targets), (h,))
    wq, ws = reference.int8_quantize(w.detach(), 1)
    logits = reference.int8_linear_forward(h.detach()[:1], w.detach(), None)
    grad_logits = torch.softmax(logits, 1) - F.one_hot(torch.tensor([7]), V)
    expect = (grad_logits / N) @ (wq.float() * ws[:, None])  # E[grad_h] of one row
    v = (grad_logits / N) * ws[None, :]
    nearest = torch.round(v * (127 / v.abs().max())) * (v.abs().max() / 127)
    nearest_h = nearest @ wq.float()
    assert rel(grad_h.mean(0, keepdim=True), expect) < 0.02
    assert rel(nearest_h, expect) > 0.5


@pytest.mark.parametrize("N, C, V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_grad_weight_is_the_stochastically_rounded_int8_math(N, C, V, dtype):
    """INT8_GRAD_WEIGHT (the default): grad_weight from the int8 GEMM of the logits' gradient
    times h's row scales under one bound scale, rounded stochastically, and h's row codes, as
    reference.int8_linear_cross_entropy(int8_grad_weight=True) computes it with the same hash
    and seed: the same values but where the two roundings of the gradient itself differ, far
    under the int8 noise that sets it apart from the float grad_weight; loss and grad_h as with
    the float weight gradient."""
    h, w, targets = make_inputs(N, C, V, dtype)
    got = run_with_grads(LCE.int8_linear_cross_entropy, h, w, targets)
    ref = run_with_grads(lambda a, b, t: reference.int8_linear_cross_entropy(
        a, b, t, int8_grad_h=True, int8_grad_weight=True), h, w, targets)
    floating = run_with_grads(lambda a, b, t: reference.int8_linear_cross_entropy(
        a, b, t, int8_grad_h=True), h, w, targets)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    assert rel(got[1], ref[1]) < 1e-3
    assert rel(got[2], ref[2]) < 1e-3, rel(got[2], ref[2])
    assert rel(got[2], floating[2]) > 1e-2  # the int8 noise: the int8 GEMM is what ran


def test_int8_grad_weight_is_unbiased_where_rounding_to_nearest_is_not():
    """Every row of the logits' gradient sums to 0 (softmax minus one-hot), so the exact
    grad_weight summed over the vocabulary is 0 as well. Under the one bound scale every
    probability is far under half a step: rounded to nearest only the targets' entries would
    remain, and with identical rows of h that sum would be h's row itself (the targets' part);
    stochastically rounded it stays near 0."""
    N, C, V = 2048, 64, 1000
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, C, generator=g).expand(N, C).contiguous().requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    (grad_w,) = torch.autograd.grad(LCE.int8_linear_cross_entropy(h, w, targets), (w,))
    hq, hs = reference.int8_quantize(h.detach(), 1)
    onehot = F.one_hot(targets, V).float() / N
    targets_part = onehot.t() @ (hq.float() * hs[:, None])  # what rounding to nearest keeps
    assert grad_w.sum(0).norm() < 0.05 * targets_part.sum(0).norm()


def test_the_logits_are_the_int8_ones_not_the_float_ones():
    """In float32 the op's loss sits on the quantized logits' loss, clearly apart from the float
    LM head's: the int8 GEMM is what ran."""
    h, w, targets = make_inputs(256, 96, 1000, torch.float32, seed=1, ignore_every=0)
    h, w = h.detach() * 4, w.detach()  # confident logits: quantization moves the loss visibly
    got = LCE.int8_linear_cross_entropy(h, w, targets).item()
    quantized = reference.int8_linear_cross_entropy(h, w, targets).item()
    plain = reference.linear_cross_entropy(h, w, targets).item()
    assert abs(got - quantized) <= 1e-5 * abs(quantized)
    assert abs(got - plain) > 20 * abs(got - quantized), (got, quantized, plain)


def test_grad_output_scaling_no_grad_and_partial_grad():
    h, w, targets = make_inputs(33, 48, 1000, torch.float32)
    f = LCE.int8_linear_cross_entropy
    gh1, gw1 = torch.autograd.grad(f(h, w, targets), (h, w))
    gh3, gw3 = torch.autograd.grad(f(h, w, targets) * 3.0, (h, w))
    torch.testing.assert_close(gh3, gh1 * 3)
    torch.testing.assert_close(gw3, gw1 * 3)
    with torch.no_grad():
        loss = f(h, w, targets)
    torch.testing.assert_close(loss, f(h, w, targets).detach())
    (gw,) = torch.autograd.grad(f(h.detach(), w, targets), (w,))
    torch.testing.assert_close(gw, gw1)


def test_all_ignored_gives_nan_and_zero_grads_and_a_nan_row_gives_nan():
    h, w, _ = make_inputs(6, 48, 1000, torch.float32)
    loss = LCE.int8_linear_cross_entropy(h, w, torch.full((6,), -100))
    assert torch.isnan(loss)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert (gh == 0).all() and (gw == 0).all()
    # a NaN in h: its row's scale is NaN (reference.int8_quantize), so is the loss, as in the
    # float LM head
    h2, _, targets = make_inputs(6, 48, 1000, torch.float32, ignore_every=0)
    h2 = h2.detach().clone()
    h2[2, 5] = float("nan")
    assert torch.isnan(LCE.int8_linear_cross_entropy(h2, w.detach(), targets))
    assert torch.isnan(reference.int8_linear_cross_entropy(h2, w.detach(), targets))
    # and, through h's largest row scale, every entry of the int8 weight gradient
    w2 = w.detach().clone().requires_grad_()
    (gw2,) = torch.autograd.grad(LCE.int8_linear_cross_entropy(h2, w2, targets), (w2,))
    assert torch.isnan(gw2).all()


def test_autocast_quantizes_the_float32_weight_and_keeps_the_loss_float32():
    h, w, targets = make_inputs(64, 48, 1000, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LCE.int8_linear_cross_entropy(h, w, targets)
    # the codes of the float32 weight, h's of its bfloat16 cast
    ref = reference.int8_linear_cross_entropy(h.detach().bfloat16(), w.detach(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_opcheck():
    h, w, targets = make_inputs(9, 24, 50, torch.float32, ignore_every=4)
    for need_h, need_w in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(torch.ops.ryzen_llm.int8_linear_cross_entropy_forward,
                              (h, w, *weight_codes(w), targets, -100, need_h, need_w))
    for flags in ((True,), (True, True), (False, True)):  # int8_grad_h[, int8_grad_weight]
        torch.library.opcheck(torch.ops.ryzen_llm.int8_linear_cross_entropy_forward,
                              (h, w, *weight_codes(w), targets, -100, True, True, None, None,
                               *flags))


def test_torch_compile_fullgraph():
    h, w, targets = make_inputs(30, 40, 100, torch.float32)
    compiled = torch.compile(LCE.int8_linear_cross_entropy, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, w, targets), LCE.int8_linear_cross_entropy(h, w, targets))


def test_bad_input_raises_named_error():
    h, w, targets = make_inputs(8, 8, 50, torch.float32, ignore_every=0)
    h, w = h.detach(), w.detach()
    codes, scales = weight_codes(w)
    op = torch.ops.ryzen_llm.int8_linear_cross_entropy_forward

    def call(h=h, w=w, codes=codes, scales=scales, targets=targets):
        return op(h, w, codes, scales, targets, -100, True, True)

    with pytest.raises(RuntimeError, match="h: expected float32 or bfloat16"):
        call(h=h.double())
    with pytest.raises(RuntimeError, match="h: expected a contiguous tensor"):
        call(h=torch.randn(8, 8).t())
    with pytest.raises(RuntimeError, match="weight: expected sizes"):
        call(w=w[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="w_codes: expected int8 codes"):
        call(codes=w)
    with pytest.raises(RuntimeError, match="w_codes: expected sizes"):
        call(codes=codes[:-1])
    with pytest.raises(RuntimeError, match="w_scales: expected float32"):
        call(scales=scales.double())
    with pytest.raises(RuntimeError, match="targets: id 50 at position 3"):
        call(targets=torch.where(torch.arange(8) == 3, 50, targets))
    with pytest.raises(TypeError, match="int8_linear_cross_entropy: h must be float32 or bfloat16"):
        LCE.int8_linear_cross_entropy(h.double(), w, targets)


def test_level4_runs_it_and_counts_what_ran(monkeypatch):
    from ryzen_llm.config import ModelConfig
    from ryzen_llm.model import ScaledTransformerModel
    from ryzen_llm.ops.dispatch import KernelOptimizer

    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=100,
                         max_seq_len=16)
    idx = torch.randint(0, 100, (2, 16))
    for level, op in ((3, "linear_cross_entropy"), (4, "int8_linear_cross_entropy")):
        model = KernelOptimizer(level).apply(ScaledTransformerModel(config))
        model.loss(idx, idx).backward()
        assert model.kernels.calls[(op, "fused")] == 1, (level, model.kernels.calls)
    # where the build has no kernel for the device, level 4 runs the bf16 op and counts it
    monkeypatch.setattr(LCE, "INT8_KERNEL", {"cpu": False})
    model = KernelOptimizer(4).apply(ScaledTransformerModel(config))
    model.loss(idx, idx).backward()
    assert model.kernels.calls[("linear_cross_entropy", "fused")] == 1
    assert ("int8_linear_cross_entropy", "fused") not in model.kernels.calls
