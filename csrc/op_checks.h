// Argument checks and host-side code that the CPU and the CUDA implementation of an op share
// word for word: shape checks, scalar arithmetic, and the ATen calls around a device kernel
// (templates taking the device's kernel launcher). Each device file checks the device type (and
// its own dtype set) of the leading tensor itself; everything here is the same on every device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <cmath>
#include <tuple>
#include <string>
#include <utility>

namespace ryzen_llm {

// t must live where ref lives, have its dtype, and be contiguous.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(),
              " (the device of ", ref_name, "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ",
              ref.scalar_type(), " (the dtype of ", ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
              t.strides(), " for sizes ", t.sizes());
}

inline void check_sizes(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected sizes ", expected, ", got ", t.sizes());
}

// -- add_layer_norm ------------------------------------------------------------------------
// Row statistics are kept in the accumulation type: float32, or float64 for float64 input.
inline at::ScalarType layer_norm_stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A dtype that may differ from x's only as float32 x with a lower precision the device computes
// in (`mixable`: bfloat16 on CPU; bfloat16 and float16 on CUDA).
inline void check_mixed_dtype(at::ScalarType t, const at::Tensor& x, const char* name,
                              at::ArrayRef<at::ScalarType> mixable) {
  bool ok = t == x.scalar_type();
  std::string alternatives;
  if (x.scalar_type() == at::kFloat) {
    for (at::ScalarType m : mixable) {
      ok = ok || t == m;
      alternatives += std::string(alternatives.empty() ? " or " : "/") + c10::toString(m);
    }
  }
  TORCH_CHECK(ok, name, ": expected dtype ", x.scalar_type(), alternatives, " (input is ",
              x.scalar_type(), "), got ", t);
}

// input (..., C), contiguous, with non-empty rows; weight and bias (C,) on its device, in its
// dtype, contiguous. The caller checks input's device type and dtype set. Returns C.
inline int64_t check_layer_norm_params(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias) {
  TORCH_CHECK(x.is_contiguous(), "input: expected a contiguous tensor, got strides ",
              x.strides(), " for sizes ", x.sizes());
  TORCH_CHECK(x.dim() >= 1, "input: expected at least 1 dimension, got a 0-D tensor");
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0, "input: the normalised (last) dimension must be non-empty");
  check_like(weight, x, "weight", "input");
  check_sizes(weight, {C}, "weight");
  check_like(bias, x, "bias", "input");
  check_sizes(bias, {C}, "bias");
  return C;
}

inline void check_add_layer_norm_forward_args(const at::Tensor& x,
                                              const c10::optional<at::Tensor>& residual,
                                              const at::Tensor& weight, const at::Tensor& bias,
                                              double eps, at::ScalarType out_type,
                                              at::ArrayRef<at::ScalarType> mixable) {
  check_layer_norm_params(x, weight, bias);
  TORCH_CHECK(eps > 0, "eps: expected a positive value, got ", eps);
  if (residual.has_value()) {
    TORCH_CHECK(residual->device() == x.device(), "residual: expected device ", x.device(),
                " (the device of input), got ", residual->device());
    check_mixed_dtype(residual->scalar_type(), x, "residual", mixable);
    check_sizes(*residual, x.sizes(), "residual");
    TORCH_CHECK(residual->is_contiguous(), "residual: expected a contiguous tensor, got strides ",
                residual->strides(), " for sizes ", residual->sizes());
  }
  check_mixed_dtype(out_type, x, "out_dtype", mixable);
}

// The backward's arguments beyond input's device type and dtype set (checked by the caller):
// grad_out like input (or in a mixable dtype), grad_sum and weight like input, the forward's
// statistics. Returns the number of rows N.
inline int64_t check_add_layer_norm_backward_args(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_sum,
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, at::ScalarType residual_type, at::ArrayRef<at::ScalarType> mixable) {
  TORCH_CHECK(input.is_contiguous(), "input: expected a contiguous tensor, got strides ",
              input.strides(), " for sizes ", input.sizes());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) > 0,
              "input: the normalised (last) dimension must be non-empty");
  const int64_t C = input.size(-1), N = input.numel() / C;
  TORCH_CHECK(grad_out.device() == input.device(), "grad_out: expected device ", input.device(),
              " (the device of input), got ", grad_out.device());
  check_mixed_dtype(grad_out.scalar_type(), input, "grad_out", mixable);
  check_sizes(grad_out, input.sizes(), "grad_out");
  TORCH_CHECK(grad_out.is_contiguous(), "grad_out: expected a contiguous tensor, got strides ",
              grad_out.strides(), " for sizes ", grad_out.sizes());
  check_like(weight, input, "weight", "input");
  check_sizes(weight, {C}, "weight");
  const at::ScalarType stats = layer_norm_stats_dtype(input);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"},
                                {rstd, "rstd"}}) {
    TORCH_CHECK(t.device() == input.device() && t.scalar_type() == stats && t.numel() == N &&
                    t.is_contiguous(),
                name, ": expected ", N, " contiguous ", stats, " statistics on ", input.device(),
                ", got ", t.numel(), " ", t.scalar_type(), " on ", t.device());
  }
  if (grad_sum.has_value()) {
    check_like(*grad_sum, input, "grad_sum", "input");
    check_sizes(*grad_sum, input.sizes(), "grad_sum");
  }
  check_mixed_dtype(residual_type, input, "residual_dtype", mixable);
  return N;
}

// -- causal_attention ----------------------------------------------------------------------
// A (B, nh, T, hs) operand: 4-D and, with `like`, on its device, in its dtype, of its sizes. The
// caller checks the device type and its dtype set first. Returned with unit stride in the head
// dim (another last-dim stride is copied once; the other strides are used as they are).
inline at::Tensor attention_operand(const at::Tensor& t, const char* name, const at::Tensor* like,
                                    const char* like_name) {
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor, got ", t.dim(), "-D with sizes ",
              t.sizes());
  if (like != nullptr) {
    TORCH_CHECK(t.device() == like->device(), name, ": expected device ", like->device(),
                " (the device of ", like_name, "), got ", t.device());
    TORCH_CHECK(t.scalar_type() == like->scalar_type(), name, ": expected dtype ",
                like->scalar_type(), " (the dtype of ", like_name, "), got ", t.scalar_type());
    check_sizes(t, like->sizes(), name);
  }
  return t.stride(3) == 1 ? t : t.contiguous();
}

// q's head dim within what the device's kernels are built for (`device` names it in the error).
inline void check_head_dim(const at::Tensor& q, int64_t min_dim, int64_t max_dim,
                           const char* device) {
  const int64_t D = q.size(3);
  TORCH_CHECK(D >= min_dim && D <= max_dim, "q: head dim (size 3) must be in [", min_dim, ", ",
              max_dim, "]", device, ", got ", D);
}

inline void check_attention_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
}

// (B, T) bool, on q's device: True marks a real key.
inline void check_key_padding_mask(const at::Tensor& m, const at::Tensor& q) {
  TORCH_CHECK(m.device() == q.device(), "key_padding_mask: expected device ", q.device(),
              " (the device of q), got ", m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, "key_padding_mask: expected dtype bool, got ",
              m.scalar_type());
  check_sizes(m, {q.size(0), q.size(2)}, "key_padding_mask");
}

// The forward's log-sum-exp (B, nh, T) in q's accumulation type, on q's device.
inline void check_attention_lse(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.device() == q.device(), "lse: expected device ", q.device(),
              " (the device of q), got ", lse.device());
  const auto acc_type = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_type, "lse: expected dtype ", acc_type,
              " (the accumulation type of q), got ", lse.scalar_type());
  check_sizes(lse, {q.size(0), q.size(1), q.size(2)}, "lse");
}

// Decode: q (B, nh, 1, hs); caches (B, nh, Tmax, hs), each already checked as 4-D in its dtype;
// cache_lengths (B,) int64 on q's device. Returns Tmax. The values of cache_lengths are checked by
// the device (on the host for CPU, with one copy for CUDA).
inline int64_t check_decode_shapes(const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& cache_lengths) {
  TORCH_CHECK(q.size(2) == 1, "q: expected one query per sequence (size 2 == 1), got sizes ",
              q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Tmax = k_cache.size(2);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"},
                                {v_cache, "v_cache"}}) {
    TORCH_CHECK(t.device() == q.device(), name, ": expected device ", q.device(),
                " (the device of q), got ", t.device());
  }
  check_sizes(k_cache, {B, H, Tmax, D}, "k_cache");
  check_sizes(v_cache, k_cache.sizes(), "v_cache");
  TORCH_CHECK(cache_lengths.device() == q.device(), "cache_lengths: expected device ",
              q.device(), " (the device of q), got ", cache_lengths.device());
  TORCH_CHECK(cache_lengths.scalar_type() == at::kLong,
              "cache_lengths: expected dtype int64, got ", cache_lengths.scalar_type());
  check_sizes(cache_lengths, {B}, "cache_lengths");
  return Tmax;
}

// -- gelu_feed_forward ---------------------------------------------------------------------
struct FeedForwardShape {
  int64_t N, C, F;
};

// x (N, C) or (B, T, C), w1 (F, C), b1 (F), w2 (C, F), b2 (C); x's device and dtype checked.
inline FeedForwardShape check_feed_forward_shapes(const at::Tensor& x, const at::Tensor& w1,
                                                  const at::Tensor& b1, const at::Tensor& w2,
                                                  const at::Tensor& b2) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x: expected a (N, C) or (B, T, C) tensor, got ",
              x.dim(), "-D with sizes ", x.sizes());
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0, "x: the feature (last) dimension must be non-empty");
  check_like(w1, x, "w1", "x");
  TORCH_CHECK(w1.dim() == 2, "w1: expected a 2-D tensor, got ", w1.dim(), "-D with sizes ",
              w1.sizes());
  const int64_t F = w1.size(0);
  TORCH_CHECK(F > 0, "w1: expected a non-empty hidden dimension, got sizes ", w1.sizes());
  check_sizes(w1, {F, C}, "w1");
  check_like(b1, x, "b1", "x");
  check_sizes(b1, {F}, "b1");
  check_like(w2, x, "w2", "x");
  check_sizes(w2, {C, F}, "w2");
  check_like(b2, x, "b2", "x");
  check_sizes(b2, {C}, "b2");
  return {x.numel() / C, C, F};
}

// The feed-forward around a device's fused bias + GELU: fc1 and fc2 are ATen GEMMs (MKL/oneDNN
// on CPU, cuBLAS on CUDA). bias_gelu(in, bias, pre, act) writes in + bias to pre (which may be
// in) and GELU of it to act. Returns (y, h_pre, h_act); h_act is empty when recompute.
template <typename BiasGelu>
std::tuple<at::Tensor, at::Tensor, at::Tensor> feed_forward_forward(
    const at::Tensor& x, const FeedForwardShape& s, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, bool recompute, BiasGelu&& bias_gelu) {
  const at::Tensor x2 = x.reshape({s.N, s.C});
  at::Tensor h_pre = at::mm(x2, w1.t());  // (N, F), becomes fc1(x) + b1 in place
  at::Tensor h_act = at::empty_like(h_pre);
  bias_gelu(h_pre, b1, h_pre, h_act);
  at::Tensor y = at::addmm(b2, h_act, w2.t()).view(x.sizes());  // (N, C) -> x's shape
  if (recompute) h_act = at::empty({0}, x.options());
  return {y, h_pre, h_act};
}

// The backward's arguments beyond x's device and dtype (checked by the caller).
inline FeedForwardShape check_feed_forward_backward_args(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& h_pre, const at::Tensor& h_act, bool recompute) {
  TORCH_CHECK(x.is_contiguous(), "x: expected a contiguous tensor, got strides ", x.strides(),
              " for sizes ", x.sizes());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x: expected a (N, C) or (B, T, C) tensor, got ",
              x.dim(), "-D with sizes ", x.sizes());
  const int64_t C = x.size(-1);
  const int64_t N = x.numel() / std::max<int64_t>(1, C);
  check_like(grad_y, x, "grad_y", "x");
  check_sizes(grad_y, x.sizes(), "grad_y");
  check_like(w1, x, "w1", "x");
  TORCH_CHECK(w1.dim() == 2, "w1: expected a 2-D tensor, got ", w1.dim(), "-D with sizes ",
              w1.sizes());
  const int64_t F = w1.size(0);
  check_sizes(w1, {F, C}, "w1");
  check_like(w2, x, "w2", "x");
  check_sizes(w2, {C, F}, "w2");
  check_like(h_pre, x, "h_pre", "x");
  check_sizes(h_pre, {N, F}, "h_pre");
  if (recompute) {
    check_sizes(h_act, {0}, "h_act");
  } else {
    check_like(h_act, x, "h_act", "x");
    check_sizes(h_act, {N, F}, "h_act");
  }
  return {N, C, F};
}

// bias_gelu_grad(grad, in, grad_in, act) -> grad of the bias: grad_in = grad * GELU'(in) (grad_in
// may be grad), act = GELU(in) when act is defined. Returns (grad_x, grad_w1, grad_b1, grad_w2,
// grad_b2).
template <typename BiasGeluGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const FeedForwardShape& s,
    const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& h_pre, const at::Tensor& h_act,
    bool recompute, BiasGeluGrad&& bias_gelu_grad) {
  const at::Tensor gy = grad_y.reshape({s.N, s.C});
  const at::Tensor x2 = x.reshape({s.N, s.C});
  at::Tensor grad_b2 = gy.sum(0);
  at::Tensor grad_h = at::mm(gy, w2);  // (N, F): dL/dGELU, becomes dL/dh_pre in place
  at::Tensor act = recompute ? at::empty_like(h_pre) : h_act;
  at::Tensor grad_b1 = bias_gelu_grad(grad_h, h_pre, grad_h, recompute ? act : at::Tensor());
  at::Tensor grad_w2 = at::mm(gy.t(), act);     // (C, F)
  at::Tensor grad_w1 = at::mm(grad_h.t(), x2);  // (F, C)
  at::Tensor grad_x = at::mm(grad_h, w1).view(x.sizes());
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

// -- linear_cross_entropy ------------------------------------------------------------------
struct LinearCrossEntropyShape {
  int64_t N, C, V;
};

// h (N, C), weight (V, C), targets (N,) int64; h's device and dtype checked.
inline LinearCrossEntropyShape check_linear_cross_entropy_args(const at::Tensor& h,
                                                               const at::Tensor& weight,
                                                               const at::Tensor& targets) {
  TORCH_CHECK(h.dim() == 2, "h: expected a 2-D tensor, got ", h.dim(), "-D with sizes ",
              h.sizes());
  TORCH_CHECK(h.is_contiguous(), "h: expected a contiguous tensor, got strides ", h.strides());
  const int64_t N = h.size(0), C = h.size(1);
  check_like(weight, h, "weight", "h");
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-D tensor, got ", weight.dim(),
              "-D with sizes ", weight.sizes());
  const int64_t V = weight.size(0);
  TORCH_CHECK(V > 0, "weight: expected at least one vocabulary row, got sizes ", weight.sizes());
  TORCH_CHECK(weight.size(1) == C, "weight: expected sizes [V, ", C, "] (C from h), got ",
              weight.sizes());
  TORCH_CHECK(targets.device() == h.device(), "targets: expected device ", h.device(),
              " (the device of h), got ", targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets: expected int64, got ",
              targets.scalar_type());
  check_sizes(targets, {N}, "targets");
  TORCH_CHECK(targets.is_contiguous(), "targets: expected a contiguous tensor");
  return {N, C, V};
}

// The LM head in chunks of `chunk` rows around a device's row kernel, so the (N, V) logits are
// never whole: logits = h @ weight.T per chunk, then rows(logits, r0, n) turns the n rows from
// r0 into d(loss)/d(logits) (recording their losses), and the gradients are accumulated from
// them. Low-precision inputs sum the chunks' grad_weight products in float32 and round once.
// Returns (grad_h, grad_weight), each empty when not needed. logits_of(r0, n) makes a chunk's
// logits (n, V) in h's dtype (the int8 LM head computes them from codes); the gradients use h and
// weight as they are, except that grad_h_of(grad_logits, r0, out), where given, writes a chunk's
// grad_h instead of out = grad_logits @ weight (the int8 LM head's int8 input gradient).
template <typename Logits, typename Rows>
std::pair<at::Tensor, at::Tensor> linear_cross_entropy_chunks(
    const at::Tensor& h, const at::Tensor& weight, const LinearCrossEntropyShape& s,
    int64_t chunk, bool need_grad_h, bool need_grad_weight, Logits&& logits_of, Rows&& rows,
    const std::function<void(const at::Tensor&, int64_t, at::Tensor&)>& grad_h_of = nullptr) {
  const bool low_precision = h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf;
  at::Tensor grad_h = need_grad_h ? at::empty({s.N, s.C}, h.options()) : at::empty({0}, h.options());
  at::Tensor acc;
  if (need_grad_weight) {
    acc = at::empty({s.V, s.C}, h.options().dtype(low_precision ? at::kFloat : h.scalar_type()));
  }
  for (int64_t r0 = 0; r0 < s.N; r0 += chunk) {
    const int64_t n = std::min(chunk, s.N - r0);
    const at::Tensor hc = h.narrow(0, r0, n);
    at::Tensor logits = logits_of(r0, n);  // (n, V), becomes d(loss)/d(logits)
    rows(logits, r0, n);
    if (need_grad_h) {
      at::Tensor out = grad_h.narrow(0, r0, n);
      if (grad_h_of) {
        grad_h_of(logits, r0, out);
      } else {
        at::mm_out(out, logits, weight);  // (n, C)
      }
    }
    if (need_grad_weight) {
      if (low_precision) {
        if (r0 == 0) {
          acc.copy_(at::mm(logits.t(), hc));
        } else {
          acc.add_(at::mm(logits.t(), hc));
        }
      } else if (r0 == 0) {
        at::mm_out(acc, logits.t(), hc);  // (V, C)
      } else {
        acc.addmm_(logits.t(), hc);
      }
    }
  }
  at::Tensor grad_weight;
  if (!need_grad_weight) {
    grad_weight = at::empty({0}, weight.options());
  } else if (s.N == 0) {
    grad_weight = at::zeros_like(weight);
  } else {
    grad_weight = low_precision ? acc.to(weight.scalar_type()) : acc;
  }
  return {grad_h, grad_weight};
}

// The plain logits of rows [r0, r0 + n) of h: h @ weight.T (linear_cross_entropy_chunks' logits_of).
inline auto plain_logits(const at::Tensor& h, const at::Tensor& weight) {
  return [&h, weight_t = weight.t()](int64_t r0, int64_t n) {
    return at::mm(h.narrow(0, r0, n), weight_t);
  };
}

// float32 loss (as the reference, which takes the loss of logits.float()); float64 inputs get a
// float64 loss so that gradcheck sees full precision.
inline at::ScalarType linear_cross_entropy_loss_dtype(const at::Tensor& h) {
  return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// -- quantize --------------------------------------------------------------------------------
inline void check_block_args(int64_t block_size, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits: expected 8 or 4, got ", bits);
  TORCH_CHECK(block_size >= 1, "block_size: expected a positive block size, got ", block_size);
  TORCH_CHECK(bits == 8 || block_size % 2 == 0,
              "block_size: expected an even block size for 4-bit codes (two per byte), got ",
              block_size);
}

// Bytes of codes for n values: one per value at 8 bits, two values per byte at 4 bits.
inline int64_t data_bytes(int64_t n, int64_t bits) { return bits == 8 ? n : (n + 1) / 2; }

// dequantize_blockwise's arguments beyond data's device type (checked by the caller): scales
// beside data, dtypes, block arguments, and data/scales sized for shape. Returns the value count.
inline int64_t check_dequantize_args(const at::Tensor& data, const at::Tensor& scales,
                                     at::IntArrayRef shape, int64_t block_size, int64_t bits,
                                     at::ScalarType dtype) {
  TORCH_CHECK(scales.device() == data.device(), "scales: expected device ", data.device(),
              " (the device of data), got ", scales.device());
  TORCH_CHECK(data.scalar_type() == at::kByte, "data: expected uint8, got ", data.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales: expected float32, got ",
              scales.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "dtype: expected float32 or bfloat16, got ", dtype);
  check_block_args(block_size, bits);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{data, "data"},
                                std::pair<const at::Tensor&, const char*>{scales, "scales"}}) {
    TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D tensor, got ", t.dim(), "-D with sizes ",
                t.sizes());
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                t.strides(), " for sizes ", t.sizes());
  }
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "shape: expected non-negative sizes, got ", shape);
    n *= s;
  }
  const int64_t n_blocks = (n + block_size - 1) / block_size;
  TORCH_CHECK(data.numel() == data_bytes(n, bits), "data: expected ", data_bytes(n, bits),
              " bytes for ", n, " values at ", bits, " bits, got ", data.numel());
  TORCH_CHECK(scales.numel() == n_blocks, "scales: expected ", n_blocks, " blocks of ",
              block_size, " for ", n, " values, got ", scales.numel());
  return n;
}

// -- causal_attention_decode ------------------------------------------------------------------
// The scales of the KV caches: none for float caches; for int8 caches (k_cache and v_cache both
// int8) one float32 absmax / 127 per cached vector, sizes (B, nh, Tmax), on the caches' device.
// Returns whether the caches are int8.
inline bool check_decode_cache_scales(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const c10::optional<at::Tensor>& k_scale,
                                      const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache: expected dtype ",
              k_cache.scalar_type(), " (the dtype of k_cache), got ", v_cache.scalar_type());
  const bool quantized = k_cache.scalar_type() == at::kChar;
  const std::pair<const c10::optional<at::Tensor>*, const char*> scales[] = {
      {&k_scale, "k_scale"}, {&v_scale, "v_scale"}};
  for (const auto& [s, name] : scales) {
    if (!quantized) {
      TORCH_CHECK(!s->has_value(), name, ": given with a ", k_cache.scalar_type(),
                  " cache; scales go with int8 caches only");
      continue;
    }
    TORCH_CHECK(s->has_value(), name, ": required with an int8 cache (float32, sizes [B, nh, ",
                "Tmax]: one scale per cached vector), got None");
    const at::Tensor& t = **s;
    TORCH_CHECK(t.device() == k_cache.device(), name, ": expected device ", k_cache.device(),
                " (the device of k_cache), got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
                t.scalar_type());
    check_sizes(t, {k_cache.size(0), k_cache.size(1), k_cache.size(2)}, name);
  }
  return quantized;
}

// -- int8 linear -----------------------------------------------------------------------------
// The leading activation of int8_linear_forward/backward (x or grad_y, (M, K)): 2-D, contiguous,
// float32 or bfloat16. Its device type is the device file's to check.
inline void check_int8_activations(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, ": expected a 2-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), name, ": expected a contiguous tensor, got strides ", x.strides(),
              " for sizes ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              ": expected float32 or bfloat16, got ", x.scalar_type());
}

// t on ref's device (ref_name: the leading activation).
inline void check_on_device_of(const at::Tensor& t, const at::Tensor& ref, const char* name,
                               const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(),
              " (the device of ", ref_name, "), got ", t.device());
}

// int8 codes (rows, cols) and their float32 scales (scale_len,), contiguous, on ref's device.
inline void check_int8_codes(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& ref,
                             const char* ref_name, int64_t rows, int64_t cols, int64_t scale_len,
                             const char* name, const char* scales_name) {
  check_on_device_of(codes, ref, name, ref_name);
  TORCH_CHECK(codes.scalar_type() == at::kChar, name, ": expected int8 codes, got ",
              codes.scalar_type());
  check_sizes(codes, {rows, cols}, name);
  TORCH_CHECK(codes.is_contiguous(), name, ": expected a contiguous tensor");
  check_on_device_of(scales, ref, scales_name, ref_name);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, scales_name, ": expected float32, got ",
              scales.scalar_type());
  check_sizes(scales, {scale_len}, scales_name);
  TORCH_CHECK(scales.is_contiguous(), scales_name, ": expected a contiguous tensor");
}

// The names a linear's weight, bias and codes go by in an int8 op's errors.
struct Int8WeightNames {
  const char* weight = "weight";
  const char* bias = "bias";
  const char* codes = "w_codes";
  const char* scales = "w_scales";
};

// A linear's float weight (N, K), its codes per output channel and optional float32 bias (N,) in
// an int8 op whose leading activation is ref (ref_name); returns N.
inline int64_t check_int8_weight(const at::Tensor& ref, const char* ref_name, int64_t K,
                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& w_codes, const at::Tensor& w_scales,
                                 const Int8WeightNames& names = {}) {
  TORCH_CHECK(weight.dim() == 2, names.weight, ": expected a 2-D tensor, got ", weight.dim(), "-D");
  const int64_t N = weight.size(0);
  check_sizes(weight, {N, K}, names.weight);
  check_int8_codes(w_codes, w_scales, ref, ref_name, N, K, N, names.codes, names.scales);
  if (bias.has_value() && bias->defined()) {
    check_on_device_of(*bias, ref, names.bias, ref_name);
    TORCH_CHECK(bias->scalar_type() == at::kFloat, names.bias, ": expected float32, got ",
                bias->scalar_type());
    check_sizes(*bias, {N}, names.bias);
    TORCH_CHECK(bias->is_contiguous(), names.bias, ": expected a contiguous tensor");
  }
  return N;
}

// int8_linear_forward's arguments beside x (checked by check_int8_activations); returns N.
inline int64_t check_int8_linear_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const at::Tensor& w_codes,
                                              const at::Tensor& w_scales) {
  return check_int8_weight(x, "x", x.size(1), weight, bias, w_codes, w_scales);
}

// x's row codes and scales given to an int8 op that would otherwise make them from x (M, K):
// both or neither; returns whether they were given.
inline bool check_given_row_codes(const at::Tensor& x, const c10::optional<at::Tensor>& x_codes,
                                  const c10::optional<at::Tensor>& x_scales) {
  const bool codes = x_codes.has_value() && x_codes->defined();
  const bool scales = x_scales.has_value() && x_scales->defined();
  TORCH_CHECK(codes == scales, "x_codes and x_scales: expected both or neither, got ",
              codes ? "x_codes only" : "x_scales only");
  if (codes) {
    check_int8_codes(*x_codes, *x_scales, x, "x", x.size(0), x.size(1), x.size(0), "x_codes",
                     "x_scales");
  }
  return codes;
}

// int8_linear_backward's arguments beside grad_y (checked by check_int8_activations); returns K.
inline int64_t check_int8_linear_backward_args(const at::Tensor& grad_y, const at::Tensor& pre,
                                               const at::Tensor& x_saved,
                                               const at::Tensor& x_scales,
                                               const at::Tensor& w_codes,
                                               const at::Tensor& w_scales, bool gelu,
                                               bool int8_weight_grad) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  const int64_t K = w_codes.dim() == 2 ? w_codes.size(1) : -1;
  check_int8_codes(w_codes, w_scales, grad_y, "grad_y", N, K, N, "w_codes", "w_scales");
  if (gelu) {
    check_like(pre, grad_y, "pre", "grad_y");
    check_sizes(pre, {M, N}, "pre");
  }
  if (int8_weight_grad) {
    check_int8_codes(x_saved, x_scales, grad_y, "grad_y", M, K, M, "x_saved", "x_scales");
  } else {
    check_like(x_saved, grad_y, "x_saved", "grad_y");
    check_sizes(x_saved, {M, K}, "x_saved");
  }
  return K;
}

// -- adamw -----------------------------------------------------------------------------------
template <typename acc_t>
struct AdamWScalars {
  acc_t decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size;
  acc_t grad_scale;  // each gradient element is multiplied by it first (gradient clipping)
};

template <typename acc_t>
AdamWScalars<acc_t> adamw_scalars(double lr, double beta1, double beta2, double eps,
                                  double weight_decay, int64_t step, double grad_scale) {
  // As torch.optim.AdamW computes them, in double, before they meet the tensors.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<acc_t>(1.0 - lr * weight_decay), static_cast<acc_t>(1.0 - beta1),
          static_cast<acc_t>(beta2),                   static_cast<acc_t>(1.0 - beta2),
          static_cast<acc_t>(std::sqrt(bc2)),          static_cast<acc_t>(eps),
          static_cast<acc_t>(-(lr / bc1)),            static_cast<acc_t>(grad_scale)};
}


// The arguments of adamw_step_ (masters empty; params float32 or float64, moments of the
// params' dtype, or bfloat16 for float32 params where bf16_state_ok) and of adamw_master_step_
// (bfloat16 params and grads, float32 masters and moments): hyperparameters, list lengths, and
// per parameter its device type, dtype and contiguity and its companions' device, dtype and
// shape. Returns the parameters' dtype (undefined when there are none).
inline c10::ScalarType check_adamw_args(c10::DeviceType device_type, at::TensorList params,
                                        at::TensorList masters, bool with_masters,
                                        at::TensorList grads, at::TensorList exp_avgs,
                                        at::TensorList exp_avg_sqs, double lr, double beta1,
                                        double beta2, double eps, double weight_decay,
                                        int64_t step, double grad_scale,
                                        bool bf16_state_ok = false) {
  TORCH_CHECK(lr >= 0, "lr: expected a non-negative value, got ", lr);
  TORCH_CHECK(grad_scale >= 0 && grad_scale <= std::numeric_limits<double>::max(),
              "grad_scale: expected a finite non-negative value, got ", grad_scale);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "beta1: expected a value in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "beta2: expected a value in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0, "eps: expected a non-negative value, got ", eps);
  TORCH_CHECK(weight_decay >= 0, "weight_decay: expected a non-negative value, got ", weight_decay);
  TORCH_CHECK(step >= 1, "step: expected the 1-based step count (>= 1), got ", step);
  const size_t n = params.size();
  auto check_length = [n](at::TensorList list, const char* name) {
    TORCH_CHECK(list.size() == n, name, ": expected ", n, " tensors (one per param), got ",
                list.size());
  };
  if (with_masters) check_length(masters, "master_params");
  check_length(grads, "grads");
  check_length(exp_avgs, "exp_avgs");
  check_length(exp_avg_sqs, "exp_avg_sqs");
  if (n == 0) return c10::ScalarType::Undefined;
  const auto param_dtype = with_masters ? at::kBFloat16 : params[0].scalar_type();
  TORCH_CHECK(with_masters || param_dtype == at::kFloat || param_dtype == at::kDouble,
              "params[0]: expected float32 or float64 (bfloat16 parameters go through "
              "adamw_master_step_), got ", param_dtype);
  auto state_dtype = with_masters ? at::kFloat : param_dtype;
  if (!with_masters && param_dtype == at::kFloat && exp_avgs[0].scalar_type() == at::kBFloat16) {
    TORCH_CHECK(bf16_state_ok, "exp_avgs[0]: bfloat16 moments have no ", device_type,
                " kernel in this build (CPU only); keep them float32 on this device");
    state_dtype = at::kBFloat16;
  }
  auto check_tensor = [&](const at::Tensor& t, const std::string& name, c10::ScalarType dtype) {
    TORCH_CHECK(t.device().type() == device_type, name, ": expected a ", device_type,
                " tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                t.strides(), " for sizes ", t.sizes());
  };
  for (size_t i = 0; i < n; ++i) {
    const std::string pn = "params[" + std::to_string(i) + "]";
    check_tensor(params[i], pn, param_dtype);
    TORCH_CHECK(params[i].device() == params[0].device(), pn, ": expected device ",
                params[0].device(), " (the device of params[0]), got ", params[i].device());
    auto companion = [&](at::TensorList list, const char* list_name, c10::ScalarType dtype) {
      const std::string name = std::string(list_name) + "[" + std::to_string(i) + "]";
      check_tensor(list[i], name, dtype);
      TORCH_CHECK(list[i].device() == params[i].device(), name, ": expected device ",
                  params[i].device(), " (the device of ", pn, "), got ", list[i].device());
      check_sizes(list[i], params[i].sizes(), name.c_str());
    };
    if (with_masters) companion(masters, "master_params", at::kFloat);
    companion(grads, "grads", param_dtype);
    companion(exp_avgs, "exp_avgs", state_dtype);
    companion(exp_avg_sqs, "exp_avg_sqs", state_dtype);
  }
  return param_dtype;
}

}  // namespace ryzen_llm
