"""A whole decode step or prefill as one op: the Python face of torch.ops.ryzen_llm.decode_step
and prefill_step (csrc/decode_block.cpp; decode_block, one block of a decode step, is the piece
decode_step runs per block).

They run the same fused kernels, in the same order, as the composed path of
ScaledTransformerModel.forward_with_cache (per block: qkv decode_linear, the KV-cache write,
attention, the output projection, add + LayerNorm, the GELU feed-forward, the next add +
LayerNorm), so their results are bit for bit that path's; they only remove the Python and
dispatch around ~90 calls. Inference only (no autograd); the caches (and an int8 cache's scales)
and lengths are written in place."""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops._spec import OpSpec

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


def _model_args(model, cache, weight_of) -> tuple:
    """decode_step's and prefill_step's arguments from tok_emb to lengths: per block its 12
    weights (each linear's as weight_of(linear) gives it: the packed copy where there is one) and
    its 2 eps, the LM head, all rows of every cache. The weights' part is kept on the model (a
    step would otherwise rebuild it from module attribute lookups every time); in-place updates
    of the parameters show through, and cast_linear_weights, which replaces the packed weights,
    drops it, as does a new KernelSet (another weight_of)."""
    kept = model.__dict__.get("_decode_block_args")
    if kept is None or kept[0] != weight_of:
        blocks, w = model.blocks, weight_of
        weights, eps = [], []
        for i, block in enumerate(blocks):
            nxt = blocks[i + 1].ln1 if i + 1 < len(blocks) else model.ln_f
            attn, mlp = block.attn, block.mlp
            weights += [w(attn.qkv), attn.qkv.bias, w(attn.proj), attn.proj.bias, block.ln2.weight,
                        block.ln2.bias, w(mlp.fc1), mlp.fc1.bias, w(mlp.fc2), mlp.fc2.bias,
                        nxt.weight, nxt.bias]
            eps += [block.ln2.eps, nxt.eps]
        first = blocks[0].ln1 if len(blocks) else model.ln_f
        kept = (weight_of, (model.tok_emb.weight, model.pos_emb, first.weight, first.bias,
                            first.eps, weights, eps, w(model.lm_head), model.config.vocab_size))
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


# Its reference is the model's composed path (ScaledTransformerModel.forward_with_cache running
# the ops below one by one), which gives the same bits.
SPECS = (OpSpec("decode_block", 2, decode_step, None,
                "a whole decode step (and prefill) as one op: embedding, blocks, LM head",
                inference_only=True,
                runs_inside={"decode_linear": 4, "causal_attention_decode": 1,
                             "add_layer_norm": 2}),)
