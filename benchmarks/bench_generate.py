"""Generation throughput and per-token latency of ryzen_llm.Engine, in-process, at batch 1, 4,
8, 16 and 32, with its linear weights in each of WEIGHTS (bfloat16, today's level 3, and int8 and
int4), beside Hugging Face transformers' GPT-2 generate() of the same shape (d_model 512,
4 layers, 8 heads, FFN 1024, vocab 2048, context 128; random weights, in float32 and in
bfloat16; greedy, 32-token prompts, 16 new tokens, no early stop), all timed in this process
after warm-up. The report compares the engine with the faster of the two HF runs, and the int8
and int4 engines with the bfloat16 one.

Each result records in extra_info: median_ms (the whole batch), tokens_per_s (generated),
ms_per_token (median_ms / 16: the per-token latency a client of the batch sees, prefill
included) and, for the engine, its own time-to-first-token and time-per-output-token medians.
transformers is an optional dependency (pip install -e ".[bench]"); without it the HF rows are
skipped as "not measured", never replaced. Nothing asserts on time.

All run in this pytest process, the HF peers first: the engine's scheduler keeps an OpenMP
team while idle, which would slow the main thread's parallel work beside it; each of the
engine's generate() calls hands back the main thread's idle workers before it waits, so that
the engine's team is the only one while it runs (see ryzen_llm/engine/openmp.py).

Run: pytest benchmarks/bench_generate.py --benchmark-only
"""
from __future__ import annotations

import statistics

import pytest
import torch

from benchmarks._serving import HF_DTYPES, NEW_TOKENS, PROMPT_TOKENS, hf_generate, hf_gpt2
from ryzen_llm.bench_report import ENGINE_WEIGHTS, engine_impl
from ryzen_llm.engine import Engine, SamplingParams

BATCHES = [1, 4, 8, 16, 32]
WEIGHTS = ENGINE_WEIGHTS  # bfloat16, int8, int4
ROUNDS = 5
RESULTS: dict[tuple[str, int], dict] = {}  # read by benchmarks/conftest.py for the summary


@pytest.fixture(scope="module", params=WEIGHTS)
def engine(seed_checkpoint, request):
    """One engine per weight format, in turn (the previous one stopped first)."""
    path, _ = seed_checkpoint
    e = Engine.from_checkpoint(path, weights=request.param)
    assert e.wait_ready(600), "the engine did not finish warming up"
    yield e
    e.stop()


@pytest.fixture(scope="module", params=list(HF_DTYPES))
def hf_model(request):
    """(impl name, model or None, note), one per HF_DTYPES entry."""
    return (request.param, *hf_gpt2(HF_DTYPES[request.param]))


def record(benchmark, impl: str, batch: int, extra: dict):
    median = benchmark.stats.stats.median
    info = {"scenario": "generate", "impl": impl, "batch": batch,
            "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
            "threads": torch.get_num_threads(), "median_ms": median * 1e3,
            "tokens_per_s": batch * NEW_TOKENS / median, "ms_per_token": median * 1e3 / NEW_TOKENS,
            **extra}
    benchmark.extra_info.update(info)
    RESULTS[(impl, batch)] = info


@pytest.mark.parametrize("batch", BATCHES)
def test_generate_hf_transformers(benchmark, hf_model, batch):
    impl, model, note = hf_model
    if model is None:
        RESULTS[(impl, batch)] = {"not_measured": note}
        pytest.skip(f"HF transformers generate() peer {note}")
    benchmark.group = f"generate batch {batch}"
    out = benchmark.pedantic(hf_generate(model, batch), rounds=ROUNDS, warmup_rounds=1,
                             iterations=1)
    assert out.shape == (batch, PROMPT_TOKENS + NEW_TOKENS)
    record(benchmark, impl, batch, {"peer": note})


@pytest.mark.parametrize("batch", BATCHES)
def test_generate_ryzen_llm(benchmark, engine, seed_checkpoint, batch):
    _, prompts = seed_checkpoint
    group = [prompts[j % len(prompts)] for j in range(batch)]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    benchmark.group = f"generate batch {batch}"
    out = benchmark.pedantic(engine.generate, args=(group, params), rounds=ROUNDS,
                             warmup_rounds=1, iterations=1)
    assert all(r["completion_tokens"] == NEW_TOKENS for r in out)
    t = [r["timings"] for r in out]
    record(benchmark, engine_impl(engine.weights), batch, {
        "level": engine.level_note, "weights": engine.weights, "exact_batching": engine.exact,
        "engine_ttft_ms": statistics.median(x["time_to_first_token_ms"] for x in t),
        "engine_tpot_ms": statistics.median(x["time_per_output_token_ms"] for x in t),
    })
