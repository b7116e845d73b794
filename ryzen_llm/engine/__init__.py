"""Generation with a KV cache and continuous batching: `Engine.from_checkpoint(path)`.

Split by job, as vLLM splits its serving: engine.py runs the loop and holds the public API;
scheduler.py decides who runs next (admission, rows of the KV cache, their compaction);
sampler.py chooses each token; detokenizer.py turns tokens into text, stop strings and streamed
deltas; request.py holds what callers pass in and get back; openmp.py keeps the caller's
OpenMP workers out of the engine's way.
"""
from ryzen_llm.engine.engine import Engine
from ryzen_llm.engine.openmp import _omp_pause, release_idle_openmp_workers
from ryzen_llm.engine.request import (
    Candidate,
    EngineStopped,
    QueueFull,
    Request,
    RequestCancelled,
    SamplingParams,
)
from ryzen_llm.engine.scheduler import decode_rows

__all__ = ["Candidate", "Engine", "EngineStopped", "QueueFull", "Request", "RequestCancelled",
           "SamplingParams", "decode_rows", "release_idle_openmp_workers"]
