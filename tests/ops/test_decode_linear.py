"""The batch-invariant decode linear against its plain-PyTorch reference, and its one promise:
a row's result does not depend on the other rows, their number, or the thread count."""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.ops import reference
from tests.ops.conftest import assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# (M, K, N): one row, K below one vector and not a multiple of 16, N not a multiple of the
# 4-row tile, the seed model's shapes, a prefill-sized M.
SHAPES = [(1, 7, 3), (3, 33, 50), (4, 512, 1536), (5, 1024, 512), (32, 512, 2048), (97, 80, 97)]


def fused(x, w, b, gelu, packed=False):
    """decode_linear; packed: with the weight (bfloat16) in pack_decode_weight's layout."""
    from ryzen_llm.ops.decode_linear import decode_linear, pack_decode_weight

    if packed:
        return decode_linear(x, pack_decode_weight(w), b, gelu, out_features=w.shape[0])
    return decode_linear(x, w, b, gelu)


# float32 weights, bfloat16 weights as (N, K) rows, and bfloat16 weights packed
LAYOUTS = [torch.float32, torch.bfloat16, "packed"]


def make_inputs(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_within_pytorch_error(shape, layout, gelu, with_bias):
    x, w, b = make_inputs(*shape)
    packed = layout == "packed"
    wdtype = torch.bfloat16 if packed else layout
    w = w.to(wdtype)  # the weights as stored; the reference widens these same values
    if wdtype == torch.bfloat16:  # x meets bfloat16 weights rounded to bfloat16 (autocast's rule)
        x = x.bfloat16().float()
    b = b if with_bias else None
    ref64 = reference.decode_linear(x.double(), w.double(), None if b is None else b.double(),
                                    gelu)
    plain = reference.decode_linear(x, w, b, gelu)
    got = fused(x, w, b, gelu, packed)
    assert got.dtype == torch.float32 and got.shape == plain.shape
    assert_within_pytorch_error(f"y {shape} {layout} gelu={gelu}", got, plain, ref64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_are_bitwise_independent_of_the_batch(layout):
    """Any slice of rows gives exactly the rows of the whole batch (ATen's GEMM does not)."""
    packed = layout == "packed"
    x, w, b = make_inputs(40, 512, 1530)  # N: not a multiple of 16 (a partial packed block)
    w = w.to(torch.bfloat16 if packed else layout)
    whole = fused(x, w, b, True, packed)
    for m in range(1, 41):
        for start in sorted({0, 1, 40 - m}):
            if start + m <= 40:
                assert torch.equal(fused(x[start:start + m], w, b, True, packed),
                                   whole[start:start + m]), (
                    f"rows {start}..{start + m - 1} differ from the same rows in a batch of 40")
    # The row order within the batch does not matter either.
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fused(x[perm], w, b, True, packed), whole[perm])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_are_bitwise_independent_of_the_thread_count(layout):
    packed = layout == "packed"
    x, w, b = make_inputs(9, 512, 1024)
    w = w.to(torch.bfloat16 if packed else layout)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, w, b, False, packed)
        torch.set_num_threads(max(2, before))
        many = fused(x, w, b, False, packed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_packed_layout_and_its_named_errors():
    from ryzen_llm.ops.decode_linear import decode_linear, pack_decode_weight

    w = torch.randn(20, 7).bfloat16()
    p = pack_decode_weight(w)
    assert p.shape == (2, 4, 16, 2) and p.dtype == torch.bfloat16
    assert torch.equal(p[0, :, 3, :].reshape(-1)[:7], w[3])  # output 3's weights, in K order
    assert not p[1, :, 4:].any() and not p[:, 3, :, 1].any()  # zeros past N = 20 and K = 7
    x = torch.randn(2, 7)
    with pytest.raises(RuntimeError, match="out_features: required"):
        torch.ops.ryzen_llm.decode_linear(x, p, None, False)
    with pytest.raises(RuntimeError, match="do not fit"):
        decode_linear(x, p, None, out_features=40)
    with pytest.raises(RuntimeError, match="packed for 8 input features"):
        decode_linear(torch.randn(2, 9), p, None, out_features=20)
    with pytest.raises(RuntimeError, match="a packed .4-D. weight must be bfloat16"):
        decode_linear(x, p.float(), None, out_features=20)
    with pytest.raises(ValueError, match="weight: expected a .N, K. matrix"):
        pack_decode_weight(p)
    torch.library.opcheck(torch.ops.ryzen_llm.decode_linear, (x, p, torch.randn(20), True, -1))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", [(5, 96, 40), (700, 81, 40)])  # (700, 81): rows rounded by
def test_bfloat16_weights_round_x_like_autocast(packed, shape):  # several threads, odd K
    x, w, b = make_inputs(*shape)
    w = w.bfloat16()
    got = fused(x, w, b, False, packed)
    assert torch.equal(got, fused(x.bfloat16().float(), w, b, False, packed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, w, b.bfloat16())  # bf16 out: compare loosely
    torch.testing.assert_close(got, ref.float(), atol=3e-2, rtol=2e-2)


def test_leading_dimensions_and_empty():
    x, w, b = make_inputs(6, 24, 10)
    y = fused(x.view(2, 3, 24), w, b, False)
    assert y.shape == (2, 3, 10)
    assert torch.equal(y.view(6, 10), fused(x, w, b, False))
    assert fused(x[:0], w, b, False).shape == (0, 10)


def test_opcheck():
    x, w, b = make_inputs(5, 40, 12)
    torch.library.opcheck(torch.ops.ryzen_llm.decode_linear, (x, w, b, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ryzen_llm.decode_linear, (x, w.bfloat16(), None, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    x, w, b = make_inputs(3, 40, 12)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, b, True), fused(x, w, b, True))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, w, b: (x.double(), w, b), "x: expected float32"),
        (lambda x, w, b: (x[None], w, b), "x: expected a 2-D tensor"),
        (lambda x, w, b: (x.t(), w[:, :6], b), "x: expected a contiguous tensor"),
        (lambda x, w, b: (x, w.half(), b), "weight: expected float32 or bfloat16"),
        (lambda x, w, b: (x, w[:, :-1].contiguous(), b), "weight: expected \\(N, 8\\)"),
        (lambda x, w, b: (x, w, b[:-1]), "bias: expected sizes"),
        (lambda x, w, b: (x, w, b.bfloat16()), "bias: expected float32"),
    ],
)
def test_bad_input_raises_named_error(mutate, message):
    x, w, b = make_inputs(6, 8, 5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.decode_linear(*mutate(x, w, b), False)
