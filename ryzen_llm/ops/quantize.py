"""Block-wise int8 / 4-bit quantization: the Python face of torch.ops.ryzen_llm.(de)quantize_blockwise.

    qt = quantize_blockwise(x, block_size=64, bits=8)   # QuantizedTensor
    qt.nbytes / (4 * x.numel())                         # 0.266 for int8, 0.141 for 4-bit at block 64
    y = qt.dequantize()                                 # x's shape and dtype

Defined behaviour (the kernel and reference.quantize_blockwise agree bit for bit):
- x is quantized in its logical row-major order; a non-contiguous x is copied once first.
- numel need not be a multiple of block_size: the last block is short and has its own scale.
- empty x gives empty data and scales, and dequantizes to an empty tensor of x's shape.
- a block holding NaN or +-inf dequantizes to NaN in every position (its scale is NaN), so
  non-finite values are never hidden; other blocks are unaffected.
- float32 and bfloat16 in; float64 is quantized through float32. Gradients do not flow.
- round-to-nearest: |x - dequantize| <= scale / 2 per block; stochastic: E[dequantize] = x,
  reproducible from (seed, offset + element index), whatever the thread count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::quantize_blockwise")
    def _(x, block_size, bits, stochastic, seed, offset):
        n = x.numel()
        data = x.new_empty((n if bits == 8 else (n + 1) // 2,), dtype=torch.uint8)
        return data, x.new_empty((-(-n // block_size),), dtype=torch.float32)

    @torch.library.register_fake(f"{_LIB}::dequantize_blockwise")
    def _(data, scales, shape, block_size, bits, dtype):
        return data.new_empty(shape, dtype=dtype)


@dataclass
class QuantizedTensor:
    """Codes and per-block scales of one tensor, enough to restore an approximation of it."""

    data: torch.Tensor  # uint8 (numel,) for 8 bits, (ceil(numel / 2),) for 4 bits
    scales: torch.Tensor  # float32 (ceil(numel / block_size),)
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block_size: int
    fused: bool = True  # dequantize with the kernel (True) or the plain-PyTorch reference

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales."""
        return self.data.nbytes + self.scales.nbytes

    def dequantize(self) -> torch.Tensor:
        out_dtype = self.dtype if self.dtype in (torch.float32, torch.bfloat16) else torch.float32
        args = (self.data, self.scales, list(self.shape), self.block_size, self.bits, out_dtype)
        fn = torch.ops.ryzen_llm.dequantize_blockwise if self.fused else reference.dequantize_blockwise
        return fn(*args).to(self.dtype)


def _check_args(x: torch.Tensor, block_size: int, bits: int, seed: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating-point tensor, got {got}")
    if bits not in (8, 4):
        raise ValueError(f"bits: expected 8 or 4, got {bits!r}")
    if not isinstance(block_size, int) or block_size < 1 or (bits == 4 and block_size % 2):
        raise ValueError(
            f"block_size: expected a positive integer{' (even for 4 bits)' if bits == 4 else ''}, "
            f"got {block_size!r}"
        )
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")


def quantize_blockwise(
    x: torch.Tensor,
    block_size: int = 64,
    bits: int = 8,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
    fused: bool = True,
) -> QuantizedTensor:
    """Absmax codes of x per block of block_size values (see the module docstring).

    fused=False runs reference.quantize_blockwise (plain PyTorch); fused=True needs the
    compiled extension and raises when it is not built."""
    _check_args(x, block_size, bits, seed)
    if fused and not extension_loaded():
        raise RuntimeError(f"fused quantize_blockwise requested but unavailable: {extension_error()}")
    src = x.detach()
    if src.dtype not in (torch.float32, torch.bfloat16):
        src = src.float()
    fn = torch.ops.ryzen_llm.quantize_blockwise if fused else reference.quantize_blockwise
    data, scales = fn(src, block_size, bits, stochastic, seed, offset)
    return QuantizedTensor(data, scales, x.shape, x.dtype, bits, block_size, fused)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (..., hs) and float32 scales (...) of keys or values x (..., hs), one block per
    hs-vector: the fused twin of reference.quantize_kv (bit for bit), for an int8 KV cache."""
    data, scales = torch.ops.ryzen_llm.quantize_blockwise(x, x.shape[-1], 8, False, 0, 0)
    return data.view(torch.int8).view(x.shape), scales.view(x.shape[:-1])


def compressed_ratio(numel: int, block_size: int = 64, bits: int = 8) -> float:
    """Compressed bytes (codes + float32 scales) / float32 bytes of a numel-element tensor."""
    if numel == 0:
        return 0.0
    codes = numel if bits == 8 else (numel + 1) // 2
    return (codes + 4 * math.ceil(numel / block_size)) / (4 * numel)
