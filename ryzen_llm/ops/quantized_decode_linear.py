"""Decode linears from int8 and int4 weights: the Python face of
torch.ops.ryzen_llm.quantized_decode_linear (csrc/cpu/quantized_decode_linear.cpp).

    packed = pack_quantized_weight(linear.weight, "int8")     # once, at load
    y = quantized_decode_linear(x, packed, linear.bias)       # (M, N) float32

Formats (reference.quantize_weight_int8 / quantize_weight_int4 give the codes):
- int8: one float32 scale per output (absmax / 127); at run time each row of x is quantized to
  int8 (absmax / 127) and the products summed exactly in int32 (AVX512-VNNI), then scaled by
  row scale x output scale. About 1 byte per weight.
- int4: one float32 scale per output and group of 32 along K (codes -8..7, two per byte); x is
  quantized to int8 per row and group of 32, each group's products summed exactly in int32 and
  the groups summed in K order in float32. About 0.625 bytes per weight.
Each output row is computed the same way whatever the number of rows (batch-invariant, like
decode_linear), and reference.quantized_decode_linear reproduces the kernel bit for bit before
the GELU. decode_linear takes these packed weights too (the fused decode steps call it), so a
model switches format by swapping the packed tensors. Inference only (no autograd)."""
from __future__ import annotations

import torch

from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_loaded

_LIB = "ryzen_llm"

# The quantized weight formats, by name (the engine's `weights` option adds "bfloat16" and
# "float32").
QUANTIZED_FORMATS = ("int8", "int4")

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::quantized_decode_linear")
    def _(x, weight, bias, gelu, out_features=-1):
        n = out_features if out_features >= 0 else bias.shape[0]
        return x.new_empty((x.shape[0], n))


def _blocks_of_16(t: torch.Tensor) -> torch.Tensor:
    """t (N, ...) zero-padded to a multiple of 16 rows."""
    n16 = -(-t.shape[0] // 16) * 16
    out = t.new_zeros((n16, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) and scales (N,) in the kernel's layout: int8 (ceil(N/16), ceil(K/4)+2,
    64); per block of 16 outputs, ceil(K/4) rows of 4 K codes per output, then the 16 scales
    (float32 bytes) and 16 corrections 128 * sum_k code (int32 bytes)."""
    N, K = codes.shape
    k4 = -(-K // 4)
    c = torch.zeros(N, 4 * k4, dtype=torch.int8)
    c[:, :K] = codes
    c = _blocks_of_16(c)
    nb = c.shape[0] // 16
    body = c.view(nb, 16, k4, 4).permute(0, 2, 1, 3).reshape(nb, k4, 64)
    s = _blocks_of_16(scales.float().contiguous()).view(nb, 1, 16).view(torch.int8)
    corr = _blocks_of_16(128 * codes.to(torch.int32).sum(1, dtype=torch.int32))
    corr = corr.view(nb, 1, 16).view(torch.int8)
    return torch.cat([body, s, corr], 1).contiguous()


def pack_int4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int4 codes (N, K) in [-8, 7] and scales (N, G) in the kernel's layout: uint8
    (ceil(N/16), 5 * G, 64); per block of 16 outputs and group g of 32 K, 4 rows of codes (row z,
    lane j, byte t: code[j][32g + 8z + t] + 8 in the low nibble, code[j][32g + 8z + 4 + t] + 8 in
    the high one), then the 16 group scales (float32 bytes)."""
    N, K = codes.shape
    G = scales.shape[1]
    c = torch.zeros(N, G * reference.INT4_GROUP, dtype=torch.int16)
    c[:, :K] = codes.to(torch.int16)
    u = _blocks_of_16((c + 8).to(torch.uint8))  # padding outputs: code 0 too (nibble 8)
    u[N:] = 8
    nb = u.shape[0] // 16
    u = u.view(nb, 16, G, 4, 2, 4)  # (block, lane j, group, z, low/high, t)
    byte = u[..., 0, :] | (u[..., 1, :] << 4)  # (nb, 16, G, 4, 4)
    codes_rows = byte.permute(0, 2, 3, 1, 4).reshape(nb, G, 4, 64)
    s = _blocks_of_16(scales.float()).view(nb, 16, G).permute(0, 2, 1).contiguous()
    s = s.view(torch.uint8).view(nb, G, 1, 64)
    return torch.cat([codes_rows, s], 2).reshape(nb, G * 5, 64).contiguous()


def quantize_weight(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a (N, K) float weight in format fmt ("int8" or "int4")."""
    if fmt == "int8":
        return reference.quantize_weight_int8(weight)
    if fmt == "int4":
        return reference.quantize_weight_int4(weight)
    raise ValueError(f"fmt: expected one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")


def pack_quantized_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """A (N, K) float weight (any float dtype) quantized to fmt and packed for
    quantized_decode_linear (and decode_linear). Done once, at load."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a floating-point (N, K) matrix, got {got}")
    codes, scales = quantize_weight(weight, fmt)
    return pack_int8(codes, scales) if fmt == "int8" else pack_int4(codes, scales)


def quantized_decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
    out_features: int = -1,
) -> torch.Tensor:
    """x (..., K) float32 against a packed int8/int4 weight (pack_quantized_weight), + bias (N,),
    GELU'd when gelu; N from out_features or the bias. Returns (..., N) float32."""
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = torch.ops.ryzen_llm.quantized_decode_linear(x2, weight, bias, bool(gelu), out_features)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
