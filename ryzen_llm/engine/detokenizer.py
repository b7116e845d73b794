"""A candidate's text, when it stops, and what of its text is streamed after each token.

Stop strings are matched on the decoded text, so a stop string spanning several tokens ends
generation too; the text ends before the first occurrence. Streaming sends only the part of
the text that the next tokens cannot change: an incomplete UTF-8 character (decoded as U+FFFD)
and a suffix that could be the start of a stop string are held back until the next token
decides them.
"""
from __future__ import annotations

from typing import Sequence

from ryzen_llm.engine.request import Candidate, Request
from ryzen_llm.tokenizer import Tokenizer


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """text up to the first occurrence of each stop string in turn, and whether one was found."""
    found = False
    for s in stop:
        at = text.find(s)
        if at >= 0:
            text, found = text[:at], True
    return text, found


def streamable_length(text: str, stop: Sequence[str], sent: int, final: bool) -> int:
    """How many characters of text can be streamed now (never fewer than already sent)."""
    safe = len(text)
    if not final:
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
    return max(safe, sent)


class Detokenizer:
    """Appends each new token to its candidate, decides whether the candidate is finished (EOS,
    a stop string, max_new_tokens, a full context), keeps its text and streams text deltas.

    max_len is the model's context: the KV cache holds the prompt and every token but the
    newest, so a candidate ends once the next token would have no position."""

    def __init__(self, tokenizer: Tokenizer | None, max_len: int):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_id if tokenizer is not None else None
        self.max_len = max_len

    def append_token(self, req: Request, cand: Candidate, tok: int, lp: float) -> None:
        cand.tokens.append(tok)
        cand.logprobs.append(lp)
        p = req.params
        eos = self.eos
        done = None
        if tok == eos and not p.ignore_eos:
            done = "stop"
        # The text is decoded every token only where it is read every token (stop strings,
        # streaming); otherwise once, when the candidate finishes.
        eager_text = self.tokenizer is not None and (p.stop or req.on_token is not None)
        if eager_text:
            text = self.tokenizer.decode(cand.tokens[:-1] if done else cand.tokens)
            cand.text, stopped = cut_at_stop(text, p.stop)
            done = "stop" if stopped else done
        if done is None and len(cand.tokens) >= p.max_new_tokens:
            done = "length"
        if done is None and len(req.prompt_ids) + len(cand.tokens) - 1 >= self.max_len:
            done = "length"  # the context is full: the next token would have no position
        if done is not None and self.tokenizer is not None and not eager_text:
            cand.text = self.tokenizer.decode(cand.tokens[:-1] if tok == eos and
                                              not p.ignore_eos else cand.tokens)
        if req.on_token is not None:
            safe = streamable_length(cand.text, p.stop, cand._sent, final=done is not None)
            delta, cand._sent = cand.text[cand._sent:safe], safe
            req.on_token(cand.index, tok, lp, delta)
        if done is not None:
            cand.finish_reason = done
