"""The load generator against a real server on 127.0.0.1 (ephemeral port, tiny model)."""
import asyncio
import json
import random

import pytest

from ryzen_llm.engine import Engine
from ryzen_llm.loadtest import main, percentile, run_load, summarize
from ryzen_llm.serve import create_app
from tests.serve_fixtures import PROMPTS, Served, make_checkpoint

KEY = "sekrit"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("loadtest"))
    s = Served(create_app(Engine.from_checkpoint(ckpt, warmup_steps=5), api_key=KEY))
    assert s.engine.wait_ready(30)
    yield s
    s.close()


def load(url, **kw):
    kw.setdefault("api_key", KEY)
    kw.setdefault("prompts", PROMPTS)
    kw.setdefault("max_new_tokens", 4)
    return asyncio.run(run_load(url, **kw)).to_dict()


def test_percentile_math():
    xs = list(range(1, 101))  # 1..100
    random.Random(0).shuffle(xs)
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([], 50) is None
    assert summarize([])["p95"] is None
    with pytest.raises(ValueError, match="q: "):
        percentile(xs, 101)


def test_max_requests_closed_loop_counts_tokens(served):
    d = load(served.url, concurrency=4, duration=60, max_requests=10)
    assert d["sent"] == 10 and d["completed"] == 10 and d["error_count"] == 0
    assert d["generated_tokens"] == 40
    assert len(d["samples"]) == 10
    lat = d["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert d["ttft_ms"] is None  # not streaming
    assert d["requests_per_s"] > 0 and d["tokens_per_s"] > 0


def test_streaming_measures_time_to_first_token(served):
    d = load(served.url, concurrency=2, duration=60, max_requests=6, stream=True,
             max_new_tokens=5)
    assert d["completed"] == 6 and d["error_count"] == 0
    assert d["generated_tokens"] == 30  # one SSE event per token
    for _, status, latency, ttft, tokens in d["samples"]:
        assert status == "200" and tokens == 5 and 0 < ttft <= latency
    assert d["ttft_ms"]["p50"] <= d["latency_ms"]["p50"]


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_per_request(served, stream):
    """Each request carries 3 prompts; the tokens of all three are counted."""
    d = load(served.url, concurrency=2, duration=60, max_requests=4, stream=stream,
             prompts_per_request=3)
    assert d["completed"] == 4 and d["error_count"] == 0 and d["prompts_per_request"] == 3
    assert [s[4] for s in d["samples"]] == [12] * 4 and d["generated_tokens"] == 48
    with pytest.raises(ValueError, match="^prompts_per_request: expected an int >= 1"):
        load(served.url, max_requests=1, prompts_per_request=0)


def test_errors_are_counted_by_status(served):
    d = load(served.url, concurrency=2, duration=60, max_requests=5, api_key="wrong")
    assert d["completed"] == 0 and d["errors"] == {"401": 5} and d["error_count"] == 5
    assert d["latency_ms"]["p50"] is None  # percentiles are of successful requests only
    d = load(served.url, concurrency=1, duration=60, max_requests=3, api_key=None, stream=True)
    assert d["errors"] == {"401": 3}


def test_connection_errors_are_counted_not_raised():
    d = load("http://127.0.0.1:9", concurrency=1, duration=60, max_requests=2)
    assert d["completed"] == 0 and d["error_count"] == 2
    assert list(d["errors"]) == ["ClientConnectorError"]  # aiohttp's name for a refused connection


def test_duration_bounds_the_run(served):
    served.engine.step_delay_s = 0.01  # ~40 ms a request: many fit in 1 s, none take long
    try:
        d = load(served.url, concurrency=2, duration=1.0)
    finally:
        served.engine.step_delay_s = 0.0
    assert d["max_requests"] is None and d["error_count"] == 0
    assert d["sent"] >= 2
    assert all(s[0] < 1.0 for s in d["samples"])  # nothing starts after the duration
    assert d["wall_s"] < 30  # sending stopped (a loose bound: only a runaway loop fails it)


def test_poisson_sends_about_rate_times_duration(served):
    rate, duration, seed = 20.0, 2.0, 3
    d = load(served.url, rate=rate, duration=duration, concurrency=32, seed=seed)
    rng, t, expected = random.Random(seed), 0.0, 0
    while True:  # the same seeded arrival times
        t += rng.expovariate(rate)
        if t >= duration:
            break
        expected += 1
    assert d["mode"] == "poisson" and d["sent"] == expected
    assert abs(expected - rate * duration) <= 4 * (rate * duration) ** 0.5  # Poisson spread
    assert d["completed"] == expected and d["error_count"] == 0
    d = load(served.url, rate=50.0, duration=10.0, max_requests=7)
    assert d["sent"] == 7


def test_cli_prints_and_writes_json(served, tmp_path, capsys):
    out = tmp_path / "sub" / "lt.json"
    assert main(["--url", served.url, "--concurrency", "2", "--max-requests", "4",
                 "--max-new-tokens", "3", "--api-key", KEY, "--stream", "--json",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first token: p50" in printed and "4 ok, 0 errors" in printed
    d = json.loads(out.read_text())
    assert d["kind"] == "loadtest" and d["completed"] == 4 and d["generated_tokens"] == 12
    with pytest.raises(SystemExit):
        main(["--url", served.url, "--concurrency", "0"])
