"""Why the engine's thread runs every parallel region of generation, and how a waiting caller
gets out of its way.

The scheduler thread runs generation with `threads` torch threads (default: the caller's count
at construction). A decode step is a series of short parallel regions, and libgomp only keeps
its idle workers spinning between them while it manages no more threads than there are CPUs:
once a second thread (say the main one) has run a parallel region of its own, the workers sleep
between regions and each wake-up costs more than the work (docs/serving.md, "Threads", has the
measurements). A server therefore sets its main thread to one torch thread before loading the
model (ryzen_llm.serve does), so that only the scheduler's team exists. Where the runtime is
libgomp, the engine also hands back the idle workers of the calling thread's team (OpenMP 5's
omp_pause_resource_all, which frees only the caller's pool) once the model is loaded and
whenever generate() waits. The caller's next parallel region starts its workers again; a
restart costs milliseconds, which is why the scheduler keeps its own workers while idle (an
idle engine's team still throttles other threads' parallel work).
"""
from __future__ import annotations

import torch  # noqa: F401  (loads the OpenMP runtime that libgomp_pause looks up)

from ryzen_llm.native import OMP_PAUSE_SOFT, libgomp_pause

# libgomp's omp_pause_resource_all, or None: another runtime or none found.
_omp_pause = libgomp_pause()


def release_idle_openmp_workers() -> bool:
    """Ends the idle OpenMP workers of the calling thread's team (libgomp), so that the engine's
    scheduler thread runs the only team (see the module docstring). True when it did."""
    return _omp_pause is not None and _omp_pause(OMP_PAUSE_SOFT) == 0
