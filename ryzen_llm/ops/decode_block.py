"""One transformer block of a decode step as one op, and a whole decode step or prefill as one
op: the Python face of torch.ops.ryzen_llm.decode_block, decode_step and prefill_step
(csrc/decode_block.cpp).

It runs the same fused kernels, in the same order, as the composed decode path of
ScaledTransformerModel.forward_with_cache (qkv decode_linear, the KV-cache write, the decode
attention, the output projection, add + LayerNorm, the GELU feed-forward, the next add +
LayerNorm), so its result is bit for bit that path's; it only removes the Python and dispatch
around them (~20 calls per block). Inference only (no autograd); k_cache, v_cache and, for an
int8 cache, k_scale and v_scale are written in place."""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::decode_block")
    def _(x, h, qkv_weight, qkv_bias, proj_weight, proj_bias, ln2_weight, ln2_bias, ln2_eps,
          fc1_weight, fc1_bias, fc2_weight, fc2_bias, next_weight, next_bias, next_eps, k_cache,
          v_cache, k_scale, v_scale, slots, lengths, n_heads):
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake(f"{_LIB}::decode_step")
    def _(idx, tok_emb, pos_emb, ln0_weight, ln0_bias, ln0_eps, block_weights, block_eps,
          head_weight, vocab_size, k_caches, v_caches, k_scales, v_scales, lengths, n_heads):
        return idx.new_empty((idx.shape[0], vocab_size), dtype=torch.float32)

    @torch.library.register_fake(f"{_LIB}::prefill_step")
    def _(idx, key_padding_mask, prompt_lengths, tok_emb, pos_emb, ln0_weight, ln0_bias, ln0_eps,
          block_weights, block_eps, head_weight, vocab_size, k_caches, v_caches, k_scales,
          v_scales, lengths, n_heads):
        return idx.new_empty((idx.shape[0], vocab_size), dtype=torch.float32)


def _block_args(block, next_ln, weight_of) -> tuple:
    """The block's parameters in the op's order, each linear's weight as weight_of(linear) gives it
    (KernelSet.decode_weight: the packed copy where there is one). Looked up once and kept on the
    block (a decode step would otherwise spend ~25 module attribute lookups per block on them);
    in-place updates of the parameters show through, and cast_linear_weights, which replaces the
    packed weights, drops the kept tuple."""
    kept = block.__dict__.get("_decode_block_args")
    if kept is not None and kept[0] is next_ln:
        return kept[1]
    attn, mlp, w = block.attn, block.mlp, weight_of
    args = (w(attn.qkv), attn.qkv.bias, w(attn.proj), attn.proj.bias,
            block.ln2.weight, block.ln2.bias, block.ln2.eps,
            w(mlp.fc1), mlp.fc1.bias, w(mlp.fc2), mlp.fc2.bias,
            next_ln.weight, next_ln.bias, next_ln.eps)
    block.__dict__["_decode_block_args"] = (next_ln, args)
    return args


def decode_block(x, h, block, next_ln, k_cache, v_cache, k_scale, v_scale, slots, lengths,
                 weight_of):
    """(x, h) after `block` (a model Block) for one new token per row: x (B, C) the residual
    stream, h (B, C) = block.ln1(x); returns (new x, next_ln(new x)). slots (B * nh,) are the
    flat (row, head, position) cache indices of the new keys, lengths (B,) the valid keys per
    row after the write; weight_of(linear): the weight decode_linear reads for a linear."""
    return torch.ops.ryzen_llm.decode_block(
        x, h, *_block_args(block, next_ln, weight_of), k_cache, v_cache, k_scale, v_scale, slots, lengths,
        block.attn.n_heads,
    )


def _model_args(model, cache, weight_of) -> tuple:
    """decode_step's and prefill_step's arguments from tok_emb to lengths: the weights of every
    block flattened (12 and 2 eps per block), the LM head, all rows of every cache. The weights'
    part is kept on the model as _block_args keeps a block's (cast_linear_weights drops both), so
    a step does not spend ~25 us of module attribute lookups rebuilding it."""
    kept = model.__dict__.get("_decode_block_args")
    if kept is None or kept[0] != weight_of:
        blocks = model.blocks
        weights, eps = [], []
        for i, block in enumerate(blocks):
            args = _block_args(block, blocks[i + 1].ln1 if i + 1 < len(blocks) else model.ln_f,
                               weight_of)
            weights += args[:6] + args[7:13]
            eps += [args[6], args[13]]
        first = blocks[0].ln1 if len(blocks) else model.ln_f
        kept = (weight_of, (model.tok_emb.weight, model.pos_emb, first.weight, first.bias,
                            first.eps, weights, eps, weight_of(model.lm_head),
                            model.config.vocab_size))
        model.__dict__["_decode_block_args"] = kept
    quantized = cache.k_scale is not None
    return kept[1] + (cache.k, cache.v, cache.k_scale if quantized else [],
                      cache.v_scale if quantized else [], cache.lengths)


def decode_step(model, idx, cache, weight_of):
    """Logits (B, V) of a whole decode step of `model` (a ScaledTransformerModel) in one op: the
    embedding, the first LayerNorm, one decode_block per block and the LM head, the same ops in the
    same order as the model's composed decode path, so the same bits; cache.lengths[:B] += 1.
    idx (B, 1) int64; cache: a KVCache whose rows 0..B-1 are the step's."""
    return torch.ops.ryzen_llm.decode_step(idx, *_model_args(model, cache, weight_of),
                                           model.config.n_heads)


def prefill_step(model, idx, key_padding_mask, prompt_lengths, cache, weight_of):
    """Logits (B, V) of each prompt's last real token after a whole prefill of `model` in one op:
    the same ops in the same order as the model's composed prefill, so the same bits. idx (B, T)
    int64 right-padded prompts, key_padding_mask (B, T) bool or None, prompt_lengths (B,) int64;
    fills cache rows 0..B-1 from position 0 and sets cache.lengths[:B] = prompt_lengths."""
    return torch.ops.ryzen_llm.prefill_step(idx, key_padding_mask, prompt_lengths,
                                            *_model_args(model, cache, weight_of),
                                            model.config.n_heads)
