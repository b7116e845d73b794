"""create_app: the FastAPI app around one Engine, its routes gathered from the modules that own
them, behind the gate; and the probes (/health, /ready, /metrics, /v1/models)."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ryzen_llm.engine import Engine
from ryzen_llm.serving import completions, infer
from ryzen_llm.serving.cache import ResponseCache
from ryzen_llm.serving.errors import add_error_handlers, error_response
from ryzen_llm.serving.gate import Gate, ServeState
from ryzen_llm.serving.metrics import Metrics
from ryzen_llm.serving.protocol import (CompletionStreamResponse, ErrorResponse, HealthResponse,
                                        ModelList, ReadyResponse)
from ryzen_llm.serving.runner import PromptRunner


def formats(engine: Engine) -> dict:
    """What the model is served in, for /health and /v1/models."""
    return {"weights": engine.weights, "kv_cache_dtype": engine.kv_cache_dtype}


async def health(request: HTTPRequest):
    engine: Engine = request.app.state.engine
    return {"status": "ok", "model": engine.model_id, **formats(engine)}


async def ready(request: HTTPRequest):
    state: ServeState = request.app.state.serve_state
    engine: Engine = request.app.state.engine
    if state.draining:
        return error_response(503, "draining: the server is shutting down", None, "unavailable")
    if not engine.ready.is_set():
        return error_response(503, "warming up", None, "unavailable")
    return {"status": "ready", "model": engine.model_id}


async def prometheus(request: HTTPRequest):
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: HTTPRequest):
    engine: Engine = request.app.state.engine
    return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                        "created": int(request.app.state.started),
                                        "owned_by": "ryzen_llm", **formats(engine)}]}


def add_probe_routes(app: FastAPI) -> None:
    app.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    app.add_api_route("/ready", ready, methods=["GET"], response_model=ReadyResponse,
                      responses={503: {"model": ErrorResponse,
                                       "description": "Warming up, or draining"}})
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=Response,
                      responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                                       "description": "Prometheus text format"}})
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the streamed completion chunk that /v1/completions' 200 refers to
    (a model no route returns directly, so FastAPI does not collect it)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        stream = CompletionStreamResponse.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="serialization")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, sub in stream.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components["CompletionStreamResponse"] = stream
        app.openapi_schema = schema
    return app.openapi_schema


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
    """The FastAPI app around engine; app.state holds engine, metrics, cache, runner,
    serve_state."""
    from ryzen_llm import __version__

    state = ServeState()
    metrics = Metrics(engine)
    engine.on_step = metrics.batch.observe
    cache = ResponseCache(cache_size, cache_ttl_s)
    app = FastAPI(title="ryzen_llm", version=__version__, openapi_url="/openapi.json",
                  docs_url="/docs", redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  description="OpenAI-compatible completions (POST /v1/completions, streaming "
                  "over SSE) and batch generation (POST /infer) from one model on CPUs.")
    app.state.engine, app.state.metrics, app.state.serve_state = engine, metrics, state
    app.state.cache, app.state.started = cache, time.time()
    app.state.runner = PromptRunner(engine, metrics, cache, request_timeout_s, retry_after_s)
    metrics.ready_gauge.set_function(lambda: int(engine.ready.is_set() and not state.draining))
    add_error_handlers(app)
    # routes added to the app itself: FastAPI's include_router puts a second routing layer
    # in front of every request
    add_probe_routes(app)
    infer.add_routes(app)
    completions.add_routes(app)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(Gate, state=state, metrics=metrics, api_key=api_key,
                       max_body_bytes=max_body_bytes)
    return app
