"""Where a process's memory goes, stage by stage: RYZEN_LLM_MEMTRACE=1 python -m ryzen_llm.train ...

Each mark("stage") prints one line to stderr with the process's current resident set (VmRSS),
its own high-water mark (VmHWM) and getrusage's ru_maxrss, in MiB. ru_maxrss is what the trainer
reports; it can exceed VmHWM because the kernel carries the parent's high-water mark into a
process started by fork + exec (multiprocessing's spawn). Without the variable, mark() does
nothing, and this module imports only os, sys and ryzen_llm.native (ctypes).
"""
from __future__ import annotations

import os
import sys

from ryzen_llm.native import mallinfo2

ENV_VAR = "RYZEN_LLM_MEMTRACE"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def _status_mib(*keys: str) -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) / 1024  # the file says kB
    return out


def _malloc_mib() -> dict[str, float]:
    """glibc's view, summed over all arenas: bytes in use by malloc'ed blocks (heap + mmap), and
    free bytes the arenas hold without returning them to the system."""
    m = mallinfo2()
    return {"malloc_used": (m.uordblks + m.hblkhd) / 2**20, "malloc_free": m.fordblks / 2**20}


def snapshot() -> dict[str, float]:
    """{"VmRSS", "VmHWM", "ru_maxrss"} of this process in MiB (ru_maxrss only off Linux)."""
    import resource

    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        out.update(_status_mib("VmRSS", "VmHWM", "RssAnon", "RssFile"))
    except OSError:
        pass
    try:
        out.update(_malloc_mib())
    except (OSError, AttributeError):  # not glibc, or a glibc older than 2.33
        pass
    return out


def mark(stage: str) -> None:
    if not enabled():
        return
    s = snapshot()
    fields = "  ".join(f"{k} {v:7.1f}" for k, v in s.items())
    print(f"[memtrace {os.getpid()}] {stage:<32} {fields}  MiB", file=sys.stderr, flush=True)
