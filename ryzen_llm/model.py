"""The seed's ScaledTransformerModel: a GPT-style decoder-only language model.

Read top to bottom: positional encoding -> attention -> feed-forward -> block -> model. Every hot
op goes through `self.kernels` (ryzen_llm.ops.dispatch.KernelSet), which binds each op to its
fused kernel or its plain-PyTorch reference according to the optimization level; level 0 is the
plain model. Pre-LayerNorm blocks; each residual add is fused with the LayerNorm that follows it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import torch
import torch.nn as nn

from ryzen_llm.config import ModelConfig
from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops.decode_linear import pack_decode_weight
from ryzen_llm.ops.quantized_decode_linear import QUANTIZED_FORMATS, pack_int4, pack_int8
from ryzen_llm.ops import reference as _reference
from ryzen_llm.ops.dispatch import KernelSet


def sinusoidal_positions(max_seq_len: int, d_model: int) -> torch.Tensor:
    """The fixed (max_seq_len, d_model) sinusoidal encoding of 'Attention Is All You Need'."""
    position = torch.arange(max_seq_len, dtype=torch.float64)[:, None]  # (T, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
    return pe.float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelSet):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.kernels = kernels

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        # split + transpose views (split_heads: where the fused attention runs, their backward
        # takes its three gradients as one tensor, without a copy)
        qkv = self.kernels.linear(x, self.qkv.weight, self.qkv.bias)  # (B, T, 3C)
        q, k, v = self.kernels.split_heads(qkv, self.n_heads)  # each (B, nh, T, hs)
        y = self.kernels.causal_attention(q, k, v, key_padding_mask, 1.0 / math.sqrt(self.head_dim))
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dropout(self.kernels.linear(y, self.proj.weight, self.proj.bias))

    def forward_cached(self, x, k_cache, v_cache, step: "_CacheStep", k_scale=None,
                       v_scale=None) -> torch.Tensor:
        """Attention of new tokens x (B, T, C) that also writes their keys and values into
        k_cache, v_cache (B, nh, Tmax, hs). T > 1: prefill from position 0; T == 1: decode.
        An int8 cache comes with k_scale, v_scale (B, nh, Tmax): the new keys and values are
        stored as int8 codes with one scale per vector. Prefill attends to the exact keys and
        values of the prompt; only later decode steps read the codes."""
        B, T, C = x.shape
        kern = self.kernels
        qkv = kern.decode_linear(x, kern.decode_weight(self.qkv), self.qkv.bias).view(
            B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        scale = 1.0 / math.sqrt(self.head_dim)
        if k_scale is not None:
            # k and v in one call: codes (B, T, 2, nh, hs), scales (B, T, 2, nh)
            codes, scales = self.kernels.quantize_kv(qkv[:, :, 1:])
            k_new, v_new = codes.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
            ks_new, vs_new = scales.permute(2, 0, 3, 1).unbind(0)  # each (B, nh, T)
        else:
            k_new, v_new = k, v
        if T == 1:
            # each row's new key and value at its own position: one index_copy_ per tensor
            hs = self.head_dim
            k_cache.view(-1, hs).index_copy_(0, step.slots, k_new.reshape(B * self.n_heads, hs))
            v_cache.view(-1, hs).index_copy_(0, step.slots, v_new.reshape(B * self.n_heads, hs))
            if k_scale is not None:
                k_scale.view(-1).index_copy_(0, step.slots, ks_new.reshape(-1))  # (B * nh,)
                v_scale.view(-1).index_copy_(0, step.slots, vs_new.reshape(-1))
            y = self.kernels.causal_attention_decode(q, k_cache, v_cache, step.lengths, scale,
                                                     k_scale, v_scale)
        else:
            k_cache[:, :, :T] = k_new
            v_cache[:, :, :T] = v_new
            if k_scale is not None:
                k_scale[:, :, :T] = ks_new
                v_scale[:, :, :T] = vs_new
            y = self.kernels.causal_attention(q, k, v, step.key_padding_mask, scale)
        return kern.decode_linear(y.transpose(1, 2).reshape(B, T, C),
                                  kern.decode_weight(self.proj), self.proj.bias)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelSet):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.gelu_feed_forward(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        )
        return self.dropout(y)


class LayerNorm(nn.Module):
    """Parameters of a LayerNorm; the norm itself runs fused with a residual add."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps


class Block(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelSet):
        super().__init__()
        self.ln1 = LayerNorm(config.d_model, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, kernels)
        self.ln2 = LayerNorm(config.d_model, config.layer_norm_eps)
        self.mlp = FeedForward(config, kernels)
        self.kernels = kernels

    def forward(self, x, h, key_padding_mask, next_ln: LayerNorm):
        """x: residual stream (B, T, C); h: ln1(x). Returns (new x, next_ln(new x))."""
        k = self.kernels
        a = self.attn(h, key_padding_mask)
        x, h = k.add_layer_norm(x, a, self.ln2.weight, self.ln2.bias, self.ln2.eps)
        m = self.mlp(h)
        return k.add_layer_norm(x, m, next_ln.weight, next_ln.bias, next_ln.eps)

    def forward_cached(self, x, h, k_cache, v_cache, step: "_CacheStep", next_ln: LayerNorm,
                       k_scale=None, v_scale=None):
        k = self.kernels
        a = self.attn.forward_cached(h, k_cache, v_cache, step, k_scale, v_scale)
        x, h = k.add_layer_norm(x, a, self.ln2.weight, self.ln2.bias, self.ln2.eps)
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        m = k.decode_linear(k.decode_linear(h, k.decode_weight(fc1), fc1.bias, True),
                            k.decode_weight(fc2), fc2.bias)
        return k.add_layer_norm(x, m, next_ln.weight, next_ln.bias, next_ln.eps)


class KVCache:
    """Keys and values of every layer for up to `batch` sequences of up to `max_len` tokens.

    Preallocated once: k[layer], v[layer] are (batch, nh, max_len, hs). Row r holds one sequence
    from position 0; lengths[r] is how many positions of row r are valid. The engine keeps its
    running sequences in rows 0..n-1 and passes `cache.rows(n)` views to the model, so a decode
    step touches only the live rows and never copies the cache.

    A floating dtype stores keys and values as they are; torch.int8 stores int8 codes
    with one float32 scale per (row, head, position) vector in k_scale[layer], v_scale[layer]
    (batch, nh, max_len): absmax / 127, round to nearest (reference.quantize_kv), read by the
    decode kernel directly. 2 * nh * (hs + 4) bytes per token and layer instead of 2 * nh * hs * 4
    (0.266x at hs 64). k_scale and v_scale are None for the float dtypes.
    """

    DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.int8)

    def __init__(self, config: ModelConfig, batch: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32):
        if dtype not in self.DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(map(str, self.DTYPES))}, "
                             f"got {dtype}")
        self.config = config
        self.batch = batch
        self.max_len = max_len or config.max_seq_len
        self.dtype = dtype
        shape = (batch, config.n_heads, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = [torch.zeros(shape[:3]) for _ in range(config.n_layers)]
            self.v_scale = [torch.zeros(shape[:3]) for _ in range(config.n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, *(self.k_scale or ()), *(self.v_scale or ())]

    def layer(self, i: int, rows: int) -> tuple:
        """(k, v, k_scale, v_scale) of layer i, rows 0..rows-1 (scales None unless int8)."""
        if not self.quantized:
            return self.k[i][:rows], self.v[i][:rows], None, None
        return self.k[i][:rows], self.v[i][:rows], self.k_scale[i][:rows], self.v_scale[i][:rows]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows start..stop-1 (shares storage; lengths is a view too)."""
        view = KVCache.__new__(KVCache)
        view.config, view.batch, view.max_len = self.config, stop - start, self.max_len
        view.dtype = self.dtype
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.k_scale = [t[start:stop] for t in self.k_scale] if self.quantized else None
        view.v_scale = [t[start:stop] for t in self.v_scale] if self.quantized else None
        view.lengths = self.lengths[start:stop]
        return view

    def copy_row(self, src: int, dst: int | slice) -> None:
        """Row dst becomes a copy of row src (dst may be a slice: n candidates of one prompt)."""
        if isinstance(dst, int) and dst == src:
            return
        n = self.lengths[src].item()
        for t in self._tensors():  # (batch, nh, max_len, hs) and scales (batch, nh, max_len)
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def nbytes(self) -> int:
        """Bytes held by keys, values and (int8) their scales."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def bytes_per_token(self) -> int:
        """Bytes one cached token takes over all layers (nbytes / (batch * max_len))."""
        return self.nbytes() // (self.batch * self.max_len)


@dataclasses.dataclass
class _CacheStep:
    """Per-call indices shared by every layer of one cached forward."""

    slots: torch.Tensor | None  # (B * nh,) flat (row, head, position) of each new key (decode)
    lengths: torch.Tensor | None  # (B,) valid keys per row after the write (decode)
    key_padding_mask: torch.Tensor | None  # (B, T) bool (prefill)


def value_checks_allowed(t: torch.Tensor) -> bool:
    """Whether checks of t's values (token ids in range), which read them on the host, may run:
    not while torch.compile traces nor while a CUDA graph is captured, where a host read would
    break the graph (TrainStep checks each batch on the host before replaying its graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


class ScaledTransformerModel(nn.Module):
    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        self.kernels = KernelSet(0)
        self.kernel_level = 0
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.register_buffer(
            "pos_emb", sinusoidal_positions(config.max_seq_len, config.d_model), persistent=False
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, self.kernels) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(config.d_model, config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Token embedding N(0, 1), other weight matrices Xavier-uniform, zero biases,
        LayerNorms at identity.

        The token embedding is added to the fixed sinusoidal table, whose entries have a standard
        deviation of ~0.7. Xavier-uniform would give it ~0.03 (sqrt(2 / (vocab + d_model))), and
        the first LayerNorm would then see almost nothing but position: the model learned little
        beyond token frequencies. At unit scale (PyTorch's nn.Embedding default; 'Attention Is
        All You Need' scales its embedding by sqrt(d_model) for the same reason) tokens and
        positions enter the first block at comparable size."""
        for name, p in self.named_parameters():
            if p is self.tok_emb.weight:
                nn.init.normal_(p, mean=0.0, std=1.0)
            elif p.dim() >= 2:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def cast_linear_weights(self, dtype: torch.dtype | str) -> "ScaledTransformerModel":
        """Stores the weight matrices of every linear layer (attention, feed-forward, LM head) in
        a generation format: torch.float32 / "float32", torch.bfloat16 / "bfloat16", "int8" or
        "int4". A decode step is bound by reading weights, and bfloat16 halves the bytes. With
        bfloat16 each linear also keeps `decode_weight`, the same values packed for the fused
        decode_linear's outer-product kernel (pack_decode_weight; one more copy of the bfloat16
        weights), which the fused ops read instead. With "int8" (one scale per output) or "int4"
        (one scale per output and 32 inputs) `decode_weight` holds the packed codes
        (ryzen_llm.ops.quantized_decode_linear; the fused ops then also quantize the activations
        entering each linear to int8) and the weight itself the dequantized float32 values, for
        the composed reference path. Needs the compiled extension. Biases, embeddings and
        LayerNorms stay float32; accumulation and outputs stay float32. forward() and loss()
        need float32 weights: cast back with torch.float32 before training (after int8/int4 that
        keeps the dequantized values: the rounding is not undone)."""
        names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
        fmt = names.get(dtype, dtype)
        formats = ("float32", "bfloat16", *QUANTIZED_FORMATS)
        if fmt not in formats:
            raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or one of "
                             f"{', '.join(repr(f) for f in formats)}, got {dtype!r}")
        quantized = fmt in QUANTIZED_FORMATS
        if quantized and not extension_loaded():
            raise RuntimeError(f"{fmt} weights need the compiled extension (ryzen_llm._C): "
                               "its kernels are the only implementation of the format")
        packed = fmt == "bfloat16" and extension_loaded()
        self.__dict__.pop("_decode_block_args", None)  # kept by ops.decode_block
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if quantized:
                    w = module.weight.data
                    if fmt == "int8":
                        codes, scales = _reference.quantize_weight_int8(w)
                        module.decode_weight = pack_int8(codes, scales)
                    else:
                        codes, scales = _reference.quantize_weight_int4(w)
                        module.decode_weight = pack_int4(codes, scales)
                    module.weight.data = _reference.dequantize_weight(codes, scales)
                    continue
                module.weight.data = module.weight.data.to(getattr(torch, fmt))
                module.decode_weight = pack_decode_weight(module.weight.data) if packed else None
        self.linear_weight_dtype = torch.bfloat16 if fmt == "bfloat16" else torch.float32
        self.linear_weight_format = fmt
        return self

    linear_weight_dtype = torch.float32
    linear_weight_format = "float32"  # cast_linear_weights' format: float32, bfloat16, int8, int4

    # -- input checks -----------------------------------------------------------------------
    def check_targets(self, targets: torch.Tensor, ignore_index: int = -100) -> None:
        """ValueError naming the first target id outside the vocabulary (ignore_index aside)."""
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= self.config.vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"targets: id {int(targets[bad][0])} is out of range for vocab_size "
                f"{self.config.vocab_size}"
            )

    def _check_input(self, idx: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx: expected a (batch, seq_len) tensor of token ids, got {shape}")
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"idx: expected an integer tensor, got {idx.dtype}")
        T = idx.shape[1]
        if T == 0 or T > self.config.max_seq_len:
            raise ValueError(
                f"idx: sequence length {T} is outside 1..max_seq_len ({self.config.max_seq_len})"
            )
        if idx.numel() and value_checks_allowed(idx):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = hi if hi >= self.config.vocab_size else lo
                raise ValueError(
                    f"idx: token id {bad} is out of range for vocab_size {self.config.vocab_size}"
                )
        if attention_mask is not None and attention_mask.shape != idx.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(idx.shape)} (that of idx), "
                f"got {tuple(attention_mask.shape)}"
            )

    # -- forward ------------------------------------------------------------------------------
    def hidden_states(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, C). attention_mask: (B, T), 1 = real token."""
        if self.linear_weight_format != "float32":
            raise RuntimeError(
                f"the linear weights are {self.linear_weight_format} for generation "
                "(cast_linear_weights); forward and loss need cast_linear_weights(torch.float32)"
            )
        self._check_input(idx, attention_mask)
        B, T = idx.shape
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        x = self.drop(self.tok_emb(idx.long()) + self.pos_emb[:T])  # (B, T, C)
        first = self.blocks[0].ln1 if len(self.blocks) else self.ln_f
        x, h = self.kernels.add_layer_norm(x, None, first.weight, first.bias, first.eps)
        for i, block in enumerate(self.blocks):
            next_ln = self.blocks[i + 1].ln1 if i + 1 < len(self.blocks) else self.ln_f
            x, h = block(x, h, key_padding_mask, next_ln)
        return h

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); with targets, the loss instead (as self.loss, without ever
        holding the logits), so that a DistributedDataParallel wrapper can run a training step."""
        if targets is not None:
            return self.loss(idx, targets, attention_mask)
        return self.lm_head(self.hidden_states(idx, attention_mask))

    def forward_with_cache(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        every_position: bool = False,
    ) -> torch.Tensor:
        """Incremental forward for generation; returns logits (B, vocab_size) of each row's last
        real token, and updates the cache (rows 0..B-1 of `cache`; use cache.rows() for others).
        every_position (prefill only): logits (B, T, vocab_size) of every position instead, for
        teacher-forced evaluation through the generation kernels (ryzen_llm.evaluate); it runs
        the composed path below, since prefill_step returns the last position's only.

        Prefill (T > 1): idx (B, T) are whole prompts, right-padded, each starting at position 0;
        attention_mask (B, T) marks real tokens (1) and must be a prefix of ones per row. Their
        keys and values fill cache positions 0..T-1 and cache.lengths becomes the real lengths.
        Because padding sits after the real tokens, causal attention never reaches it and each
        prompt keeps positions 0..len-1, exactly as if it ran alone.

        Decode (T == 1): idx (B, 1) is the next token of each row, at position cache.lengths[r];
        it is written there and attends to positions 0..lengths[r] of its own row only. A
        one-token prompt is a decode step on a row whose length was set to 0.

        Every linear layer runs through kernels.decode_linear: fused (level >= 2), each row's
        result is the same whatever the batch holds; the weights may be bfloat16
        (cast_linear_weights), which rounds the activations entering them to bfloat16 as well.
        With the fused ops a decode step runs as one kernels.decode_step op (embedding, one
        decode_block per block, LM head) and a prefill as one kernels.prefill_step op: the same
        kernels in the same order as the loop below, bit for bit, without the Python between
        them.
        """
        B, T = idx.shape
        if cache.batch < B:
            raise ValueError(f"cache: has {cache.batch} rows, idx has {B}")
        if every_position and T == 1:
            raise ValueError("every_position: needs a prefill (idx of >= 2 positions), got 1")
        if T == 1:
            positions = cache.lengths[:B]  # (B,)
            if not torch.compiler.is_compiling() and int(positions.max()) >= cache.max_len:
                raise ValueError(
                    f"idx: a sequence would exceed the cache length {cache.max_len} "
                    f"(max_seq_len {self.config.max_seq_len})"
                )
            if self.kernels.fused_decode_block:  # the whole step as one op, the same bits
                return self.kernels.decode_step(self, idx.long(), cache)
            lengths = positions + 1
            # cache rows are contiguous (B, nh, Tmax, hs) blocks: flat slot of (row, head, pos)
            heads = torch.arange(B * self.config.n_heads).view(B, -1)
            slots = (heads * cache.max_len + positions[:, None]).view(-1)
            step = _CacheStep(slots, lengths, None)
            x = self.tok_emb(idx.long()) + self.pos_emb[positions][:, None]  # (B, 1, C)
            last = None
        else:
            mask, lengths = self._prompt_lengths(idx, cache, attention_mask)
            if self.kernels.fused_prefill and not every_position:  # one op, the same bits
                return self.kernels.prefill_step(self, idx.long(), mask, lengths, cache)
            step = _CacheStep(None, None, mask)
            x = self.tok_emb(idx.long()) + self.pos_emb[:T]  # (B, T, C)
            last = lengths - 1
        first = self.blocks[0].ln1 if len(self.blocks) else self.ln_f
        k = self.kernels
        x, h = k.add_layer_norm(x, None, first.weight, first.bias, first.eps)
        for i, block in enumerate(self.blocks):
            next_ln = self.blocks[i + 1].ln1 if i + 1 < len(self.blocks) else self.ln_f
            kc, vc, ks, vs = cache.layer(i, B)
            x, h = block.forward_cached(x, h, kc, vc, step, next_ln, ks, vs)
        if last is None:
            h = h[:, 0]  # (B, C)
            cache.lengths[:B] += 1
        elif every_position:
            cache.lengths[:B] = lengths  # h stays (B, T, C): logits (B, T, V)
        else:
            h = h[torch.arange(B), last]  # (B, C): each row's last real token
            cache.lengths[:B] = lengths
        return k.decode_linear(h, k.decode_weight(self.lm_head), None,
                               out_features=self.config.vocab_size)  # (B, V) or (B, T, V)

    def _prompt_lengths(self, idx, cache: KVCache, attention_mask) -> tuple:
        """(key padding mask (B, T) bool or None, real lengths (B,)) of right-padded prompts,
        after checking them against the model and the cache."""
        B, T = idx.shape
        self._check_input(idx, attention_mask)
        if T > cache.max_len:
            raise ValueError(f"idx: prompt length {T} exceeds the cache length {cache.max_len}")
        if attention_mask is None:
            return None, torch.full((B,), T, dtype=torch.int64)
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()) or not bool(
            (mask == (torch.arange(T) < lengths[:, None])).all()
        ):
            raise ValueError(
                "attention_mask: each row must be ones then zeros (right padding) with "
                "at least one real token"
            )
        return mask, lengths

    def loss(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Mean cross-entropy of next-token prediction; the fused path never holds all logits."""
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets: expected shape {tuple(idx.shape)} (that of idx), got {tuple(targets.shape)}"
            )
        h = self.hidden_states(idx, attention_mask)
        B, T, C = h.shape
        targets = targets.long()
        if value_checks_allowed(targets):
            self.check_targets(targets, ignore_index)
        return self.kernels.linear_cross_entropy(
            h.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T), ignore_index
        )

    # -- bookkeeping --------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any] | ModelConfig) -> "ScaledTransformerModel":
        if isinstance(config, dict):
            from ryzen_llm.config import ModelConfig as _MC, _build

            config = _build(_MC, config, "model.")
        return cls(config)

    def count_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def estimate_memory(self, batch: int, seq_len: int, training: bool = True) -> dict[str, int]:
        """Bytes per category for one fp32 step of the level-0 (plain PyTorch) model with AdamW.

        activations: tensors autograd saves for backward, per layer (N = batch * seq_len tokens):
        LayerNorm inputs 2N*C, qkv input and output 4N*C, attention probabilities B*nh*T*T, proj
        input N*C, fc1 input N*C, GELU input and output 2N*F; then the final LayerNorm input and
        output 2N*C and the log-softmax of the logits N*V.
        """
        c = self.config
        P = self.count_parameters()
        N = batch * seq_len
        per_layer = 8 * N * c.d_model + 2 * N * c.d_ff + batch * c.n_heads * seq_len * seq_len
        activations = c.n_layers * per_layer + 2 * N * c.d_model + N * c.vocab_size
        out = {
            "parameters": 4 * P,
            "gradients": 4 * P if training else 0,
            "optimizer_state": 8 * P if training else 0,
            "activations": 4 * activations if training else 0,
        }
        out["total"] = sum(out.values())
        return out


def measure_saved_activation_bytes(model: nn.Module, fn, pack_hooks=None) -> tuple[int, Any]:
    """Bytes of the distinct storages autograd saves for backward while running fn(), not
    counting the model's own parameters and buffers (which autograd also saves).

    pack_hooks: (pack, unpack) of a saved-tensor transform to measure through, such as
    ryzen_llm.compression.ActivationCompressor.pack_fn(): what pack returns is counted (every
    tensor field of it, for a QuantizedTensor its codes and scales, for a CompressedView those of
    the QuantizedTensor it shares)."""
    storages: dict[int, int] = {}
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    inner_pack, inner_unpack = pack_hooks if pack_hooks is not None else (None, lambda t: t)

    def pack(t: torch.Tensor):
        packed = inner_pack(t) if inner_pack is not None else t
        whole = getattr(packed, "whole", None)  # a CompressedView: its shared codes
        held = [packed] if isinstance(packed, torch.Tensor) else [
            v for v in vars(whole.qt if whole is not None else packed).values()
            if isinstance(v, torch.Tensor)
        ]
        for h in held:
            s = h.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
        out = fn()
    for ptr in own | {0}:  # 0: empty tensors
        storages.pop(ptr, None)
    return sum(storages.values()), out


def validate(batch: int = 16, seq_len: int = 128) -> bool:
    """The seed's validation: build, forward, shape, parameter count, memory estimate."""
    ok = True

    def report(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok &= passed
        print(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}")

    torch.manual_seed(0)
    config = ModelConfig()
    model = ScaledTransformerModel(config)
    report("create", True, f"{config}")
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.no_grad():
        logits = model(idx)
    expected = (batch, seq_len, config.vocab_size)
    report("forward shape", tuple(logits.shape) == expected, f"{tuple(logits.shape)}, expected {expected}")
    report("finite logits", bool(torch.isfinite(logits).all()), "no NaN/inf")
    n = model.count_parameters()
    report("parameters", 10_000_000 < n < 11_000_000, f"{n:,} ({n / 1e6:.2f} M)")
    est = model.estimate_memory(batch, seq_len)
    measured, loss = measure_saved_activation_bytes(model, lambda: model.loss(idx, idx))
    rel = abs(est["activations"] - measured) / measured
    report(
        "activation memory estimate",
        rel < 0.25,
        f"estimated {est['activations'] / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
        f"saved for backward ({rel:.1%} apart)",
    )
    for key in ("parameters", "gradients", "optimizer_state", "total"):
        print(f"       {key:>16}: {est[key] / 2**20:8.1f} MiB")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ryzen_llm.model", description=__doc__)
    parser.add_argument("--validate", action="store_true", help="run the seed's model validation")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    if not args.validate:
        parser.print_help()
        return 0
    return 0 if validate(args.batch, args.seq_len) else 1


if __name__ == "__main__":
    sys.exit(main())
