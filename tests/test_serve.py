"""The HTTP server end to end: real uvicorn on 127.0.0.1 (ephemeral port), httpx clients."""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ryzen_llm.engine import Engine, SamplingParams
from ryzen_llm.serve import MAKE_ONE, create_app, latest_checkpoint, main
from tests.serve_fixtures import PROMPTS, Served, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search("^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def served(ckpt):
    s = Served(create_app(Engine.from_checkpoint(ckpt, warmup_steps=10)))
    assert s.engine.wait_ready(30)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy outputs of each prompt alone, from a second engine in this process."""
    e = Engine.from_checkpoint(ckpt, warmup_steps=0)
    out = {(p, n): e.generate(p, SamplingParams(max_new_tokens=n))
           for p in PROMPTS for n in (8, 16, 20)}
    e.stop()
    return out


def test_32_concurrent_requests_are_correct_and_batched(served, reference):
    served.engine.step_delay_s = 0.003  # keep steps long enough for arrivals to overlap
    jobs = [(PROMPTS[i % 8], (8, 16, 20)[i % 3]) for i in range(32)]

    async def fire():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            return await asyncio.gather(*[
                client.post("/infer", json={"inputs": [p], "max_new_tokens": n,
                                            "use_cache": False}) for p, n in jobs])

    try:
        responses = asyncio.run(fire())
    finally:
        served.engine.step_delay_s = 0.0
    for (p, n), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        ref = reference[(p, n)]
        assert out["token_ids"] == ref["token_ids"], p  # greedy: alone == batched, exactly
        assert out["logprobs"] == ref["logprobs"]
        assert out["text"] == ref["text"] and not out["cached"]
        assert out["completion_tokens"] == n and out["finish_reason"] == "length"
        assert set(out["timings"]) >= {"queue_ms", "time_to_first_token_ms", "total_ms"}
    m = served.metrics()
    steps = metric(m, "ryzen_llm_batch_size_count")
    single = metric(m, "ryzen_llm_batch_size_bucket", le="1.0")
    assert steps > single, "no decode step ran more than one sequence"
    assert metric(m, "ryzen_llm_batch_size_bucket", le="8.0") < steps  # some steps had > 8
    assert metric(m, "ryzen_llm_requests_total", route="/infer", status="200") >= 32
    assert metric(m, "ryzen_llm_generated_tokens_total") >= sum(n for _, n in jobs)
    for h in ("ryzen_llm_queue_time_seconds", "ryzen_llm_time_to_first_token_seconds",
              "ryzen_llm_time_per_output_token_seconds", "ryzen_llm_request_latency_seconds"):
        assert f"{h}_bucket" in m
    assert "ryzen_llm_queue_depth" in m


def test_multi_prompt_request_matches_alone(served, reference):
    r = httpx.post(served.url + "/infer", json={"inputs": PROMPTS, "max_new_tokens": 16,
                                                "use_cache": False})
    assert r.status_code == 200
    for p, out in zip(PROMPTS, r.json()["outputs"]):
        assert out["token_ids"] == reference[(p, 16)]["token_ids"]


def test_cache_hit_on_repeat_only_when_deterministic(served):
    body = {"inputs": ["cache me: " + PROMPTS[3]], "max_new_tokens": 6}
    before = served.metrics()
    a = httpx.post(served.url + "/infer", json=body).json()["outputs"][0]
    b = httpx.post(served.url + "/infer", json=body).json()["outputs"][0]
    assert not a["cached"] and b["cached"] and a["token_ids"] == b["token_ids"]
    other = httpx.post(served.url + "/infer", json={**body, "max_new_tokens": 7}).json()
    assert not other["outputs"][0]["cached"]  # every parameter is part of the key
    seeded = {**body, "temperature": 0.9, "seed": 11}
    s1 = httpx.post(served.url + "/infer", json=seeded).json()["outputs"][0]
    s2 = httpx.post(served.url + "/infer", json=seeded).json()["outputs"][0]
    assert s2["cached"] and s1["token_ids"] == s2["token_ids"]
    unseeded = {**body, "temperature": 0.9}
    for _ in range(2):
        assert not httpx.post(served.url + "/infer", json=unseeded).json()["outputs"][0]["cached"]
    after = served.metrics()
    assert metric(after, "ryzen_llm_cache_hits_total") - metric(before, "ryzen_llm_cache_hits_total") == 2
    assert metric(after, "ryzen_llm_cache_misses_total") - metric(before, "ryzen_llm_cache_misses_total") == 3


@pytest.mark.parametrize("body,status,field", [
    ({"inputs": ["x"], "temperature": -1}, 422, "temperature"),
    ({"inputs": ["x"], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"inputs": ["x"], "max_new_tokens": "many"}, 422, "max_new_tokens"),
    ({"inputs": ["x"], "top_p": 0}, 422, "top_p"),
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": "x"}, 422, "inputs"),
    ({"inputs": [""]}, 400, "inputs"),
    ({"inputs": ["x"], "stop": [""]}, 400, "stop"),
    ({"inputs": ["x"], "n": 99}, 422, "n"),
    ({"inputs": ["x"], "unknown_knob": 1}, 422, "unknown_knob"),
    ({}, 422, "inputs"),
    ([1, 2], 422, "body"),
])
def test_bad_input_is_4xx_naming_the_field(served, body, status, field):
    r = httpx.post(served.url + "/infer", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field) and field in err["message"]


def test_malformed_json_and_prompt_too_long(served):
    r = httpx.post(served.url + "/infer", content=b'{"inputs": ["x"],',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/infer", json={"inputs": ["the quick " * 200]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "x", "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(served.url + "/nope").status_code == 404


def test_openai_completion_fields(served):
    body = {"model": served.engine.model_id, "prompt": [PROMPTS[0], PROMPTS[2]],
            "max_tokens": 5, "temperature": 0, "logprobs": 1}
    r = httpx.post(served.url + "/v1/completions", json=body)
    assert r.status_code == 200
    j = r.json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-")
    assert isinstance(j["created"], int) and j["model"] == served.engine.model_id
    assert [c["index"] for c in j["choices"]] == [0, 1]
    direct = served.engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=5))
    c0 = j["choices"][0]
    assert c0["text"] == direct["text"] and c0["finish_reason"] == "length"
    assert c0["logprobs"]["token_logprobs"] == direct["logprobs"]
    assert len(c0["logprobs"]["tokens"]) == 5 and len(c0["logprobs"]["text_offset"]) == 5
    assert j["usage"]["completion_tokens"] == 10
    assert j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"] + 10
    models = httpx.get(served.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == served.engine.model_id
    assert models["data"][0]["object"] == "model"
    # best_of: more candidates than returned, the best by mean log-prob first
    r = httpx.post(served.url + "/v1/completions", json={
        "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2,
        "best_of": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_openai_streaming_field_by_field(served):
    body = {"prompt": PROMPTS[6], "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(line.startswith("data: ") for line in lines)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == served.engine.model_id
        assert isinstance(c["created"], int) and len(c["choices"]) == 1
        choice = c["choices"][0]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
        assert choice["index"] == 0
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 12 + 1  # one chunk per token, then the finish
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    plain = httpx.post(served.url + "/v1/completions", json={**body, "stream": False}).json()
    assert streamed == plain["choices"][0]["text"]
    r = httpx.post(served.url + "/v1/completions", json={**body, "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_cancelled_when_the_client_disconnects(served):
    e = served.engine
    before = metric(served.metrics(), "ryzen_llm_cancelled_total", reason="client_disconnected")
    e.step_delay_s = 0.02
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/infer", json={"inputs": ["cancel " + PROMPTS[0]],
                                                    "max_new_tokens": 80}, timeout=0.4)
        for _ in range(100):
            if e.batch_size == 0:
                break
            time.sleep(0.02)
        assert e.batch_size == 0  # the work stopped long before its 80 tokens (~1.6 s)
        after = metric(served.metrics(), "ryzen_llm_cancelled_total", reason="client_disconnected")
        assert after == before + 1
        # streaming: closing the stream early cancels too
        with httpx.stream("POST", served.url + "/v1/completions", json={
                "prompt": PROMPTS[0], "max_tokens": 80, "stream": True, "temperature": 0}) as r:
            next(r.iter_lines())
        for _ in range(100):
            if e.batch_size == 0:
                break
            time.sleep(0.02)
        assert e.batch_size == 0
    finally:
        e.step_delay_s = 0.0


def test_queue_full_is_429_with_retry_after(ckpt):
    s = Served(create_app(Engine.from_checkpoint(ckpt, max_batch_size=1, max_queue=1,
                                                 warmup_steps=0, step_delay_s=0.02)))
    try:
        async def fire():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                return await asyncio.gather(*[
                    client.post("/infer", json={"inputs": [p], "max_new_tokens": 10})
                    for p in PROMPTS[:6]])

        codes = [r.status_code for r in asyncio.run(fire())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        r429 = [r for r in asyncio.run(fire()) if r.status_code == 429][0]
        assert int(r429.headers["retry-after"]) >= 1
        assert r429.json()["error"]["type"] == "rate_limit_exceeded"
        # more prompts than the queue holds: a retry cannot help, so 400, not 429
        r = httpx.post(s.url + "/infer", json={"inputs": PROMPTS[:2], "max_new_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "inputs", r.text
        assert "can never fit the request queue of 1" in r.json()["error"]["message"]
    finally:
        s.close()


def test_api_key_body_limit_and_timeout(ckpt):
    s = Served(create_app(Engine.from_checkpoint(ckpt, warmup_steps=0, step_delay_s=0.02),
                          api_key="sekrit", max_body_bytes=2000, request_timeout_s=0.3))
    try:
        body = {"inputs": ["x"], "max_new_tokens": 2}
        assert httpx.post(s.url + "/infer", json=body).status_code == 401
        r = httpx.post(s.url + "/infer", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer sekrit"}
        assert httpx.post(s.url + "/infer", json=body, headers=auth).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
        big = {"inputs": ["x" * 5000]}
        r = httpx.post(s.url + "/infer", json=big, headers=auth)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 500

        r = httpx.post(s.url + "/infer", content=chunks(), headers=auth)
        assert r.status_code == 413
        r = httpx.post(s.url + "/infer", json={"inputs": ["x"], "max_new_tokens": 60},
                       headers=auth)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        # streaming: the 200 went out with the first token, the timeout ends the stream
        r = httpx.post(s.url + "/v1/completions", headers=auth,
                       json={"prompt": "x", "max_tokens": 60, "stream": True, "ignore_eos": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert r.status_code == 200 and "data: [DONE]" not in r.text
        assert events[-1]["error"]["type"] == "timeout" and events[-1]["error"]["code"] == 504
        assert 1 <= len(events) - 1 < 60  # some tokens streamed before it
    finally:
        s.close()


def test_ready_is_503_until_warm(ckpt):
    e = Engine.from_checkpoint(ckpt, warmup_steps=5, start=False)
    s = Served(create_app(e))
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/ready").status_code == 503
        assert httpx.post(s.url + "/infer", json={"inputs": ["x"]}).status_code == 503
        e._thread.start()
        assert e.wait_ready(30)
        assert httpx.get(s.url + "/ready").status_code == 200
    finally:
        s.close()


def test_no_checkpoint_says_how_to_make_one(tmp_path, capsys):
    assert main(["--runs-dir", str(tmp_path / "runs")]) == 2
    assert MAKE_ONE in capsys.readouterr().err
    older = make_checkpoint(tmp_path / "a")
    time.sleep(0.02)
    newer = make_checkpoint(tmp_path / "b")
    (tmp_path / "runs").mkdir()
    for name, ck in (("old", older), ("new", newer)):
        dst = tmp_path / "runs" / name / "optimized" / "checkpoints"
        dst.mkdir(parents=True)
        os.symlink(ck, dst / "best")
    assert latest_checkpoint(tmp_path / "runs").parent.parent.parent.name == "new"


def test_sigterm_drains_in_flight_requests_then_exits(ckpt):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ryzen_llm.serve", "--checkpoint", str(ckpt), "--port", "0",
         "--warmup-steps", "5", "--debug-step-delay", "0.02", "--drain-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"on (http://127\.0\.0\.1:\d+);", line)
            if m:
                url = m.group(1)
            if line.startswith("ready"):
                break
        assert url, "server did not start"
        # startup's objects are frozen: full collections under load do not walk them
        assert metric(httpx.get(url + "/metrics").text, "ryzen_llm_gc_frozen_objects") > 10_000
        results = {}

        def client(i):
            r = httpx.post(url + "/infer", json={"inputs": [PROMPTS[i]], "max_new_tokens": 60,
                                                 "use_cache": False}, timeout=30)
            results[i] = r

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for _ in range(500):  # until all six are in flight (60 steps x 20 ms each)
            m = httpx.get(url + "/metrics").text
            if metric(m, "ryzen_llm_running_sequences") + metric(m, "ryzen_llm_queue_depth") >= 6:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert httpx.get(url + "/ready").status_code == 503
        late = httpx.post(url + "/infer", json={"inputs": ["late"]})
        assert late.status_code == 503
        for t in threads:
            t.join(30)
        assert all(results[i].status_code == 200 for i in range(6)), \
            [results[i].status_code for i in range(6)]
        assert all(results[i].json()["outputs"][0]["completion_tokens"] == 60 for i in range(6))
        assert proc.wait(20) == 0
        rest = proc.stdout.read()
        assert "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_openapi_lists_the_completions_request_and_response_schemas(served):
    r = httpx.get(served.url + "/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    schemas = spec["components"]["schemas"]
    for name in ("CompletionBody", "CompletionResponse", "CompletionStreamResponse",
                 "CompletionChoice", "CompletionUsage", "ErrorResponse", "InferBody",
                 "InferResponse", "ModelList"):
        assert name in schemas, name
    post = spec["paths"]["/v1/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/CompletionBody")
    ok = post["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/CompletionResponse")
    assert ok["text/event-stream"]["schema"]["$ref"].endswith("/CompletionStreamResponse")
    for code in ("400", "422", "429", "503", "504"):
        assert post["responses"][code]["content"]["application/json"]["schema"]["$ref"] \
            .endswith("/ErrorResponse"), code
    assert set(schemas["CompletionResponse"]["required"]) >= {"id", "created", "model",
                                                               "choices", "usage"}
    infer = spec["paths"]["/infer"]["post"]["responses"]["200"]["content"]
    assert infer["application/json"]["schema"]["$ref"].endswith("/InferResponse")
    assert httpx.get(served.url + "/docs").status_code == 200


def test_answers_match_their_documented_models(served):
    """The handlers send plain dicts; each must validate against the response model that
    /openapi.json publishes for it (the models forbid fields they do not list)."""
    from ryzen_llm.serving import protocol as P

    url = served.url
    r = httpx.post(url + "/infer", json={"inputs": PROMPTS[:2], "max_new_tokens": 3})
    P.InferResponse.model_validate(r.json())
    r = httpx.post(url + "/infer", json={"inputs": [PROMPTS[0]], "max_new_tokens": 3, "n": 2,
                                         "temperature": 0.8, "seed": 1})
    assert P.InferResponse.model_validate(r.json()).outputs[0].candidates is not None
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[:2], "max_tokens": 3,
                                                  "logprobs": 0, "temperature": 0})
    assert P.CompletionResponse.model_validate(r.json()).choices[0].logprobs is not None
    with httpx.stream("POST", url + "/v1/completions", json={
            "prompt": PROMPTS[1], "max_tokens": 3, "stream": True, "logprobs": 0}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        P.CompletionStreamResponse.model_validate_json(e)
    P.ModelList.model_validate(httpx.get(url + "/v1/models").json())
    P.ReadyResponse.model_validate(httpx.get(url + "/ready").json())
    P.HealthResponse.model_validate(httpx.get(url + "/health").json())
    for bad in ({"inputs": ["x"], "n": 99}, {"inputs": ["x"], "stop": [""]}):
        P.ErrorResponse.model_validate(httpx.post(url + "/infer", json=bad).json())


def test_streamed_completion_on_a_full_queue_is_429_not_a_broken_stream(ckpt):
    s = Served(create_app(Engine.from_checkpoint(ckpt, max_batch_size=1, max_queue=1,
                                                 warmup_steps=0, step_delay_s=0.02)))
    try:
        async def fire():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                return await asyncio.gather(*[
                    client.post("/v1/completions", json={"prompt": p, "max_tokens": 10,
                                                         "stream": True})
                    for p in PROMPTS[:6]])

        responses = asyncio.run(fire())
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_exceeded"
            else:
                assert r.text.endswith("data: [DONE]\n\n")
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "the quick " * 200,
                                                        "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    finally:
        s.close()


def test_int8_weights_and_int8_kv_cache_are_served_and_shown(ckpt):
    """The weight format and the KV cache dtype combine, and /v1/models, /health and /metrics
    say which are serving; answers are the engine's own greedy output in that format."""
    e = Engine.from_checkpoint(ckpt, weights="int8", kv_cache_dtype="int8", warmup_steps=2)
    s = Served(create_app(e))
    try:
        assert e.wait_ready(30)
        card = httpx.get(s.url + "/v1/models").json()["data"][0]
        assert card["weights"] == "int8" and card["kv_cache_dtype"] == "int8"
        health = httpx.get(s.url + "/health").json()
        assert health == {"status": "ok", "model": e.model_id, "weights": "int8",
                          "kv_cache_dtype": "int8"}
        info = dict(kv_cache_dtype="int8", level=str(e.level), model=e.model_id,
                    weights="int8")  # sorted
        assert metric(s.metrics(), "ryzen_llm_model_info", **info) == 1.0
        r = httpx.post(s.url + "/infer", json={"inputs": [PROMPTS[0]], "max_new_tokens": 8,
                                               "use_cache": False}, timeout=30)
        alone = Engine.from_checkpoint(ckpt, weights="int8", kv_cache_dtype="int8",
                                       warmup_steps=0)
        want = alone.generate(PROMPTS[0], SamplingParams(max_new_tokens=8))
        alone.stop()
        assert r.json()["outputs"][0]["token_ids"] == want["token_ids"]
    finally:
        s.close()


def test_weights_and_kv_cache_options_reach_the_engine(tmp_path, monkeypatch):
    seen = {}

    def from_checkpoint(path, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop before serving")

    monkeypatch.setattr(Engine, "from_checkpoint", staticmethod(from_checkpoint))
    assert main(["--checkpoint", str(tmp_path), "--kv-cache-dtype", "int8"]) == 2
    assert seen["kv_cache_dtype"] == "int8"
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert seen["kv_cache_dtype"] is None  # the checkpoint config's inference.kv_cache_dtype
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--kv-cache-dtype", "fp8"])
    assert main(["--checkpoint", str(tmp_path), "--weights", "int4",
                 "--kv-cache-dtype", "int8"]) == 2
    assert seen["weights"] == "int4" and seen["kv_cache_dtype"] == "int8"
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert seen["weights"] is None  # the checkpoint config's inference.weights, else the level's
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--weights", "int3"])


def test_startup_output_names_the_weight_format(ckpt):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ryzen_llm.serve", "--checkpoint", str(ckpt), "--port", "0",
         "--warmup-steps", "1", "--weights", "int8", "--kv-cache-dtype", "int8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert "level 4: int8 linear weights" in first and "int8 KV cache" in first, first
        url = re.search(r"on (http://127\.0\.0\.1:\d+);", first).group(1)
        assert proc.stdout.readline().startswith("ready")
        assert httpx.get(url + "/health").json()["weights"] == "int8"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
