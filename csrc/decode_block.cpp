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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
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

// (x + residual, LayerNorm(x + residual))
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
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
  if (quantized) {
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

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CompositeExplicitAutograd, m) {
  m.impl("decode_block", &decode_block);
}

}  // namespace ryzen_llm
