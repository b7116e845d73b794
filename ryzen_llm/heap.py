"""Keeping freed heap memory from staying resident during training, and reusing it while serving.

glibc serves blocks under its mmap threshold (which rises to 32 MiB as big blocks are freed) from
its heap, keeps what is freed there for reuse, and returns memory to the system only from the
top of the heap. A training step takes and frees gigabytes in 64 KiB-8 MiB blocks, activations
and gradients living for different spans, and the holes they leave stay resident (docs/memory.md
has the measurements).

- enable_cpu_block_cache installs the extension's allocator (csrc/cpu/cpu_block_cache.cpp) for
  the training loop: a freed block of 64 KiB or more waits for the next request of exactly its
  size, which a step makes every micro-batch: a lower peak and far fewer page faults, the same
  losses.
- release_free_heap (malloc_trim(0)) after each step hands back the free pages left in glibc's
  heap by the smaller blocks, without moving anything; the pages the next step reuses fault back
  in.
- keep_freed_heap (mallopt) for the inference engine: its prefills take and free activations of
  1-8 MiB whose sizes change with every batch. Under glibc's default thresholds (mmap from
  128 KiB, raised to the size of the largest block freed, and the heap trimmed back whenever
  twice that is free at its top) most of them were mapped or trimmed and faulted in fresh each
  time, a large share of a prefill's time (docs/serving.md); the thresholds are fixed at 32 MiB
  (mmap) and 64 MiB (trim). Not an exact-size cache like the one above: glibc's
  bins serve any size from what was freed, so a server's ever new batch shapes cannot grow it
  past its peak use plus the 64 MiB of free top it may keep.
"""
from __future__ import annotations

import torch

from ryzen_llm.native import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, malloc_trim, mallopt

# glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_MAX_BYTES = 32 << 20
SERVING_TRIM_THRESHOLD_BYTES = 64 << 20


def release_free_heap() -> bool:
    """malloc_trim(0) where glibc provides it. True when it returned memory to the system."""
    return bool(malloc_trim(0)) if malloc_trim is not None else False


def keep_freed_heap(mmap_threshold: int = MMAP_THRESHOLD_MAX_BYTES,
                    trim_threshold: int = SERVING_TRIM_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's thresholds for the whole process: blocks below mmap_threshold bytes come
    from the heap (and are reused from it once freed), and the heap keeps up to trim_threshold
    bytes free at its top instead of handing them back. True when glibc took both; False where
    there is no mallopt (another C library: nothing changes) or glibc refused one of them (an
    mmap threshold above MMAP_THRESHOLD_MAX_BYTES; the other may have been taken)."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or not 0 <= value < 2**31:
            raise ValueError(f"{name}: expected bytes in [0, 2**31), got {value!r}")
    if mallopt is None:
        return False
    ok_mmap = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok_trim = mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    return ok_mmap and ok_trim


# Blocks from this size up are cached by the extension's allocator (see enable_cpu_block_cache).
# Below it are Python objects, LayerNorm statistics and biases: glibc's small bins serve them well.
CPU_BLOCK_CACHE_MIN_BYTES = 64 * 1024


def enable_cpu_block_cache(min_bytes: int = CPU_BLOCK_CACHE_MIN_BYTES) -> bool:
    """Installs csrc/cpu/cpu_block_cache.cpp as torch's CPU allocator: freed blocks of at least
    min_bytes wait for the next request of the same size instead of going back to glibc, whose
    heap keeps the holes they leave resident. For loops that repeat their allocation sizes (a
    training step); a workload with ever new sizes would grow the cache. False where the
    extension is not built (nothing changes then)."""
    from ryzen_llm.ops._extension import extension_loaded

    if not extension_loaded():
        return False
    return bool(torch.ops.ryzen_llm.cpu_block_cache_enable(min_bytes))


def disable_cpu_block_cache() -> int:
    """Puts back the allocator that was in place and frees the cached blocks (returns the
    bytes); blocks still in use are freed when their tensors are."""
    from ryzen_llm.ops._extension import extension_loaded

    if not extension_loaded():
        return 0
    return int(torch.ops.ryzen_llm.cpu_block_cache_disable())


def cpu_block_cache_stats() -> dict[str, int]:
    """{"cached", "in_use", "peak_held", "peak_in_use"} in bytes (zeros where the extension is not
    built). peak_held - peak_in_use is what exact-size reuse costs: cached blocks of sizes no
    request wanted at the peak."""
    from ryzen_llm.ops._extension import extension_loaded

    if not extension_loaded():
        return {"cached": 0, "in_use": 0, "peak_held": 0, "peak_in_use": 0}
    cached, in_use, peak, peak_in_use = torch.ops.ryzen_llm.cpu_block_cache_stats()
    return {"cached": cached, "in_use": in_use, "peak_held": peak, "peak_in_use": peak_in_use}
