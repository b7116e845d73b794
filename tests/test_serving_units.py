"""The serving package's parts without a server: request translation, the cache key, response
formatting, error bodies and the gate's refusals."""
import asyncio
import json
import time

import pytest
from pydantic import ValidationError

from ryzen_llm.engine import SamplingParams
from ryzen_llm.serving import protocol as P
from ryzen_llm.serving.cache import ResponseCache, cache_key
from ryzen_llm.serving.completions import (check_completion_body, completion_response,
                                           logprobs_block)
from ryzen_llm.serving.errors import APIError, validation_error_response
from ryzen_llm.serving.gate import Gate, ServeState
from ryzen_llm.serving.infer import infer_output


def decode(ids):
    return "".join(chr(ord("a") + i) * (i + 1) for i in ids)  # token i is i+1 characters


def result(n_cands=1, tokens=(0, 1, 2)):
    cands = [{"index": i, "text": decode(list(tokens)), "token_ids": list(tokens),
              "logprobs": [-0.5] * len(tokens), "mean_logprob": -0.5,
              "finish_reason": "length" if i else "stop"} for i in range(n_cands)]
    timings = {"queue_ms": 0.1, "time_to_first_token_ms": 1.0, "time_per_output_token_ms": None,
               "total_ms": 2.0}
    return {**{k: cands[0][k] for k in ("text", "token_ids", "logprobs", "mean_logprob",
                                        "finish_reason")},
            "prompt_tokens": 4, "completion_tokens": len(tokens), "candidates": cands,
            "timings": timings}


# -- request -> SamplingParams ----------------------------------------------------------------
def test_infer_body_to_sampling_params():
    body = P.InferBody(inputs=["x"], max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9,
                       seed=5, stop="\n", n=2, ignore_eos=True)
    assert body.to_sampling_params() == SamplingParams(
        max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=5, stop=("\n",), n=2,
        ignore_eos=True)
    assert P.InferBody(inputs=["x"]).to_sampling_params() == SamplingParams()


def test_completion_body_to_sampling_params_samples_best_of():
    body = P.CompletionBody(prompt="x", max_tokens=3, n=2, best_of=5, stop=["a", "b"])
    params = body.to_sampling_params()
    assert params.n == 5 and params.max_new_tokens == 3 and params.stop == ("a", "b")
    assert params.temperature == 1.0  # OpenAI's default, not the engine's greedy
    assert P.CompletionBody(prompt="x", n=3).to_sampling_params().n == 3


def test_what_the_engine_refuses_is_a_400_naming_the_field():
    with pytest.raises(APIError) as e:
        P.InferBody(inputs=["x"], stop=[""]).to_sampling_params()
    assert e.value.status == 400 and e.value.param == "stop"


def test_request_models_refuse_out_of_range_fields():
    with pytest.raises(ValidationError, match="max_new_tokens"):
        P.InferBody(inputs=["x"], max_new_tokens=0)
    with pytest.raises(ValidationError, match="unknown"):
        P.InferBody(inputs=["x"], unknown=1)
    assert P.CompletionBody(prompt="x", unknown=1).prompt == "x"  # OpenAI clients' extras


@pytest.mark.parametrize("fields,status,param", [
    ({"model": "other"}, 404, "model"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"frequency_penalty": -1}, 400, "frequency_penalty"),
    ({"echo": True}, 400, "echo"),
    ({"n": 3, "best_of": 2}, 400, "best_of"),
    ({"n": 1, "best_of": 2, "stream": True}, 400, "best_of"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["x"] * 65}, 400, "prompt"),
])
def test_check_completion_body(fields, status, param):
    body = P.CompletionBody(**{"prompt": "x", **fields})
    with pytest.raises(APIError) as e:
        check_completion_body(body, "served")
    assert e.value.status == status and e.value.param == param


def test_check_completion_body_returns_the_prompts():
    assert check_completion_body(P.CompletionBody(prompt="x", model="m"), "m") == ["x"]
    assert check_completion_body(P.CompletionBody(prompt=["a", "b"]), "m") == ["a", "b"]


# -- responses --------------------------------------------------------------------------------
def test_logprobs_block_offsets_count_characters():
    block = logprobs_block(decode, [0, 2, 1], [-1.0, -2.0, -3.0])
    assert block == {"tokens": ["a", "ccc", "bb"], "token_logprobs": [-1.0, -2.0, -3.0],
                     "top_logprobs": None, "text_offset": [0, 1, 4]}
    # a streamed token: its offset continues the choice's text so far
    assert logprobs_block(decode, [1], [-0.1], offset=6)["text_offset"] == [6]
    P.CompletionLogprobs.model_validate(block)


def test_completion_response_indexes_choices_and_counts_usage():
    body = P.CompletionBody(prompt=["p", "q"], n=2, best_of=3, logprobs=0)
    out = completion_response([result(3), result(3, tokens=(1,))], body, decode, "cmpl-1", 7,
                              "m")
    P.CompletionResponse.model_validate(out)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]  # prompt * n + candidate
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "length"] * 2
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 3 + 3 + 1 + 1,
                            "total_tokens": 16}
    assert out["choices"][2]["logprobs"]["tokens"] == ["bb"]
    plain = completion_response([result()], P.CompletionBody(prompt="p"), decode, "c", 7, "m")
    assert plain["choices"][0]["logprobs"] is None


def test_infer_output_lists_candidates_only_for_n_above_1():
    one = infer_output(result(), cached=True, n=1)
    assert one["cached"] and "candidates" not in one
    P.InferOutput.model_validate(one)
    two = infer_output(result(2), cached=False, n=2)
    assert len(two["candidates"]) == 2
    P.InferOutput.model_validate(two)


# -- the cache --------------------------------------------------------------------------------
def test_cache_key_covers_model_level_prompt_and_every_parameter():
    base = cache_key("sha", 2, "p", SamplingParams(max_new_tokens=4))
    assert base == cache_key("sha", 2, "p", SamplingParams(max_new_tokens=4))
    others = [cache_key("sha2", 2, "p", SamplingParams(max_new_tokens=4)),
              cache_key("sha", 3, "p", SamplingParams(max_new_tokens=4)),
              cache_key("sha", 2, "q", SamplingParams(max_new_tokens=4)),
              cache_key("sha", 2, "p", SamplingParams(max_new_tokens=5))]
    others += [cache_key("sha", 2, "p", SamplingParams(max_new_tokens=4, **{k: v}))
               for k, v in (("temperature", 0.5), ("top_k", 2), ("top_p", 0.5), ("seed", 1),
                            ("stop", ("x",)), ("n", 2), ("ignore_eos", True))]
    assert len({base, *others}) == len(others) + 1


def test_response_cache_hands_out_copies_and_expires():
    cache = ResponseCache(maxsize=2, ttl_s=0.2)
    r = result()
    cache.put("k", r)
    r["text"] = "changed after put"
    got = cache.get("k")
    assert got["text"] == decode([0, 1, 2])
    got["text"] = "changed after get"
    assert cache.get("k")["text"] == decode([0, 1, 2])
    assert cache.get("missing") is None
    time.sleep(0.3)
    assert cache.get("k") is None


# -- errors and the gate ----------------------------------------------------------------------
def test_validation_errors_name_the_field():
    r = validation_error_response([{"type": "json_invalid", "loc": ("body", 5),
                                    "ctx": {"error": "Expecting value"}}])
    assert r.status_code == 400
    assert json.loads(r.body)["error"]["message"] == "malformed JSON body: Expecting value"
    r = validation_error_response([{"type": "greater_than_equal", "loc": ("body", "n"),
                                    "msg": "too small"},
                                   {"type": "missing", "loc": ("body", "inputs"), "msg": "gone"}])
    err = json.loads(r.body)["error"]
    assert r.status_code == 422 and err["param"] == "n"
    assert err["message"] == "n: too small; inputs: gone"
    P.ErrorResponse.model_validate(json.loads(r.body))


def gate(api_key=None, draining=False):
    state = ServeState()
    state.draining = draining
    return Gate(None, state, metrics=None, api_key=api_key, max_body_bytes=100)


def test_gate_refusals():
    g = gate(api_key="k")
    r = g.refusal("/infer", {})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert g.refusal("/v1/models", {b"authorization": b"Bearer nope"}).status_code == 401
    assert g.refusal("/infer", {b"authorization": b"bearer k"}) is None
    for open_route in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
        assert g.refusal(open_route, {}) is None, open_route
    d = gate(draining=True)
    assert d.refusal("/v1/completions", {}).status_code == 503
    assert d.refusal("/ready", {}) is None  # /ready answers its own 503
    g = gate()
    assert g.refusal("/infer", {b"content-length": b"101"}).status_code == 413
    assert g.refusal("/infer", {b"content-length": b"100"}) is None
    assert g.refusal("/infer", {b"content-length": b"lots"}).status_code == 400


def test_gate_reads_a_chunked_body_up_to_the_limit_and_replays_it():
    def messages(*bodies):
        it = iter([{"type": "http.request", "body": b, "more_body": i < len(bodies) - 1}
                   for i, b in enumerate(bodies)])

        async def receive():
            return next(it)
        return receive

    async def check():
        receive, refusal = await gate().read_chunked_body(messages(b"x" * 60, b"y" * 30))
        assert refusal is None
        assert (await receive())["body"] == b"x" * 60 + b"y" * 30
        _, refusal = await gate().read_chunked_body(messages(b"x" * 60, b"y" * 60))
        assert refusal.status_code == 413

    asyncio.run(check())
