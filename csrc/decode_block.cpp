// One transformer block of a decode step (one new token per row) as one op: the qkv projection,
// the write of the new key and value into the KV cache (int8 codes and scales for an int8
// cache), attention against the cache, the output projection, add + LayerNorm, the GELU
// feed-forward and the next add + LayerNorm. The same kernels in the same order as the
// composed Python path (ScaledTransformerModel.forward_with_cache through the KernelSet), so
// the result is bit for bit the same; what goes away is the Python and dispatch around ~20
// small calls per block, which at batch 1 costs as much as the arithmetic.
//
// Device-generic (CompositeExplicitAutograd): every step is an op call through the dispatcher,
// so it runs wherever ryzen_llm's decode ops have kernels. Inference only (no autograd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

namespace ryzen_llm {
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool gelu) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           bool, int64_t)>("ryzen_llm::decode_linear");
  return op.call(x, w, b, gelu, -1);  // a packed weight's output count comes from the bias
}

// (x + residual, LayerNorm(x + residual)); without a residual the first is undefined
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x,
                                                  const std::optional<at::Tensor>& residual,
                                                  const at::Tensor& w, const at::Tensor& b,
                                                  double eps) {
  using Fn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      double, std::optional<at::ScalarType>);
  static const auto op = op_handle<Fn>("ryzen_llm::add_layer_norm_forward");
  auto [out, sum, mean, rstd] = op.call(x, residual, w, b, eps, std::nullopt);
  return {sum, out};
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& lengths, double scale,
                     const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&);
  static const auto op = op_handle<Fn>("ryzen_llm::causal_attention_decode");
  return op.call(q, k_cache, v_cache, lengths, scale, k_scale, v_scale);
}

// int8 codes and float32 scales of x (..., D), one absmax / 127 block per D-vector.
std::tuple<at::Tensor, at::Tensor> quantize_vectors(const at::Tensor& x, int64_t D) {
  using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, bool,
                                                int64_t, int64_t);
  static const auto op = op_handle<Fn>("ryzen_llm::quantize_blockwise");
  auto [data, scales] = op.call(x, D, 8, false, 0, 0);
  return {data.view(at::kChar), scales};
}

// rows[i] (D values, at src + (i / H) * s_b + (i % H) * s_h) -> row slots[i] of dst (rows of D),
// for every i < B * H: the KV-cache write of a decode step, as index_copy_ along dim 0 of the
// cache viewed as (-1, D) but without its TensorIterator set-up (8 of them per step cost about
// as much as a block's attention at batch 1). CPU tensors only; slots are checked here.
template <typename T>
void scatter_rows(const at::Tensor& dst, const at::Tensor& slots, const T* src, int64_t s_b,
                  int64_t s_h, int64_t H, int64_t D) {
  const int64_t rows = dst.numel() / D, n = slots.numel();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* out = dst.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i)  // every slot checked before anything is written
    TORCH_CHECK(slot[i] >= 0 && slot[i] < rows, "slots: entry ", i, " is ", slot[i],
                ", outside the cache's ", rows, " (row, head, position) slots");
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(out + slot[i] * D, src + (i / H) * s_b + (i % H) * s_h, D * sizeof(T));
}

// A prompt's B x T x H rows of D values (row (b, t, h) at src + b * s_b + t * s_t + h * s_h)
// -> positions 0..T-1 of dst (B, H, Tmax, D), contiguous: for each (batch, head) T rows into one
// contiguous run. The prefill's cache write without copy_'s strided TensorIterator, which moves
// such rows one element at a time. CPU tensors only.
template <typename T>
void write_prompt_rows(const at::Tensor& dst, const T* src, int64_t s_b, int64_t s_t,
                       int64_t s_h, int64_t B, int64_t Tn, int64_t H, int64_t D) {
  const int64_t Tmax = dst.size(2);
  T* out = dst.data_ptr<T>();
  at::parallel_for(0, B * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Tn * D)),
                   [&](int64_t i0, int64_t i1) {
                     for (int64_t i = i0; i < i1; ++i) {
                       const int64_t b = i / H, h = i % H;
                       const T* from = src + b * s_b + h * s_h;
                       T* to = out + i * Tmax * D;
                       for (int64_t t = 0; t < Tn; ++t)
                         std::memcpy(to + t * D, from + t * s_t, D * sizeof(T));
                     }
                   });
}

void check_2d_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a (batch, d_model) tensor, got sizes ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> decode_block(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& qkv_weight,
    const at::Tensor& qkv_bias, const at::Tensor& proj_weight, const at::Tensor& proj_bias,
    const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, double ln2_eps,
    const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
    const at::Tensor& fc2_bias, const at::Tensor& next_weight, const at::Tensor& next_bias,
    double next_eps, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const at::Tensor& slots, const at::Tensor& lengths, int64_t n_heads) {
  check_2d_float(x, "x");
  check_2d_float(h, "h");
  TORCH_CHECK(h.sizes() == x.sizes(), "h: expected the sizes of x ", x.sizes(), ", got ",
              h.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(n_heads > 0 && C % n_heads == 0, "n_heads: expected a positive divisor of d_model ",
              C, ", got ", n_heads);
  const int64_t H = n_heads, D = C / H;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == H &&
                  k_cache.size(3) == D && k_cache.is_contiguous(),
              "k_cache: expected a contiguous (", B, ", ", H, ", Tmax, ", D, ") tensor, got sizes ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "v_cache: expected a contiguous tensor like k_cache (", k_cache.sizes(), " ",
              k_cache.scalar_type(), "), got ", v_cache.sizes(), " ", v_cache.scalar_type());
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == k_scale.has_value() && quantized == v_scale.has_value(),
              quantized ? "k_scale, v_scale: required with an int8 cache"
                        : "k_scale, v_scale: only an int8 cache takes scales");
  TORCH_CHECK(slots.dim() == 1 && slots.numel() == B * H && slots.scalar_type() == at::kLong,
              "slots: expected ", B * H, " int64 flat (row, head, position) indices, got ",
              slots.sizes(), " ", slots.scalar_type());

  const at::Tensor qkv = linear(h, qkv_weight, qkv_bias, false);  // (B, 3C)
  const at::Tensor parts = qkv.view({B, 3, H, D});
  const at::Tensor q = parts.select(1, 0).unsqueeze(2);  // (B, H, 1, D)
  const bool direct = k_cache.is_cpu() && qkv.is_cpu() && slots.is_cpu() &&
                      slots.is_contiguous() && qkv.is_contiguous() &&
                      (!quantized || (k_scale->is_contiguous() && v_scale->is_contiguous()));
  if (quantized && direct) {
    auto [codes, scales] = quantize_vectors(parts.slice(1, 1, 3), D);  // (B, 2, H, D), (B, 2, H)
    codes = codes.contiguous();
    scales = scales.contiguous();
    const int8_t* c = codes.data_ptr<int8_t>();
    const float* sc = scales.data_ptr<float>();
    scatter_rows<int8_t>(k_cache, slots, c, 2 * C, D, H, D);
    scatter_rows<int8_t>(v_cache, slots, c + C, 2 * C, D, H, D);
    scatter_rows<float>(*k_scale, slots, sc, 2 * H, 1, H, 1);  // scales: rows of one
    scatter_rows<float>(*v_scale, slots, sc + H, 2 * H, 1, H, 1);
  } else if (direct) {
    const float* kv = qkv.data_ptr<float>();
    scatter_rows<float>(k_cache, slots, kv + C, 3 * C, D, H, D);
    scatter_rows<float>(v_cache, slots, kv + 2 * C, 3 * C, D, H, D);
  } else if (quantized) {
    auto [codes, scales] = quantize_vectors(parts.slice(1, 1, 3), D);  // (B, 2, H, D), (B, 2, H)
    codes = codes.view({B, 2, H, D});
    scales = scales.view({B, 2, H});
    k_cache.view({-1, D}).index_copy_(0, slots, codes.select(1, 0).reshape({B * H, D}));
    v_cache.view({-1, D}).index_copy_(0, slots, codes.select(1, 1).reshape({B * H, D}));
    k_scale->view({-1}).index_copy_(0, slots, scales.select(1, 0).reshape({B * H}));
    v_scale->view({-1}).index_copy_(0, slots, scales.select(1, 1).reshape({B * H}));
  } else {
    k_cache.view({-1, D}).index_copy_(0, slots, parts.select(1, 1).reshape({B * H, D}));
    v_cache.view({-1, D}).index_copy_(0, slots, parts.select(1, 2).reshape({B * H, D}));
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const at::Tensor y = attention(q, k_cache, v_cache, lengths, scale, k_scale, v_scale);
  const at::Tensor a = linear(y.view({B, C}), proj_weight, proj_bias, false);
  auto [x1, h1] = add_layer_norm(x, a, ln2_weight, ln2_bias, ln2_eps);
  const at::Tensor m = linear(linear(h1, fc1_weight, fc1_bias, true), fc2_weight, fc2_bias, false);
  return add_layer_norm(x1, m, next_weight, next_bias, next_eps);
}

// The arguments decode_step and prefill_step share: 12 weights and 2 eps per block, one cache of
// keys and one of values per block (with int8 scales or none), lengths for at least B rows.
void check_step_args(at::TensorList block_weights, at::ArrayRef<double> block_eps,
                     at::TensorList k_caches, at::TensorList v_caches, at::TensorList k_scales,
                     at::TensorList v_scales, const at::Tensor& lengths, int64_t B) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(block_weights.size()) == 12 * L,
              "block_weights: expected 12 per block (", 12 * L, " for ", L, " caches), got ",
              block_weights.size());
  TORCH_CHECK(static_cast<int64_t>(block_eps.size()) == 2 * L,
              "block_eps: expected 2 per block (", 2 * L, "), got ", block_eps.size());
  TORCH_CHECK(v_caches.size() == k_caches.size(), "v_caches: expected ", L, " caches, got ",
              v_caches.size());
  TORCH_CHECK(k_scales.size() == v_scales.size() &&
                  (k_scales.empty() || k_scales.size() == k_caches.size()),
              "k_scales, v_scales: expected none (float cache) or one each per block");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong && lengths.size(0) >= B,
              "lengths: expected an int64 vector of at least ", B, " rows, got ", lengths.sizes(),
              " ", lengths.scalar_type());
}

// Rows 0..B-1 of block i's int8 scales, or none for a float cache.
std::optional<at::Tensor> scale_rows(at::TensorList scales, int64_t i, int64_t B) {
  if (scales.empty()) return std::nullopt;
  return scales[i].slice(0, 0, B);
}

// The LM head's logits of h (B, C): no bias, so a packed weight needs the vocabulary size.
at::Tensor lm_head(const at::Tensor& h, const at::Tensor& weight, int64_t vocab_size) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           bool, int64_t)>("ryzen_llm::decode_linear");
  return op.call(h, weight, std::nullopt, false, weight.dim() == 2 ? -1 : vocab_size);
}

// A whole decode step: embedding, the first LayerNorm, every block (decode_block above, called
// directly), the LM head, and lengths[:B] += 1; the same ops in the same order as
// ScaledTransformerModel.forward_with_cache with one decode_block op per block, so the same bits,
// without the Python around them per step (slots, embedding, cache views, wrappers).
// block_weights: 12 per block in decode_block's order (qkv weight, bias, proj weight, bias, ln2
// weight, bias, fc1 weight, bias, fc2 weight, bias, next LayerNorm weight, bias); block_eps: 2 per
// block (ln2, next); caches: one per block, all their rows (the step uses rows 0..B-1); k_scales,
// v_scales empty for a float cache.
at::Tensor decode_step(const at::Tensor& idx, const at::Tensor& tok_emb, const at::Tensor& pos_emb,
                       const at::Tensor& ln0_weight, const at::Tensor& ln0_bias, double ln0_eps,
                       at::TensorList block_weights, at::ArrayRef<double> block_eps,
                       const at::Tensor& head_weight, int64_t vocab_size,
                       at::TensorList k_caches, at::TensorList v_caches, at::TensorList k_scales,
                       at::TensorList v_scales, const at::Tensor& lengths, int64_t n_heads) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(1) == 1 && idx.scalar_type() == at::kLong,
              "idx: expected (batch, 1) int64 token ids, got sizes ", idx.sizes(), " ",
              idx.scalar_type());
  const int64_t B = idx.size(0), L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(B >= 1, "idx: expected at least one row");
  check_step_args(block_weights, block_eps, k_caches, v_caches, k_scales, v_scales, lengths, B);
  TORCH_CHECK(L >= 1 && k_caches[0].dim() == 4 && k_caches[0].size(0) >= B,
              "k_caches: expected (rows >= ", B, ", heads, Tmax, head dim) caches");
  const int64_t H = n_heads, Tmax = k_caches[0].size(2);
  const at::Tensor positions = lengths.slice(0, 0, B);
  at::Tensor new_lengths, slots;
  if (positions.is_cpu() && positions.is_contiguous()) {
    // B lengths and B * H slots in plain loops: the tensor ops cost ~10 us a step at batch 1
    const int64_t* pos = positions.data_ptr<int64_t>();
    new_lengths = at::empty({B}, positions.options());
    slots = at::empty({B * H}, positions.options());
    int64_t* nl = new_lengths.data_ptr<int64_t>();
    int64_t* sl = slots.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pos[b] >= 0, "lengths: row ", b, " is ", pos[b], ", expected >= 0");
      TORCH_CHECK(pos[b] < Tmax, "idx: a sequence would exceed the cache length ", Tmax,
                  " (row ", b, " is at position ", pos[b], ")");
      nl[b] = pos[b] + 1;
      for (int64_t hh = 0; hh < H; ++hh) sl[b * H + hh] = (b * H + hh) * Tmax + pos[b];
    }
  } else {
    TORCH_CHECK(positions.max().item<int64_t>() < Tmax,
                "idx: a sequence would exceed the cache length ", Tmax);
    new_lengths = positions + 1;
    slots = (at::arange(B * H, positions.options()).view({B, H}) * Tmax + positions.unsqueeze(1))
                .view({-1});
  }
  const at::Tensor x0 = at::embedding(tok_emb, idx.view({B})) + pos_emb.index_select(0, positions);
  at::Tensor x = x0;
  at::Tensor h = std::get<1>(add_layer_norm(x0, std::nullopt, ln0_weight, ln0_bias, ln0_eps));
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = block_weights.data() + 12 * i;
    std::tie(x, h) = decode_block(x, h, w[0], w[1], w[2], w[3], w[4], w[5], block_eps[2 * i], w[6],
                                  w[7], w[8], w[9], w[10], w[11], block_eps[2 * i + 1],
                                  k_caches[i].slice(0, 0, B), v_caches[i].slice(0, 0, B),
                                  scale_rows(k_scales, i, B), scale_rows(v_scales, i, B), slots,
                                  new_lengths, H);
  }
  positions.add_(1);
  return lm_head(h, head_weight, vocab_size);
}

// One block of a prefill: x (B*T, C) residual stream, h = its LayerNorm; the prompt's keys and
// values go to positions 0..T-1 of the caches' rows 0..B-1 (int8 codes and scales for an int8
// cache) and attention runs over the exact keys and values of the prompt (causal, key padding
// mask), as CausalSelfAttention.forward_cached and Block.forward_cached do.
std::tuple<at::Tensor, at::Tensor> prefill_block(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor* w, double ln2_eps,
    double next_eps, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& mask, int64_t B, int64_t T, int64_t H) {
  using AttnFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double);
  static const auto attention_forward = op_handle<AttnFn>("ryzen_llm::causal_attention_forward");
  const int64_t C = x.size(1), D = C / H;
  const at::Tensor parts = linear(h, w[0], w[1], false).view({B, T, 3, H, D});
  const at::Tensor q = parts.select(2, 0).permute({0, 2, 1, 3});  // (B, H, T, D) views
  const at::Tensor k = parts.select(2, 1).permute({0, 2, 1, 3});
  const at::Tensor v = parts.select(2, 2).permute({0, 2, 1, 3});
  const bool direct = k_cache.is_cpu() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                      (!k_scale.has_value() ||
                       (k_scale->is_contiguous() && v_scale->is_contiguous()));
  if (k_scale.has_value() && direct) {
    auto [codes, scales] = quantize_vectors(parts.slice(2, 1, 3), D);  // (B, T, 2, H, D), (.., H)
    codes = codes.contiguous();
    scales = scales.contiguous();
    const int8_t* c = codes.data_ptr<int8_t>();
    const float* sc = scales.data_ptr<float>();
    write_prompt_rows<int8_t>(k_cache, c, T * 2 * C, 2 * C, D, B, T, H, D);
    write_prompt_rows<int8_t>(v_cache, c + C, T * 2 * C, 2 * C, D, B, T, H, D);
    write_prompt_rows<float>(*k_scale, sc, T * 2 * H, 2 * H, 1, B, T, H, 1);
    write_prompt_rows<float>(*v_scale, sc + H, T * 2 * H, 2 * H, 1, B, T, H, 1);
  } else if (direct && parts.is_contiguous()) {
    const float* kv = parts.data_ptr<float>();
    write_prompt_rows<float>(k_cache, kv + C, T * 3 * C, 3 * C, D, B, T, H, D);
    write_prompt_rows<float>(v_cache, kv + 2 * C, T * 3 * C, 3 * C, D, B, T, H, D);
  } else if (k_scale.has_value()) {
    auto [codes, scales] = quantize_vectors(parts.slice(2, 1, 3), D);
    codes = codes.view({B, T, 2, H, D});
    scales = scales.view({B, T, 2, H});
    k_cache.slice(2, 0, T).copy_(codes.select(2, 0).permute({0, 2, 1, 3}));
    v_cache.slice(2, 0, T).copy_(codes.select(2, 1).permute({0, 2, 1, 3}));
    k_scale->slice(2, 0, T).copy_(scales.select(2, 0).permute({0, 2, 1}));
    v_scale->slice(2, 0, T).copy_(scales.select(2, 1).permute({0, 2, 1}));
  } else {
    k_cache.slice(2, 0, T).copy_(k);
    v_cache.slice(2, 0, T).copy_(v);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const at::Tensor y = std::get<0>(attention_forward.call(q, k, v, mask, scale));
  const at::Tensor a = linear(y.transpose(1, 2).reshape({B * T, C}), w[2], w[3], false);
  auto [x1, h1] = add_layer_norm(x, a, w[4], w[5], ln2_eps);
  const at::Tensor m = linear(linear(h1, w[6], w[7], true), w[8], w[9], false);
  return add_layer_norm(x1, m, w[10], w[11], next_eps);
}

// A whole prefill of B right-padded prompts of T tokens from position 0: the embedding, the
// first LayerNorm, one prefill_block per block, the LM head on each row's last real token
// (prompt_lengths[b] - 1); lengths[:B] = prompt_lengths. The same ops in the same order as the
// composed prefill of ScaledTransformerModel.forward_with_cache, so the same bits. Arguments as
// decode_step's; key_padding_mask (B, T) bool, True = real token, or None.
at::Tensor prefill_step(const at::Tensor& idx, const std::optional<at::Tensor>& key_padding_mask,
                        const at::Tensor& prompt_lengths, const at::Tensor& tok_emb,
                        const at::Tensor& pos_emb, const at::Tensor& ln0_weight,
                        const at::Tensor& ln0_bias, double ln0_eps, at::TensorList block_weights,
                        at::ArrayRef<double> block_eps, const at::Tensor& head_weight,
                        int64_t vocab_size, at::TensorList k_caches, at::TensorList v_caches,
                        at::TensorList k_scales, at::TensorList v_scales,
                        const at::Tensor& lengths, int64_t n_heads) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) >= 1 && idx.size(1) >= 1 &&
                  idx.scalar_type() == at::kLong,
              "idx: expected (batch, tokens) int64 token ids, got sizes ", idx.sizes(), " ",
              idx.scalar_type());
  const int64_t B = idx.size(0), T = idx.size(1), L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(!key_padding_mask.has_value() ||
                  (key_padding_mask->sizes() == idx.sizes() &&
                   key_padding_mask->scalar_type() == at::kBool),
              "key_padding_mask: expected a bool tensor of idx's sizes ", idx.sizes());
  TORCH_CHECK(prompt_lengths.dim() == 1 && prompt_lengths.size(0) == B &&
                  prompt_lengths.scalar_type() == at::kLong,
              "prompt_lengths: expected ", B, " int64 lengths, got ", prompt_lengths.sizes(), " ",
              prompt_lengths.scalar_type());
  check_step_args(block_weights, block_eps, k_caches, v_caches, k_scales, v_scales, lengths, B);
  TORCH_CHECK(L >= 1 && k_caches[0].dim() == 4 && k_caches[0].size(0) >= B &&
                  k_caches[0].size(1) == n_heads && k_caches[0].size(2) >= T,
              "k_caches: expected (rows >= ", B, ", ", n_heads, " heads, Tmax >= ", T,
              ", head dim) caches, got ", k_caches[0].sizes());
  const at::Tensor x0 =
      (at::embedding(tok_emb, idx) + pos_emb.slice(0, 0, T)).view({B * T, tok_emb.size(1)});
  at::Tensor x = x0;
  at::Tensor h = std::get<1>(add_layer_norm(x0, std::nullopt, ln0_weight, ln0_bias, ln0_eps));
  for (int64_t i = 0; i < L; ++i) {
    std::tie(x, h) = prefill_block(x, h, block_weights.data() + 12 * i, block_eps[2 * i],
                                   block_eps[2 * i + 1], k_caches[i].slice(0, 0, B),
                                   v_caches[i].slice(0, 0, B), scale_rows(k_scales, i, B),
                                   scale_rows(v_scales, i, B), key_padding_mask, B, T, n_heads);
  }
  const at::Tensor rows = at::arange(B, prompt_lengths.options()) * T + prompt_lengths - 1;
  lengths.slice(0, 0, B).copy_(prompt_lengths);
  return lm_head(h.index_select(0, rows), head_weight, vocab_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CompositeExplicitAutograd, m) {
  m.impl("decode_block", &decode_block);
  m.impl("decode_step", &decode_step);
  m.impl("prefill_step", &prefill_step);
}

}  // namespace ryzen_llm
