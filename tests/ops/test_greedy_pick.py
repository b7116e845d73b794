"""The engine's token choice (greedy token, its log-probability, the row's log-sum-exp) against
log_softmax + argmax + gather: tokens exactly, log-probabilities within PyTorch's own error,
torch.argmax's choice on ties, NaN and infinities, and rows independent of the batch."""
from __future__ import annotations

import math

import pytest
import torch

from ryzen_llm.ops import reference
from tests.ops.conftest import assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# one column, fewer columns than a vector, a vector and one, the seed's vocabulary, one more
SHAPES = [(1, 1), (3, 7), (2, 17), (5, 2048), (33, 2049)]


def fused(logits):
    from ryzen_llm.ops.greedy_pick import greedy_pick

    return greedy_pick(logits)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_matches_reference_within_pytorch_error(shape, spread):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    logits = torch.randn(*shape, generator=g) * spread
    tokens, logprobs, lse = fused(logits)
    ref_tokens, ref_logprobs, ref_lse = reference.greedy_pick(logits)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, ref_tokens)
    x64 = logits.double()
    lp64 = torch.log_softmax(x64, -1).gather(1, ref_tokens[:, None])[:, 0]
    assert_within_pytorch_error(f"logprobs {shape}", logprobs, ref_logprobs, lp64)
    assert_within_pytorch_error(f"logsumexp {shape}", lse, ref_lse, torch.logsumexp(x64, -1))


def test_ties_nan_and_infinities_follow_torch():
    rows = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    rows[0, 3] = rows[0, 30] = 50.0                   # a tie: the first index
    rows[1, 5] = float("nan")                         # a NaN: its index, NaN log-probability
    rows[2, 7] = rows[2, 9] = float("inf")            # +inf: the first one
    rows[3] = float("-inf")                           # nothing but -inf: index 0, lse -inf
    rows[4, 16] = float("-inf")                       # -inf among finite values: fine
    rows[5, 39] = 1e30                                # a huge finite maximum in the tail
    tokens, logprobs, lse = fused(rows)
    ref_tokens, ref_logprobs, ref_lse = reference.greedy_pick(rows)
    assert tokens.tolist() == ref_tokens.tolist() == [3, 5, 7, 0, int(rows[4].argmax()), 39]
    for r in range(6):
        a, b = logprobs[r].item(), ref_logprobs[r].item()
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-6), r
    assert math.isnan(lse[1]) and lse[2] == math.inf and lse[3] == -math.inf
    torch.testing.assert_close(lse[[0, 4, 5]], ref_lse[[0, 4, 5]])


def test_rows_are_bitwise_independent_of_the_batch():
    logits = torch.randn(40, 2048, generator=torch.Generator().manual_seed(2)) * 4
    whole = fused(logits)
    for start, m in ((0, 1), (5, 3), (17, 23)):
        part = fused(logits[start:start + m])
        for a, b in zip(part, whole):
            assert torch.equal(a, b[start:start + m])


def test_strided_and_empty_inputs():
    logits = torch.randn(2048, 6).t()  # not contiguous
    for a, b in zip(fused(logits), reference.greedy_pick(logits)):
        torch.testing.assert_close(a, b)
    tokens, logprobs, lse = fused(torch.empty(0, 9))
    assert tokens.shape == logprobs.shape == lse.shape == (0,)


def test_opcheck():
    torch.library.opcheck(torch.ops.ryzen_llm.greedy_pick, (torch.randn(3, 50),),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "logits, message",
    [
        (torch.randn(5), "logits: expected a 2-D tensor"),
        (torch.randn(2, 5, dtype=torch.float64), "logits: expected float32"),
        (torch.empty(3, 0), "logits: expected at least one column"),
    ],
)
def test_bad_input_raises_named_error(logits, message):
    with pytest.raises(RuntimeError, match=message):
        fused(logits)
