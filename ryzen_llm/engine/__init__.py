"""Generation with a KV cache and continuous batching: `Engine.from_checkpoint(path)`.

The package splits the engine by job (as vLLM does): engine.py runs the loop and holds the
public API.
"""
from ryzen_llm.engine.engine import (
    Candidate,
    Engine,
    EngineStopped,
    QueueFull,
    Request,
    RequestCancelled,
    SamplingParams,
    _omp_pause,
    decode_rows,
    release_idle_openmp_workers,
)

__all__ = ["Candidate", "Engine", "EngineStopped", "QueueFull", "Request", "RequestCancelled",
           "SamplingParams", "decode_rows", "release_idle_openmp_workers"]
