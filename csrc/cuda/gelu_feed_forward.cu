// Bias + exact-erf GELU on CUDA, alone and inside the feed-forward fc2(GELU(fc1(x))).
// bias_gelu forward: one grid-stride pass reads x and the bias row and writes GELU(x + b).
// Backward: one kernel reads grad_y and x once per element, writes grad_x and keeps grad_bias
// partial sums per strip of rows in registers (threads own columns, so warps read whole rows:
// coalesced); a second kernel adds the strips in a fixed order (deterministic).
// gelu_feed_forward: the GEMMs are ATen's (cuBLAS) through at::mm/at::addmm, bias + GELU one pass
// over the fc1 output (pre-activation in place, activation beside it); backward fuses dGELU with
// the grad_b1 reduction (and with recomputing the activation when recompute is set).
#include "cuda_common.cuh"
#include "op_checks.h"
#include "common.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace ryzen_llm {
namespace cuda {
namespace {

// Phi(u) = 0.5 erfc(-u / sqrt2); GELU(u) = u Phi(u); GELU'(u) = Phi(u) + u phi(u).
__device__ __forceinline__ float gelu_value(float u) { return 0.5f * u * erfcf(-u * 0.70710678118654752f); }
__device__ __forceinline__ double gelu_value(double u) { return 0.5 * u * erfc(-u * 0.70710678118654752440); }
__device__ __forceinline__ float gelu_grad(float u) {
  return 0.5f * erfcf(-u * 0.70710678118654752f) + u * 0.398942280401432678f * expf(-0.5f * u * u);
}
__device__ __forceinline__ double gelu_grad(double u) {
  return 0.5 * erfc(-u * 0.70710678118654752440) +
         u * 0.39894228040143267794 * exp(-0.5 * u * u);
}

// u = in + bias rounded to the storage dtype (the saved pre-activation and the activation must
// describe the same tensor, as on CPU). `pre` may alias `in`.
template <typename scalar_t, typename acc_t>
__global__ void bias_gelu_forward_kernel(const scalar_t* in, const scalar_t* __restrict__ bias,
                                         scalar_t* pre, scalar_t* __restrict__ act, int64_t n,
                                         int64_t F) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const scalar_t u = static_cast<scalar_t>(static_cast<acc_t>(in[i]) +
                                             static_cast<acc_t>(bias[i % F]));
    if (pre != nullptr) pre[i] = u;
    act[i] = static_cast<scalar_t>(gelu_value(static_cast<acc_t>(u)));
  }
}

// grad_in = grad * GELU'(u), u = round(in + bias) (or in when bias is null); act = GELU(u) when
// non-null (recompute). Column c = blockIdx.x * blockDim.x + threadIdx.x, rows of strip blockIdx.y;
// the strip's unrounded column sum goes to partial[blockIdx.y * F + c]. grad_in may alias grad.
template <typename scalar_t, typename acc_t>
__global__ void bias_gelu_backward_kernel(const scalar_t* grad, const scalar_t* __restrict__ in,
                                          const scalar_t* __restrict__ bias, scalar_t* grad_in,
                                          scalar_t* __restrict__ act, acc_t* __restrict__ partial,
                                          int64_t N, int64_t F, int64_t rows_per_strip) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= F) return;
  const int64_t begin = blockIdx.y * rows_per_strip;
  const int64_t end = min(N, begin + rows_per_strip);
  const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
  acc_t sum = 0;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i = r * F + c;
    acc_t u = static_cast<acc_t>(in[i]);
    if (bias != nullptr) u = static_cast<acc_t>(static_cast<scalar_t>(u + b));
    const acc_t d = static_cast<acc_t>(grad[i]) * gelu_grad(u);
    if (act != nullptr) act[i] = static_cast<scalar_t>(gelu_value(u));
    grad_in[i] = static_cast<scalar_t>(d);
    sum += d;
  }
  partial[blockIdx.y * F + c] = sum;
}

template <typename scalar_t, typename acc_t>
__global__ void sum_strips_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out,
                                  int64_t strips, int64_t F) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= F) return;
  acc_t s = 0;
  for (int64_t k = 0; k < strips; ++k) s += partial[k * F + c];
  out[c] = static_cast<scalar_t>(s);
}

void bias_gelu_forward_impl(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre,
                            const at::Tensor& act) {
  const int64_t F = in.size(-1), n = in.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "bias_gelu_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int threads = 256;
    bias_gelu_forward_kernel<scalar_t, acc_t><<<elementwise_blocks(n, threads), threads, 0, stream>>>(
        in.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
        pre.defined() ? pre.data_ptr<scalar_t>() : nullptr, act.data_ptr<scalar_t>(), n, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Returns grad_bias (dtype of grad); writes grad_in (and act when defined).
at::Tensor bias_gelu_backward_impl(const at::Tensor& grad, const at::Tensor& in,
                                   const at::Tensor& bias, const at::Tensor& grad_in,
                                   const at::Tensor& act) {
  const int64_t F = in.size(-1);
  const int64_t N = F > 0 ? in.numel() / F : 0;
  at::Tensor grad_bias = at::empty({F}, grad.options());
  if (F == 0) return grad_bias;
  if (N == 0) return grad_bias.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "bias_gelu_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int threads = 128;
    const int64_t col_blocks = (F + threads - 1) / threads;
    // Enough strips to give every SM a few blocks, at least 16 rows each.
    const int64_t strips = std::max<int64_t>(1, std::min<int64_t>((N + 15) / 16, std::max<int64_t>(1, 1024 / col_blocks)));
    const int64_t rows_per_strip = (N + strips - 1) / strips;
    auto partial = at::empty({strips, F}, in.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    bias_gelu_backward_kernel<scalar_t, acc_t><<<dim3(col_blocks, strips), threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(),
        bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, grad_in.data_ptr<scalar_t>(),
        act.defined() ? act.data_ptr<scalar_t>() : nullptr, partial.data_ptr<acc_t>(), N, F,
        rows_per_strip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_strips_kernel<scalar_t, acc_t><<<(F + 255) / 256, 256, 0, stream>>>(
        partial.data_ptr<acc_t>(), grad_bias.data_ptr<scalar_t>(), strips, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_bias;
}

void check_float_input(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  check_float_dtype_cuda(t, name);
  check_contiguous(t, name);
}


at::Tensor bias_gelu_forward_cuda(const at::Tensor& x, const at::Tensor& bias) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a 0-D tensor");
  check_like(bias, x, "bias", "x");
  check_shape(bias, {x.size(-1)}, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  bias_gelu_forward_impl(x, bias, at::Tensor(), y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           const at::Tensor& bias) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a 0-D tensor");
  check_like(grad_y, x, "grad_y", "x");
  check_shape(grad_y, x.sizes(), "grad_y");
  check_like(bias, x, "bias", "x");
  check_shape(bias, {x.size(-1)}, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_bias = bias_gelu_backward_impl(grad_y, x, bias, grad_x, at::Tensor());
  return {grad_x, grad_bias};
}

FeedForwardShape check_feed_forward(const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2) {
  check_float_input(x, "x");
  return check_feed_forward_shapes(x, w1, b1, w2, b2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_feed_forward_forward_cuda(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, bool recompute) {
  const auto s = check_feed_forward(x, w1, b1, w2, b2);
  const c10::cuda::CUDAGuard guard(x.device());
  return feed_forward_forward(x, s, w1, b1, w2, b2, recompute, bias_gelu_forward_impl);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gelu_feed_forward_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                                const at::Tensor& w2, const at::Tensor& h_pre,
                                const at::Tensor& h_act, bool recompute) {
  check_cuda(x, "x");
  check_float_dtype_cuda(x, "x");
  const auto s = check_feed_forward_backward_args(grad_y, x, w1, w2, h_pre, h_act, recompute);
  const c10::cuda::CUDAGuard guard(x.device());
  return feed_forward_backward(
      grad_y, x, s, w1, w2, h_pre, h_act, recompute,
      [](const at::Tensor& grad, const at::Tensor& in, const at::Tensor& grad_in,
         const at::Tensor& act) { return bias_gelu_backward_impl(grad, in, at::Tensor(), grad_in, act); });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("bias_gelu_forward", &cuda::bias_gelu_forward_cuda);
  m.impl("bias_gelu_backward", &cuda::bias_gelu_backward_cuda);
  m.impl("gelu_feed_forward_forward", &cuda::gelu_feed_forward_forward_cuda);
  m.impl("gelu_feed_forward_backward", &cuda::gelu_feed_forward_backward_cuda);
}

}  // namespace ryzen_llm
