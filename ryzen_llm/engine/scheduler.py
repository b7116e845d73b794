"""Who runs next: the queue of waiting requests, the live rows of the KV cache, admission at
token boundaries and the compaction of rows when sequences finish.

Continuous batching: between two decode steps (a token boundary) the engine admits waiting
requests in arrival order while their candidates fit the free rows (a request that does not
fit holds back the ones behind it, so none starves); each prompt is prefilled into free rows
and its n candidates copy the prompt's keys and values instead of recomputing them. Finished
sequences leave at once: the last live row moves into the freed slot, so live rows are always
0..n-1 and a decode step runs over a prefix of the cache.

Why greedy output is bit-identical alone or batched (tests/test_engine.py checks it):
  * prompts admitted together are prefilled as one right-padded batch where the decode is
    batch-invariant (levels 2-3), since there every kernel of the cached forward computes a row
    the same way whatever the padding and the other rows (tested bitwise); at levels 0-1 each
    prompt is prefilled on its own (batch 1, its exact length), since there padding changes the
    reduction lengths of softmax and att @ v, which moves logits in the last bits and can flip
    a near-tie argmax.
  * decode attention always spans the whole cache (Tmax keys, masked by length), so each row
    does the same arithmetic whatever the other rows hold;
  * at level >= 2 every linear layer of a decode step runs the fused decode_linear, whose rows
    are computed by the same instructions whatever the row count: nothing else is needed.
  * at levels 0-1 the linears are ATen's, and MKL's sgemm picks its kernel by the row count M:
    rows computed at M = 1, 2 or 3, or 9-11, differ in the last bits from the same rows at
    M = 4, 8 or any M >= 12, which all agree with each other (tests/test_engine.py re-checks
    it). Decode steps there run decode_rows(n) rows, padding with dummy rows: 1-4 live
    sequences run as 4 rows, 5-8 as 8, 9-11 as 12. exact=False (serve --no-exact-batching)
    drops the dummy rows; a greedy token may then differ between alone and batched where two
    logits nearly tie.
"""
from __future__ import annotations

import threading
from collections import deque

from ryzen_llm.engine.request import Candidate, EngineStopped, QueueFull, Request
from ryzen_llm.model import KVCache


def decode_rows(n: int, exact: bool = True) -> int:
    """Rows a decode step of n live sequences runs (see the module docstring)."""
    if not exact:
        return n
    return 4 if n <= 4 else 8 if n <= 8 else max(n, 12)


class Scheduler:
    """The waiting queue and the live (request, candidate) rows, shared by the threads that
    submit and the engine's thread; `cv` guards the queue and the stopping flag.

    prefill_together: prompts admitted at one boundary may be prefilled as one padded batch
    (only where the cached forward is batch-invariant, see the module docstring)."""

    def __init__(self, cache: KVCache, max_batch_size: int, max_queue: int,
                 prefill_together: bool):
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_together = prefill_together
        self.pending: deque[Request] = deque()
        self.live: list[tuple[Request, Candidate]] = []  # index = cache row
        self.cv = threading.Condition()
        self.stopping = False

    # -- submitting threads -----------------------------------------------------------------
    def check_fits(self, n: int, prompts: int, field_name: str) -> None:
        """ValueError when n candidates can never fit the batch or prompts the queue."""
        if n > self.max_batch_size:
            raise ValueError(f"n: at most {self.max_batch_size} candidates fit the batch "
                             "(max_batch_size)")
        if prompts > self.max_queue:
            raise ValueError(f"{field_name}: {prompts} prompts can never fit the request "
                             f"queue of {self.max_queue} (max_queue)")

    def enqueue(self, reqs: list[Request]) -> None:
        """Queues reqs, all or none; QueueFull when they do not all fit the queue now."""
        with self.cv:
            if self.stopping:
                raise EngineStopped("the engine is stopping")
            if len(self.pending) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting "
                                f"(max_queue {self.max_queue})")
            self.pending.extend(reqs)
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()

    # -- the engine's thread ----------------------------------------------------------------
    def admit(self) -> list[list[Request]] | None:
        """Waits for work, then takes the requests that fit the free rows, in arrival order,
        as groups to prefill (one forward pass each); None once stopping. Requests cancelled
        while they waited finish here."""
        with self.cv:
            while not self.stopping and not self.pending and not self.live:
                self.cv.wait()
            if self.stopping:
                return None
            admitted = []
            free = self.max_batch_size - len(self.live)
            while self.pending and self.pending[0].params.n <= free:
                req = self.pending.popleft()
                if req.cancelled:
                    req.finish()
                    continue
                admitted.append(req)
                free -= req.params.n
        return self.prefill_groups(admitted)

    def prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        # One-token prompts take the decode path alone (it reads the new key from the cache,
        # which an int8 cache stores rounded); longer ones go together.
        longer = [r for r in admitted if len(r.prompt_ids) > 1]
        if self.prefill_together and len(longer) > 1:
            return [longer] + [[r] for r in admitted if len(r.prompt_ids) == 1]
        return [[r] for r in admitted]

    def place(self, reqs: list[Request]) -> tuple[list[tuple[Request, Candidate]], list[int]]:
        """Makes the candidates of reqs live, their prompts just prefilled into the next free
        rows (prompt j into row len(live) + j): a prompt's first candidate keeps its row, the
        others take rows after the batch with a copy of the prompt's keys and values. Returns
        the placed (request, candidate) pairs and, for each, its prompt's index in reqs."""
        r0 = len(self.live)
        placed, prompt_of = [], []
        for j, req in enumerate(reqs):
            req.candidates[0].row = r0 + j
            placed.append((req, req.candidates[0]))
            prompt_of.append(j)
        self.live.extend(placed)
        for j, req in enumerate(reqs):
            extra = req.candidates[1:]
            if not extra:
                continue
            start = len(self.live)
            self.cache.copy_row(r0 + j, slice(start, start + len(extra)))
            for cand in extra:
                cand.row = len(self.live)
                self.live.append((req, cand))
                placed.append((req, cand))
                prompt_of.append(j)
        return placed, prompt_of

    def retire(self) -> list[Request]:
        """Removes finished or cancelled candidates, moving the last live rows into the freed
        ones so that live rows stay 0..n-1; returns the requests whose candidates are now all
        finished (cancelled ones with every candidate marked "cancelled")."""
        done_rows = [i for i, (req, cand) in enumerate(self.live)
                     if cand.finish_reason is not None or req.cancelled]
        if not done_rows:
            return []
        finished_reqs = {}
        for i in sorted(done_rows, reverse=True):
            req, cand = self.live[i]
            if cand.finish_reason is None:
                cand.finish_reason = "cancelled"
            last = len(self.live) - 1
            if i != last:
                self.cache.copy_row(last, i)
                self.live[i] = self.live[last]
                self.live[i][1].row = i
            self.live.pop()
            finished_reqs[id(req)] = req
        done = []
        for req in finished_reqs.values():
            if req.cancelled:
                for c in req.candidates:
                    c.finish_reason = c.finish_reason or "cancelled"
            if all(c.finish_reason is not None for c in req.candidates):
                done.append(req)
        return done

    def close(self) -> list[Request]:
        """Stops admitting; returns every request still waiting or live, and forgets them."""
        with self.cv:
            self.stopping = True
            waiting = list(self.pending) + list({id(r): r for r, _ in self.live}.values())
            self.pending.clear()
            self.live.clear()
        return waiting
