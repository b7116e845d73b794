"""Shared pieces of the op benchmarks: forward / backward / full-step timing of one callable
with pytest-benchmark, and torch.compile of the reference where it works.

Every benchmark records in extra_info what it ran (impl, dtype, mode) and the achieved rate
against a napkin-math model of the op (GFLOP/s or GB/s). Nothing asserts on time.

ResourceMonitor records CPU utilisation and peak RSS of a process over one scenario;
benchmarks/conftest.py wraps every benchmark in one (this process), and the server scenarios
record the server process's own."""
from __future__ import annotations

import functools
import os
import threading
import time

import psutil
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


class ResourceMonitor:
    """CPU utilisation and peak RSS of one process (this one by default) over a `with` block:
    CPU time from the kernel's counters (all threads), RSS sampled every `interval` seconds.
    cpu_percent is of one core (200 = two cores busy)."""

    def __init__(self, pid: int | None = None, interval: float = 0.1, label: str | None = None):
        self.pid = os.getpid() if pid is None else pid
        self.label = label or ("this process" if pid is None else f"server process (pid {pid})")
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append((time.perf_counter() - self.t0, self.proc.memory_info().rss))
            except Exception:  # the process exited
                return

    def __enter__(self) -> "ResourceMonitor":
        self.proc = psutil.Process(self.pid)
        self._stop = threading.Event()
        self.t0 = time.perf_counter()
        self.cpu0 = self._cpu()
        self.samples.append((0.0, self.proc.memory_info().rss))
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self.t0
        try:
            self.cpu_s = self._cpu() - self.cpu0
            self.samples.append((self.wall_s, self.proc.memory_info().rss))
        except Exception:
            self.cpu_s = float("nan")

    def rss_at(self, seconds: float) -> int:
        """The last RSS sample taken at or before `seconds` into the block."""
        return [rss for t, rss in self.samples if t <= seconds][-1]

    def result(self) -> dict:
        mb = 2**20
        return {
            "resources_of": self.label,
            "cpu_percent": round(100 * self.cpu_s / self.wall_s, 1),
            "cpu_seconds": round(self.cpu_s, 3),
            "cpu_cores": os.cpu_count(),
            "peak_rss_mb": round(max(r for _, r in self.samples) / mb, 1),
            "rss_start_mb": round(self.samples[0][1] / mb, 1),
            "rss_end_mb": round(self.samples[-1][1] / mb, 1),
        }
