"""Handing freed heap memory back to the system between training phases (glibc only).

glibc keeps memory that tensors freed in its heap, for reuse, and returns it to the system
only from the top of the heap. A training step frees a few hundred MiB of activations and
gradients scattered through the heap, so between steps those pages stay resident, and the next
step's peak stacks on top of whatever it does not reuse. malloc_trim(0) releases every free
page (madvise) without moving anything; the pages the next step reuses fault back in, a few
thousand per step against the hundreds of thousands a step touches anyway.
"""
from __future__ import annotations

import ctypes
import sys

_malloc_trim = None
if sys.platform.startswith("linux"):
    try:
        _malloc_trim = ctypes.CDLL(None).malloc_trim  # absent from musl and other C libraries
    except (OSError, AttributeError):
        pass


def release_free_heap() -> bool:
    """malloc_trim(0) where glibc provides it. True when it returned memory to the system."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False
