"""ryzen_llm.native: the ctypes entry points answer, or say they cannot, without raising."""
import sys

import pytest

from ryzen_llm import native

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and dladdr")


@linux
def test_symbol_owner_finds_libc_and_says_none_when_it_cannot():
    import ctypes.util

    libc = ctypes.util.find_library("c") or "libc.so.6"
    assert "libc" in (native.symbol_owner(libc, "malloc") or "")
    assert native.symbol_owner(libc, "no_such_symbol_here") is None
    assert native.symbol_owner("/no/such/library.so", "malloc") is None


@linux
def test_mallinfo2_counts_the_heap():
    try:
        info = native.mallinfo2()
    except (OSError, AttributeError):
        pytest.skip("glibc older than 2.33")
    assert info.arena > 0 and info.uordblks > 0


def test_libgomp_pause_is_a_function_or_none():
    import torch  # noqa: F401  (loads the OpenMP runtime)

    pause = native.libgomp_pause()
    assert pause is None or callable(pause)
