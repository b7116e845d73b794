// torch.optim.AdamW's step on CUDA for many tensors: multi-tensor launches, each over a table of
// up to kTensorsPerLaunch tensors passed by value as a kernel argument (no host-to-device copy):
// blockIdx.y picks the tensor, blocks along x stride over its elements. Each element is read
// once and written once (p, m, v read and written, g read: 28 bytes per float32 parameter, the
// memory-bound minimum). The arithmetic follows torch's sequence (mul_, lerp_, mul_ + addcmul_,
// sqrt / bc2_sqrt + eps, addcdiv_) with the scalars computed in double on the host, as the CPU op.
// adamw_master_step_ runs the same on float32 masters of bfloat16 params and writes them rounded.
#include "cuda_common.cuh"
#include "op_checks.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace ryzen_llm {
namespace cuda {
namespace {

constexpr int kTensorsPerLaunch = 32;
constexpr int kThreads = 256;


// param_t: stored parameter and gradient type; acc_t: moments (and master) type.
template <typename param_t, typename acc_t>
struct TensorTable {
  param_t* param[kTensorsPerLaunch];
  acc_t* master[kTensorsPerLaunch];  // null without master copies
  const param_t* grad[kTensorsPerLaunch];
  acc_t* exp_avg[kTensorsPerLaunch];
  acc_t* exp_avg_sq[kTensorsPerLaunch];
  int64_t numel[kTensorsPerLaunch];
};

__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

template <typename param_t, typename acc_t>
__global__ void adamw_multi_tensor_kernel(TensorTable<param_t, acc_t> table, AdamWScalars<acc_t> s) {
  const int t = blockIdx.y;
  const int64_t n = table.numel[t];
  param_t* param = table.param[t];
  acc_t* master = table.master[t];
  const param_t* grad = table.grad[t];
  acc_t* exp_avg = table.exp_avg[t];
  acc_t* exp_avg_sq = table.exp_avg_sq[t];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t g = static_cast<acc_t>(grad[i]) * s.grad_scale;  // grad.mul_(scale)
    acc_t p = master != nullptr ? master[i] : static_cast<acc_t>(param[i]);
    p = p * s.decay;                                                 // param.mul_(1 - lr * wd)
    const acc_t m = exp_avg[i] + s.one_minus_beta1 * (g - exp_avg[i]);  // lerp_(grad, 1 - b1)
    acc_t v = exp_avg_sq[i] * s.beta2;                                   // mul_(b2)
    v = v + s.one_minus_beta2 * g * g;                                   // addcmul_(g, g, 1 - b2)
    const acc_t denom = sqrt_acc(v) / s.bc2_sqrt + s.eps;
    p = p + s.neg_step_size * m / denom;                                 // addcdiv_(m, denom, -step_size)
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (master != nullptr) master[i] = p;
    param[i] = static_cast<param_t>(p);
  }
}

// Launches over params in groups of kTensorsPerLaunch (empty tensors skipped).
template <typename param_t, typename acc_t>
void launch_groups(at::TensorList params, at::TensorList masters, at::TensorList grads,
                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs, AdamWScalars<acc_t> s) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  TensorTable<param_t, acc_t> table{};
  int count = 0;
  int64_t max_numel = 0;
  auto flush = [&] {
    if (count == 0) return;
    const int64_t blocks_x = std::min<int64_t>((max_numel + kThreads - 1) / kThreads, 1024);
    adamw_multi_tensor_kernel<param_t, acc_t><<<dim3(blocks_x, count), kThreads, 0, stream>>>(table, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count = 0;
    max_numel = 0;
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    table.param[count] = static_cast<param_t*>(params[i].data_ptr());
    table.master[count] = masters.empty() ? nullptr : static_cast<acc_t*>(masters[i].data_ptr());
    table.grad[count] = static_cast<const param_t*>(grads[i].data_ptr());
    table.exp_avg[count] = static_cast<acc_t*>(exp_avgs[i].data_ptr());
    table.exp_avg_sq[count] = static_cast<acc_t*>(exp_avg_sqs[i].data_ptr());
    table.numel[count] = n;
    max_numel = std::max(max_numel, n);
    if (++count == kTensorsPerLaunch) flush();
  }
  flush();
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double grad_scale) {
  const auto dtype = check_adamw_args(c10::DeviceType::CUDA, params, {}, false, grads, exp_avgs,
                                      exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                                      grad_scale);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES(dtype, "adamw_step_cuda", [&] {
    launch_groups<scalar_t, scalar_t>(
        params, {}, grads, exp_avgs, exp_avg_sqs,
        adamw_scalars<scalar_t>(lr, beta1, beta2, eps, weight_decay, step, grad_scale));
  });
}

void adamw_master_step_cuda(at::TensorList params, at::TensorList master_params,
                            at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                            double eps, double weight_decay, int64_t step, double grad_scale) {
  check_adamw_args(c10::DeviceType::CUDA, params, master_params, true, grads, exp_avgs,
                   exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  launch_groups<c10::BFloat16, float>(
      params, master_params, grads, exp_avgs, exp_avg_sqs,
      adamw_scalars<float>(lr, beta1, beta2, eps, weight_decay, step, grad_scale));
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("adamw_step_", &cuda::adamw_step_cuda);
  m.impl("adamw_master_step_", &cuda::adamw_master_step_cuda);
}

}  // namespace ryzen_llm
