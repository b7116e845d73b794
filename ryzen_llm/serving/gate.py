"""The gate: plain ASGI middleware in front of every route (so also around a streamed
response), for what must happen before a handler runs or whatever it answers: the API key,
draining, the body size limit, the in-flight count, and each request's route/status metrics."""
from __future__ import annotations

import hmac
import time

from fastapi.responses import Response

from ryzen_llm.serving.errors import error_response
from ryzen_llm.serving.metrics import Metrics

WORK_ROUTES = ("/infer", "/v1/completions")
DOC_ROUTES = ("/openapi.json", "/docs")
KNOWN_ROUTES = WORK_ROUTES + ("/v1/models", "/health", "/ready", "/metrics") + DOC_ROUTES
# probes and scrapers need no key, nor does the API's description (the same for every server)
OPEN_ROUTES = ("/health", "/ready", "/metrics") + DOC_ROUTES


class ServeState:
    """Shared by the gate, GET /ready and the draining uvicorn server (ryzen_llm.serving.cli)."""

    def __init__(self):
        self.draining = False
        self.drain_started = 0.0
        self.inflight = 0  # requests to WORK_ROUTES under way


class Gate:
    def __init__(self, app, state: ServeState, metrics: Metrics, api_key: str | None,
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

        work = path in WORK_ROUTES
        try:
            headers = dict(scope["headers"])
            refusal = self.refusal(path, headers)
            if refusal is None and b"content-length" not in headers:
                receive, refusal = await self.read_chunked_body(receive)
            if refusal is not None:
                return await refusal(scope, receive, send_wrapper)
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

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> Response | None:
        """The answer for a request that must not reach the app (401 without the key, 503 for
        work while draining, 413 when Content-Length is over the limit), or None."""
        if self.api_key is not None and path not in OPEN_ROUTES:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return error_response(401, "missing or wrong API key: send "
                                      "'Authorization: Bearer <key>'", None,
                                      "authentication_error", {"WWW-Authenticate": "Bearer"})
        if path in WORK_ROUTES and self.state.draining:
            return error_response(503, "the server is shutting down", None, "unavailable",
                                  {"Connection": "close"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return error_response(400, "Content-Length is not a number")
            if too_big:
                return error_response(413, f"request body is {int(length)} bytes; the limit "
                                      f"is {self.max_body}", None, "request_too_large")
        return None

    async def read_chunked_body(self, receive):
        """A body without Content-Length, read here up to the limit: (a receive that replays it
        to the app, None), or (receive, the 413) once it is over."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return receive, error_response(413, f"request body exceeds the limit of "
                                               f"{self.max_body} bytes", None,
                                               "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None
