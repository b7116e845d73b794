"""Loading of the compiled extension ryzen_llm._C, once, with the reason kept when it fails."""
from __future__ import annotations

_loaded: bool | None = None
_error: str | None = None


def extension_loaded() -> bool:
    """True when ryzen_llm._C imported and registered its ops with torch."""
    global _loaded, _error
    if _loaded is None:
        try:
            from ryzen_llm import _C  # noqa: F401  (registers torch.ops.ryzen_llm.*)

            _loaded = True
        except ImportError as exc:  # not built, or built against another torch
            _loaded, _error = False, f"{type(exc).__name__}: {exc}"
    return _loaded


def extension_error() -> str | None:
    """Why the extension did not load (None when it did, or was not tried yet)."""
    extension_loaded()
    return _error
