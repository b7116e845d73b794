"""Batch-invariant linear for decode steps: the Python face of torch.ops.ryzen_llm.decode_linear.

Each output row is computed by the same instructions whatever the number of rows, so a sequence
gets bit-identical logits alone or inside any batch (ATen's GEMMs pick kernels by the row count
and do not promise that). The weight may be a bfloat16 inference copy: decode steps are bound by
reading weights, and half the bytes is nearly half the time. Inference only (no autograd)."""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::decode_linear")
    def _(x, weight, bias, gelu):
        return x.new_empty((x.shape[0], weight.shape[0]))


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False
) -> torch.Tensor:
    """x (..., K) float32 @ weight (N, K).T + bias (N,), GELU'd when gelu; see
    reference.decode_linear. Returns (..., N) float32. The weight must be contiguous (it is
    not copied per call)."""
    # A decode step calls this ~20 times: skip the conversions that would be no-ops.
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = torch.ops.ryzen_llm.decode_linear(x2, weight, bias, bool(gelu))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
