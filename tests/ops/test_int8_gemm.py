"""The int8 GEMM under the level-4 linear (csrc/cpu/int8_gemm.cpp): the own AVX512-VNNI kernel
(plain loops without VNNI) and at::_int_mm give exact int32 sums, bit for bit the integer
product, on awkward shapes and strides; the linear's outputs and gradients are the same bits
whichever runs; the per-shape choice is reported."""
import pytest
import torch

from ryzen_llm.ops import linear as L
from ryzen_llm.ops import reference
from tests.ops.conftest import requires_extension

pytestmark = requires_extension

# M not a multiple of the 4-row tile nor of the 48-row block, K not of 4, N not of 16.
SHAPES = [(1, 1, 1), (3, 5, 17), (49, 77, 33), (97, 130, 70), (200, 64, 48)]


@pytest.fixture
def mode():
    old = L.set_int8_gemm("auto")
    yield L.set_int8_gemm
    L.set_int8_gemm(old)


def operands(M, K, N, layout, g):
    """a (M, K) and b (K, N) with every int8 value, -128 included, in the given layout."""
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8)
    a[0, 0], b[0, 0] = -128, -128
    if layout in ("a_t", "both_t"):  # a transposed view, as the weight gradient's
        a = a.t().contiguous().t()
    if layout in ("b_t", "both_t"):  # b transposed, as the forward's W.T
        b = b.t().contiguous().t()
    return a, b


@pytest.mark.parametrize("impl", ["own", "onednn"])
@pytest.mark.parametrize("layout", ["contiguous", "a_t", "b_t", "both_t"])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_sums_are_exact(M, K, N, layout, impl, mode):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a, b = operands(M, K, N, layout, g)
    mode(impl)
    c = torch.ops.ryzen_llm.int8_mm(a, b)
    assert c.dtype == torch.int32
    assert torch.equal(c, reference.int8_matmul(a, b))


def test_extreme_codes_over_a_long_reduction(mode):
    """The extreme codes (-128, whose u8 form is 0, and 127: 255) over 4099 terms: exact."""
    a = torch.full((5, 4099), -128, dtype=torch.int8)
    b = torch.full((4099, 19), -128, dtype=torch.int8)
    b[:, 3] = 127
    for impl in ("own", "onednn"):
        mode(impl)
        assert torch.equal(torch.ops.ryzen_llm.int8_mm(a, b), reference.int8_matmul(a, b))


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_is_the_same_bits_whichever_gemm_runs(gelu, dtype, mode):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(130, 77, generator=g).to(dtype)
    w = torch.randn(70, 77, generator=g) / 77**0.5
    b = torch.randn(70, generator=g)
    grad_y = torch.randn(130, 70, generator=g).to(dtype)
    results = []
    for impl in ("own", "onednn"):
        mode(impl)
        xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, b))
        y = L.int8_linear(xd, wd, bd, gelu)
        y.backward(grad_y)
        results.append((y.detach(), xd.grad, wd.grad, bd.grad))
    for own, onednn in zip(*results):
        assert torch.equal(own, onednn)


def test_auto_times_both_and_reports_the_choice(mode):
    a = torch.randint(-127, 128, (67, 45), dtype=torch.int8)
    b = torch.randint(-127, 128, (45, 29), dtype=torch.int8)
    mode("own")  # a call under a pinned mode does not stand in for auto's timing
    torch.ops.ryzen_llm.int8_mm(a, b)
    mode("auto")
    for _ in range(3):
        assert torch.equal(torch.ops.ryzen_llm.int8_mm(a, b), reference.int8_matmul(a, b))
    entry = next(c for c in L.int8_gemm_choices()
                 if (c["M"], c["N"], c["K"]) == (67, 29, 45)
                 and c["threads"] == torch.get_num_threads())
    assert entry["runs"] in ("own", "onednn")
    # one call counted per call, the timing runs aside: the pinned one, then auto's three
    assert entry["calls"] == ({"own": 4, "onednn": 0} if entry["runs"] == "own"
                              else {"own": 1, "onednn": 3})
    if entry["own_us"] is not None:  # timed (the CPU has AVX512-VNNI): the faster one runs,
        # the own kernel when within 5%
        faster = "own" if entry["own_us"] * 100 <= entry["onednn_us"] * 105 else "onednn"
        assert entry["runs"] == faster
    mode("onednn")
    torch.ops.ryzen_llm.int8_mm(a, b)
    entry2 = next(c for c in L.int8_gemm_choices() if (c["M"], c["N"], c["K"]) == (67, 29, 45)
                  and c["threads"] == torch.get_num_threads())
    assert entry2["calls"]["onednn"] == entry["calls"]["onednn"] + 1
    assert entry2["runs"] == "onednn"


def test_opcheck():
    g = torch.Generator().manual_seed(3)
    for layout in ("contiguous", "a_t", "b_t"):
        a, b = operands(19, 37, 21, layout, g)
        torch.library.opcheck(torch.ops.ryzen_llm.int8_mm.default, (a, b))


def test_bad_input_names_the_argument(mode):
    a = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8_mm: expected int8 a and b"):
        torch.ops.ryzen_llm.int8_mm(a.float(), a.t())
    with pytest.raises(RuntimeError, match="K 4 != 3"):
        torch.ops.ryzen_llm.int8_mm(a, a)
    with pytest.raises(RuntimeError, match="expected 2-D"):
        torch.ops.ryzen_llm.int8_mm(a[0], a.t())
    with pytest.raises(ValueError, match="int8 GEMM mode"):
        mode("fastest")
    with pytest.raises(RuntimeError, match="int8_gemm_mode: expected 0"):
        torch.ops.ryzen_llm.int8_gemm_mode(7)
