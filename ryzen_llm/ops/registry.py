"""The op catalog on the Python side: each op is declared once, as an OpSpec in its own module
ryzen_llm/ops/<op>.py (a tuple named SPECS at the module's end), beside its fused wrapper.

Everything that lists ops is derived from these declarations: which implementation runs at which
optimization level (dispatch.resolve, KernelSet, KernelOptimizer), what `doctor` self-checks and
with which inputs, which ops a training run reports as "not called" (inference_only) and what a
fused call counts as having run inside it. csrc/registration.cpp is the C++ side's catalog.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from ryzen_llm.ops._spec import OpSpec

# Modules of ryzen_llm.ops that hold machinery, not op declarations.
_NOT_OPS = frozenset({"dispatch", "registry", "reference"})


@functools.cache
def registry() -> dict[str, OpSpec]:
    """Every declared op by name, in the order of their levels (then names)."""
    import ryzen_llm.ops as package

    specs: list[OpSpec] = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name in _NOT_OPS:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        specs.extend(getattr(module, "SPECS", ()))
    specs.sort(key=lambda s: (s.level, s.name))
    out: dict[str, OpSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise RuntimeError(f"op {spec.name!r} is declared twice")
        out[spec.name] = spec
    return out



def catalog_markdown() -> str:
    """The README's op table: one row per declared op (`python -m ryzen_llm.ops.registry`)."""
    rows = ["| op | fused from level | what it computes |", "|---|---:|---|"]
    for spec in registry().values():
        where = " (generation only)" if spec.inference_only else ""
        rows.append(f"| `{spec.name}` | {spec.level} | {spec.summary}{where} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(catalog_markdown())
