"""OpSpec: how an op is declared (see ryzen_llm.ops.registry). Kept apart from the registry so
that an op module can import it without importing every other op module."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class OpSpec:
    name: str
    level: int  # the optimization level from which the fused kernel runs
    fused: Callable  # the fused wrapper (FusedAdamW for adamw); called only with the extension
    # Plain PyTorch taking the same arguments: the level-0 path, the test oracle and the
    # benchmark baseline. None where the reference is the model's composed path (decode_block).
    reference: Callable | None
    summary: str  # what the op computes, one line
    inference_only: bool = False  # only generation calls it; a training run reports it not called
    # (device, torch.Generator) -> small awkward-shaped arguments (floats requiring grad) for
    # doctor's forward and backward self-check against the reference; None: checked by its tests.
    sample_inputs: Callable | None = None
    # Ops one fused call runs inside it, and how many times (counted with the call).
    runs_inside: Mapping[str, int] = field(default_factory=dict)


def leaf(g, device: str, *shape: int):
    """A random float32 tensor of `shape` on `device` that requires grad (sample inputs)."""
    import torch

    return torch.randn(*shape, generator=g).to(device).requires_grad_()
