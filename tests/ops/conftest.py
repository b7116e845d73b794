"""Shared pieces of the op tests: devices, and the tolerance rule.

Tolerance rule (from flash-attention): the fused op's max error against an fp64 reference may be
at most 2x the error plain PyTorch makes in the same dtype, plus a floor for outputs where
PyTorch happens to be exact.
"""
from __future__ import annotations

import pytest
import torch

from ryzen_llm.ops._extension import extension_error, extension_loaded

requires_extension = pytest.mark.skipif(
    not extension_loaded(), reason=f"ryzen_llm._C not built: {extension_error()}"
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Smallest error bound per dtype, in units of the dtype's epsilon, for outputs where PyTorch's
# own error is zero or tiny.
FLOOR_EPS = {torch.float32: 8, torch.bfloat16: 2, torch.float64: 64}


def max_error(got: torch.Tensor, ref64: torch.Tensor) -> float:
    return (got.double() - ref64).abs().max().item() if got.numel() else 0.0


def assert_within_pytorch_error(
    name: str, fused: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, factor: float = 2.0
) -> None:
    """fused and plain in the same low dtype; ref64 the fp64 reference on the same inputs."""
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    floor = FLOOR_EPS[fused.dtype] * torch.finfo(fused.dtype).eps * scale
    err_fused, err_plain = max_error(fused, ref64), max_error(plain, ref64)
    bound = factor * err_plain + floor
    print(f"{name}: fused err {err_fused:.3e}, pytorch err {err_plain:.3e}, bound {bound:.3e}")
    assert err_fused <= bound, (
        f"{name}: fused max error {err_fused:.3e} exceeds {factor}x PyTorch's {err_plain:.3e} "
        f"(+ floor {floor:.1e})"
    )
