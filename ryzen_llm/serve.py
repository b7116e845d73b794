"""The HTTP server: `python -m ryzen_llm.serve --checkpoint PATH [--host H] [--port P]`.

FastAPI on uvicorn, in front of one Engine (ryzen_llm.engine):
    POST /infer             {"inputs": [...], "max_new_tokens": 16, "temperature": 0, ...}
    POST /v1/completions    OpenAI-compatible, streaming over SSE ending in `data: [DONE]`
    GET  /v1/models         the one model served
    GET  /health            alive;  GET /ready: 503 until warm-up is done and while draining
    GET  /metrics           Prometheus text format

Every prompt of a request is its own engine request, so prompts of one request and of
concurrent requests share decode steps. Deterministic results (greedy, or a fixed seed) are
cached for 5 minutes, keyed by the model's weights sha256, the prompt and every parameter.
A full queue answers 429 with Retry-After; a request past its timeout 504; a client that goes
away has its work cancelled at the next token boundary. SIGTERM (or Ctrl-C) drains: /ready
turns 503, new work gets 503, in-flight requests finish (up to --drain-timeout), then it exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cachetools import TTLCache
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector,
                               Histogram)
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ryzen_llm.engine import (
    Engine,
    EngineStopped,
    QueueFull,
    Request,
    RequestCancelled,
    SamplingParams,
)

WORK_ROUTES = ("/infer", "/v1/completions")
KNOWN_ROUTES = WORK_ROUTES + ("/v1/models", "/health", "/ready", "/metrics")
OPEN_ROUTES = ("/health", "/ready", "/metrics")  # probes and scrapers need no key
MAKE_ONE = "python -m ryzen_llm.train --preset quick"


# -- request bodies ---------------------------------------------------------------------------
class InferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[str] = Field(min_length=1, max_length=64)
    max_new_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)  # candidates per prompt; best mean log-prob returned
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks)
    use_cache: bool = True


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # an extension, as in vLLM
    ignore_eos: bool = False  # an extension, as in vLLM
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.param, self.type, self.headers = (
            status, message, param, type_, headers)


def _error(status: int, message: str, param: str | None = None,
           type_: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- metrics ----------------------------------------------------------------------------------
class Metrics:
    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        lat = (.005, .01, .015, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.requests = Counter("ryzen_llm_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("ryzen_llm_request_latency_seconds",
                                 "End-to-end request latency", ["route"], buckets=lat, registry=r)
        self.queue_time = Histogram("ryzen_llm_queue_time_seconds",
                                    "Time a prompt waited before prefill", buckets=lat, registry=r)
        self.ttft = Histogram("ryzen_llm_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", buckets=lat,
                              registry=r)
        self.tpot = Histogram("ryzen_llm_time_per_output_token_seconds",
                              "Decode time per generated token after the first",
                              buckets=(.0005, .001, .002, .004, .008, .016, .032, .064, .128, .5),
                              registry=r)
        self.batch = Histogram("ryzen_llm_batch_size", "Live sequences per decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.tokens = Counter("ryzen_llm_generated_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("ryzen_llm_cache_hits", "Response cache hits", registry=r)
        self.cache_misses = Counter("ryzen_llm_cache_misses", "Response cache misses", registry=r)
        self.cancelled = Counter("ryzen_llm_cancelled", "Prompts cancelled (client gone or "
                                 "timed out)", ["reason"], registry=r)
        # python_gc_collections_total by generation: a full (2) collection pauses every thread
        GCCollector(registry=r)
        g = Gauge("ryzen_llm_gc_frozen_objects", "Objects moved out of the cyclic collector's "
                  "sight at startup (gc.freeze)", registry=r)
        g.set_function(gc.get_freeze_count)
        g = Gauge("ryzen_llm_queue_depth", "Prompts waiting for a batch slot", registry=r)
        g.set_function(lambda: engine.queue_depth)
        g = Gauge("ryzen_llm_running_sequences", "Sequences in the running batch", registry=r)
        g.set_function(lambda: engine.batch_size)
        g = Gauge("ryzen_llm_ready", "1 when warmed up and not draining", registry=r)
        self.ready_gauge = g

    def observe_result(self, result: dict) -> None:
        t = result["timings"]
        if t["queue_ms"] is not None:
            self.queue_time.observe(t["queue_ms"] / 1e3)
        if t["time_to_first_token_ms"] is not None:
            self.ttft.observe(t["time_to_first_token_ms"] / 1e3)
        if t["time_per_output_token_ms"] is not None:
            self.tpot.observe(t["time_per_output_token_ms"] / 1e3)
        self.tokens.inc(sum(len(c["token_ids"]) for c in result["candidates"]))


class State:
    def __init__(self):
        self.draining = False
        self.drain_started = 0.0
        self.inflight = 0


# -- the gate: body size, auth, draining, per-route metrics (plain ASGI, also for streaming) ---
class Gate:
    def __init__(self, app, state: State, metrics: Metrics, api_key: str | None,
                 max_body_bytes: int):
        self.app, self.state, self.metrics = app, state, metrics
        self.api_key, self.max_body = api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(resp: Response):
            await resp(scope, receive, send_wrapper)

        work = path in WORK_ROUTES
        try:
            headers = dict(scope["headers"])
            if self.api_key is not None and path not in OPEN_ROUTES:
                auth = headers.get(b"authorization", b"").decode("latin-1")
                token = auth[7:] if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    return await reply(_error(401, "missing or wrong API key: send "
                                              "'Authorization: Bearer <key>'", None,
                                              "authentication_error",
                                              {"WWW-Authenticate": "Bearer"}))
            if work and self.state.draining:
                return await reply(_error(503, "the server is shutting down", None,
                                          "unavailable", {"Connection": "close"}))
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body
                except ValueError:
                    return await reply(_error(400, "Content-Length is not a number"))
                if too_big:
                    return await reply(_error(413, f"request body is {int(length)} bytes; the "
                                              f"limit is {self.max_body}", None,
                                              "request_too_large"))
            else:
                # chunked upload: read it here, up to the limit, and replay it to the app
                body, more = b"", True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await reply(_error(413, f"request body exceeds the limit of "
                                                  f"{self.max_body} bytes", None,
                                                  "request_too_large"))
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                receive = replay
            if work:
                self.state.inflight += 1
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                if work:
                    self.state.inflight -= 1
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


# -- the app ----------------------------------------------------------------------------------
async def client_gone(request: HTTPRequest) -> None:
    """Returns when the client has disconnected: once the body is read, the ASGI server's next
    message for the request is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    request_timeout_s: float = 60.0,
    cache_size: int = 4096,
    cache_ttl_s: float = 300.0,
    retry_after_s: int = 1,
) -> FastAPI:
    """The FastAPI app around engine; app.state holds engine, metrics, cache, serve_state."""
    state = State()
    metrics = Metrics(engine)
    engine.on_step = metrics.batch.observe
    cache: TTLCache = TTLCache(maxsize=cache_size, ttl=cache_ttl_s)
    app = FastAPI(title="ryzen_llm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.serve_state = engine, metrics, state
    app.state.cache = cache
    metrics.ready_gauge.set_function(lambda: int(engine.ready.is_set() and not state.draining))

    # -- errors: bad input is 400/413/422 naming the field, never a 500 ----------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                where = e.get("ctx", {}).get("error", "")
                return _error(400, f"malformed JSON body: {where}".rstrip(": "), "body")
        parts, first = [], None
        for e in errors[:5]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            name = ".".join(loc) or "body"
            first = first or name
            parts.append(f"{name}: {e.get('msg')}")
        return _error(422, "; ".join(parts), first)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), None, "not_found"
                      if exc.status_code == 404 else "invalid_request_error")

    # -- probes and metrics -----------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return _error(503, "draining: the server is shutting down", None, "unavailable")
        if not engine.ready.is_set():
            return _error(503, "warming up", None, "unavailable")
        return {"status": "ready", "model": engine.model_id}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "created": int(started), "owned_by": "ryzen_llm"}]}

    started = time.time()

    # -- running prompts --------------------------------------------------------------------
    def sampling(max_new_tokens, temperature, top_k, top_p, seed, stop, n,
                 ignore_eos) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed,
                                  stop=tuple([stop] if isinstance(stop, str) else stop or ()),
                                  n=n, ignore_eos=ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc), str(exc).split(":")[0]) from None

    def cache_key(prompt: str, params: SamplingParams) -> str:
        fields = json.dumps([engine.model_sha256, engine.level, prompt,
                             sorted(vars(params).items())], default=list)
        return hashlib.sha256(fields.encode()).hexdigest()

    def submit_all(prompts: list[str], params: SamplingParams, field: str,
                   on_token=None) -> list[Request]:
        """The prompts of one request, queued together (so prefilled as one batch) or not at
        all."""
        try:
            callbacks = None if on_token is None else [
                (lambda *a, _i=i: on_token(_i, *a)) for i in range(len(prompts))]
            return engine.submit_many(prompts, params, callbacks, field_name=field,
                                      indexed=len(prompts) > 1 or field == "inputs")
        except QueueFull as exc:
            raise APIError(429, f"server busy: {exc}; retry after {retry_after_s} s", None,
                           "rate_limit_exceeded", {"Retry-After": str(retry_after_s)}) from None
        except EngineStopped:
            raise APIError(503, "the server is shutting down", None, "unavailable") from None
        except ValueError as exc:
            raise APIError(400, str(exc), str(exc).split(":")[0]) from None

    async def run_prompts(request: HTTPRequest, prompts: list[str], params: SamplingParams,
                          field: str, use_cache: bool) -> tuple[list[dict], list[bool]]:
        deterministic = use_cache and params.deterministic
        results: list[dict | None] = [None] * len(prompts)
        hits = [False] * len(prompts)
        keys = [cache_key(p, params) if deterministic else None for p in prompts]
        todo = []
        for i, key in enumerate(keys):
            if key is not None and key in cache:
                results[i], hits[i] = copy.deepcopy(cache[key]), True
                metrics.cache_hits.inc()
            else:
                if key is not None:
                    metrics.cache_misses.inc()
                todo.append(i)
        if todo:
            reqs = submit_all([prompts[i] for i in todo], params, field)
            futs = [asyncio.wrap_future(r.future) for r in reqs]
            await wait_for(request, reqs, futs)
            for i, r, f in zip(todo, reqs, futs):
                result = f.result()
                metrics.observe_result(result)
                results[i] = result
                if keys[i] is not None:
                    cache[keys[i]] = copy.deepcopy(result)
        return results, hits

    async def wait_for(request: HTTPRequest, reqs: list[Request], futs) -> None:
        """Until every future is done. A client that disconnects is noticed at once (a task
        waits for the server's disconnect message instead of polling), as is the per-request
        timeout; either cancels the leftover work."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout_s
        gone = asyncio.ensure_future(client_gone(request))
        pending = set(futs)
        try:
            while pending:
                done, _ = await asyncio.wait(pending | {gone},
                                             timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    metrics.cancelled.labels("client_disconnected").inc(len(reqs))
                    raise APIError(499, "client closed the request", None, "cancelled")
                pending -= done
                for f in done:
                    exc = f.exception()
                    if isinstance(exc, EngineStopped):
                        raise APIError(503, "the server stopped before the request finished",
                                       None, "unavailable")
                    if exc is not None and not isinstance(exc, RequestCancelled):
                        raise exc
                if pending and loop.time() >= deadline:
                    metrics.cancelled.labels("timeout").inc(len(reqs))
                    raise APIError(504, f"the request took longer than {request_timeout_s} s",
                                   None, "timeout")
        finally:
            gone.cancel()
            for r in reqs:
                if not r.future.done():
                    r.cancel()

    # -- POST /infer ------------------------------------------------------------------------
    @app.post("/infer")
    async def infer(body: InferBody, request: HTTPRequest):
        if not engine.ready.is_set():
            raise APIError(503, "warming up", None, "unavailable")
        params = sampling(body.max_new_tokens, body.temperature, body.top_k, body.top_p,
                          body.seed, body.stop, body.n, body.ignore_eos)
        t0 = time.perf_counter()
        results, hits = await run_prompts(request, body.inputs, params, "inputs", body.use_cache)
        outputs = []
        for r, hit in zip(results, hits):
            out = {k: r[k] for k in ("text", "token_ids", "logprobs", "mean_logprob",
                                     "finish_reason", "prompt_tokens", "completion_tokens",
                                     "timings")}
            out["cached"] = hit
            if params.n > 1:
                out["candidates"] = r["candidates"]
            outputs.append(out)
        # a JSONResponse as it is: FastAPI would first walk the whole payload through
        # jsonable_encoder (~0.15 ms of a 1 ms request's server CPU for plain dicts and lists)
        return JSONResponse({"model": engine.model_id, "outputs": outputs,
                             "timings": {"total_ms": round((time.perf_counter() - t0) * 1e3, 3)}})

    # -- POST /v1/completions ---------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        if not engine.ready.is_set():
            raise APIError(503, "warming up", None, "unavailable")
        if body.model is not None and body.model != engine.model_id:
            raise APIError(404, f"model: {body.model!r} is not served here; this server "
                           f"serves {engine.model_id!r}", "model", "model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) != 0:
                raise APIError(400, f"{name}: not supported (must be 0)", name)
        if body.echo:
            raise APIError(400, "echo: not supported (must be false)", "echo")
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise APIError(400, f"best_of: must be >= n ({body.n}), got {best_of}", "best_of")
        if body.stream and best_of != body.n:
            raise APIError(400, "best_of: cannot stream when best_of > n", "best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > 64:
            raise APIError(400, "prompt: expected a string or a list of 1 to 64 strings", "prompt")
        params = sampling(body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed,
                          body.stop, best_of, body.ignore_eos)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(stream_completion(request, prompts, params, body, cid,
                                                       created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results, _ = await run_prompts(request, prompts, params, "prompt", True)
        choices, n_prompt, n_out = [], 0, 0
        for pi, r in enumerate(results):
            n_prompt += r["prompt_tokens"]
            for j, cand in enumerate(r["candidates"][: body.n]):
                n_out += len(cand["token_ids"])
                choices.append({
                    "text": cand["text"], "index": pi * body.n + j,
                    "logprobs": logprobs_block(cand["token_ids"], cand["logprobs"])
                    if body.logprobs is not None else None,
                    "finish_reason": "stop" if cand["finish_reason"] == "stop" else "length",
                })
        return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                             "model": engine.model_id, "choices": choices,
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                       "total_tokens": n_prompt + n_out}})

    def logprobs_block(token_ids: list[int], lps: list[float], offset: int = 0) -> dict:
        tokens = [engine.decode([t]) for t in token_ids]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None,
                "text_offset": offsets}

    async def stream_completion(request, prompts, params, body, cid, created):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(pi, ci, tok, lp, delta):  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ("token", pi, ci, tok, lp, delta))

        reqs = submit_all(prompts, params, "prompt", on_token)
        for pi, r in enumerate(reqs):
            r.future.add_done_callback(
                lambda f, _pi=pi: loop.call_soon_threadsafe(queue.put_nowait, ("done", _pi)))

        def chunk(index, text, finish, lp_block=None):
            return "data: " + json.dumps({
                "id": cid, "object": "text_completion", "created": created,
                "model": engine.model_id,
                "choices": [{"text": text, "index": index, "logprobs": lp_block,
                             "finish_reason": finish}]}) + "\n\n"

        # one timer for the whole stream, its expiry an item of the queue: cheaper than a
        # wait_for (a task and a timer) around every token
        timer = loop.call_at(loop.time() + request_timeout_s, queue.put_nowait, ("timeout",))
        remaining = len(reqs)
        offsets = {}
        try:
            while remaining:
                item = await queue.get()
                if item[0] == "timeout":
                    metrics.cancelled.labels("timeout").inc(remaining)
                    yield "data: " + json.dumps({"error": {
                        "message": f"the request took longer than {request_timeout_s} s",
                        "type": "timeout", "param": None, "code": 504}}) + "\n\n"
                    return
                if item[0] == "token":
                    _, pi, ci, tok, lp, delta = item
                    index = pi * body.n + ci
                    metrics.tokens.inc()
                    lp_block = None
                    if body.logprobs is not None:
                        lp_block = logprobs_block([tok], [lp], offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(delta)
                    yield chunk(index, delta, None, lp_block)
                    continue
                pi = item[1]
                remaining -= 1
                r = reqs[pi]
                exc = r.future.exception()
                if exc is not None:
                    yield "data: " + json.dumps({"error": {
                        "message": str(exc), "type": "unavailable", "param": None,
                        "code": 503}}) + "\n\n"
                    return
                result = r.future.result()
                t = result["timings"]
                for m, v in ((metrics.queue_time, t["queue_ms"]),
                             (metrics.ttft, t["time_to_first_token_ms"]),
                             (metrics.tpot, t["time_per_output_token_ms"])):
                    if v is not None:
                        m.observe(v / 1e3)
                for cand in sorted(result["candidates"], key=lambda c: c["index"]):
                    finish = "stop" if cand["finish_reason"] == "stop" else "length"
                    yield chunk(pi * body.n + cand["index"], "", finish)
            yield "data: [DONE]\n\n"
        finally:  # client gone (the response task is cancelled) or done: stop leftover work
            timer.cancel()
            left = [r for r in reqs if not r.future.done()]
            if left:
                metrics.cancelled.labels("client_disconnected").inc(len(left))
            for r in left:
                r.cancel()

    app.add_middleware(Gate, state=state, metrics=metrics, api_key=api_key,
                       max_body_bytes=max_body_bytes)
    return app


# -- process: checkpoint discovery, signals, uvicorn ------------------------------------------
def latest_checkpoint(runs_dir: str | Path = "runs") -> Path | None:
    """The newest runs/*/{optimized,baseline}/checkpoints/best the trainer wrote."""
    found = [p for p in Path(runs_dir).glob("*/*/checkpoints/best")
             if p.parent.parent.name in ("optimized", "baseline") and (p / "manifest.json").is_file()]
    return max(found, key=lambda p: (p / "manifest.json").stat().st_mtime, default=None)


class _DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once."""

    def __new__(cls, config, state: State, drain_timeout_s: float):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if state.draining:  # a second signal: stop now
                    self.force_exit = True
                    self.should_exit = True
                    return
                state.draining = True
                state.drain_started = time.monotonic()
                print(f"signal {signal.Signals(sig).name}: draining {state.inflight} in-flight "
                      f"request(s), up to {drain_timeout_s:g} s", flush=True)

            async def on_tick(self, counter: int) -> bool:
                if state.draining and (state.inflight == 0 or
                                       time.monotonic() - state.drain_started > drain_timeout_s):
                    return True
                return await super().on_tick(counter)

        return Server(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ryzen_llm.serve",
                                description="Serve a trained checkpoint over HTTP.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest "
                   "runs/*/{optimized,baseline}/checkpoints/best)")
    p.add_argument("--runs-dir", default="runs", help="where to look without --checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=os.environ.get("RYZEN_LLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $RYZEN_LLM_API_KEY)")
    p.add_argument("--level", type=int, choices=(0, 1, 2, 3),
                   help="kernel level (default: the checkpoint's; 3 generates from bfloat16 weights, "
                   "0-2 from float32)")
    p.add_argument("--max-batch-size", type=int, help="live sequences per decode step")
    p.add_argument("--max-queue", type=int, help="waiting prompts before 429 (default 4x batch)")
    p.add_argument("--warmup-steps", type=int, help="decode steps before ready (default: "
                   "inference.warmup_steps of the checkpoint's config)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--no-exact-batching", action="store_true",
                   help="levels 0-1 only: decode small batches without the dummy rows that make "
                   "greedy output bit-identical alone or batched (levels 2-3 need none)")
    p.add_argument("--kv-cache-dtype", choices=("float32", "int8"),
                   help="KV cache storage (default: inference.kv_cache_dtype of the checkpoint's "
                   "config); int8 keeps 0.27x the bytes, one fp32 scale per cached vector")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ryzen_llm.checkpoint import CheckpointError

    path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(args.runs_dir)
    if path is None:
        print(f"error: no checkpoint given and none found under {args.runs_dir}/*/"
              f"{{optimized,baseline}}/checkpoints/best.\nMake one with:  {MAKE_ONE}\n"
              "or pass --checkpoint PATH.", file=sys.stderr)
        return 2
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP, and without it Nagle + delayed ACK add ~40 ms per keep-alive reply.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        # listening from here on: a client that connects before uvicorn runs waits in the
        # backlog instead of being refused ("ready" can be printed before server.run starts)
        sock.listen(2048)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    import torch

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    # Generation's parallel regions run on the engine's thread alone (see ryzen_llm.engine,
    # "Threads"): this thread loads the model with one.
    torch.set_num_threads(1)
    try:
        engine = Engine.from_checkpoint(
            path, level=args.level, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
            warmup_steps=args.warmup_steps, step_delay_s=args.debug_step_delay,
            exact=not args.no_exact_batching, threads=threads,
            kv_cache_dtype=args.kv_cache_dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sock.close()
        return 2
    if args.api_key == "":
        args.api_key = None
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                           request_timeout_s=args.request_timeout)
    state: State = app.state.serve_state

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=args.access_log,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _DrainingServer(config, state, args.drain_timeout)
    print(f"serving {engine.model_id} from {path} ({engine.level_note}, "
          f"{engine.kv_cache_dtype} KV cache) on "
          f"http://{args.host}:{port}; warming up ({engine.warmup_steps} decode steps)",
          flush=True)

    def announce_ready():
        if engine.wait_ready(600):
            print(f"ready on http://{args.host}:{port}", flush=True)

    # What is loaded by now (torch, the model, the web stack: ~10^5-10^6 objects) lives as long as
    # the process. Frozen, it is out of the cyclic collector's sight: a full collection under load
    # no longer walks it (measured: one 123 ms pause in 2 s of load at concurrency 32 before).
    gc.collect()
    gc.freeze()
    threading.Thread(target=announce_ready, daemon=True).start()
    server.run(sockets=[sock])
    engine.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
