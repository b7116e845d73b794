"""Fused causal attention (flash style): the Python face of torch.ops.ryzen_llm.causal_attention_*.

Forward saves only out and the per-row log-sum-exp (fp32; fp64 for fp64 inputs); backward
recomputes the probabilities from them. q, k, v may be the strided views that
`qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)` produces: the kernels read them in
place.
"""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf

_LIB = "ryzen_llm"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::causal_attention_forward")
    def _(q, k, v, key_padding_mask, scale):
        B, H, T, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(f"{_LIB}::causal_attention_backward")
    def _(grad_out, q, k, v, out, lse, key_padding_mask, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    @torch.library.register_fake(f"{_LIB}::causal_attention_decode")
    def _(q, k_cache, v_cache, cache_lengths, scale, k_scale=None, v_scale=None):
        return q.new_empty(q.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask, scale = inputs
        out, lse = output
        ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody differentiates
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v = torch.ops.ryzen_llm.causal_attention_backward(
            grad_out, q, k, v, out, lse, key_padding_mask, ctx.scale
        )
        return grad_q, grad_k, grad_v, None, None

    torch.library.register_autograd(
        f"{_LIB}::causal_attention_forward", _backward, setup_context=_setup_context
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Fused causal softmax attention; see reference.causal_attention. q, k, v: (B, nh, T, hs)."""
    # Under autocast the projections hand over bf16 while a caller's other operand may not be.
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.bool()
    out, _ = torch.ops.ryzen_llm.causal_attention_forward(q, k, v, key_padding_mask, float(scale))
    return out


def causal_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new query per sequence: q (B, nh, 1, hs) against the first cache_lengths[b] rows of the
    caches (B, nh, Tmax, hs), the new token's own k/v already written. Returns (B, nh, 1, hs).

    Caches of q's dtype, or int8 codes with k_scale, v_scale (B, nh, Tmax) float32: cached vector
    (b, h, t) stands for codes * scale[b, h, t] (absmax / 127 per vector, as quantize_blockwise
    with block_size hs); the kernel dequantizes as it reads."""
    return torch.ops.ryzen_llm.causal_attention_decode(
        q, k_cache, v_cache, cache_lengths.long(), float(scale), k_scale, v_scale
    )


def _sample(device, g):
    mask = torch.ones(2, 13, dtype=torch.bool, device=device)
    mask[0, :3] = False
    q, k, v = (leaf(g, device, 2, 3, 13, 48) for _ in range(3))
    return (q, k, v, mask, 48 ** -0.5)


SPECS = (
    OpSpec("causal_attention", 2, causal_attention, reference.causal_attention,
           "flash-style causal attention: tiles, online softmax, recompute in backward",
           sample_inputs=_sample),
    OpSpec("causal_attention_decode", 2, causal_attention_decode,
           reference.causal_attention_decode,
           "one new query per row against its float or int8 KV cache",
           inference_only=True),
)
