"""The engine: one thread that owns the model and runs generation, and the public API that
queues prompts for it (`Engine.from_checkpoint(path)`, generate(), submit()).

The loop, between two decode steps (a token boundary): the scheduler (scheduler.py) admits
waiting requests and groups their prompts into prefills; the engine prefills them into free rows
of a preallocated KVCache of `max_batch_size` rows, runs one decode step over every live row,
has the sampler (sampler.py) choose each row's token and the detokenizer (detokenizer.py) append
it, decide whether its sequence is finished and stream its text; the scheduler then retires
finished sequences. Requests, their parameters and results are in request.py; why only the
engine's thread runs parallel work, in openmp.py.

Memory: a prefill takes and frees activations of a few MiB whose sizes change with the batch;
under glibc's default thresholds most were mapped fresh or trimmed back and faulted in again
every time. The engine fixes the thresholds for the process (ryzen_llm.heap.keep_freed_heap)
when it is created, so freed activations are reused.
"""
from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence as Seq

import torch

from ryzen_llm.checkpoint import MANIFEST_FILE, MODEL_FILE, CheckpointError, load_checkpoint
from ryzen_llm.config import KV_CACHE_DTYPES, WEIGHT_FORMATS, Config, config_from_dict
from ryzen_llm.engine.detokenizer import Detokenizer
from ryzen_llm.engine.openmp import release_idle_openmp_workers
from ryzen_llm.engine.request import EngineStopped, Request, SamplingParams
from ryzen_llm.engine.sampler import choose_tokens
from ryzen_llm.engine.scheduler import Scheduler, decode_rows
from ryzen_llm.heap import keep_freed_heap
from ryzen_llm.model import KVCache, ScaledTransformerModel
from ryzen_llm.ops.dispatch import KernelOptimizer
from ryzen_llm.ops.quantized_decode_linear import QUANTIZED_FORMATS
from ryzen_llm.tokenizer import Tokenizer

# WEIGHT_FORMATS (ryzen_llm.config): the formats the engine can hold its linear weights in
# (Engine(weights=...); the default is bfloat16 at level 3 and float32 below).
assert WEIGHT_FORMATS == ("float32", "bfloat16", *QUANTIZED_FORMATS), WEIGHT_FORMATS


def weight_format(weights: str | None, level: int, model: ScaledTransformerModel) -> str:
    """The format the linear weights are held in: `weights`, or the level's default. int8 and
    int4 run through the fused quantized kernels only (there is no other implementation of their
    math), so they need the fused decode_linear (level >= 2 with the compiled extension)."""
    if weights is None:
        return "bfloat16" if level >= 3 else "float32"
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights: expected one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights in QUANTIZED_FORMATS and model.kernels.choices["decode_linear"].impl != "fused":
        raise ValueError(f"weights: {weights!r} runs on the fused decode_linear only "
                         f"(optimization level >= 2 with the compiled extension); at level "
                         f"{level} decode_linear is {model.kernels.choices['decode_linear'].reason}")
    return weights


def warm_up(model: ScaledTransformerModel, cache: KVCache, steps: int, row_counts: list[int],
            stopping: Callable[[], bool]) -> None:
    """Prefills of a few lengths, then `steps` decode steps and token choices cycling over the
    row counts decode steps will run; stops early once stopping() (do not hold a stop() up)."""
    V, max_len = model.config.vocab_size, model.config.max_seq_len
    g = torch.Generator().manual_seed(0)
    for T in sorted({1, min(8, max_len - 1), min(32, max_len - 1)}):
        model.forward_with_cache(torch.randint(0, V, (1, T), generator=g), cache)
    cache.lengths.zero_()
    for i in range(steps):
        if stopping():
            break
        m = row_counts[i % len(row_counts)]
        if int(cache.lengths[:m].max()) >= max_len - 1:
            cache.lengths.zero_()
        model.forward_with_cache(torch.randint(0, V, (m, 1), generator=g), cache)
        choose_tokens(torch.randn(m, V, generator=g), [], model.kernels.greedy_pick)
    cache.lengths.zero_()


class Engine:
    """Continuous-batching generation over one ScaledTransformerModel.

    generate() is the simple entry point; submit() returns a Request for servers (streaming,
    cancellation). The scheduler thread starts on construction; ready is set after warm-up.

    The engine takes over the model it is given and changes it in place, so that generation
    holds no second copy of the weights: it binds the kernels of `level` (KernelOptimizer.
    apply), sets eval(), and stores the linear layers' weight matrices in bfloat16 at level 3
    (plus packed copies for decode_linear; see cast_linear_weights), in float32 below; level 3
    generates from those bfloat16 weights with float32 activations. A caller that needs the
    model unchanged passes a copy (copy.deepcopy(model)); to train it again, cast back with
    model.cast_linear_weights(torch.float32) (the bfloat16 rounding stays). from_checkpoint
    builds a model of its own.

    Args: model (taken over and changed in place, see above); tokenizer (None: token ids in
    and out, no text); config (default Config(model=model.config)), whose optimization.
    kernel_level and inference section give the defaults of level, max_batch_size (rows of the
    KV cache), max_queue (default 4 x max_batch_size), warmup_steps and kv_cache_dtype
    ("float32" or "int8") and weights; weights (the linear weights' format: "float32",
    "bfloat16", or "int8"/"int4" at levels 2-3 through ryzen_llm.ops.quantized_decode_linear,
    the activations entering each linear quantized to int8 per row (int8) or per 32 inputs
    (int4); default inference.weights, else bfloat16 at level 3, float32 below); exact (pad
    decode steps to row counts whose results agree, levels 0-1); model_id and model_sha256 (the
    model's name for the server, its weights' hash); threads (of the engine's thread; default
    the caller's count now); step_delay_s and on_step (a pause and a callback per decode step);
    start (False: the caller starts engine._thread).
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
        weights: str | None = None,
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
        # decode reads every weight once per step, so half the bytes is nearly half the time;
        # int8 and int4 read a half and about a third of those bytes again.
        weights = inf.weights if weights is None else weights
        self.weights = weights = weight_format(weights, self.level, model)
        model.cast_linear_weights(weights)
        # With the fused decode_linear every row is computed the same way whatever the batch,
        # so batching needs no padding rows to keep greedy output exact (decode_rows).
        self.batch_invariant = model.kernels.batch_invariant_decode
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
        self.scheduler = Scheduler(self.cache, self.max_batch_size, self.max_queue,
                                   prefill_together=self.batch_invariant)
        self.detokenizer = Detokenizer(tokenizer, self.max_len)
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
        state.json, tokenizer.json, manifest.json) as written by save_checkpoint. kwargs go to
        Engine (level, weights="int8", kv_cache_dtype, ...)."""
        path = Path(path)
        ckpt = load_checkpoint(path)
        raw = ckpt.config
        try:
            config = config_from_dict(raw) if "model" in raw else Config(
                model=ScaledTransformerModel.from_config(raw).config)
        except ValueError as exc:
            raise CheckpointError(f"{path / 'state.json'}: config does not load: {exc}") from None
        model = ScaledTransformerModel(config.model)
        try:
            model.load_state_dict(ckpt.model_state)
        except RuntimeError as exc:  # names every mismatched tensor, one per line: the first
            detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise CheckpointError(f"{path / MODEL_FILE} does not fit the model of state.json's "
                                  f"config: {detail[min(1, len(detail) - 1)]}") from None
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
        self.scheduler.check_fits(params.n, len(prompts), field_name)
        on_tokens = list(on_tokens) if on_tokens is not None else [None] * len(prompts)
        indexed = len(prompts) > 1 if indexed is None else indexed
        reqs = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.check_prompt(ids, f"{field_name}[{i}]" if indexed else field_name)
            reqs.append(Request(ids, params, on_tokens[i]))
        self.scheduler.enqueue(reqs)
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
        return len(self.scheduler.pending)

    @property
    def batch_size(self) -> int:
        return len(self.scheduler.live)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the scheduler; requests not finished fail with EngineStopped."""
        self.scheduler.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop (the engine's thread) -----------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)  # per thread under OpenMP: this thread's team
        try:
            with torch.inference_mode():
                self._warmup()
                self.ready.set()
                while (groups := self.scheduler.admit()) is not None:
                    for group in groups:
                        if len(group) > 1:
                            self._prefill_together(group)
                        else:
                            self._prefill(group[0])
                    self._retire()
                    if self.scheduler.live:
                        self._decode_step()
                        self._retire()
        except BaseException as exc:  # a bug: fail every request rather than hang them
            err = exc
        else:
            err = EngineStopped("the engine stopped")
        for req in self.scheduler.close():
            if not req.future.done():
                req.future.set_exception(err)

    def _warmup(self) -> None:
        if self.warmup_steps > 0:
            rows = sorted({decode_rows(n, self.exact) for n in range(1, self.max_batch_size + 1)})
            warm_up(self.model, self.cache, self.warmup_steps, rows,
                    stopping=lambda: self.scheduler.stopping)

    def _prefill(self, req: Request) -> None:
        req.t_admitted = time.perf_counter()
        row = self.batch_size
        ids = torch.tensor([req.prompt_ids], dtype=torch.int64)
        self.cache.lengths[row] = 0  # a one-token prompt takes the decode path from position 0
        logits = self.model.forward_with_cache(ids, self.cache.rows(row, row + 1))  # (1, V)
        self.stats["prefills"] += 1
        self.stats["prefill_batches"] += 1
        placed, _ = self.scheduler.place([req])  # rows row .. row + n - 1
        self._advance(logits.expand(len(placed), -1), placed)
        req.t_first_token = time.perf_counter()

    def _prefill_together(self, reqs: list[Request]) -> None:
        """Prompts admitted at one token boundary, prefilled as one right-padded batch (levels
        2-3: every row's keys, values and logits are then the bits it gets alone, checked in
        tests/test_engine.py). Prompt j fills row r0 + j; extra candidates (n > 1) copy it into
        rows after the batch."""
        t = time.perf_counter()
        r0, B = self.batch_size, len(reqs)
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
        placed, prompt_of = self.scheduler.place(reqs)
        self._advance(logits[prompt_of], placed)
        t = time.perf_counter()
        for req in reqs:
            req.t_first_token = t

    def _decode_step(self) -> None:
        live = self.scheduler.live
        n = len(live)
        m = decode_rows(n, self.exact)
        last = [[c.tokens[-1]] for _, c in live]
        if m > n:
            last += [[0]] * (m - n)
            self.cache.lengths[n:m] = 0  # dummy rows: one key each at position 0
        tokens = torch.tensor(last, dtype=torch.int64)  # (m, 1)
        logits = self.model.forward_with_cache(tokens, self.cache)[:n]
        self.stats["decode_steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], n)
        if self.on_step is not None:
            self.on_step(n)
        self._advance(logits, list(live))
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def _advance(self, logits: torch.Tensor, live) -> None:
        """One new token for each (request, candidate) of live, from its row of logits."""
        tokens, lps = choose_tokens(logits, live, self.model.kernels.greedy_pick)
        self.stats["tokens_generated"] += len(tokens)
        for (req, cand), tok, lp in zip(live, tokens, lps):
            self.detokenizer.append_token(req, cand, tok, lp)

    def _retire(self) -> None:
        for req in self.scheduler.retire():
            req.finish()
