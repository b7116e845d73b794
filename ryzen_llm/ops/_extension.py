"""Loading of the compiled extension ryzen_llm._C, once, with the reason kept when it fails."""
from __future__ import annotations

_loaded: bool | None = None
_error: str | None = None


def extension_loaded() -> bool:
    """True when ryzen_llm._C imported and registered its ops with torch."""
    global _loaded, _error
    if _loaded is None:
        try:
            import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)
            from ryzen_llm import _C  # noqa: F401  (registers torch.ops.ryzen_llm.*)

            _loaded = True
        except ImportError as exc:  # not built, or built against another torch
            _loaded, _error = False, f"{type(exc).__name__}: {exc}"
    return _loaded


def has_kernel(op: str, device_type: str) -> bool:
    """True when the loaded extension registered torch.ops.ryzen_llm.<op> for device_type
    ("cpu", "cuda"): CUDA kernels exist only in a build made with the CUDA toolkit."""
    if not extension_loaded():
        return False
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"ryzen_llm::{op}", key)


def kernel_devices(op: str) -> dict[str, bool]:
    """has_kernel(op, d) for each device type, looked up once: for code that torch.compile traces,
    which cannot trace the dispatcher query (d -> whether the kernel exists)."""
    return {d: has_kernel(op, d) for d in ("cpu", "cuda")}


def extension_error() -> str | None:
    """Why the extension did not load (None when it did, or was not tried yet)."""
    extension_loaded()
    return _error


# std::ostream::_M_insert<long>: what every error message that formats an integer calls
_OSTREAM_INSERT_LONG = "_ZNSo9_M_insertIlEERSoT_"


def libstdcxx_owner() -> str | None:
    """The file that provides the extension's C++ standard library stream code: the shared
    libstdc++ in a sound build, ryzen_llm._C itself where the compiler linked libstdc++ statically.
    Such a build carries a second copy of libstdc++'s locale code beside the one torch loaded, and
    formatting an integer into an error message can then crash the process (seen on a machine
    whose CXX was a separately installed GCC; building with the system g++ fixed it). None when
    it cannot tell (not loaded, not Linux, the symbol not found)."""
    from ryzen_llm.native import LINUX, symbol_owner

    if not extension_loaded() or not LINUX:
        return None
    from ryzen_llm import _C

    return symbol_owner(_C.__file__, _OSTREAM_INSERT_LONG)


def embeds_libstdcxx() -> bool | None:
    """True when ryzen_llm._C carries its own libstdc++ (see libstdcxx_owner), None if unknown."""
    import os

    owner = libstdcxx_owner()
    if owner is None:
        return None
    from ryzen_llm import _C

    return os.path.realpath(owner) == os.path.realpath(_C.__file__)
