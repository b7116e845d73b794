"""Plain-PyTorch version of every op: the level-0 path of the model, the oracle of the tests and
the baseline of the benchmarks. One function per op, with the same arguments as its fused twin
(ops/<op>.py declares the pair). The optimizer's reference is torch.optim.AdamW itself;
adamw_step below is the single-tensor update the fused kernel's tests check against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (sum, normed): sum = x + residual (x itself when residual is None) and
    normed = LayerNorm(sum) over the last dimension."""
    s = x if residual is None else x + residual
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x + bias), the exact (erf) form."""
    return F.gelu(x + bias)


def gelu_feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    recompute: bool = False,
) -> torch.Tensor:
    """fc2(GELU(fc1(x))); w1: (F, C), w2: (C, F). recompute is the fused op's memory choice
    (recompute the activation in backward); autograd here saves what it saves either way."""
    return F.linear(bias_gelu(F.linear(x, w1), b1), w2, b2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           gelu: bool = False) -> torch.Tensor:
    """x @ weight.T + bias, GELU'd (exact erf form) when gelu: nn.Linear's math."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal softmax attention written out, as the seed's model does it.

    q, k, v: (B, nh, T, hs). key_padding_mask: (B, T) bool, True where the key is a real token.
    A query row whose keys are all masked (a padding position before any real token) gets zeros.
    """
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    masked = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # True = not allowed
    if key_padding_mask is not None:
        masked = masked | ~key_padding_mask[:, None, None, :].bool()  # (B, 1, T, T)
    att = att.masked_fill(masked, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if key_padding_mask is not None:
        att = att.masked_fill(masked.all(dim=-1, keepdim=True), 0.0)  # rows with no key at all
    return att @ v  # (B, nh, T, hs)


def causal_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention against a KV cache.

    q: (B, nh, 1, hs); k_cache, v_cache: (B, nh, Tmax, hs); cache_lengths: (B,) int64, the valid
    positions of each row including the new token (which must already be written to the cache).
    Keys at positions >= length are ignored, whatever the cache holds there. Each row's result
    depends only on its own q, cache and length, never on the other rows of the batch: the
    scores always span all Tmax positions, so a row computes the same arithmetic alone or batched.
    int8 caches come with k_scale, v_scale (B, nh, Tmax) float32 and are dequantized first
    (dequantize_kv). Returns (B, nh, 1, hs).
    """
    if k_scale is not None or v_scale is not None:
        k_cache = dequantize_kv(k_cache, k_scale).to(q.dtype)
        v_cache = dequantize_kv(v_cache, v_scale).to(q.dtype)
    Tmax = k_cache.shape[-2]
    att = (q @ k_cache.transpose(-2, -1)) * scale  # (B, nh, 1, Tmax)
    ignored = torch.arange(Tmax, device=q.device) >= cache_lengths[:, None]  # (B, Tmax)
    att = att.masked_fill(ignored[:, None, None, :], float("-inf"))
    att = torch.softmax(att, dim=-1)
    return att @ v_cache  # (B, nh, 1, hs)


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of logits (B, V): the greedy token (torch.argmax: the first maximum, or the first
    NaN), its log-probability under softmax and the row's log-sum-exp (a sampled token's
    log-probability is logits[b, token] - logsumexp[b])."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs, torch.logsumexp(logits, dim=-1)


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    out_features: int = -1,
) -> torch.Tensor:
    """x @ weight.T + bias, then GELU when gelu, in x's dtype. bfloat16 weights (inference
    copies) take x rounded to bfloat16, as autocast does. x: (..., K), weight: (N, K), bias:
    (N,) or None. out_features, when given, must be N (the fused op needs it for a packed
    weight, which this reference does not take)."""
    if out_features >= 0 and out_features != weight.shape[0]:
        raise ValueError(f"out_features: {out_features} but weight has {weight.shape[0]} rows")
    if weight.dtype == torch.bfloat16:
        x = x.to(torch.bfloat16).to(x.dtype)
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return F.gelu(y) if gelu else y

# -- quantized weights for generation (the math of quantized_decode_linear) ---------------------
INT4_GROUP = 32  # int4: K values per weight scale and per activation scale


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K) and float32 scales (N,) of a (N, K) weight: one absmax / 127 per output,
    codes round(w / scale) (half to even) in [-127, 127]; an all-zero row has scale 0."""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127.0  # (N,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe[:, None]).clamp(-127, 127)
    return codes.to(torch.int8), scale


def quantize_weight_int4(weight: torch.Tensor,
                         group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (N, K) as int8 in [-8, 7] and float32 scales (N, ceil(K / group)) of a (N, K)
    weight, one scale per output and group of `group` values along K (the last group may be
    short): the value of largest magnitude m maps to -8, scale = m / -8 (its sign may be either;
    llama.cpp's Q4_0 rule, which uses all 16 codes), codes round(w / scale) clamped to [-8, 7]."""
    w = weight.detach().float()
    N, K = w.shape
    G = -(-K // group)
    padded = w.new_zeros(N, G * group)
    padded[:, :K] = w
    v = padded.view(N, G, group)
    at = v.abs().argmax(-1, keepdim=True)
    scale = v.gather(-1, at).squeeze(-1) / -8.0  # (N, G)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    codes = torch.round(v / safe[..., None]).clamp(-8, 7).view(N, G * group)[:, :K]
    return codes.to(torch.int8), scale


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) weights of int8 or int4 codes (N, K) and their scales: (N,) per output
    (int8) or (N, G) per output and group of INT4_GROUP along K (int4)."""
    if scales.dim() == 1:
        return codes.float() * scales[:, None]
    N, K = codes.shape
    per_k = scales.repeat_interleave(INT4_GROUP, dim=1)[:, :K]
    return codes.float() * per_k


def quantize_activations_int8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (M, G * group), zero past K, and float32 scales (M, G) of x (M, K) float32, per
    row and run of `group` values along K (the last may be short): scale = absmax / 127,
    q = round(x * (1 / scale)) (half to even) in [-127, 127]. A run holding NaN or inf gets scale
    NaN and zero codes; an all-zero run (or one whose 1 / scale overflows) scale 0, zero codes.
    The kernel quantizes x the same way at run time, bit for bit."""
    M, K = x.shape
    G = -(-K // group)
    padded = x.new_zeros(M, G * group)
    padded[:, :K] = x
    v = padded.view(M, G, group)
    finite = torch.isfinite(v).all(-1)
    scale = v.abs().amax(-1) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    overflow = torch.isinf(inv)
    scale = torch.where(overflow, torch.zeros_like(scale), scale)
    inv = torch.where(overflow | ~finite, torch.zeros_like(inv), inv)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(v * inv[..., None]).clamp(-127, 127)
    q = torch.where(finite[..., None], q, torch.zeros_like(q))
    return q.to(torch.int8).view(M, G * group), scale


def quantized_decode_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """quantized_decode_linear's math on unpacked weights: x (M, K) float32; codes (N, K) int8
    and scales from quantize_weight_int8 ((N,): int8 format) or quantize_weight_int4 ((N, G):
    int4 format). int8: x quantized per row, y = float(sum_k xq wq) * (x scale * w scale).
    int4: x quantized per group of 32 along K, y = sum over groups in K order of
    float(sum_k xq wq) * (x scale * w scale). Then + bias and GELU (exact erf form). The integer
    sums are exact (float64 matmul of integers); every float operation rounds as the kernel's."""
    M, K = x.shape
    N = codes.shape[0]
    if scales.dim() == 1:  # int8: one run per row
        xq, xs = quantize_activations_int8(x.float(), K)
        dot = xq[:, :K].double() @ codes.double().T  # (M, N), exact integers
        y = dot.float() * (xs * scales[None, :])
    else:
        xq, xs = quantize_activations_int8(x.float(), INT4_GROUP)
        G = scales.shape[1]
        wq = x.new_zeros(N, G * INT4_GROUP, dtype=torch.float64)
        wq[:, :K] = codes.double()
        dots = torch.einsum("mgk,ngk->mng", xq.double().view(M, G, INT4_GROUP),
                            wq.view(N, G, INT4_GROUP))  # (M, N, G), exact integers
        y = x.new_zeros(M, N, dtype=torch.float32)
        for g in range(G):
            y = y + dots[:, :, g].float() * (xs[:, g, None] * scales[None, :, g])
    if bias is not None:
        y = y + bias.float()
    return F.gelu(y) if gelu else y


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of keys or values x (..., hs), one scale per hs-vector: quantize_blockwise
    with block_size hs and 8 bits (absmax / 127, round half to even, NaN/inf -> scale NaN and
    zero codes). Returns (codes int8 (..., hs), scales float32 (...))."""
    data, scales = quantize_blockwise(x, x.shape[-1], 8, False, 0, 0)
    return data.view(torch.int8).view(x.shape), scales.view(x.shape[:-1])


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (..., hs) from int8 codes (..., hs) and their per-vector scales (...)."""
    return codes.float() * scales[..., None]


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets, ignoring ignore_index.

    h: (N, C); weight: (V, C); targets: (N,) int64. Holds the whole (N, V) logits.
    """
    logits = h @ weight.t()  # (N, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One torch.optim.AdamW step (decoupled weight decay, bias correction), in place, written
    with plain tensor ops in torch's own order. step is the 1-based count after this update.

    bfloat16 moments of float32 params: the update runs on their float32 values and the new
    moments are rounded stochastically with the bits of adamw_state_random_bits, as the fused
    AdamW does."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    with torch.no_grad():
        for index, (p, g, m_out, v_out) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            rounded = m_out.dtype == torch.bfloat16 and p.dtype == torch.float32
            m, v = (m_out.float(), v_out.float()) if rounded else (m_out, v_out)
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
            if rounded:
                bits = adamw_state_random_bits(p.numel(), step, index).view(p.shape)
                m_out.copy_(stochastic_round_bf16(m, bits & 0xFFFF))
                v_out.copy_(stochastic_round_bf16(v, bits >> 16))


def adamw_state_random_bits(n: int, step: int, tensor_index: int) -> torch.Tensor:
    """The 32 random bits per element (int64) that round bfloat16 AdamW moments: a hash of
    (step, (tensor_index << 40) + element); the low 16 bits round exp_avg, the high exp_avg_sq."""
    lo_key, hi_key = _seed_key(step)
    i = torch.arange(n, dtype=torch.int64) + (tensor_index << 40)
    return _mix32(_mix32((i & _MASK32) ^ lo_key) ^ (i >> 32) ^ hi_key)


def stochastic_round_bf16(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding up (in magnitude) with probability equal to the dropped
    fraction: the 16 random bits are added below the kept bits, then truncated. NaN stays NaN."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    kept = ((bits + random16) >> 16) & 0xFFFF
    out = kept.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    return torch.where(x.isnan(), torch.tensor(float("nan"), dtype=torch.bfloat16), out)


# -- block-wise quantization --------------------------------------------------------------------
_QMAX = {8: 127, 4: 7}
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _seed_key(seed: int) -> tuple[int, int]:
    """splitmix64(seed) split into two 32-bit keys, as the kernel does."""
    m64 = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    z ^= z >> 31
    return z & _MASK32, z >> 32


def stochastic_uniform(n: int, seed: int, offset: int = 0) -> torch.Tensor:
    """The u in [0, 1) (24 bits) that stochastic rounding adds to element i: a hash of
    (seed, offset + i), float32 (n,)."""
    lo_key, hi_key = _seed_key(seed)
    i = torch.arange(offset, offset + n, dtype=torch.int64)
    h = _mix32(_mix32((i & _MASK32) ^ lo_key) ^ (i >> 32) ^ hi_key)
    return (h >> 8).float() * 2.0**-24


def quantize_blockwise(
    x: torch.Tensor, block_size: int, bits: int, stochastic: bool, seed: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax codes of x flattened in row-major order -> (data uint8, scales float32).

    Block b holds elements [b * block_size, (b + 1) * block_size); the last block may be short.
    scale = absmax / qmax (qmax 127 for 8 bits, 7 for 4); q = round-half-even(x * (1 / scale)),
    or floor(x * (1 / scale) + u) with u = stochastic_uniform(...), clamped to [-qmax, qmax].
    8 bits: q as int8 bits, one byte per value. 4 bits: q + 8 per nibble, even element in the
    low nibble, ceil(numel / 2) bytes (block_size must be even). A block holding NaN or inf gets
    scale NaN and codes 0; a block whose 1 / scale overflows (absmax < ~1.5e-36) gets scale 0."""
    qmax = _QMAX[bits]
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    blocks = F.pad(flat, (0, pad)).view(n_blocks, block_size)
    nonfinite = ~torch.isfinite(blocks).all(dim=1)
    amax = torch.where(torch.isnan(blocks), 0.0, blocks.abs()).amax(dim=1) if n_blocks else blocks.new_zeros(0)
    # Divided by a tensor: ATen's CUDA division by a Python scalar multiplies by its reciprocal,
    # which can differ from amax / qmax in the last bit.
    scale = amax / torch.full_like(amax, qmax)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    flush = torch.isinf(inv)
    scale = torch.where(flush, 0.0, scale)
    inv = torch.where(flush | nonfinite, 0.0, inv)
    scale = torch.where(nonfinite, float("nan"), scale)
    v = torch.where(nonfinite[:, None], 0.0, blocks) * inv[:, None]
    if stochastic:
        u = F.pad(stochastic_uniform(n, seed, offset).to(blocks.device), (0, pad))
        u = u.view(n_blocks, block_size)
        q = torch.floor(v + u)
    else:
        q = torch.round(v)
    q = q.clamp(-qmax, qmax).to(torch.int32).reshape(-1)[:n]
    if bits == 8:
        data = q.to(torch.int8).view(torch.uint8)
    else:
        codes = F.pad(q + 8, (0, n % 2), value=8).view(-1, 2)
        data = (codes[:, 0] | (codes[:, 1] << 4)).to(torch.uint8)
    return data, scale


def dequantize_blockwise(
    data: torch.Tensor,
    scales: torch.Tensor,
    shape: list[int],
    block_size: int,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """x ~ q * scale of its block, as a (shape) tensor of dtype; inverse of quantize_blockwise."""
    n = math.prod(shape)
    if bits == 8:
        q = data.view(torch.int8).float()
    else:
        q = torch.stack([data & 0xF, data >> 4], dim=1).reshape(-1)[:n].float() - 8
    idx = torch.arange(n) // block_size
    return (q * scales[idx]).to(dtype).reshape(shape)


# -- int8 GEMMs for training (the math of the level-4 linear, ryzen_llm.ops.linear) --------------
def int8_quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (same shape) and float32 scales of a 2-D x, one per row (dim=1: the absmax is
    taken along dim 1) or per column (dim=0): scale = absmax / 127, q = round(x * (1 / scale))
    (half to even) in [-127, 127]. A row/column holding NaN or inf gets scale NaN and zero codes;
    an all-zero one (or one whose 1 / scale overflows) scale 0. Bit for bit the kernel's codes."""
    v = x.float()
    finite = torch.isfinite(v).all(dim)
    scale = v.abs().amax(dim) / 127.0 if v.shape[dim] else v.new_zeros(v.shape[1 - dim])
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    overflow = torch.isinf(inv)
    scale = torch.where(overflow, torch.zeros_like(scale), scale)
    inv = torch.where(overflow | ~finite, torch.zeros_like(inv), inv)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(v * inv.unsqueeze(dim)).clamp(-127, 127)
    return q.to(torch.int8), scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) of int8 codes as exact int32 sums (through int64)."""
    return (a.long() @ b.long()).to(torch.int32)


def int8_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        gelu: bool = False) -> torch.Tensor:
    """The level-4 linear's forward on x (M, K): x per row and the weight per output channel in
    int8, the int32 sum dequantized with both scales in float32, + bias (float32), then GELU of
    the pre-activation rounded to x's dtype; the result in x's dtype."""
    xq, xs = int8_quantize(x, 1)
    wq, ws = int8_quantize(weight, 1)
    y = int8_matmul(xq, wq.t()).float() * (xs[:, None] * ws[None, :])
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return F.gelu(y.float()).to(x.dtype) if gelu else y


def lm_head_rounding_seed(w_scales: torch.Tensor) -> int:
    """The int8 LM head's stochastic-rounding seed: FNV-1a over the bits of the weight's scales
    (float32, per vocabulary row), as the kernel computes it."""
    h, m64 = 0xCBF29CE484222325, (1 << 64) - 1
    for b in w_scales.contiguous().view(torch.int32).tolist():
        h = ((h ^ (b & _MASK32)) * 0x100000001B3) & m64
    return h


def _stochastic_codes(v: torch.Tensor, inv: torch.Tensor, seed: int) -> torch.Tensor:
    """floor(v * inv + u) clamped to [-127, 127] (float codes), u = stochastic_uniform at row *
    columns + column: the kernels' stochastic rounding of v (N, V) float32."""
    u = stochastic_uniform(v.numel(), seed).view(v.shape)
    return torch.floor(v * inv + u).clamp(-127, 127)


def _int8_lm_head_grad_h(g: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                         h_dtype) -> torch.Tensor:
    """grad_h = (G * w_scales) quantized per row (stochastically) @ the weight's codes wq."""
    v = g.float() * ws[None, :]
    finite = torch.isfinite(v).all(1)
    scale = v.abs().amax(1) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    overflow = torch.isinf(inv)
    scale = torch.where(overflow, torch.zeros_like(scale), scale)
    inv = torch.where(overflow | ~finite, torch.zeros_like(inv), inv)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = _stochastic_codes(v, inv[:, None], lm_head_rounding_seed(ws))
    return ((q.long() @ wq.long()).float() * scale[:, None]).to(h_dtype)


def _int8_lm_head_grad_weight(g: torch.Tensor, h: torch.Tensor, ws: torch.Tensor,
                              bound: float) -> torch.Tensor:
    """grad_weight = (G * h_scales) @ h's row codes under one scale: bound (1 / n_valid, the
    largest |G|) times h's largest row scale, / 127, stochastically rounded (seeded by
    lm_head_rounding_seed of the weight's scales ws, + 1); NaN everywhere when G or h holds NaN
    or inf."""
    hq, hs = int8_quantize(h, 1)
    v = g.float() * hs[:, None]
    if not (torch.isfinite(hs).all() and torch.isfinite(v).all()):
        return torch.full((g.shape[1], h.shape[1]), float("nan"))
    amax = hs.max() * torch.tensor(bound, dtype=torch.float32)
    scale = amax / torch.tensor(127.0)
    inv = 1.0 / scale if scale > 0 else torch.zeros(())
    if torch.isinf(inv):
        scale, inv = torch.zeros(()), torch.zeros(())
    q = _stochastic_codes(v, inv, (lm_head_rounding_seed(ws) + 1) & ((1 << 64) - 1))
    # float64 sums of int8 products are exact here (|sum| < 2**53), as the int32 ones are
    return (q.t().double() @ hq.double()).float() * scale


class _Int8LmHeadGrads(torch.autograd.Function):
    """h @ weight.T whose gradients are the int8 LM head's: grad_h with int8_grad_h and
    grad_weight with int8_grad_weight from int8 GEMMs of G (rounded to h's dtype, as the kernel
    holds it), else the float GEMMs G @ weight and G.T @ h."""

    @staticmethod
    def forward(ctx, h, weight, int8_grad_h: bool, int8_grad_weight: bool, bound: float):
        ctx.save_for_backward(h, weight)
        ctx.flags = (int8_grad_h, int8_grad_weight, bound)
        return h @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        int8_grad_h, int8_grad_weight, bound = ctx.flags
        g = grad.to(h.dtype)
        wq, ws = int8_quantize(weight.float(), 1)  # the forward's codes; ws seeds the rounding
        grad_h = _int8_lm_head_grad_h(g, wq, ws, h.dtype) if int8_grad_h else g @ weight
        if int8_grad_weight:
            grad_w = _int8_lm_head_grad_weight(g, h, ws, bound).to(weight.dtype)
        else:
            grad_w = g.t() @ h
        return grad_h, grad_w, None, None, None


def int8_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              ignore_index: int = -100, int8_grad_h: bool = False,
                              int8_grad_weight: bool = False) -> torch.Tensor:
    """The level-4 LM head: cross-entropy (float32) of the logits int8_linear_forward(h, weight)
    (h per row, the weight per vocabulary row, rounded to h's dtype); the gradients are those of
    the float logits h @ weight.T (straight through the quantization), as SwitchBack's forward,
    and with int8_grad_h / int8_grad_weight grad_h / grad_weight are int8 GEMMs, stochastically
    rounded (_Int8LmHeadGrads)."""
    w = weight.to(h.dtype)
    n_valid = int((targets != ignore_index).sum())
    bound = 1.0 / n_valid if n_valid else 0.0
    if int8_grad_h or int8_grad_weight:
        exact = _Int8LmHeadGrads.apply(h, w, int8_grad_h, int8_grad_weight, bound)
    else:
        exact = h @ w.t()
    logits = exact + (int8_linear_forward(h.detach(), weight.detach(), None) - exact).detach()
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def int8_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         pre: torch.Tensor | None, int8_weight_grad: bool):
    """(grad_x, grad_weight, grad_bias) of the level-4 linear: g = grad_y through GELU'(pre) when
    pre is given (in grad_y's dtype); grad_x = (g * w_scales) @ W_codes with g * w_scales (in
    float32) quantized per row and the forward's weight codes; grad_weight = (g * x_scales).T @
    x_codes with g * x_scales quantized per column and the forward's codes of x
    (int8_weight_grad), or g.T @ x in float32."""
    g = grad_y
    if pre is not None:
        p = pre.float()
        phi = 0.5 * torch.erfc(-p / math.sqrt(2.0))
        d = phi + p * torch.exp(-0.5 * p * p) / math.sqrt(2.0 * math.pi)
        g = (grad_y.float() * d).to(grad_y.dtype)
    grad_bias = g.float().sum(0)
    wq, ws = int8_quantize(weight, 1)
    gq, gs = int8_quantize(g.float() * ws[None, :], 1)
    grad_x = (int8_matmul(gq, wq).float() * gs[:, None]).to(grad_y.dtype)
    if int8_weight_grad:
        xq, xs = int8_quantize(x, 1)
        gcq, gcs = int8_quantize(g.float() * xs[:, None], 0)
        grad_w = int8_matmul(gcq.t(), xq).float() * gcs[:, None]
    else:
        grad_w = (g.t().float() @ x.float())
    return grad_x, grad_w, grad_bias
