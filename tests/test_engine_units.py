"""The engine's parts alone, without a model or a thread: the detokenizer's stop strings and
streamed deltas, the sampler's seeded choice, the scheduler's admission order and row
compaction. tests/test_engine.py checks them together through a real engine."""
import pytest
import torch

from ryzen_llm.config import ModelConfig
from ryzen_llm.engine import QueueFull, Request, RequestCancelled, SamplingParams
from ryzen_llm.engine.detokenizer import Detokenizer, cut_at_stop, streamable_length
from ryzen_llm.engine.sampler import choose_tokens
from ryzen_llm.engine.scheduler import Scheduler
from ryzen_llm.model import KVCache
from ryzen_llm.ops import reference

PIECES = ["He", "llo", " S", "TO", "P", "x", "<eos>", "\ufffd"]
EOS = PIECES.index("<eos>")


class PieceTokenizer:
    """Token i decodes to PIECES[i]; "<eos>" is the end-of-sequence token."""

    eos_id = EOS

    def decode(self, ids):
        return "".join(PIECES[i] for i in ids)


def stream(pieces, max_len=97, **params):
    """Feeds the tokens of pieces one by one; returns the candidate and the deltas sent."""
    deltas = []
    req = Request([0], SamplingParams(**params), lambda i, tok, lp, delta: deltas.append(delta))
    cand = req.candidates[0]
    detok = Detokenizer(PieceTokenizer(), max_len)
    for piece in pieces:
        assert cand.finish_reason is None
        detok.append_token(req, cand, PIECES.index(piece), -0.5)
    return cand, deltas


# -- detokenizer ---------------------------------------------------------------------------
def test_a_possible_start_of_a_stop_string_is_held_back_until_decided():
    cand, deltas = stream(["He", "llo", " S", "TO", "P"], stop=("STOP",))
    assert deltas == ["He", "llo", " ", "", ""]  # "S", then "STO", held back; "STOP" cut
    assert cand.text == "Hello " == "".join(deltas)
    assert cand.finish_reason == "stop" and cand.logprobs == [-0.5] * 5


def test_a_held_back_prefix_that_is_no_stop_string_is_sent_with_the_next_token():
    cand, deltas = stream(["He", " S", "x"], stop=("STOP",), max_new_tokens=3)
    assert deltas == ["He", " ", "Sx"]
    assert cand.text == "He Sx" and cand.finish_reason == "length"


def test_eos_ends_without_its_text_and_ignore_eos_keeps_going():
    cand, deltas = stream(["He", "<eos>"])
    assert cand.text == "He" and cand.finish_reason == "stop" and "".join(deltas) == "He"
    cand, _ = stream(["He", "<eos>", "x"], ignore_eos=True, max_new_tokens=3)
    assert cand.text == "He<eos>x" and cand.finish_reason == "length"


def test_a_full_context_finishes_with_length():
    # prompt of 1 token + 3 new ones: the cache holds 3 of them, so a max_len of 3 is full
    cand, _ = stream(["He", "llo", "x"], max_len=3)
    assert cand.finish_reason == "length" and len(cand.tokens) == 3


def test_an_incomplete_utf8_character_waits_for_the_next_token():
    assert streamable_length("ab\ufffd", (), sent=0, final=False) == 2
    assert streamable_length("ab\ufffd", (), sent=0, final=True) == 3
    assert streamable_length("abS", ("STOP",), sent=3, final=False) == 3  # never goes back


def test_cut_at_stop_cuts_at_each_stop_string_in_turn():
    assert cut_at_stop("one. two! three", (".", "!")) == ("one", True)
    assert cut_at_stop("one two", ("!",)) == ("one two", False)


# -- sampler -------------------------------------------------------------------------------
def test_greedy_rows_take_the_argmax_and_its_log_prob():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    live = [(Request([0], SamplingParams()), None)] * 3
    tokens, logps = choose_tokens(logits, live, reference.greedy_pick)
    assert tokens == logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(logps),
                               torch.log_softmax(logits, -1).max(-1).values)


def test_a_seed_draws_the_same_tokens_whatever_rows_the_candidates_occupy():
    torch.manual_seed(0)
    logits = torch.randn(50).expand(3, 50)  # every row the same distribution
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, n=2)

    def draw(order):
        req, other = Request([0], params), Request([0], SamplingParams())
        rows = [(req, req.candidates[0]), (req, req.candidates[1]), (other, other.candidates[0])]
        live = [rows[i] for i in order]
        tokens, logps = choose_tokens(logits, live, reference.greedy_pick)
        by_row = {id(cand): (tok, lp) for (_, cand), tok, lp in zip(live, tokens, logps)}
        return [by_row[id(c)] for c in req.candidates]

    first = draw([0, 1, 2])
    assert draw([2, 1, 0]) == first == draw([1, 2, 0])
    lsm = torch.log_softmax(logits[0], -1)
    assert all(lp == pytest.approx(float(lsm[tok]), abs=1e-5) for tok, lp in first)
    ranked = lsm.argsort(descending=True)[:20].tolist()
    assert all(tok in ranked for tok, _ in first)  # top-k 20


# -- scheduler -----------------------------------------------------------------------------
TINY = ModelConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=16)


def scheduler(rows=4, max_queue=8, prefill_together=True):
    return Scheduler(KVCache(TINY, rows), rows, max_queue, prefill_together)


def request(n=1, prompt_len=3):
    return Request(list(range(1, prompt_len + 1)), SamplingParams(n=n))


def test_admission_is_in_arrival_order_and_a_request_that_does_not_fit_waits_first():
    s = scheduler(rows=4)
    a, b, c = request(n=2), request(n=3), request(n=1)
    s.enqueue([a, b, c])
    assert s.admit() == [[a]]  # b needs 3 rows of the 2 left; c, behind it, waits too
    s.place([a])
    assert [cand.row for cand in a.candidates] == [0, 1] and len(s.live) == 2
    for cand in a.candidates:
        cand.finish_reason = "length"
    assert s.retire() == [a] and s.live == []
    assert s.admit() == [[b, c]]


def test_prompts_of_one_token_boundary_are_grouped_for_prefill():
    long1, one, long2 = request(prompt_len=3), request(prompt_len=1), request(prompt_len=5)
    assert scheduler().prefill_groups([long1, one, long2]) == [[long1, long2], [one]]
    assert scheduler().prefill_groups([long1, one]) == [[long1], [one]]
    alone = scheduler(prefill_together=False)
    assert alone.prefill_groups([long1, one, long2]) == [[long1], [one], [long2]]


def test_placed_candidates_share_their_prompts_rows_and_retiring_compacts():
    s = scheduler(rows=6)
    a, b = request(n=2), request(n=3)
    for j, length in enumerate((3, 5)):  # as a prefill of a and b into rows 0 and 1 leaves them
        s.cache.k[0][j] = j + 1.0
        s.cache.lengths[j] = length
    placed, prompt_of = s.place([a, b])
    assert [(req is a, cand.row) for req, cand in placed] == [
        (True, 0), (False, 1), (True, 2), (False, 3), (False, 4)]
    assert prompt_of == [0, 1, 0, 1, 1]
    assert s.cache.lengths[:5].tolist() == [3, 5, 3, 5, 5]
    assert float(s.cache.k[0][4, 0, 0, 0]) == 2.0  # b's prompt, copied
    b.candidates[0].finish_reason = "stop"  # row 1 frees: the last row (b's third) moves in
    assert s.retire() == []
    assert [(cand.row, req is a) for req, cand in s.live] == [(0, True), (1, False), (2, True),
                                                             (3, False)]
    assert s.live[1][1] is b.candidates[2] and s.cache.lengths[1] == 5
    b.cancel()
    assert s.retire() == [b] and [c.finish_reason for c in b.candidates] == [
        "stop", "cancelled", "cancelled"]
    assert [cand.row for _, cand in s.live] == [0, 1] == [c.row for c in a.candidates]


def test_queue_full_cancelled_while_waiting_and_stop():
    s = scheduler(rows=2, max_queue=2)
    a, b = request(), request()
    s.enqueue([a, b])
    with pytest.raises(QueueFull, match="max_queue 2"):
        s.enqueue([request()])
    with pytest.raises(ValueError, match=r"prompts: 3 prompts can never fit .* \(max_queue\)"):
        s.check_fits(1, 3, "prompts")
    with pytest.raises(ValueError, match=r"n: at most 2 candidates"):
        s.check_fits(3, 1, "prompts")
    a.cancel()
    assert s.admit() == [[b]]
    with pytest.raises(RequestCancelled):
        a.result(0)
    s.stop()
    assert s.admit() is None
