"""Batch-invariant linear for decode steps: the Python face of torch.ops.ryzen_llm.decode_linear.

Each output row is computed by the same instructions whatever the number of rows, so a sequence
gets bit-identical logits alone or inside any batch (ATen's GEMMs pick kernels by the row count
and do not promise that). The weight may be a bfloat16 inference copy: decode steps are bound by
reading weights, and half the bytes is nearly half the time. Inference only (no autograd)."""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::decode_linear")
    def _(x, weight, bias, gelu, out_features=-1):
        if weight.dim() == 2:
            n = weight.shape[0]
        else:
            n = out_features if out_features >= 0 else bias.shape[0]
        return x.new_empty((x.shape[0], n))


def pack_decode_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (N, K) weight as bfloat16 in the layout of decode_linear's outer-product kernel:
    (ceil(N / 16), ceil(K / 2), 16, 2), block b holding outputs 16b..16b+15 with their weights
    in pairs along K (zeros past N and K). decode_linear takes it in place of the (N, K) weight
    (with out_features or a bias to say N); the values are the bfloat16 weights, unchanged."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a (N, K) matrix, got sizes {tuple(weight.shape)}")
    N, K = weight.shape
    n16, k2 = -(-N // 16), -(-K // 2)
    padded = weight.new_zeros((n16 * 16, k2 * 2), dtype=torch.bfloat16)
    padded[:N, :K] = weight
    return padded.view(n16, 16, k2, 2).permute(0, 2, 1, 3).contiguous()


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
    out_features: int = -1,
) -> torch.Tensor:
    """x (..., K) float32 @ weight (N, K).T + bias (N,), GELU'd when gelu; see
    reference.decode_linear. Returns (..., N) float32. The weight must be contiguous (it is
    not copied per call); it may be a pack_decode_weight layout, N then given by out_features
    or the bias."""
    # A decode step calls this ~20 times: skip the conversions that would be no-ops.
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = torch.ops.ryzen_llm.decode_linear(x2, weight, bias, bool(gelu), out_features)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


SPECS = (OpSpec("decode_linear", 2, decode_linear, reference.decode_linear,
                "batch-invariant linear (+ GELU) for generation, from packed bfloat16 weights",
                inference_only=True),)
