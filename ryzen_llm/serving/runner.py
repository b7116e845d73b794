"""Running the prompts of one HTTP request on the engine: submission (or 429/503/400), the
response cache, the per-request timeout, and cancellation when the client goes away.

Every prompt of a request is its own engine request, so prompts of one request and of
concurrent requests share decode steps.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from fastapi import Request as HTTPRequest

from ryzen_llm.engine import (Engine, EngineStopped, QueueFull, Request, RequestCancelled,
                              SamplingParams)
from ryzen_llm.serving.cache import ResponseCache, cache_key
from ryzen_llm.serving.errors import APIError
from ryzen_llm.serving.metrics import Metrics


async def client_gone(request: HTTPRequest) -> None:
    """Returns when the client has disconnected: once the body is read, the ASGI server's next
    message for the request is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class PromptRunner:
    """What the endpoints share: the engine, its metrics, the response cache and the limits.
    app.state.runner holds the app's one instance."""

    def __init__(self, engine: Engine, metrics: Metrics, cache: ResponseCache,
                 request_timeout_s: float = 60.0, retry_after_s: int = 1):
        self.engine, self.metrics, self.cache = engine, metrics, cache
        self.request_timeout_s, self.retry_after_s = request_timeout_s, retry_after_s

    def check_ready(self) -> None:
        if not self.engine.ready.is_set():
            raise APIError(503, "warming up", None, "unavailable")

    def submit_all(self, prompts: list[str], params: SamplingParams, field: str,
                   on_token: Callable | None = None) -> list[Request]:
        """The prompts of one request, queued together (so prefilled as one batch) or not at
        all. on_token(prompt_index, candidate_index, token_id, logprob, text_delta) streams."""
        try:
            callbacks = None if on_token is None else [
                (lambda *a, _i=i: on_token(_i, *a)) for i in range(len(prompts))]
            return self.engine.submit_many(prompts, params, callbacks, field_name=field,
                                           indexed=len(prompts) > 1 or field == "inputs")
        except QueueFull as exc:
            retry = self.retry_after_s
            raise APIError(429, f"server busy: {exc}; retry after {retry} s", None,
                           "rate_limit_exceeded", {"Retry-After": str(retry)}) from None
        except EngineStopped:
            raise APIError(503, "the server is shutting down", None, "unavailable") from None
        except ValueError as exc:
            raise APIError(400, str(exc), str(exc).split(":")[0]) from None

    async def run(self, request: HTTPRequest, prompts: list[str], params: SamplingParams,
                  field: str, use_cache: bool) -> tuple[list[dict], list[bool]]:
        """Every prompt's result, and whether it came from the cache. Only deterministic
        requests (greedy, or a fixed seed) are looked up and stored."""
        deterministic = use_cache and params.deterministic
        engine = self.engine
        results: list[dict | None] = [None] * len(prompts)
        hits = [False] * len(prompts)
        keys = [cache_key(engine.model_sha256, engine.level, p, params) if deterministic
                else None for p in prompts]
        todo = []
        for i, key in enumerate(keys):
            cached = self.cache.get(key) if key is not None else None
            if cached is not None:
                results[i], hits[i] = cached, True
                self.metrics.cache_hits.inc()
            else:
                if key is not None:
                    self.metrics.cache_misses.inc()
                todo.append(i)
        if todo:
            reqs = self.submit_all([prompts[i] for i in todo], params, field)
            futs = [asyncio.wrap_future(r.future) for r in reqs]
            await self.wait_for(request, reqs, futs)
            for i, f in zip(todo, futs):
                result = f.result()
                self.metrics.observe_result(result)
                results[i] = result
                if keys[i] is not None:
                    self.cache.put(keys[i], result)
        return results, hits

    async def wait_for(self, request: HTTPRequest, reqs: list[Request], futs) -> None:
        """Until every future is done. A client that disconnects is noticed at once (a task
        waits for the server's disconnect message instead of polling), as is the per-request
        timeout; either cancels the leftover work."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        gone = asyncio.ensure_future(client_gone(request))
        pending = set(futs)
        try:
            while pending:
                done, _ = await asyncio.wait(pending | {gone},
                                             timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    self.metrics.cancelled.labels("client_disconnected").inc(len(reqs))
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
                    self.metrics.cancelled.labels("timeout").inc(len(reqs))
                    raise APIError(504, f"the request took longer than "
                                   f"{self.request_timeout_s} s", None, "timeout")
        finally:
            gone.cancel()
            for r in reqs:
                if not r.future.done():
                    r.cancel()
