"""Generation with a KV cache and continuous batching: `Engine.from_checkpoint(path)`.

One scheduler thread owns the model and a preallocated KVCache of `max_batch_size` rows. Between
two decode steps (a token boundary) it admits waiting requests (each prompt is prefilled into
free rows; its `n` candidates copy the prompt's keys and values instead of recomputing them),
runs one decode step over every live row, samples, and retires finished sequences at once by
moving the last live row into the freed slot, so live rows are always 0..n-1.

Why greedy output is bit-identical alone or batched (tests/test_engine.py checks it):
  * prompts admitted together are prefilled as one right-padded batch at levels 2-3, where
    every kernel of the cached forward computes a row the same way whatever the padding and the
    other rows (tested bitwise); at levels 0-1 each prompt is prefilled on its own (batch 1,
    its exact length), since there padding changes the reduction lengths of softmax and
    att @ v, which moves logits by ~1e-6 and can flip a near-tie argmax.
  * decode attention always spans the whole cache (Tmax keys, masked by length), so each row
    does the same arithmetic whatever the other rows hold;
  * at level >= 2 every linear layer of a decode step runs the fused decode_linear, whose rows
    are computed by the same instructions whatever the row count: nothing else is needed.
  * at levels 0-1 the linears are ATen's, and MKL's sgemm picks its kernel by the row count M:
    rows computed at M = 1, 2 or 3, or 9-11, differ in the last bits from the same rows at
    M = 4, 8 or any M >= 12, which all agree with each other (measured on torch 2.13 / MKL
    2024.2 at 1 and 2 threads, for every batch size 1..40; tests/test_engine.py re-checks it).
    Decode steps there run decode_rows(n) rows, padding with dummy rows: 1-4 live sequences
    run as 4 rows, 5-8 as 8, 9-11 as 12. exact=False (serve --no-exact-batching) drops the
    dummy rows; a greedy token may then differ between alone and batched where two logits tie
    to ~1e-6.

Threads: the scheduler thread runs every parallel region of generation, with `threads` torch
threads (default: the caller's count at construction). A decode step is ~30 short parallel
regions, and libgomp only keeps its idle workers spinning between them while it manages no
more threads than there are CPUs: once a second thread (say the main one) has run a parallel
region of its own, the workers sleep between regions and each wake-up costs tens of
microseconds (measured: 39 ms instead of 22 ms for a 32-token prompt and 16 new tokens on
2 cores). A server therefore sets its main thread to one torch thread before loading the model
(ryzen_llm.serve does), so that only the scheduler's team exists. Where the runtime is libgomp,
the engine also hands back the idle workers of the calling thread's team (OpenMP 5's
omp_pause_resource_all, which frees only the caller's pool) once the model is loaded and
whenever generate() waits: a plain script that loads the engine and calls generate() took
22 ms for that request instead of 8 before it did. The caller's next parallel region starts
its workers again (a restart measured 2-20 ms here, which is why the scheduler keeps its own
workers while idle; an idle engine's team still throttles other threads' parallel work).

Memory: a prefill takes and frees activations of 1-8 MiB whose sizes change with the batch;
under glibc's default thresholds most were mapped fresh or trimmed back and faulted in again
every time (a third of a 32-prompt prefill). The engine fixes the thresholds for the process
(ryzen_llm.heap.keep_freed_heap) when it is created, so freed activations are reused.

Level 3 generates from bfloat16 copies of the linear weights (ScaledTransformerModel.
cast_linear_weights) with float32 activations; levels 0-2 from the float32 weights.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import math
import os
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence as Seq

import torch

from ryzen_llm.checkpoint import MANIFEST_FILE, MODEL_FILE, CheckpointError, load_checkpoint
from ryzen_llm.config import KV_CACHE_DTYPES, Config, ModelConfig, config_from_dict
from ryzen_llm.heap import keep_freed_heap
from ryzen_llm.model import KVCache, ScaledTransformerModel
from ryzen_llm.ops.dispatch import KernelOptimizer
from ryzen_llm.tokenizer import Tokenizer

# libgomp's omp_pause_resource_all (loaded by torch), or None: another runtime (LLVM's libomp
# also exports GOMP_* names, and its pause is process-wide) or none found.
_omp_pause = None
if sys.platform.startswith("linux"):
    try:
        _lib = ctypes.CDLL(None)
        if hasattr(_lib, "GOMP_parallel") and not hasattr(_lib, "__kmpc_fork_call"):
            _omp_pause = _lib.omp_pause_resource_all
            _omp_pause.argtypes, _omp_pause.restype = [ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        pass


def release_idle_openmp_workers() -> bool:
    """Ends the idle OpenMP workers of the calling thread's team (libgomp), so that the engine's
    scheduler thread runs the only team (see "Threads" above). True when it did."""
    return _omp_pause is not None and _omp_pause(1) == 0  # 1: omp_pause_soft


def decode_rows(n: int, exact: bool = True) -> int:
    """Rows a decode step of n live sequences runs (see the module docstring)."""
    if not exact:
        return n
    return 4 if n <= 4 else 8 if n <= 8 else max(n, 12)


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
    row: int = -1
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


class Engine:
    """Continuous-batching generation over one ScaledTransformerModel.

    generate() is the simple entry point; submit() returns a Request for servers (streaming,
    cancellation). The scheduler thread starts on construction; ready is set after warm-up.
    """

    def __init__(
        self,
        model: ScaledTransformerModel,
        tokenizer: Tokenizer | None,
        config: Config | None = None,
        *,
        level: int | None = None,
        max_batch_size: int | None = None,
        max_queue: int | None = None,
        warmup_steps: int | None = None,
        exact: bool = True,
        kv_cache_dtype: str | None = None,
        model_id: str = "ryzen-llm",
        model_sha256: str | None = None,
        threads: int | None = None,
        step_delay_s: float = 0.0,
        on_step: Callable[[int], None] | None = None,
        start: bool = True,
    ):
        self.config = config or Config(model=model.config)
        inf = self.config.inference
        self.level = self.config.optimization.kernel_level if level is None else level
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            KernelOptimizer(self.level).apply(model)
        self.kernel_warnings = [str(w.message) for w in caught]
        # Level 3 generates from bfloat16 copies of the linear weights (float32 activations):
        # decode reads every weight once per step, so half the bytes is nearly half the time.
        model.cast_linear_weights(torch.bfloat16 if self.level >= 3 else torch.float32)
        # With the fused decode_linear every row is computed the same way whatever the batch,
        # so batching needs no padding rows to keep greedy output exact (decode_rows).
        self.batch_invariant = model.kernels.batch_invariant_decode
        weights = "bfloat16" if self.level >= 3 else "float32"
        self.level_note = (f"level {self.level}: {weights} linear weights, "
                           + ("batch-invariant decode" if self.batch_invariant
                              else "decode padded to MKL's row counts" if exact
                              else "decode not batch-invariant"))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.model_sha256 = model_sha256
        self.max_batch_size = max_batch_size or inf.max_batch_size
        self.max_queue = max_queue if max_queue is not None else 4 * self.max_batch_size
        self.warmup_steps = inf.warmup_steps if warmup_steps is None else warmup_steps
        self.default_max_new_tokens = inf.max_new_tokens
        self.exact = exact and not self.batch_invariant  # padding rows only where needed
        if threads is not None and threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
        self.threads = threads or torch.get_num_threads()
        self.step_delay_s = step_delay_s  # a pause per decode step: load tests and demos only
        self.on_step = on_step
        self.max_len = model.config.max_seq_len
        self.kv_cache_dtype = inf.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected {' or '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
        self.cache = KVCache(model.config, decode_rows(self.max_batch_size, self.exact),
                             dtype=getattr(torch, self.kv_cache_dtype))
        self._pending: deque[Request] = deque()
        self._live: list[tuple[Request, Candidate]] = []  # index = cache row
        self._cv = threading.Condition()
        self._stopping = False
        self.ready = threading.Event()
        # prefills: prompts prefilled; prefill_batches: forward passes that prefilled them
        self.stats = {"decode_steps": 0, "tokens_generated": 0, "prefills": 0,
                      "prefill_batches": 0,
                      "max_batch_seen": 0}
        self._thread = threading.Thread(target=self._run, name="ryzen-llm-engine", daemon=True)
        keep_freed_heap()  # prefill activations reused, not faulted in anew (see "Memory")
        release_idle_openmp_workers()  # the workers that loaded and cast the weights
        if start:
            self._thread.start()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Engine":
        """Loads weights, config and tokenizer from a checkpoint folder (model.safetensors,
        state.json, tokenizer.json, manifest.json) as written by save_checkpoint."""
        path = Path(path)
        ckpt = load_checkpoint(path)
        raw = ckpt.config
        try:
            config = config_from_dict(raw) if "model" in raw else Config(
                model=ScaledTransformerModel.from_config(raw).config)
        except ValueError as exc:
            raise CheckpointError(f"{path / 'state.json'}: config does not load: {exc}") from None
        model = ScaledTransformerModel(config.model)
        model.load_state_dict(ckpt.model_state)
        if ckpt.tokenizer_path is None:
            raise CheckpointError(f"checkpoint {str(path)!r} has no tokenizer.json; the engine "
                                  "needs the tokenizer the model was trained with")
        tokenizer = Tokenizer.load(ckpt.tokenizer_path)
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        sha = manifest[MODEL_FILE]["sha256"]
        kwargs.setdefault("model_id", f"ryzen-llm-{path.parent.parent.name}-{path.name}"
                          if path.parent.name == "checkpoints" else f"ryzen-llm-{path.name}")
        return cls(model, tokenizer, config, model_sha256=sha, **kwargs)

    # -- public API -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids")
        return self.tokenizer.encode(text)

    def decode(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def check_prompt(self, prompt_ids: list[int], field_name: str = "inputs") -> None:
        if not prompt_ids:
            raise ValueError(f"{field_name}: the prompt is empty (it must encode to >= 1 token)")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"{field_name}: the prompt is {len(prompt_ids)} tokens; the model's "
                             f"context is {self.max_len}, so at most {self.max_len - 1} fit")
        V = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < V)]
        if bad:
            raise ValueError(f"{field_name}: token id {bad[0]!r} is outside 0..{V - 1}")

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               on_token=None) -> Request:
        """Queues one prompt; raises QueueFull when max_queue requests already wait."""
        return self.submit_many([prompt], params, [on_token], field_name="inputs")[0]

    def submit_many(self, prompts: Seq[str | list[int]], params: SamplingParams | None = None,
                    on_tokens: Seq[Callable | None] | None = None,
                    field_name: str = "prompts", indexed: bool | None = None) -> list[Request]:
        """Queues several prompts at once, all or none: they are admitted at the same token
        boundary and prefilled as one batch (queued one by one, the scheduler could start on
        the first while the others are still being tokenized). Raises ValueError naming
        field_name[i] for a bad prompt (field_name alone when indexed is False; by default
        indexed when there are several), QueueFull when they do not all fit the queue now."""
        params = params or SamplingParams(max_new_tokens=self.default_max_new_tokens)
        if params.n > self.max_batch_size:
            raise ValueError(f"n: at most {self.max_batch_size} candidates fit the batch "
                             "(max_batch_size)")
        if len(prompts) > self.max_queue:
            raise ValueError(f"{field_name}: {len(prompts)} prompts can never fit the request "
                             f"queue of {self.max_queue} (max_queue)")
        on_tokens = list(on_tokens) if on_tokens is not None else [None] * len(prompts)
        indexed = len(prompts) > 1 if indexed is None else indexed
        reqs = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.check_prompt(ids, f"{field_name}[{i}]" if indexed else field_name)
            reqs.append(Request(ids, params, on_tokens[i]))
        with self._cv:
            if self._stopping:
                raise EngineStopped("the engine is stopping")
            if len(self._pending) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting "
                                f"(max_queue {self.max_queue})")
            self._pending.extend(reqs)
            self._cv.notify()
        return reqs

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | None = None, timeout: float | None = None):
        """Generates for one prompt (returns one result) or a list (returns a list); the prompts
        run batched. A result: text, token_ids, logprobs, finish_reason, candidates, timings."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        reqs = self.submit_many([prompts] if single else prompts, params)
        release_idle_openmp_workers()  # this thread waits: only the scheduler's team runs
        out = [r.result(timeout) for r in reqs]
        return out[0] if single else out

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        return len(self._live)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the scheduler; requests not finished fail with EngineStopped."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- scheduler --------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)  # per thread under OpenMP: this thread's team
        try:
            with torch.inference_mode():
                self._warmup()
                self.ready.set()
                while True:
                    with self._cv:
                        while not self._stopping and not self._pending and not self._live:
                            self._cv.wait()
                        if self._stopping:
                            break
                        admitted = []
                        free = self.max_batch_size - len(self._live)
                        while self._pending and self._pending[0].params.n <= free:
                            req = self._pending.popleft()
                            if req.cancelled:
                                self._finish_request(req, "cancelled")
                                continue
                            admitted.append(req)
                            free -= req.params.n
                    # One-token prompts take the decode path alone (it reads the new key from
                    # the cache, which an int8 cache stores rounded); longer ones go together.
                    longer = [r for r in admitted if len(r.prompt_ids) > 1]
                    if self.batch_invariant and len(longer) > 1:
                        self._prefill_together(longer)
                        admitted = [r for r in admitted if len(r.prompt_ids) == 1]
                    for req in admitted:
                        self._prefill(req)
                    self._retire()
                    if self._live:
                        self._decode_step()
                        self._retire()
        except BaseException as exc:  # a bug: fail every request rather than hang them
            err = exc
        else:
            err = EngineStopped("the engine stopped")
        with self._cv:
            self._stopping = True
            waiting = list(self._pending) + list({id(r): r for r, _ in self._live}.values())
            self._pending.clear()
            self._live.clear()
        for req in waiting:
            if not req.future.done():
                req.future.set_exception(err)

    def _warmup(self) -> None:
        """Prefills of a few lengths, then warmup_steps decode steps cycling over the row
        counts the engine will run (decode_rows of 1 .. max_batch_size)."""
        if self.warmup_steps <= 0:
            return
        V, cache = self.model.config.vocab_size, self.cache
        g = torch.Generator().manual_seed(0)
        for T in sorted({1, min(8, self.max_len - 1), min(32, self.max_len - 1)}):
            self.model.forward_with_cache(torch.randint(0, V, (1, T), generator=g), cache)
        sizes = sorted({decode_rows(n, self.exact) for n in range(1, self.max_batch_size + 1)})
        cache.lengths.zero_()
        for i in range(self.warmup_steps):
            if self._stopping:  # stop() during warm-up: do not hold the process up
                break
            m = sizes[i % len(sizes)]
            if int(cache.lengths[:m].max()) >= self.max_len - 1:
                cache.lengths.zero_()
            self.model.forward_with_cache(torch.randint(0, V, (m, 1), generator=g), cache)
            self._choose(torch.randn(m, V, generator=g), [])
        cache.lengths.zero_()

    def _prefill(self, req: Request) -> None:
        req.t_admitted = time.perf_counter()
        row = len(self._live)
        ids = torch.tensor([req.prompt_ids], dtype=torch.int64)
        self.cache.lengths[row] = 0  # a one-token prompt takes the decode path from position 0
        logits = self.model.forward_with_cache(ids, self.cache.rows(row, row + 1))  # (1, V)
        self.stats["prefills"] += 1
        self.stats["prefill_batches"] += 1
        n = req.params.n
        if n > 1:  # the candidates share the prompt's keys and values
            self.cache.copy_row(row, slice(row + 1, row + n))
        for i, cand in enumerate(req.candidates):
            cand.row = row + i
            self._live.append((req, cand))
        self._advance(logits.expand(n, -1), [(req, c) for c in req.candidates])
        req.t_first_token = time.perf_counter()

    def _prefill_together(self, reqs: list[Request]) -> None:
        """Prompts admitted at one token boundary, prefilled as one right-padded batch (levels
        2-3: every row's keys, values and logits are then the bits it gets alone, checked in
        tests/test_engine.py). Prompt j fills row r0 + j; extra candidates (n > 1) copy it into
        rows after the batch."""
        t = time.perf_counter()
        r0, B = len(self._live), len(reqs)
        T = max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(B, T, dtype=torch.int64)
        mask = torch.zeros(B, T, dtype=torch.int64)
        for j, req in enumerate(reqs):
            req.t_admitted = t
            ids[j, :len(req.prompt_ids)] = torch.tensor(req.prompt_ids)
            mask[j, :len(req.prompt_ids)] = 1
        logits = self.model.forward_with_cache(ids, self.cache.rows(r0, r0 + B), mask)  # (B, V)
        self.stats["prefills"] += B
        self.stats["prefill_batches"] += 1
        placed, rows = [], []
        for j, req in enumerate(reqs):
            req.candidates[0].row = r0 + j
            placed.append((req, req.candidates[0]))
            rows.append(j)
        self._live.extend(placed)
        for j, req in enumerate(reqs):
            for cand in req.candidates[1:]:  # the candidates share the prompt's keys and values
                cand.row = len(self._live)
                self.cache.copy_row(r0 + j, cand.row)
                self._live.append((req, cand))
                placed.append((req, cand))
                rows.append(j)
        self._advance(logits[rows], placed)
        t = time.perf_counter()
        for req in reqs:
            req.t_first_token = t

    def _decode_step(self) -> None:
        n = len(self._live)
        m = decode_rows(n, self.exact)
        last = [[c.tokens[-1]] for _, c in self._live]
        if m > n:
            last += [[0]] * (m - n)
            self.cache.lengths[n:m] = 0  # dummy rows: one key each at position 0
        tokens = torch.tensor(last, dtype=torch.int64)  # (m, 1)
        logits = self.model.forward_with_cache(tokens, self.cache)[:n]
        self.stats["decode_steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], n)
        if self.on_step is not None:
            self.on_step(n)
        self._advance(logits, list(self._live))
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def _choose(self, logits: torch.Tensor, live) -> tuple[list[int], list[float]]:
        """Next token and its log-prob (under the model, temperature 1) for each row."""
        logits = logits.float()
        # greedy rows: the argmax and its log-prob; sampled rows are overwritten below
        chosen, logps, lse = self.model.kernels.greedy_pick(logits)
        sampled = [i for i, (req, _) in enumerate(live) if not req.params.greedy]
        # Each request draws from its own generator in candidate order, whatever rows the
        # candidates occupy after other sequences left: a seed gives the same output in any batch.
        sampled.sort(key=lambda i: (live[i][0].id, live[i][1].index))
        if sampled:
            idx = torch.tensor(sampled)
            sub = logits[idx]
            temps = torch.tensor([live[i][0].params.temperature for i in sampled])[:, None]
            sorted_logits, order = torch.sort(sub / temps, dim=-1, descending=True)
            ranks = torch.arange(sub.shape[-1])[None, :]
            ks = torch.tensor([live[i][0].params.top_k or sub.shape[-1] for i in sampled])
            sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
            probs = torch.softmax(sorted_logits, dim=-1)
            top_ps = torch.tensor([live[i][0].params.top_p for i in sampled])[:, None]
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_ps, 0.0)
            for j, i in enumerate(sampled):
                pick = torch.multinomial(probs[j], 1, generator=live[i][0].generator)
                chosen[i] = order[j, pick[0]]
            logps[idx] = logits[idx, chosen[idx]] - lse[idx]  # log_softmax at the sampled token
        return chosen.tolist(), logps.tolist()

    def _advance(self, logits: torch.Tensor, live) -> None:
        tokens, lps = self._choose(logits, live)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        self.stats["tokens_generated"] += len(tokens)
        for (req, cand), tok, lp in zip(live, tokens, lps):
            cand.tokens.append(tok)
            cand.logprobs.append(lp)
            p = req.params
            done = None
            if tok == eos and not p.ignore_eos:
                done = "stop"
            # The text is decoded every token only where it is read every token (stop strings,
            # streaming); otherwise once, when the candidate finishes.
            eager_text = self.tokenizer is not None and (p.stop or req.on_token is not None)
            if eager_text:
                cand.text = self.tokenizer.decode(cand.tokens[:-1] if done else cand.tokens)
                for s in p.stop:
                    at = cand.text.find(s)
                    if at >= 0:
                        cand.text, done = cand.text[:at], "stop"
            if done is None and len(cand.tokens) >= p.max_new_tokens:
                done = "length"
            # the cache holds the prompt and every token but this one (a tensor read per token
            # cost ~1 us a row)
            if done is None and len(req.prompt_ids) + len(cand.tokens) - 1 >= self.max_len:
                done = "length"  # the context is full: the next token would have no position
            if done is not None and self.tokenizer is not None and not eager_text:
                cand.text = self.tokenizer.decode(cand.tokens[:-1] if tok == eos and
                                                  not p.ignore_eos else cand.tokens)
            if req.on_token is not None:
                self._stream(req, cand, tok, lp, final=done is not None)
            if done is not None:
                cand.finish_reason = done

    def _stream(self, req: Request, cand: Candidate, tok: int, lp: float, final: bool) -> None:
        """Sends the new text, holding back an incomplete UTF-8 character or a possible start of
        a stop string until the next token decides it."""
        text = cand.text
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for s in req.params.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        safe = max(safe, cand._sent)
        delta, cand._sent = text[cand._sent:safe], safe
        req.on_token(cand.index, tok, lp, delta)

    def _retire(self) -> None:
        """Removes finished or cancelled candidates; compacts rows so live rows are 0..n-1."""
        done_rows = [i for i, (req, cand) in enumerate(self._live)
                     if cand.finish_reason is not None or req.cancelled]
        if not done_rows:
            return
        finished_reqs = {}
        for i in sorted(done_rows, reverse=True):
            req, cand = self._live[i]
            if cand.finish_reason is None:
                cand.finish_reason = "cancelled"
            last = len(self._live) - 1
            if i != last:
                self.cache.copy_row(last, i)
                self._live[i] = self._live[last]
                self._live[i][1].row = i
            self._live.pop()
            finished_reqs[id(req)] = req
        for req in finished_reqs.values():
            if req.cancelled:
                for c in req.candidates:
                    c.finish_reason = c.finish_reason or "cancelled"
            if all(c.finish_reason is not None for c in req.candidates):
                self._finish_request(req, None)

    def _finish_request(self, req: Request, reason: str | None) -> None:
        req.t_done = time.perf_counter()
        if reason == "cancelled" or req.cancelled:
            for c in req.candidates:
                c.finish_reason = c.finish_reason or "cancelled"
            if not req.future.done():
                req.future.set_exception(RequestCancelled(f"request {req.id} was cancelled"))
            return
        ranked = sorted(req.candidates, key=lambda c: (-c.mean_logprob, c.index))
        best = ranked[0]
        result = {
            "text": best.text,
            "token_ids": list(best.tokens),
            "logprobs": list(best.logprobs),
            "mean_logprob": best.mean_logprob,
            "finish_reason": best.finish_reason,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(best.tokens),
            "candidates": [c.as_dict() for c in ranked],
            "timings": req.timings(),
        }
        if not req.future.done():
            req.future.set_result(result)
