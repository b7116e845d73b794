"""The level-4 linear (ryzen_llm.ops.linear, csrc/cpu/linear.cpp) against the exact math of
its quantization (reference.int8_*): codes bit for bit, int32 sums exact, forward and backward
within a rounding of the stored dtype; and against nn.Linear's float math within the error int8
quantization makes (measured here, ~1% of the output's norm)."""
import pytest
import torch
import torch.nn.functional as F

from ryzen_llm.ops import linear as L
from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, requires_extension

pytestmark = requires_extension

SHAPES = [(1, 5, 3), (3, 40, 17), (97, 77, 33), (130, 100, 70), (97, 64, 48)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# K a multiple of 16 (48, 512) takes the AVX-512 passes where the CPU has them
@pytest.mark.parametrize("M,K", [(1, 1), (3, 40), (97, 77), (2048, 13), (3, 48), (2048, 512)])
def test_quantize_matches_reference_bit_for_bit(M, K, dtype, device):
    g = torch.Generator().manual_seed(M * K)
    x = (torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)).to(dtype)
    x[0, 0] = 0.0
    if M > 2:
        x[1] = 0.0  # an all-zero row: scale 0, codes 0
    out = torch.ops.ryzen_llm.int8_quantize(x.to(device), True, True)
    rows, row_scales, cols, col_scales = (t.cpu() for t in out)
    ref_rows, ref_row_scales = reference.int8_quantize(x, 1)
    ref_cols, ref_col_scales = reference.int8_quantize(x, 0)
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    assert torch.equal(row_scales, ref_row_scales) and torch.equal(col_scales, ref_col_scales)
    only_rows = torch.ops.ryzen_llm.int8_quantize(x.to(device), True, False)
    assert torch.equal(only_rows[0].cpu(), rows) and only_rows[2].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [9, 32])
def test_quantize_marks_nonfinite_rows_and_columns_nan(device, K):
    x = torch.randn(6, K)
    x[2, 4] = float("nan")
    x[4, 1] = float("inf")
    x = x.to(device)
    rows, row_scales, cols, col_scales = torch.ops.ryzen_llm.int8_quantize(x, True, True)
    good_cols = [k for k in range(K) if k not in (1, 4)]
    assert row_scales[[2, 4]].isnan().all() and not row_scales[[0, 1, 3, 5]].isnan().any()
    assert col_scales[[4, 1]].isnan().all() and not col_scales[good_cols].isnan().any()
    assert (rows[[2, 4]] == 0).all() and (cols[:, [1, 4]] == 0).all()
    ref_rows, _ = reference.int8_quantize(x.cpu(), 1)
    ref_cols, _ = reference.int8_quantize(x.cpu(), 0)
    assert torch.equal(rows.cpu(), ref_rows) and torch.equal(cols.cpu(), ref_cols)
    # a NaN activation row gives a NaN output row, the others are untouched (as a float GEMM)
    w = torch.randn(5, K, device=device)
    y = L.int8_linear(x, w, None)
    assert y[[2, 4]].isnan().all() and y[[0, 1, 3, 5]].isfinite().all()


@pytest.mark.parametrize("M,K,N", SHAPES + [(2048, 512, 64)])
def test_int_sums_are_exact(M, K, N):
    g = torch.Generator().manual_seed(K)
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b.t()), reference.int8_matmul(a, b.t()))


# On CUDA also the shapes cuBLASLt's int8 GEMM takes (M > 16, K and N multiples of 8).
DEVICE_SHAPES = [("cpu", s) for s in SHAPES] + [
    ("cuda", s) for s in SHAPES + [(64, 512, 1536)] if "cuda" in DEVICES]


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device,shape", DEVICE_SHAPES)
@pytest.mark.parametrize("int8_weight_grad", [True, False])
def test_forward_backward_match_the_quantized_math(device, shape, dtype, gelu, int8_weight_grad,
                                                   monkeypatch):
    """The kernels (CPU; on CUDA the ATen composition of csrc/cuda/linear.cu) against the
    reference math run on the CPU."""
    M, K, N = shape
    monkeypatch.setattr(L, "INT8_WEIGHT_GRAD", int8_weight_grad)
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    grad_y = torch.randn(M, N, generator=g).to(dtype)
    xd, wd, bd = (t.to(device).requires_grad_() for t in (x, w, b))
    y = L.int8_linear(xd, wd, bd, gelu)
    y.backward(grad_y.to(device))
    assert y.dtype == dtype and xd.grad.dtype == dtype and wd.grad.dtype == torch.float32
    y, gx, gw, gb = y.detach().cpu(), xd.grad.cpu(), wd.grad.cpu(), bd.grad.cpu()

    ref_y = reference.int8_linear_forward(x, w, b, gelu)
    pre = reference.int8_linear_forward(x, w, b, False) if gelu else None
    ref_gx, ref_gw, ref_gb = reference.int8_linear_backward(grad_y, x, w, pre, int8_weight_grad)
    # The same codes and exact int32 sums: what may differ is the float32 epilogue's rounding
    # (one ulp of the stored dtype; GELU's float polynomial adds ~3e-7 relative in float32), and
    # the bias gradient, which the kernel sums before rounding.
    ulp = torch.finfo(dtype).eps
    assert (y.double() - ref_y.double()).abs().max() <= 4 * ulp * ref_y.double().abs().max()
    assert (gx.double() - ref_gx.double()).abs().max() <= 4 * ulp * ref_gx.double().abs().max()
    tol_w = 1e-6 if int8_weight_grad else 2 * ulp  # bf16 weight-gradient GEMM rounds its result
    assert rel(gw, ref_gw) <= tol_w
    assert rel(gb, ref_gb) <= 4 * ulp


@pytest.mark.parametrize("gelu", [False, True])
def test_close_to_the_float_linear(gelu):
    """Against nn.Linear's float32 math: the error int8 makes, ~1% relative (bound 3%)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 96, generator=g, requires_grad=True)
    w = (torch.randn(80, 96, generator=g) / 10).requires_grad_()
    b = torch.randn(80, generator=g).requires_grad_()
    grad_y = torch.randn(256, 80, generator=g)
    L.int8_linear(x, w, b, gelu).backward(grad_y)
    got = (x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    y = reference.linear(x, w, b, gelu)
    y.backward(grad_y)
    errors = [rel(a, e) for a, e in zip(got, (x.grad, w.grad, b.grad))]
    print("relative errors of grad x, w, b:", errors)
    assert max(errors) < 0.03


def test_leading_dims_and_autocast():
    x = torch.randn(2, 7, 24)
    w, b = torch.randn(10, 24), torch.randn(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.int8_linear(x, w, b)
    assert y.shape == (2, 7, 10) and y.dtype == torch.bfloat16
    assert rel(y, F.linear(x, w, b)) < 0.03


def test_weight_codes_are_made_once_per_update():
    """Cached on the weight: reused until the optimizer changes it (both AdamWs move its
    version), so micro-batches of one step share one quantization."""
    from ryzen_llm.ops.adamw import FusedAdamW

    for make in (torch.optim.AdamW, FusedAdamW):
        w = torch.nn.Parameter(torch.randn(8, 16))
        first = L.weight_codes(w)
        assert L.weight_codes(w) is first
        w.grad = torch.randn(8, 16)
        make([w], lr=0.1).step()
        again = L.weight_codes(w)
        assert again is not first
        assert torch.equal(again[0], reference.int8_quantize(w.detach(), 1)[0])


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g, requires_grad=True)
    w = torch.randn(7, 12, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    codes = L.weight_codes(w)
    for gelu, wg in [(False, True), (True, False)]:
        torch.library.opcheck(torch.ops.ryzen_llm.int8_linear_forward, (x, w, b, *codes, gelu, wg),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.ryzen_llm.int8_quantize, (x.detach(), True, True))


def test_compiles_with_fullgraph():
    x = torch.randn(9, 20, requires_grad=True)
    w = torch.randn(6, 20, requires_grad=True)
    b = torch.randn(6, requires_grad=True)

    def f(x, w, b):
        return L.int8_linear(x, w, b, True).sum()

    eager = f(x, w, b)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
    assert torch.allclose(eager, compiled)


def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    codes = L.weight_codes(w)

    def forward(x, w=w, bias=None, codes=codes):
        return torch.ops.ryzen_llm.int8_linear_forward(x, w, bias, *codes, False, False)

    with pytest.raises(RuntimeError, match="x: expected float32 or bfloat16"):
        forward(x.double())
    with pytest.raises(RuntimeError, match="weight: expected sizes"):
        forward(torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        forward(torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="w_codes: expected int8 codes"):
        forward(x, codes=(w, *codes[1:]))
    with pytest.raises(RuntimeError, match="w_scales: expected sizes"):
        forward(x, codes=(codes[0], codes[1][:2]))
    grad_y = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="x_scales: expected sizes"):
        torch.ops.ryzen_llm.int8_linear_backward(grad_y, torch.empty(0, 0),
                                                 torch.zeros(4, 8, dtype=torch.int8),
                                                 torch.ones(2), *codes, False, True, True)
    with pytest.raises(RuntimeError, match="bias: expected sizes"):
        forward(x, bias=torch.randn(4))
    with pytest.raises(TypeError, match="int8_linear: x must be float32 or bfloat16"):
        L.int8_linear(x.half(), w, None)
    with pytest.raises(RuntimeError, match="acc: expected int32"):
        torch.ops.ryzen_llm.int8_dequantize(torch.zeros(2, 3), torch.ones(2), torch.ones(3),
                                            None, False, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_level4_runs_the_int8_linear_and_trains(device):
    from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=16)
    step = TrainStep(ScaledTransformerModel(cfg).to(device), level=4, lr=1e-3)
    idx = torch.randint(0, 64, (2, 17))
    first = step(idx[:, :-1], idx[:, 1:])
    for _ in range(20):
        last = step(idx[:, :-1], idx[:, 1:])
    calls = step.kernels.summary()
    assert calls["linear"]["calls"] == {"fused": 4 * 21}  # qkv, proj, fc1, fc2 per step
    assert calls["gelu_feed_forward"]["calls"] == {}
    assert last < first


def test_level4_falls_back_by_name_where_the_build_has_no_kernel(monkeypatch):
    """A device without an int8 linear in this build (a CUDA device with an extension built
    without the CUDA toolkit): level 3's linear layers, a warning, FELL BACK in the report."""
    from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
    from ryzen_llm import train_step as ts

    monkeypatch.setattr(ts, "has_kernel", lambda op, device_type: False)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=16)
    with pytest.warns(UserWarning, match="fused linear unavailable"):
        step = TrainStep(ScaledTransformerModel(cfg), level=4)
    assert step.kernels.choices["linear"].reason == "FELL BACK: no cpu kernel in this build"
    idx = torch.randint(0, 64, (2, 17))
    step(idx[:, :-1], idx[:, 1:])
    calls = step.kernels.summary()
    assert calls["linear"]["calls"] == {"reference": 2}  # qkv and proj through F.linear
    assert calls["gelu_feed_forward"]["calls"] == {"fused": 1}  # level 3's feed-forward


def test_an_op_unavailable_where_it_runs_falls_back_and_says_so():
    from ryzen_llm.ops.dispatch import KernelSet

    with pytest.warns(UserWarning, match="level 4: fused linear unavailable"):
        kernels = KernelSet(4, unavailable={"linear": "no cuda kernel in this build (CPU only)"})
    choice = kernels.choices["linear"]
    assert choice.impl == "reference"
    assert choice.reason == "FELL BACK: no cuda kernel in this build (CPU only)"


def _mini_level4(seed=0):
    from ryzen_llm import ModelConfig, ScaledTransformerModel
    from ryzen_llm.ops.dispatch import KernelOptimizer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32)
    return KernelOptimizer(4).apply(ScaledTransformerModel(cfg))


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_norm_codes_reach_every_int8_consumer_bit_for_bit(monkeypatch, autocast):
    """From level 4 add + LayerNorm writes its output's row codes, and qkv, the feed-forward and
    the LM head read them instead of quantizing the output: the loss and every gradient are the
    bits of the model whose linears quantize for themselves, and each of those consumers was
    handed the codes (proj reads attention's output, which has none)."""
    from ryzen_llm.ops import linear_cross_entropy as LCE

    handed = []

    def spy(x, x2):
        got = given_row_codes(x, x2)
        handed.append(got[0] is not None)
        return got

    given_row_codes = L.given_row_codes
    monkeypatch.setattr(L, "given_row_codes", spy)
    monkeypatch.setattr(LCE, "given_row_codes", spy)
    g = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 97, (3, 17), generator=g) for _ in range(2))
    results = []
    for from_layer_norm in (False, True):
        monkeypatch.setattr(L, "ROW_CODES_FROM_LAYER_NORM", from_layer_norm)
        handed.clear()
        model = _mini_level4()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(idx, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert handed == [True, False, True] * 2 + [True]  # qkv, proj, feed-forward; the LM head
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_level4_loss_under_inference_mode_is_the_no_grad_loss():
    """Inference tensors have no version counter: no codes travel with them, and the level-4
    model's loss under torch.inference_mode is its loss under no_grad."""
    model = _mini_level4()
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expect = model.loss(idx, idx)
    with torch.inference_mode():
        got = model.loss(idx, idx)
        x = torch.randn(4, 32)
        L.attach_row_codes(x, *torch.ops.ryzen_llm.int8_quantize(x, True, False)[:2])
        assert L.given_row_codes(x, x) == (None, None)
    assert torch.equal(got, expect)


def test_attached_codes_are_dropped_when_the_tensor_changes():
    x = torch.randn(6, 32)
    codes = torch.ops.ryzen_llm.int8_quantize(x, True, False)[:2]
    L.attach_row_codes(x, *codes)
    assert L.given_row_codes(x, x)[0] is codes[0]
    assert L.given_row_codes(x.view(3, 2, 32), x)[0] is codes[0]  # a reshape of it, whole
    assert L.given_row_codes(x[:3], x[:3]) == (None, None)  # part of it
    assert L.given_row_codes(x, x.bfloat16()) == (None, None)  # another dtype
    x.mul_(2)
    assert L.given_row_codes(x, x) == (None, None)  # changed in place


def test_opcheck_with_given_codes():
    from ryzen_llm.ops.linear_cross_entropy import weight_codes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g, requires_grad=True)
    xq = torch.ops.ryzen_llm.int8_quantize(x.detach(), True, False)[:2]
    w = torch.randn(7, 12, generator=g, requires_grad=True)
    w2 = torch.randn(12, 7, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.ryzen_llm.int8_linear_forward,
                          (x, w, b, *weight_codes(w), True, True, *xq), test_utils=utils)
    torch.library.opcheck(torch.ops.ryzen_llm.int8_feed_forward_forward,
                          (x, w, b, *weight_codes(w), w2, None, *weight_codes(w2), *xq),
                          test_utils=utils)
    targets = torch.randint(0, 7, (5,), generator=g)
    torch.library.opcheck(torch.ops.ryzen_llm.int8_linear_cross_entropy_forward,
                          (x, w, *weight_codes(w), targets, -100, True, True, *xq))


def test_given_codes_of_the_wrong_shape_or_alone_are_refused_by_name():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    xq, xs = torch.ops.ryzen_llm.int8_quantize(x, True, False)[:2]
    codes = L.weight_codes(w)
    op = torch.ops.ryzen_llm.int8_linear_forward
    with pytest.raises(RuntimeError, match="x_codes and x_scales: expected both or neither"):
        op(x, w, None, *codes, False, True, xq, None)
    with pytest.raises(RuntimeError, match="x_codes: expected sizes"):
        op(x, w, None, *codes, False, True, xq[:2], xs)
    with pytest.raises(RuntimeError, match="x_scales: expected float32"):
        op(x, w, None, *codes, False, True, xq, xs.double())
