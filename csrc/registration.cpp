// The op catalog: every ryzen_llm schema, one line each. Kernels register their device
// implementations in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the Python face of each op
// (register_fake, register_autograd, the wrapper) lives in ryzen_llm/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(ryzen_llm, m) {
  // sum = x + residual (empty when residual is None); out = LayerNorm(sum); mean/rstd per row (float32; float64 for float64 x).
  // A float32 x may take a bfloat16 residual and emit out as out_dtype bfloat16 (autocast); the backward then
  // reads a bfloat16 grad_out and, given residual_dtype, also returns grad_residual in it (else grad_residual is empty).
  m.def("add_layer_norm_forward(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype=None) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  // The same, also writing out's int8 row codes (N, C) and scales (N,) (int8_quantize's) for the level-4
  // linear that reads out; out float32 or bfloat16 (CPU kernel only). Its backward is add_layer_norm_backward.
  m.def("add_layer_norm_int8_forward(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype=None) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd, Tensor codes, Tensor scales)");
  m.def("add_layer_norm_backward(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor weight, Tensor mean, Tensor rstd, ScalarType? residual_dtype=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // y = GELU(x + bias), exact erf form; the backward also reduces grad_bias over all rows of x.
  m.def("bias_gelu_forward(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad_y, Tensor x, Tensor bias) -> (Tensor grad_x, Tensor grad_bias)");
  // y = fc2(GELU(fc1(x))); h_pre = fc1(x) + b1 (N, F); h_act = GELU(h_pre), empty when recompute.
  m.def("gelu_feed_forward_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool recompute) -> (Tensor y, Tensor h_pre, Tensor h_act)");
  m.def("gelu_feed_forward_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor h_pre, Tensor h_act, bool recompute) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  // Mean CE of h @ weight.T (float32 loss); the gradients for d(loss) = 1 are computed on the way
  // (empty when not needed), so no logits are kept: backward only scales them.
  m.def("linear_cross_entropy_forward(Tensor h, Tensor weight, Tensor targets, int ignore_index, bool need_grad_h, bool need_grad_weight) -> (Tensor loss, Tensor grad_h, Tensor grad_weight)");
  // The same with the logits GEMM on int8 codes: h per row, weight per vocabulary row (w_codes (V, C),
  // w_scales (V,) float32); the gradients are the float linear's at those logits (CPU kernel only). h_codes, h_scales:
  // h's row codes from its producer (add_layer_norm_int8_forward's), used instead of quantizing h. int8_grad_h: grad_h
  // from an int8 GEMM too, (G * w_scales) quantized per row times w_codes, as the int8 linear's input gradient.
  // int8_grad_weight: grad_weight from an int8 GEMM too, G * h's row scales under one bound scale (|G| <= 1 / n_valid),
  // stochastically rounded, times h's row codes.
  m.def("int8_linear_cross_entropy_forward(Tensor h, Tensor weight, Tensor w_codes, Tensor w_scales, Tensor targets, int ignore_index, bool need_grad_h, bool need_grad_weight, Tensor? h_codes=None, Tensor? h_scales=None, bool int8_grad_h=False, bool int8_grad_weight=False) -> (Tensor loss, Tensor grad_h, Tensor grad_weight)");
  // torch.optim.AdamW's update on lists of same-dtype tensors (float32/float64), in place.
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale=1.0) -> ()");
  // The same on float32 master copies of bfloat16 params: the params receive the rounded master.
  m.def("adamw_master_step_(Tensor(a!)[] params, Tensor(b!)[] master_params, Tensor[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale=1.0) -> ()");
  // Block-wise absmax int8/4-bit codes of x flattened (row-major): data uint8 (numel or
  // ceil(numel/2) bytes), scales float32 per block; stochastic rounding hashes (seed, offset + i).
  m.def("quantize_blockwise(Tensor x, int block_size, int bits, bool stochastic, int seed, int offset) -> (Tensor data, Tensor scales)");
  m.def("dequantize_blockwise(Tensor data, Tensor scales, int[] shape, int block_size, int bits, ScalarType dtype) -> Tensor");
  // Causal attention over q, k, v (B, nh, T, hs); mask (B, T) True = real key; lse (B, nh, T) in the accumulation type (fp32; fp64 for fp64).
  m.def("causal_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale) -> (Tensor out, Tensor lse)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The same gradients as one (B, T, 3, H, D) tensor (q, k, v along dim 2): the layout of a qkv projection
  // split into heads, whose gradient it then is without a copy (CPU kernel only).
  m.def("causal_attention_backward_packed(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, float scale) -> Tensor");
  // One new query (B, nh, 1, hs) against the first cache_lengths[b] rows of k/v caches (B, nh, Tmax, hs):
  // q's dtype, or int8 codes with k_scale/v_scale float32 (B, nh, Tmax), one absmax/127 per cached vector.
  m.def("causal_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lengths, float scale, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  // y = x @ weight.T + bias, GELU'd when gelu; x (M, K) float32, weight (N, K) float32/bfloat16,
  // bias (N,) float32; each row's result is independent of M (batch-invariant decode GEMM). The weight may
  // also be bfloat16 packed by ryzen_llm.ops.decode_linear.pack_decode_weight, (ceil(N/16), ceil(K/2), 16, 2),
  // or a 3-D int8/int4 weight of quantized_decode_linear (run by that kernel), N then given by out_features or the bias.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias, bool gelu, int out_features=-1) -> Tensor");
  // The same with quantized weights packed by ryzen_llm.ops.quantized_decode_linear (decode_linear takes them too): int8
  // (ceil(N/16), ceil(K/4)+2, 64), one scale per output, x quantized per row; int4 as uint8 (ceil(N/16), 5*ceil(K/32), 64),
  // one scale per output and 32 K, x quantized per 32 K; exact int32 sums (VNNI), batch-invariant; N from out_features or bias.
  m.def("quantized_decode_linear(Tensor x, Tensor weight, Tensor? bias, bool gelu, int out_features=-1) -> Tensor");
  // int8 codes of a 2-D float32/bfloat16 x per row (row_codes (M, K), row_scales (M,)) and/or per column
  // (col_codes (M, K), col_scales (K,)), absmax / 127; tensors not asked for are empty (csrc/cpu/linear.cpp).
  m.def("int8_quantize(Tensor x, bool rows, bool cols) -> (Tensor row_codes, Tensor row_scales, Tensor col_codes, Tensor col_scales)");
  // acc (M, N) int32 * row_scales[m] * col_scales[n] (+ bias) in dtype; with gelu, pre is that and y = GELU(pre).
  m.def("int8_dequantize(Tensor acc, Tensor row_scales, Tensor col_scales, Tensor? bias, bool gelu, ScalarType dtype) -> (Tensor y, Tensor pre)");
  // The int8 linear of level 4 on x (M, K) and weight (N, K) given as its codes per output (w_codes, w_scales (N,));
  // weight itself only receives its gradient. y = x @ W.T + bias (GELU'd); pre for backward (gelu only); x's row
  // codes and scales (M,), the forward GEMM's own, for an int8 weight gradient (save_codes). Given x_codes and x_scales
  // (x's row codes from its producer, add_layer_norm_int8_forward's) x is not read and the two outputs are empty.
  m.def("int8_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor w_codes, Tensor w_scales, bool gelu, bool save_codes, Tensor? x_codes=None, Tensor? x_scales=None) -> (Tensor y, Tensor pre, Tensor x_codes, Tensor x_scales)");
  // Its backward with the forward's weight codes (the scales folded into grad_y); x_saved is x's row codes with x_scales
  // (int8_weight_grad) or x itself; grad_weight float32 (N, K), grad_bias float32 (N,).
  m.def("int8_linear_backward(Tensor grad_y, Tensor pre, Tensor x_saved, Tensor x_scales, Tensor w_codes, Tensor w_scales, bool gelu, bool need_grad_x, bool int8_weight_grad) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The level-4 feed-forward fc2(GELU(fc1(x))) on x (M, C), w1 (F, C), w2 (C, F) given as their codes per output:
  // y (M, C), pre (M, F) (fc1's pre-activation), x's row codes and scales, and the activation's row codes (M, F)
  // and scales (M,), which fc1's epilogue writes instead of the activation (csrc/cpu/int8_feed_forward.cpp). x_codes,
  // x_scales: as for int8_linear_forward.
  m.def("int8_feed_forward_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w1_codes, Tensor w1_scales, Tensor w2, Tensor? b2, Tensor w2_codes, Tensor w2_scales, Tensor? x_codes=None, Tensor? x_scales=None) -> (Tensor y, Tensor pre, Tensor x_codes, Tensor x_scales, Tensor h_codes, Tensor h_scales)");
  // Its backward from what the forward saved: grad_x (empty without need_grad_x), grad_w1, grad_b1, grad_w2, grad_b2 (float32).
  m.def("int8_feed_forward_backward(Tensor grad_y, Tensor pre, Tensor x_codes, Tensor x_scales, Tensor h_codes, Tensor h_scales, Tensor w1_codes, Tensor w1_scales, Tensor w2_codes, Tensor w2_scales, bool need_grad_x) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  // Exact int32 a (M, K) int8 @ b (K, N) int8 through the level-4 linear's GEMM (csrc/cpu/int8_gemm.cpp):
  // at::_int_mm or the own AVX512-VNNI kernel, as int8_gemm_mode says.
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  // Process state: which int8 GEMM runs, 0 = the faster per shape (both timed on its first call), 1 = the own
  // kernel, 2 = at::_int_mm; returns the previous mode. choices: per shape seen, 9 values: M, N, K, threads, the
  // implementation running (1 own, 2 oneDNN), the microseconds each took when timed (0: not timed), calls of each.
  m.def("int8_gemm_mode(int mode) -> int");
  m.def("int8_gemm_choices() -> int[]");
  // Per row of logits (B, V) float32: the first argmax (int64), its log-softmax value and the row's log-sum-exp.
  m.def("greedy_pick(Tensor logits) -> (Tensor tokens, Tensor logprobs, Tensor logsumexp)");
  // One transformer block of a decode step (csrc/decode_block.cpp): x (B, C) residual stream, h (B, C)
  // = ln1(x); writes the new keys/values (int8 codes + scales for an int8 cache) at the flat slots
  // (B * nh,) and attends to lengths[b] keys; returns (x + attn + ffn, next LayerNorm of it).
  m.def("decode_block(Tensor x, Tensor h, Tensor qkv_weight, Tensor qkv_bias, Tensor proj_weight, Tensor proj_bias, Tensor ln2_weight, Tensor ln2_bias, float ln2_eps, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, Tensor next_weight, Tensor next_bias, float next_eps, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? k_scale, Tensor(d!)? v_scale, Tensor slots, Tensor lengths, int n_heads) -> (Tensor x_out, Tensor h_out)");
  // A whole decode step (csrc/decode_block.cpp): idx (B, 1) -> logits (B, vocab_size); the embedding, the first
  // LayerNorm, one decode_block per block (12 weights and 2 eps each in block_weights, block_eps), the LM head;
  // caches hold all rows (rows 0..B-1 are used), scales empty for a float cache; lengths[:B] += 1.
  m.def("decode_step(Tensor idx, Tensor tok_emb, Tensor pos_emb, Tensor ln0_weight, Tensor ln0_bias, float ln0_eps, Tensor[] block_weights, float[] block_eps, Tensor head_weight, int vocab_size, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales, Tensor(e!) lengths, int n_heads) -> Tensor");
  // A whole prefill (csrc/decode_block.cpp): B right-padded prompts idx (B, T) from position 0 -> logits (B, vocab_size)
  // of each row's last real token (prompt_lengths[b] - 1); keys and values written to positions 0..T-1 of cache rows
  // 0..B-1; lengths[:B] = prompt_lengths. Other arguments as decode_step's.
  m.def("prefill_step(Tensor idx, Tensor? key_padding_mask, Tensor prompt_lengths, Tensor tok_emb, Tensor pos_emb, Tensor ln0_weight, Tensor ln0_bias, float ln0_eps, Tensor[] block_weights, float[] block_eps, Tensor head_weight, int vocab_size, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales, Tensor(e!) lengths, int n_heads) -> Tensor");
  // Process state, not tensor math: c10's CPU allocator caches blocks of >= min_bytes by exact size
  // while enabled (the trainer's steps). disable returns the bytes freed; stats are
  // [cached, in use, most held since enable] in bytes.
  m.def("cpu_block_cache_enable(int min_bytes) -> bool");
  m.def("cpu_block_cache_disable() -> int");
  m.def("cpu_block_cache_stats() -> int[]");
}
