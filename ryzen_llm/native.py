"""Every ctypes call of ryzen_llm, in one place: glibc's allocator controls, libgomp's pause and
the dynamic loader's dladdr.

Each entry point is looked up in the symbols the process has already loaded (ctypes.CDLL(None)):
the C library's at import, the OpenMP runtime's when asked (torch loads it). Where the platform
lacks one (not Linux, musl, LLVM's libomp) its name here is None or the function says "don't
know", and the callers (ryzen_llm.heap, ryzen_llm.memory_trace, ryzen_llm.ops._extension)
fall back to doing nothing. libgomp_pause is the engine's lookup; the engine still keeps its own
copy until its OpenMP module (split from engine.py on another branch) imports this one.

Named native, not platform: a ryzen_llm/platform.py would shadow the standard library's platform
module (which torch imports) for any script run from inside the package folder.
"""
from __future__ import annotations

import ctypes
import sys

LINUX = sys.platform.startswith("linux")


def _process_symbols() -> ctypes.CDLL | None:
    """The symbols already loaded into this process, or None off Linux."""
    if not LINUX:
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_process = _process_symbols()

# -- glibc's allocator ------------------------------------------------------------------------
# malloc_trim(pad) and mallopt(param, value), or None where the C library is not glibc
malloc_trim = getattr(_process, "malloc_trim", None)
mallopt = getattr(_process, "mallopt", None)
if mallopt is not None:
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


class Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (all arenas): arena = heap bytes, hblks/hblkhd = mmapped blocks
    and their bytes, uordblks/fordblks = bytes in use/free in the heap."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def mallinfo2() -> Mallinfo2:
    """glibc's mallinfo2() (Linux with glibc 2.33+ only; OSError or AttributeError elsewhere)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    return libc.mallinfo2()


# -- the OpenMP runtime -----------------------------------------------------------------------
def libgomp_pause():
    """libgomp's omp_pause_resource_all, or None: another runtime (LLVM's libomp also exports
    GOMP_* names, and its pause is process-wide) or none loaded. Call it after `import torch`,
    which loads the runtime."""
    if _process is None or not hasattr(_process, "GOMP_parallel") or hasattr(
            _process, "__kmpc_fork_call"):
        return None
    pause = getattr(_process, "omp_pause_resource_all", None)
    if pause is not None:
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


OMP_PAUSE_SOFT = 1


# -- the dynamic loader -----------------------------------------------------------------------
class DlInfo(ctypes.Structure):
    """struct Dl_info of dladdr(3)."""
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def symbol_owner(library: str, symbol: str) -> str | None:
    """The file whose code the dynamic loader binds `symbol` to when it is looked up from the
    shared library `library` (searched first, then the libraries it needs). None when it cannot
    tell: not Linux, the library or symbol not found."""
    if _process is None:
        return None
    try:
        handle = ctypes.CDLL(library)
        address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
        info = DlInfo()
        if not _process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return None
    except (OSError, AttributeError):
        return None
    return info.dli_fname.decode() if info.dli_fname else None
