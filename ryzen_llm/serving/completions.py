"""POST /v1/completions: OpenAI's completions API, whole or streamed over SSE.

A streamed response is one `data: {json}` event per generated token, one with the
finish_reason per choice, then `data: [DONE]`. The 200 goes out before the first token, so a
failure after it (timeout, engine stopped) is an error event that ends the stream instead.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ryzen_llm.engine import Request, SamplingParams
from ryzen_llm.serving.errors import APIError, error_body
from ryzen_llm.serving.protocol import (ERROR_RESPONSES, CompletionBody, CompletionResponse,
                                        error_doc)
from ryzen_llm.serving.runner import PromptRunner

STREAM_RESPONSE = {"description": "The completion; with stream: true, text/event-stream instead: "
                   "one CompletionStreamResponse per `data:` event, ending in `data: [DONE]`",
                   "content": {"text/event-stream": {"schema": {
                       "$ref": "#/components/schemas/CompletionStreamResponse"}}}}


def check_completion_body(body: CompletionBody, model_id: str) -> list[str]:
    """The request's prompts, or the APIError for what this server does not do."""
    if body.model is not None and body.model != model_id:
        raise APIError(404, f"model: {body.model!r} is not served here; this server "
                       f"serves {model_id!r}", "model", "model_not_found")
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
    return prompts


def logprobs_block(decode: Callable[[list[int]], str], token_ids: list[int], lps: list[float],
                   offset: int = 0) -> dict:
    """A choice's OpenAI logprobs: each token's text, its log-prob, and where it starts in the
    choice's text (counted from offset, for a streamed choice's later tokens)."""
    tokens = [decode([t]) for t in token_ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None,
            "text_offset": offsets}


def finish_reason(engine_reason: str | None) -> str:
    return "stop" if engine_reason == "stop" else "length"


def completion_response(results: list[dict], body: CompletionBody, decode: Callable,
                        cid: str, created: int, model_id: str) -> dict:
    """The whole CompletionResponse: the best body.n candidates of each prompt's result."""
    choices, n_prompt, n_out = [], 0, 0
    for pi, r in enumerate(results):
        n_prompt += r["prompt_tokens"]
        for j, cand in enumerate(r["candidates"][: body.n]):
            n_out += len(cand["token_ids"])
            choices.append({
                "text": cand["text"], "index": pi * body.n + j,
                "logprobs": logprobs_block(decode, cand["token_ids"], cand["logprobs"])
                if body.logprobs is not None else None,
                "finish_reason": finish_reason(cand["finish_reason"]),
            })
    return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
            "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                          "total_tokens": n_prompt + n_out}}


class CompletionStream(StreamingResponse):
    """The SSE response of a streamed completion. Its events' generator cancels what is left
    when it ends; this also covers a client gone before the generator's first step."""

    def __init__(self, events: AsyncIterator[str], reqs: list[Request], metrics):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.reqs, self.metrics = reqs, metrics

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            left = [r for r in self.reqs if not r.future.done() and not r.cancelled]
            if left:
                self.metrics.cancelled.labels("client_disconnected").inc(len(left))
            for r in left:
                r.cancel()


def sse(payload: dict) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


def submit_streaming(runner: PromptRunner, prompts: list[str], params: SamplingParams,
                     queue: asyncio.Queue) -> list[Request]:
    """Submits the prompts with their tokens, and each prompt's end, delivered to queue as
    ("token", prompt, candidate, token_id, logprob, text) and ("done", prompt)."""
    loop = asyncio.get_running_loop()

    def on_token(pi, ci, tok, lp, delta):  # the engine's thread
        loop.call_soon_threadsafe(queue.put_nowait, ("token", pi, ci, tok, lp, delta))

    reqs = runner.submit_all(prompts, params, "prompt", on_token)
    for pi, r in enumerate(reqs):
        r.future.add_done_callback(
            lambda f, _pi=pi: loop.call_soon_threadsafe(queue.put_nowait, ("done", _pi)))
    return reqs


async def stream_completion(runner: PromptRunner, reqs: list[Request], queue: asyncio.Queue,
                            body: CompletionBody, cid: str, created: int) -> AsyncIterator[str]:
    """The SSE events of requests submitted by submit_streaming, until every prompt is done,
    the request's timeout, or the client goes away (which cancels what is left)."""
    engine, metrics, timeout_s = runner.engine, runner.metrics, runner.request_timeout_s
    loop = asyncio.get_running_loop()
    head = {"id": cid, "object": "text_completion", "created": created, "model": engine.model_id}

    def chunk(index, text, finish, lp_block=None):
        return sse({**head, "choices": [{"text": text, "index": index, "logprobs": lp_block,
                                         "finish_reason": finish}]})

    # one timer for the whole stream, its expiry an item of the queue: cheaper than a
    # wait_for (a task and a timer) around every token
    timer = loop.call_at(loop.time() + timeout_s, queue.put_nowait, ("timeout",))
    remaining, offsets = len(reqs), {}
    try:
        while remaining:
            item = await queue.get()
            if item[0] == "timeout":
                metrics.cancelled.labels("timeout").inc(remaining)
                yield sse(error_body(504, f"the request took longer than {timeout_s} s", None,
                                     "timeout"))
                return
            if item[0] == "token":
                _, pi, ci, tok, lp, delta = item
                index = pi * body.n + ci
                metrics.tokens.inc()
                lp_block = None
                if body.logprobs is not None:
                    lp_block = logprobs_block(engine.decode, [tok], [lp], offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(delta)
                yield chunk(index, delta, None, lp_block)
                continue
            pi = item[1]
            remaining -= 1
            exc = reqs[pi].future.exception()
            if exc is not None:
                yield sse(error_body(503, str(exc), None, "unavailable"))
                return
            result = reqs[pi].future.result()
            metrics.observe_timings(result["timings"])
            for cand in sorted(result["candidates"], key=lambda c: c["index"]):
                yield chunk(pi * body.n + cand["index"], "", finish_reason(cand["finish_reason"]))
        yield "data: [DONE]\n\n"
    finally:  # client gone (the response task is cancelled) or done: stop leftover work
        timer.cancel()
        left = [r for r in reqs if not r.future.done()]
        if left:
            metrics.cancelled.labels("client_disconnected").inc(len(left))
        for r in left:
            r.cancel()


async def completions(body: CompletionBody, request: HTTPRequest):
    runner: PromptRunner = request.app.state.runner
    runner.check_ready()
    engine = runner.engine
    prompts = check_completion_body(body, engine.model_id)
    params = body.to_sampling_params()
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        # queued before the 200 goes out, so that a full queue is still a 429 (and a prompt
        # the engine refuses a 400), not a stream that breaks off
        queue: asyncio.Queue = asyncio.Queue()
        reqs = submit_streaming(runner, prompts, params, queue)
        return CompletionStream(stream_completion(runner, reqs, queue, body, cid, created),
                                reqs, runner.metrics)
    results, _ = await runner.run(request, prompts, params, "prompt", True)
    # sent as it is, like /infer's answer (see ryzen_llm.serving.protocol)
    return JSONResponse(completion_response(results, body, engine.decode, cid, created,
                                            engine.model_id))


def add_routes(app: FastAPI) -> None:
    app.add_api_route(
        "/v1/completions", completions, methods=["POST"], response_model=CompletionResponse,
        responses={200: STREAM_RESPONSE, **ERROR_RESPONSES,
                   404: error_doc("The request names a model this server does not serve")})
