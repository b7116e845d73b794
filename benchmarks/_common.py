"""Shared pieces of the op benchmarks: forward / backward / full-step timing of one callable
with pytest-benchmark, and torch.compile of the reference where it works.

Every benchmark records in extra_info what it ran (impl, dtype, mode) and the achieved rate
against a napkin-math model of the op (GFLOP/s or GB/s). Nothing asserts on time."""
from __future__ import annotations

import functools

import torch

ROUNDS = 5


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile (inductor) of a reference function; one compile per function, reused."""
    return torch.compile(fn)


def run(benchmark, fn, make_inputs, mode: str, work: float, unit: str, info: dict):
    """mode: 'fwd' (forward with autograd recording, as in training), 'bwd' (backward of a
    fresh forward, forward untimed) or 'full' (both). work: FLOP or bytes of one call of mode."""
    inputs = make_inputs()
    grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def forward():
        out = fn(*inputs)
        return out if out.dim() == 0 else out.float().square().mean()  # a scalar to backprop

    for _ in range(2):  # warm-up (and compile)
        forward().backward()
    for t in grad_inputs:
        t.grad = None

    if mode == "fwd":
        benchmark.pedantic(forward, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    elif mode == "bwd":

        def setup():
            for t in grad_inputs:
                t.grad = None
            return (forward(),), {}

        benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=ROUNDS,
                           warmup_rounds=1)
    else:

        def full():
            for t in grad_inputs:
                t.grad = None
            forward().backward()

        benchmark.pedantic(full, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info)
    benchmark.extra_info["mode"] = mode
    benchmark.extra_info["median_ms"] = round(median * 1e3, 3)
    benchmark.extra_info[unit] = round(work / median / 1e9, 2)
