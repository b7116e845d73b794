"""The CPU block cache (csrc/cpu/cpu_block_cache.cpp) and malloc_trim: reuse, restore, and
training that gives the same losses with and without them; glibc's thresholds for serving."""
import json
import subprocess
import sys

import pytest
import torch

from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
from ryzen_llm.heap import (
    CPU_BLOCK_CACHE_MIN_BYTES, cpu_block_cache_stats, disable_cpu_block_cache,
    enable_cpu_block_cache, keep_freed_heap, release_free_heap,
)
from ryzen_llm.ops._extension import extension_loaded

requires_extension = pytest.mark.skipif(not extension_loaded(), reason="ryzen_llm._C not built")
TINY = ModelConfig(vocab_size=128, d_model=48, n_layers=2, n_heads=4, d_ff=80, max_seq_len=32)


@pytest.fixture
def block_cache():
    assert enable_cpu_block_cache()
    try:
        yield
    finally:
        disable_cpu_block_cache()


@requires_extension
def test_freed_block_is_reused_by_a_request_of_its_size(block_cache):
    a = torch.empty(1 << 18)  # 1 MiB
    ptr = a.data_ptr()
    assert cpu_block_cache_stats()["in_use"] == 1 << 20
    del a
    assert cpu_block_cache_stats() == {"cached": 1 << 20, "in_use": 0, "peak_held": 1 << 20,
                                      "peak_in_use": 1 << 20}
    other_size = torch.empty((1 << 18) + 1)  # 4 bytes more: not the cached block
    assert other_size.data_ptr() != ptr
    b = torch.empty(1 << 18)
    assert b.data_ptr() == ptr and cpu_block_cache_stats()["cached"] == 0
    small = torch.ones(CPU_BLOCK_CACHE_MIN_BYTES // 8)  # under the threshold: not counted
    assert cpu_block_cache_stats()["in_use"] == 2 * (1 << 20) + 4
    assert small.sum() == CPU_BLOCK_CACHE_MIN_BYTES // 8


@requires_extension
def test_disable_frees_the_cache_and_restores_the_allocator():
    assert enable_cpu_block_cache()
    kept = torch.full((1 << 18,), 3.0)  # alive across disable
    freed = torch.empty(1 << 19)
    del freed
    assert disable_cpu_block_cache() == 1 << 21
    after = torch.empty(1 << 18)  # through the previous allocator: not counted
    assert cpu_block_cache_stats()["in_use"] == 1 << 20
    assert kept.sum() == 3.0 * (1 << 18)
    del kept, after  # freed straight away, not cached
    assert cpu_block_cache_stats() == {"cached": 0, "in_use": 0, "peak_held": 3 << 20,
                                      "peak_in_use": 3 << 20}


@requires_extension
def test_onednn_and_autocast_matmuls_run_on_it(block_cache):
    # oneDNN asks the CPU allocator for scratch memory through raw_allocate.
    x, w = torch.randn(97, 80), torch.randn(48, 80)
    expected = torch.nn.functional.linear(x, w)
    for _ in range(2):
        torch.testing.assert_close(torch.nn.functional.linear(x, w), expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(x, w)
        assert y.dtype == torch.bfloat16


def _losses(level: int, cache: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    step = TrainStep(ScaledTransformerModel(TINY), level=level, lr=3e-3, grad_accum_steps=2,
                     compression_ratio=0.3 if level == 3 else 0.0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, TINY.vocab_size, (4, TINY.max_seq_len), generator=g)
               for _ in range(steps)]
    if cache:
        assert enable_cpu_block_cache(min_bytes=4096)  # the tiny model's blocks are small
    try:
        out = []
        for idx in batches:
            out.append(step(idx, torch.roll(idx, -1, dims=1)))
            release_free_heap()
        return out
    finally:
        disable_cpu_block_cache()


@requires_extension
@pytest.mark.parametrize("level", [0, 3])
def test_training_losses_are_identical_with_the_cache(level):
    assert _losses(level, cache=True) == _losses(level, cache=False)


# A child process with a fresh glibc heap: a 24 MiB block is mapped under the default thresholds
# (mallinfo2's hblks counts mapped blocks) and comes from the heap after keep_freed_heap, which
# also keeps it there once freed (the heap's size, arena, does not drop back).
_HEAP_PROBE = """
import ctypes, json, sys
from ryzen_llm.heap import keep_freed_heap
from ryzen_llm.memory_trace import mallinfo2
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_heap() if sys.argv[1] == "keep" else None
before = mallinfo2()
p = libc.malloc(24 << 20)
ctypes.memset(p, 1, 24 << 20)
during = mallinfo2()
libc.free(p)
after = mallinfo2()
print(json.dumps({"kept": kept, "mapped": during.hblks - before.hblks,
                  "heap_grew": during.arena - before.arena, "heap_after": after.arena - before.arena}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_heap_serves_big_blocks_from_the_heap_and_keeps_them():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)

    default, kept = probe("default"), probe("keep")
    assert default["mapped"] == 1 and default["heap_grew"] < (24 << 20)
    assert kept["kept"] is True and kept["mapped"] == 0
    # the heap grew by the block (less what was already free at its top) and kept it all
    assert kept["heap_grew"] >= (20 << 20) and kept["heap_after"] == kept["heap_grew"]


def test_keep_freed_heap_rejects_thresholds_out_of_range():
    with pytest.raises(ValueError, match=r"trim_threshold: expected bytes in \[0, 2\*\*31\)"):
        keep_freed_heap(trim_threshold=-1)
    with pytest.raises(ValueError, match="mmap_threshold: expected bytes"):
        keep_freed_heap(mmap_threshold=2**40)
