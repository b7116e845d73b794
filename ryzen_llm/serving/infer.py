"""POST /infer: ryzen_llm's own endpoint, a batch of prompts in and each one's best candidate
(with token ids, log-probs and timings) out."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse

from ryzen_llm.serving.protocol import ERROR_RESPONSES, InferBody, InferResponse
from ryzen_llm.serving.runner import PromptRunner

# the fields of an engine result that /infer returns for each prompt
OUTPUT_FIELDS = ("text", "token_ids", "logprobs", "mean_logprob", "finish_reason",
                 "prompt_tokens", "completion_tokens", "timings")


def infer_output(result: dict, cached: bool, n: int) -> dict:
    """One prompt's entry of InferResponse.outputs, from the engine's result."""
    out = {k: result[k] for k in OUTPUT_FIELDS}
    out["cached"] = cached
    if n > 1:
        out["candidates"] = result["candidates"]
    return out


async def infer(body: InferBody, request: HTTPRequest):
    runner: PromptRunner = request.app.state.runner
    runner.check_ready()
    params = body.to_sampling_params()
    t0 = time.perf_counter()
    results, hits = await runner.run(request, body.inputs, params, "inputs", body.use_cache)
    outputs = [infer_output(r, hit, params.n) for r, hit in zip(results, hits)]
    # a JSONResponse as it is: FastAPI would otherwise validate the payload against
    # InferResponse and walk it through jsonable_encoder on every request
    return JSONResponse({"model": runner.engine.model_id, "outputs": outputs,
                         "timings": {"total_ms": round((time.perf_counter() - t0) * 1e3, 3)}})


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/infer", infer, methods=["POST"], response_model=InferResponse,
                      responses=ERROR_RESPONSES)
