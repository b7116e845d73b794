"""greedy_pick: the engine's token choice for one decode step (the greedy token, its
log-probability and the row's log-sum-exp) over the seed model's 2,048-token vocabulary at 1, 8
and 32 rows, fused vs the plain-PyTorch reference (log_softmax + argmax + gather, and logsumexp)
vs torch.compile of the reference.

Run: PYTHONPATH=. pytest benchmarks/bench_greedy_pick.py --benchmark-only"""
from __future__ import annotations

import pytest
import torch

from benchmarks._common import compiled
from ryzen_llm.config import ModelConfig
from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded

ROWS = [1, 8, 32]


def fused_pick(logits):
    from ryzen_llm.ops.greedy_pick import greedy_pick

    return greedy_pick(logits)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", ["fused", "reference", "compile"])
def test_greedy_pick(benchmark, name, rows):
    if name == "fused" and not extension_loaded():
        pytest.skip(f"FUSED greedy_pick UNAVAILABLE ({extension_error()}): not timed")
    fn = {"fused": fused_pick, "reference": reference.greedy_pick,
          "compile": compiled(reference.greedy_pick)}[name]
    logits = torch.randn(rows, ModelConfig().vocab_size,
                         generator=torch.Generator().manual_seed(0)) * 3

    def step():
        with torch.inference_mode():
            return fn(logits)

    step()
    step()
    benchmark.group = f"greedy_pick fp32 rows={rows}"
    benchmark.pedantic(step, rounds=200, iterations=1, warmup_rounds=5)
    benchmark.extra_info.update(impl=name, rows=rows,
                                median_ms=round(benchmark.stats.stats.median * 1e3, 4))
