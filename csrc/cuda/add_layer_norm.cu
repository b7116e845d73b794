// LayerNorm fused with the residual add on CUDA: one thread block per row; the row is read once
// for the statistics (kept in registers-sized chunks through L1) and once for the output.
// Backward: one block per row for grad_input; grad_weight/grad_bias via per-block partial rows
// reduced by a second kernel, in a fixed order (deterministic).
// Mixed dtypes (a float32 x with a reduced-precision residual, out_dtype, grad_out or
// residual_dtype: autocast's residual stream) are converted with casts around the kernels here;
// the CPU kernels read and write them in the same pass.
#include "cuda_common.cuh"
#include "op_checks.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace ryzen_llm {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void add_layer_norm_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, scalar_t* __restrict__ sum, acc_t* __restrict__ mean_out,
    acc_t* __restrict__ rstd_out, int64_t C, double eps) {
  __shared__ acc_t shared[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * C;
  acc_t local = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t s = static_cast<acc_t>(xr[c]);
    if (residual != nullptr) {
      scalar_t rounded = static_cast<scalar_t>(s + static_cast<acc_t>(residual[row * C + c]));
      sum[row * C + c] = rounded;
      s = static_cast<acc_t>(rounded);
    }
    local += s;
  }
  const acc_t mean = block_sum(local, shared) / static_cast<acc_t>(C);
  const scalar_t* src = residual != nullptr ? sum + row * C : xr;
  local = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t d = static_cast<acc_t>(src[c]) - mean;
    local += d * d;
  }
  const acc_t var = block_sum(local, shared) / static_cast<acc_t>(C);
  const acc_t rstd = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t xh = (static_cast<acc_t>(src[c]) - mean) * rstd;
    out[row * C + c] = static_cast<scalar_t>(xh * static_cast<acc_t>(weight[c]) +
                                             static_cast<acc_t>(bias[c]));
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void add_layer_norm_backward_input_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grad_sum,
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
    scalar_t* __restrict__ grad_input, int64_t C) {
  __shared__ acc_t shared[32];
  const int64_t row = blockIdx.x;
  const acc_t m = mean[row], s = rstd[row];
  acc_t sum_g = 0, sum_gx = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t xh = (static_cast<acc_t>(input[row * C + c]) - m) * s;
    acc_t g = static_cast<acc_t>(grad_out[row * C + c]) * static_cast<acc_t>(weight[c]);
    sum_g += g;
    sum_gx += g * xh;
  }
  const acc_t mean_g = block_sum(sum_g, shared) / static_cast<acc_t>(C);
  const acc_t mean_gx = block_sum(sum_gx, shared) / static_cast<acc_t>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t xh = (static_cast<acc_t>(input[row * C + c]) - m) * s;
    acc_t g = static_cast<acc_t>(grad_out[row * C + c]) * static_cast<acc_t>(weight[c]);
    acc_t gi = s * (g - mean_g - xh * mean_gx);
    if (grad_sum != nullptr) gi += static_cast<acc_t>(grad_sum[row * C + c]);
    grad_input[row * C + c] = static_cast<scalar_t>(gi);
  }
}

// Partial column sums of grad_out * xhat and grad_out over a strip of rows per block.y.
template <typename scalar_t, typename acc_t>
__global__ void add_layer_norm_backward_params_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
    acc_t* __restrict__ partial_w, acc_t* __restrict__ partial_b, int64_t N, int64_t C,
    int64_t rows_per_strip) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t begin = blockIdx.y * rows_per_strip;
  const int64_t end = min(N, begin + rows_per_strip);
  acc_t gw = 0, gb = 0;
  for (int64_t r = begin; r < end; ++r) {
    acc_t dy = static_cast<acc_t>(grad_out[r * C + c]);
    gw += dy * (static_cast<acc_t>(input[r * C + c]) - mean[r]) * rstd[r];
    gb += dy;
  }
  partial_w[blockIdx.y * C + c] = gw;
  partial_b[blockIdx.y * C + c] = gb;
}

template <typename scalar_t, typename acc_t>
__global__ void reduce_strips_kernel(const acc_t* __restrict__ partial_w,
                                     const acc_t* __restrict__ partial_b,
                                     scalar_t* __restrict__ grad_weight,
                                     scalar_t* __restrict__ grad_bias, int64_t strips, int64_t C) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t gw = 0, gb = 0;
  for (int64_t s = 0; s < strips; ++s) {
    gw += partial_w[s * C + c];
    gb += partial_b[s * C + c];
  }
  grad_weight[c] = static_cast<scalar_t>(gw);
  grad_bias[c] = static_cast<scalar_t>(gb);
}

// float32 input may come with a bfloat16 or float16 residual, gradient or output.
constexpr at::ScalarType kMixable[] = {at::kBFloat16, at::kHalf};

at::ScalarType stats_dtype(const at::Tensor& x) { return layer_norm_stats_dtype(x); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual_in, const at::Tensor& weight,
    const at::Tensor& bias, double eps, c10::optional<at::ScalarType> out_dtype) {
  check_cuda(x, "input");
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  check_add_layer_norm_forward_args(x, residual_in, weight, bias, eps, out_type, kMixable);
  c10::optional<at::Tensor> residual = residual_in;
  if (residual.has_value() && residual->scalar_type() != x.scalar_type()) {
    residual = residual->to(x.scalar_type()).contiguous();  // the kernel reads input's dtype
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(-1), N = x.numel() / C;
  auto out = at::empty_like(x);
  auto sum = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  auto mean = at::empty(stat_shape, x.options().dtype(stats_dtype(x)));
  auto rstd = at::empty(stat_shape, x.options().dtype(stats_dtype(x)));
  if (N == 0) return {out.to(out_type), sum, mean, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_layer_norm_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    add_layer_norm_forward_kernel<scalar_t, acc_t><<<N, threads_for_row(C), 0, stream>>>(
        x.data_ptr<scalar_t>(), residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
        weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        residual.has_value() ? sum.data_ptr<scalar_t>() : nullptr, mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>(), C, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (out_type != x.scalar_type()) out = out.to(out_type);
  return {out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cuda(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_sum,
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, c10::optional<at::ScalarType> residual_dtype) {
  check_cuda(input, "input");
  const at::ScalarType res_type = residual_dtype.value_or(input.scalar_type());
  const int64_t N = check_add_layer_norm_backward_args(grad_out_in, grad_sum, input, weight, mean,
                                                       rstd, res_type, kMixable);
  const int64_t C = input.size(-1);
  const at::Tensor grad_out = grad_out_in.scalar_type() == input.scalar_type()
                                  ? grad_out_in
                                  : grad_out_in.to(input.scalar_type()).contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  auto grad_input = at::empty_like(input);
  auto grad_weight = at::empty_like(weight);
  auto grad_bias = at::empty_like(weight);
  auto residual_grad = [&] {
    return res_type != input.scalar_type() ? grad_input.to(res_type)
                                           : at::empty({0}, input.options());
  };
  if (N == 0) return {grad_input, grad_weight.zero_(), grad_bias.zero_(), residual_grad()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "add_layer_norm_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    add_layer_norm_backward_input_kernel<scalar_t, acc_t><<<N, threads_for_row(C), 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), grad_sum.has_value() ? grad_sum->data_ptr<scalar_t>() : nullptr,
        input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>(), grad_input.data_ptr<scalar_t>(), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t rows_per_strip = 64;
    const int64_t strips = (N + rows_per_strip - 1) / rows_per_strip;
    auto partial = at::empty({2, strips, C}, input.options().dtype(stats_dtype(input)));
    const dim3 grid((C + 127) / 128, strips);
    add_layer_norm_backward_params_kernel<scalar_t, acc_t><<<grid, 128, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>(), partial[0].data_ptr<acc_t>(), partial[1].data_ptr<acc_t>(), N, C,
        rows_per_strip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_strips_kernel<scalar_t, acc_t><<<(C + 255) / 256, 256, 0, stream>>>(
        partial[0].data_ptr<acc_t>(), partial[1].data_ptr<acc_t>(), grad_weight.data_ptr<scalar_t>(),
        grad_bias.data_ptr<scalar_t>(), strips, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_input, grad_weight, grad_bias, residual_grad()};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("add_layer_norm_forward", &cuda::add_layer_norm_forward_cuda);
  m.impl("add_layer_norm_backward", &cuda::add_layer_norm_backward_cuda);
}

}  // namespace ryzen_llm
