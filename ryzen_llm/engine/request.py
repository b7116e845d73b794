"""What a caller hands the engine and gets back: SamplingParams, a Request in flight, its
Candidates, and the errors a request can end with.

A Request's future resolves once, from the engine's thread: with the result dict (the best
candidate first) or with RequestCancelled / EngineStopped. Its timestamps (perf_counter) give
the timings reported with every result.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class QueueFull(RuntimeError):
    """The engine's request queue is full; retry later."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


class RequestCancelled(RuntimeError):
    """The request was cancelled (client gone, or timed out)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # fixes the sampling draws; same seed, same output
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    n: int = 1  # candidates per prompt; the one with the best mean log-prob is returned first
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an int >= 1"),
            ("temperature", _real(self.temperature) and 0.0 <= self.temperature <= 100.0,
             "a number in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
            ("top_p", _real(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             "null or an int in [0, 2**63)"),
            ("stop", len(self.stop) <= 8 and all(isinstance(s, str) and s for s in self.stop),
             "up to 8 non-empty strings"),
            ("n", isinstance(self.n, int) and 1 <= self.n <= 16, "an int in [1, 16]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def deterministic(self) -> bool:
        return self.greedy or self.seed is not None


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Candidate:
    """One generated continuation; tokens and logprobs grow as it decodes."""

    index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the model (T = 1)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    row: int = -1  # its row of the KV cache while it decodes
    _sent: int = 0  # characters of text already streamed

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "token_ids": list(self.tokens),
                "logprobs": list(self.logprobs), "mean_logprob": self.mean_logprob,
                "finish_reason": self.finish_reason}


class Request:
    """A prompt and its candidates in flight; result() blocks, cancel() stops it at the next
    token boundary. on_token(candidate_index, token_id, logprob, text_delta) is called from the
    scheduler thread for every token (streaming); keep it short."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 on_token: Callable[[int, int, float, str], None] | None = None):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_token = on_token
        self.candidates = [Candidate(i) for i in range(params.n)]
        self.future: Future = Future()
        self.cancelled = False
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None
                                       else int.from_bytes(os.urandom(7), "little"))
        self.t_queued = time.perf_counter()
        self.t_admitted: float | None = None
        self.t_first_token: float | None = None
        self.t_done: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        return self.future.result(timeout)

    @property
    def live(self) -> list[Candidate]:
        return [c for c in self.candidates if c.finish_reason is None]

    def timings(self) -> dict[str, float | None]:
        def ms(a, b):
            return None if a is None or b is None else round((b - a) * 1e3, 3)

        n_out = max((len(c.tokens) for c in self.candidates), default=0)
        decode = ms(self.t_first_token, self.t_done)
        return {
            "queue_ms": ms(self.t_queued, self.t_admitted),
            "time_to_first_token_ms": ms(self.t_queued, self.t_first_token),
            "time_per_output_token_ms": (round(decode / (n_out - 1), 3)
                                         if decode is not None and n_out > 1 else None),
            "total_ms": ms(self.t_queued, self.t_done),
        }

    def finish(self) -> None:
        """Resolves the future once every candidate is done, or fails it with RequestCancelled
        when the request was cancelled (its unfinished candidates become "cancelled")."""
        self.t_done = time.perf_counter()
        if self.cancelled:
            for c in self.candidates:
                c.finish_reason = c.finish_reason or "cancelled"
            if not self.future.done():
                self.future.set_exception(RequestCancelled(f"request {self.id} was cancelled"))
            return
        ranked = sorted(self.candidates, key=lambda c: (-c.mean_logprob, c.index))
        best = ranked[0]
        result = {
            "text": best.text,
            "token_ids": list(best.tokens),
            "logprobs": list(best.logprobs),
            "mean_logprob": best.mean_logprob,
            "finish_reason": best.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(best.tokens),
            "candidates": [c.as_dict() for c in ranked],
            "timings": self.timings(),
        }
        if not self.future.done():
            self.future.set_result(result)
