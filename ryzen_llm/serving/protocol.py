"""The HTTP API's bodies as pydantic models: what each endpoint takes and what it answers.

Request models validate (a bad field is a 422 naming it). Response models document: they are
the routes' response_model, so /openapi.json and /docs describe every answer, but the handlers
return their plain dicts as a JSONResponse, which FastAPI sends as it is (no second walk of the
payload through jsonable_encoder on every request). tests/test_serve.py validates real answers
against these models, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ryzen_llm.engine import SamplingParams
from ryzen_llm.serving.errors import APIError


def sampling_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    seed: int | None, stop: str | list[str] | None, n: int,
                    ignore_eos: bool) -> SamplingParams:
    """A request's sampling fields as the engine's SamplingParams; what the engine refuses
    (an empty stop string, ...) is a 400 naming the field."""
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed,
                              stop=tuple([stop] if isinstance(stop, str) else stop or ()),
                              n=n, ignore_eos=ignore_eos)
    except ValueError as exc:
        raise APIError(400, str(exc), str(exc).split(":")[0]) from None


# -- errors -----------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_exceeded, timeout, ...
    param: str | None  # the request field at fault, dotted ("inputs.0"), or null
    code: int  # the HTTP status


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer, in OpenAI's shape."""
    error: ErrorInfo


def error_doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES = {
    400: error_doc("Malformed JSON, or a value the engine refuses (the field is named)"),
    401: error_doc("Missing or wrong API key (when the server has one)"),
    413: error_doc("Request body over the server's limit"),
    422: error_doc("A field of the wrong type or out of range (the field is named)"),
    429: error_doc("Queue full: retry after the Retry-After header's seconds"),
    503: error_doc("Warming up, or draining before shutdown"),
    504: error_doc("The request ran past the server's timeout"),
}


# -- probes -----------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    weights: str = Field(description="the linear weights' format: float32, bfloat16, int8, int4")
    kv_cache_dtype: str = Field(description="the KV cache's storage: float32 or int8")


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ryzen_llm"
    weights: str = Field(description="the linear weights' format: float32, bfloat16, int8, int4")
    kv_cache_dtype: str = Field(description="the KV cache's storage: float32 or int8")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- POST /infer ------------------------------------------------------------------------------
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

    def to_sampling_params(self) -> SamplingParams:
        return sampling_params(self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                               self.seed, self.stop, self.n, self.ignore_eos)


class PromptTimings(BaseModel):
    """Milliseconds from the prompt's arrival at the engine (null where a stage did not
    happen: one token has no time per output token)."""
    queue_ms: float | None
    time_to_first_token_ms: float | None
    time_per_output_token_ms: float | None
    total_ms: float | None


class InferCandidate(BaseModel):
    index: int  # the order it was sampled in
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token) of each generated token
    mean_logprob: float
    finish_reason: Literal["stop", "length"]


class InferOutput(BaseModel):
    """One prompt's answer: its best candidate (by mean log-prob)."""
    model_config = ConfigDict(extra="forbid")
    text: str
    token_ids: list[int]
    logprobs: list[float]
    mean_logprob: float
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    timings: PromptTimings
    cached: bool  # answered from the response cache (deterministic requests only)
    candidates: list[InferCandidate] | None = Field(
        None, description="every candidate, best first; present only when n > 1")


class RequestTimings(BaseModel):
    total_ms: float  # the server's time for the whole request


class InferResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    outputs: list[InferOutput]  # one per input, in order
    timings: RequestTimings


# -- POST /v1/completions (OpenAI) ------------------------------------------------------------
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

    def to_sampling_params(self) -> SamplingParams:
        """best_of candidates per prompt (n when not given); the best n are returned."""
        return sampling_params(self.max_tokens, self.temperature, self.top_k, self.top_p,
                               self.seed, self.stop, self.best_of or self.n, self.ignore_eos)


class CompletionLogprobs(BaseModel):
    tokens: list[str]  # each generated token's text
    token_logprobs: list[float]
    top_logprobs: None = None  # alternatives are not reported
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    index: int  # prompt index * n + candidate index
    logprobs: CompletionLogprobs | None = None  # present when the request asked for logprobs
    finish_reason: Literal["stop", "length"] | None  # null on every streamed chunk but the last


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str  # cmpl-...
    object: Literal["text_completion"] = "text_completion"
    created: int  # Unix seconds
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionStreamResponse(BaseModel):
    """One `data: {...}` event of a streamed completion: a token's text for one choice, then a
    chunk with empty text and the finish_reason per choice, then `data: [DONE]`. A request that
    fails after the 200 went out ends with an ErrorResponse event instead of [DONE]."""
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]  # exactly one
