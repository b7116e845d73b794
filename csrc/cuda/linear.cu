// The int8 linear layers of level 4 on CUDA: the ops of csrc/cpu/linear.cpp (int8_quantize,
// int8_dequantize, int8_linear_forward, int8_linear_backward) with the same arguments, results,
// scale folding (grad_y * w_scales for grad_x, grad_y * x_scales for grad_weight) and
// quantization (absmax / 127 per row or column, round half to even, NaN/inf rows and columns ->
// scale NaN and zero codes, all-zero ones -> scale 0; see reference.int8_quantize).
// Composed from ATen ops rather than kernels of its own: the GEMMs are torch._int_mm (cuBLASLt
// int8 tensor cores) where its shape rules allow, else exact float64 products of the codes; the
// quantization and the dequantizing epilogue (scales, bias, GELU) are elementwise and reduction
// ops, each a pass over its tensor: correct and memory-bound, not fused as on the CPU.
#include "cuda_common.cuh"
#include "common.h"
#include "op_checks.h"

#include <torch/library.h>

#include <limits>
#include <tuple>

namespace ryzen_llm {
namespace cuda {
namespace {

// Codes and scales of a 2-D x along dim (1: per row, 0: per column), as reference.int8_quantize.
std::tuple<at::Tensor, at::Tensor> quantize_along(const at::Tensor& x, int64_t dim) {
  const at::Tensor v = x.to(at::kFloat);
  const int64_t other = v.size(1 - dim);
  if (v.size(dim) == 0) {
    return {at::empty(v.sizes(), v.options().dtype(at::kChar)), at::zeros({other}, v.options())};
  }
  const at::Tensor finite = at::isfinite(v).all(dim);
  at::Tensor scale = v.abs().amax(dim).div(127.0);
  at::Tensor inv = at::where(scale.gt(0), scale.reciprocal(), at::zeros_like(scale));
  const at::Tensor overflow = at::isinf(inv);
  scale = at::where(overflow, at::zeros_like(scale), scale);
  inv = at::where(overflow.logical_or(finite.logical_not()), at::zeros_like(inv), inv);
  scale = at::where(finite, scale, at::full_like(scale, std::numeric_limits<float>::quiet_NaN()));
  // x * (1 / scale) is one correctly rounded multiply (no contraction), then half to even
  const at::Tensor codes = at::round(v.mul(inv.unsqueeze(dim))).clamp(-127, 127).to(at::kChar);
  return {codes.contiguous(), scale};
}

// a (M, K) @ b (K, N) of int8 codes as exact int32 sums. cuBLASLt's int8 GEMM takes M > 16 and K,
// N multiples of 8; other shapes (and a cuBLAS that refuses) go through float64, exact for any
// K this library meets (|sum| <= K * 127^2 < 2^53).
at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M > 16 && K % 8 == 0 && N % 8 == 0 && K > 0 && N > 0) {
    try {
      return at::_int_mm(a.contiguous(), b);
    } catch (const c10::Error&) {
      // layouts this cuBLAS does not take: the exact path below
    }
  }
  return at::mm(a.to(at::kDouble), b.to(at::kDouble)).to(at::kInt);
}

// y (and pre with gelu) from exact int32 sums: acc * (row_scale * col_scale) (+ bias) in float32,
// rounded to dtype; GELU of the rounded pre-activation, as the CPU epilogue does.
std::tuple<at::Tensor, at::Tensor> dequantize(const at::Tensor& acc, const at::Tensor& row_scales,
                                              const at::Tensor& col_scales,
                                              const c10::optional<at::Tensor>& bias, bool gelu,
                                              at::ScalarType dtype) {
  at::Tensor u = acc.to(at::kFloat).mul(row_scales.unsqueeze(1).mul(col_scales.unsqueeze(0)));
  if (bias.has_value() && bias->defined()) u = u.add(*bias);
  at::Tensor y = u.to(dtype);
  if (!gelu) return {y, at::empty({0, 0}, acc.options().dtype(dtype))};
  return {at::gelu(y.to(at::kFloat)).to(dtype), y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_quantize_cuda(
    const at::Tensor& x, bool rows, bool cols) {
  check_cuda(x, "x");
  check_int8_activations(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto i8 = x.options().dtype(at::kChar);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor row_codes = at::empty({0, 0}, i8), row_scales = at::empty({0}, f32);
  at::Tensor col_codes = at::empty({0, 0}, i8), col_scales = at::empty({0}, f32);
  if (rows) std::tie(row_codes, row_scales) = quantize_along(x, 1);
  if (cols) std::tie(col_codes, col_scales) = quantize_along(x, 0);
  return {row_codes, row_scales, col_codes, col_scales};
}

std::tuple<at::Tensor, at::Tensor> int8_dequantize_cuda(const at::Tensor& acc,
                                                        const at::Tensor& row_scales,
                                                        const at::Tensor& col_scales,
                                                        const c10::optional<at::Tensor>& bias,
                                                        bool gelu, at::ScalarType dtype) {
  check_cuda(acc, "acc");
  check_dim(acc, 2, "acc");
  TORCH_CHECK(acc.scalar_type() == at::kInt, "acc: expected int32, got ", acc.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "dtype: expected float32 or bfloat16, got ", dtype);
  const int64_t M = acc.size(0), N = acc.size(1);
  for (auto [t, name, len] : {std::tuple{&row_scales, "row_scales", M},
                              std::tuple{&col_scales, "col_scales", N}}) {
    check_cuda(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, ": expected float32, got ", t->scalar_type());
    check_shape(*t, {len}, name);
  }
  if (bias.has_value() && bias->defined()) {
    check_on_device_of(*bias, acc, "bias", "acc");
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias: expected float32, got ",
                bias->scalar_type());
    check_shape(*bias, {N}, "bias");
  }
  const c10::cuda::CUDAGuard guard(acc.device());
  return dequantize(acc, row_scales, col_scales, bias, gelu, dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_linear_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& w_codes, const at::Tensor& w_scales, bool gelu, bool save_codes,
    const c10::optional<at::Tensor>& given_codes, const c10::optional<at::Tensor>& given_scales) {
  check_cuda(x, "x");
  check_int8_activations(x, "x");
  const int64_t M = x.size(0);
  const int64_t N = check_int8_linear_forward_args(x, weight, bias, w_codes, w_scales);
  const bool given = check_given_row_codes(x, given_codes, given_scales);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_codes, x_scales;
  if (given) {  // x's row codes from its producer: not returned, the caller holds them
    x_codes = *given_codes;
    x_scales = *given_scales;
  } else {
    std::tie(x_codes, x_scales) = quantize_along(x, 1);
  }
  at::Tensor y, pre;
  if (M * N == 0) {
    y = at::empty({M, N}, x.options());
    pre = at::empty({gelu ? M : 0, gelu ? N : 0}, x.options());
  } else {
    std::tie(y, pre) = dequantize(int8_mm(x_codes, w_codes.t()), x_scales, w_scales, bias, gelu,
                                  x.scalar_type());
  }
  if (!save_codes || given) {
    x_codes = at::empty({0, 0}, x_codes.options());
    x_scales = at::empty({0}, x_scales.options());
  }
  return {y, pre, x_codes, x_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& pre, const at::Tensor& x_saved,
    const at::Tensor& x_scales, const at::Tensor& w_codes, const at::Tensor& w_scales, bool gelu,
    bool need_grad_x, bool int8_weight_grad) {
  check_cuda(grad_y, "grad_y");
  check_int8_activations(grad_y, "grad_y");
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  const int64_t K = check_int8_linear_backward_args(grad_y, pre, x_saved, x_scales, w_codes,
                                                    w_scales, gelu, int8_weight_grad);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  // The gradient at the GEMM's output, through GELU'(pre) in float32, rounded to grad_y's dtype.
  const at::Tensor g =
      gelu ? at::gelu_backward(grad_y.to(at::kFloat), pre.to(at::kFloat)).to(grad_y.scalar_type())
           : grad_y;
  const at::Tensor grad_bias = g.to(at::kFloat).sum(0);
  const at::Tensor ones = at::ones({K > 0 ? K : 0}, grad_y.options().dtype(at::kFloat));
  at::Tensor grad_x = at::empty({need_grad_x ? M : 0, need_grad_x ? K : 0}, grad_y.options());
  if (need_grad_x && M * K > 0) {  // (g * w_scales) (M, N) @ W_codes (N, K)
    auto [g_rows, g_row_scales] = quantize_along(g.to(at::kFloat).mul(w_scales.unsqueeze(0)), 1);
    grad_x = std::get<0>(dequantize(int8_mm(g_rows, w_codes), g_row_scales, ones, c10::nullopt,
                                    false, grad_y.scalar_type()));
  }
  at::Tensor grad_w;
  if (!int8_weight_grad) {
    grad_w = at::mm(g.t(), x_saved).to(at::kFloat);
  } else if (N * K == 0) {
    grad_w = at::zeros({N, K}, grad_y.options().dtype(at::kFloat));
  } else {  // (g * x_scales).T (N, M) @ x_codes (M, K): summed over the M tokens
    auto [g_cols, g_col_scales] = quantize_along(g.to(at::kFloat).mul(x_scales.unsqueeze(1)), 0);
    grad_w = std::get<0>(dequantize(int8_mm(g_cols.t().contiguous(), x_saved), g_col_scales, ones,
                                    c10::nullopt, false, at::kFloat));
  }
  return {grad_x, grad_w, grad_bias};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("int8_quantize", &cuda::int8_quantize_cuda);
  m.impl("int8_dequantize", &cuda::int8_dequantize_cuda);
  m.impl("int8_linear_forward", &cuda::int8_linear_forward_cuda);
  m.impl("int8_linear_backward", &cuda::int8_linear_backward_cuda);
}

}  // namespace ryzen_llm
