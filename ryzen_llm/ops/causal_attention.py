"""Fused causal attention (flash style): the Python face of torch.ops.ryzen_llm.causal_attention_*.

Forward saves only out and the per-row log-sum-exp (fp32; fp64 for fp64 inputs); backward
recomputes the probabilities from them. q, k, v may be the strided views that
`qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)` produces: the kernels read them in
place.
"""
from __future__ import annotations

import torch

from ryzen_llm.ops._autograd import first_order_only, not_differentiable
from ryzen_llm.ops._extension import extension_loaded, kernel_devices
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec, leaf

_LIB = "ryzen_llm"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if extension_loaded():

    # The CPU kernel lays out out as (B, T, H, D) (merging the heads is then a view); the CUDA
    # kernel writes it contiguous.
    @torch.library.register_fake(f"{_LIB}::causal_attention_forward")
    def _(q, k, v, key_padding_mask, scale):
        B, H, T, D = q.shape
        lse = q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype))
        if q.device.type == "cpu":
            return q.new_empty((B, T, H, D)).transpose(1, 2), lse
        return q.new_empty(q.shape), lse

    @torch.library.register_fake(f"{_LIB}::causal_attention_backward")
    def _(grad_out, q, k, v, out, lse, key_padding_mask, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    @torch.library.register_fake(f"{_LIB}::causal_attention_backward_packed")
    def _(grad_out, q, k, v, out, lse, key_padding_mask, scale):
        B, H, T, D = q.shape
        return q.new_empty((B, T, 3, H, D))

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
        first_order_only("causal_attention")
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        args = (grad_out, q, k, v, out, lse, key_padding_mask, ctx.scale)
        if _PACKED_BACKWARD.get(q.device.type, False):
            # views of one (B, T, 3, H, D) tensor: split_heads' gradient without a copy
            packed = torch.ops.ryzen_llm.causal_attention_backward_packed(*args)
            grad_q, grad_k, grad_v = (packed.select(2, i).transpose(1, 2) for i in range(3))
        else:
            grad_q, grad_k, grad_v = torch.ops.ryzen_llm.causal_attention_backward(*args)
        return grad_q, grad_k, grad_v, None, None

    torch.library.register_autograd(
        f"{_LIB}::causal_attention_forward", _backward, setup_context=_setup_context
    )
    for _op in ("causal_attention_backward", "causal_attention_backward_packed"):
        not_differentiable(_op, "causal_attention")


# Per device type: whether the build has the packed backward.
_PACKED_BACKWARD = kernel_devices("causal_attention_backward_packed")


class _SplitHeads(torch.autograd.Function):
    """q, k, v (B, nh, T, hs) as views of qkv (B, T, 3 * C); backward writes the three gradients
    straight into one (B, T, 3 * C) tensor, where the views' own backward reshapes each
    (a copy) and then concatenates them (another)."""

    @staticmethod
    def forward(ctx, qkv, n_heads):
        ctx.set_materialize_grads(False)
        ctx.qkv_shape, ctx.n_heads = qkv.shape, n_heads
        C = qkv.shape[-1] // 3
        return tuple(t.unflatten(-1, (n_heads, C // n_heads)).transpose(-3, -2)
                     for t in qkv.split(C, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        whole = _as_qkv(grads, ctx.qkv_shape)
        if whole is not None:
            return whole, None
        ref = next(g for g in grads if g is not None)
        out = ref.new_empty(ctx.qkv_shape)
        C = ctx.qkv_shape[-1] // 3
        for i, g in enumerate(grads):
            part = out.narrow(-1, i * C, C).unflatten(-1, (ctx.n_heads, C // ctx.n_heads))
            if g is None:
                part.zero_()
            else:
                part.transpose(-3, -2).copy_(g)
        return out, None


def _as_qkv(grads, shape) -> torch.Tensor | None:
    """The (B, T, 3 * C) tensor the three gradients are views of, in q, k, v order (as the CPU
    kernel's backward returns them), or None when they are not."""
    if torch.compiler.is_compiling() or any(g is None for g in grads):
        return None  # (traced tensors have no storage to compare)
    gq = grads[0]
    B, T, C3 = shape
    C = C3 // 3
    strides = (T * C3, C // gq.shape[1], C3, 1)  # (B, H, T, D) inside (B, T, 3, H, D)
    storage = gq.untyped_storage().data_ptr()
    for i, g in enumerate(grads):
        if (g.stride() != strides or g.untyped_storage().data_ptr() != storage
                or g.storage_offset() != gq.storage_offset() + i * C or g.dtype != gq.dtype):
            return None
    return gq.as_strided(shape, (T * C3, C3, 1), gq.storage_offset())


def split_heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, nh, T, hs) of qkv (B, T, 3 * C): the views the plain split and transposes give,
    with one pass in backward instead of two (see _SplitHeads)."""
    return _SplitHeads.apply(qkv, n_heads)


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
