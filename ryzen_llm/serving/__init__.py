"""The HTTP server, split by job. FastAPI on uvicorn, in front of one Engine (ryzen_llm.engine):
    POST /infer             {"inputs": [...], "max_new_tokens": 16, "temperature": 0, ...}
    POST /v1/completions    OpenAI-compatible, streaming over SSE ending in `data: [DONE]`
    GET  /v1/models         the one model served, with its weight format and KV cache dtype
    GET  /health            alive, and the same formats;  GET /ready: 503 until warm-up is done
                            and while draining
    GET  /metrics           Prometheus text format (ryzen_llm_model_info: model, level, formats)
    GET  /openapi.json      the API's description (pydantic models of every body); /docs shows it

    protocol.py     request and response bodies (pydantic); request -> SamplingParams
    errors.py       the {"error": {...}} body; bad input is 400/413/422 naming the field
    gate.py         ASGI middleware: API key, draining, body size limit, per-route metrics
    runner.py       a request's prompts on the engine: queueing (429), cache, timeout, cancel
    cache.py        the response cache and its key
    infer.py        POST /infer
    completions.py  POST /v1/completions, whole or streamed (SSE)
    metrics.py      the Prometheus metrics
    app.py          create_app: the routes, the probes, the gate
    cli.py          argument parsing, main, the draining uvicorn server

Every prompt of a request is its own engine request, so prompts of one request and of
concurrent requests share decode steps. Deterministic results (greedy, or a fixed seed) are
cached for 5 minutes, keyed by the model's weights sha256, the prompt and every parameter.
A full queue answers 429 with Retry-After; a request past its timeout 504; a client that goes
away has its work cancelled at the next token boundary. SIGTERM (or Ctrl-C) drains: /ready
turns 503, new work gets 503, in-flight requests finish (up to --drain-timeout), then it exits 0.
"""
from ryzen_llm.serving.app import create_app

__all__ = ["create_app"]
