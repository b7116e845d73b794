// Mean cross-entropy of h @ weight.T on CUDA without holding the (N, V) logits: rows in chunks;
// per chunk at::mm (cuBLAS) gives the logits, one thread block per row reads its logits three
// times (max, sum of exp, gradient; the row stays in L2) and turns them in place into
// d(loss)/d(logits) = (softmax - onehot) / n_valid while writing the row's loss term, and two
// more GEMMs give the chunk's grad_h rows and add its share of grad_weight (Liger-Kernel's scheme).
// n_valid stays on the device (the kernel and the final division read it there). Target
// validation costs one device-to-host copy per call, as the CPU op raises on a bad target too;
// while the stream is being captured into a CUDA graph (TrainStep at level 3) no copy is allowed,
// so the check is skipped there and a row with an out-of-range target makes the loss NaN instead
// (TrainStep then raises NonFiniteError before the update).
#include "cuda_common.cuh"
#include "op_checks.h"
#include "common.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <limits>

namespace ryzen_llm {
namespace cuda {
namespace {

// Rows per chunk: about 8 M logits (32 MiB in float32), at least 64 rows for GEMM efficiency.
int64_t rows_per_chunk(int64_t N, int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(N, std::max<int64_t>(64, (int64_t(1) << 23) / V)));
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// One block per row of the chunk. loss_rows (float64) gets lse - logit[target], 0 when ignored.
template <typename scalar_t, typename acc_t>
__global__ void softmax_nll_rows_kernel(scalar_t* __restrict__ logits,
                                        const int64_t* __restrict__ targets, int64_t ignore_index,
                                        const int64_t* __restrict__ n_valid, bool need_grad,
                                        double* __restrict__ loss_rows, int64_t V) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  scalar_t* l = logits + r * V;
  const int64_t t = targets[r];
  const bool in_range = t >= 0 && t < V;
  const bool valid = t != ignore_index && in_range;
  if (t != ignore_index && !in_range) {  // only reachable under graph capture (see the top)
    if (threadIdx.x == 0) loss_rows[r] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  // Mean over zero targets is 0/0 = nan, as in F.cross_entropy; the gradients are then zero.
  const double scale = *n_valid > 0 ? 1.0 / static_cast<double>(*n_valid) : 0.0;
  const acc_t target_logit = valid ? static_cast<acc_t>(l[t]) : acc_t(0);  // read before any write
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const acc_t x = static_cast<acc_t>(l[v]);
    m = x > m ? x : m;
  }
  // Block max through the sum helper's shared buffer: negate-free, via warp_max then shared.
  m = warp_max(m);
  {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = m;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    acc_t mm = threadIdx.x < warps ? shared[threadIdx.x] : -std::numeric_limits<acc_t>::infinity();
    if (warp == 0) mm = warp_max(mm);
    if (threadIdx.x == 0) shared[0] = mm;
    __syncthreads();
    m = shared[0];
  }
  acc_t s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += exp_acc(static_cast<acc_t>(l[v]) - m);
  s = block_sum(s, shared);
  const double lse = static_cast<double>(m) + log_acc(static_cast<double>(s));
  if (threadIdx.x == 0) loss_rows[r] = valid ? lse - static_cast<double>(target_logit) : 0.0;
  if (!need_grad) return;
  // softmax = exp(l - m) / s; grad = (softmax - onehot) * scale, 0 for an ignored row.
  const acc_t row_scale = valid ? static_cast<acc_t>(scale / static_cast<double>(s)) : acc_t(0);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    acc_t g = exp_acc(static_cast<acc_t>(l[v]) - m) * row_scale;
    if (valid && v == t) g -= static_cast<acc_t>(scale);
    l[v] = static_cast<scalar_t>(g);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_cuda(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, bool need_grad_h, bool need_grad_weight) {
  check_cuda(h, "h");
  check_float_dtype_cuda(h, "h");
  const auto shape = check_linear_cross_entropy_args(h, weight, targets);
  const int64_t N = shape.N, V = shape.V;
  const c10::cuda::CUDAGuard guard(h.device());

  const at::Tensor valid = targets.ne(ignore_index);
  const at::Tensor n_valid = valid.sum();  // int64, on the device
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    // One sync: are there out-of-range targets?
    const at::Tensor bad = valid.logical_and(targets.lt(0).logical_or(targets.ge(V)));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.to(at::kInt).argmax().item<int64_t>();
      TORCH_CHECK(false, "targets: id ", targets[i].item<int64_t>(), " at position ", i,
                  " is out of range [0, ", V, ") and is not ignore_index (", ignore_index, ")");
    }
  }

  at::Tensor loss_rows = at::zeros({N}, h.options().dtype(at::kDouble));
  const bool need_grad = need_grad_h || need_grad_weight;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto [grad_h, grad_weight] = linear_cross_entropy_chunks(
      h, weight, shape, rows_per_chunk(N, V), need_grad_h, need_grad_weight,
      plain_logits(h, weight), [&](at::Tensor& logits, int64_t r0, int64_t rows) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "linear_cross_entropy_cuda", [&] {
          using acc_t = at::acc_type<scalar_t, true>;
          softmax_nll_rows_kernel<scalar_t, acc_t><<<rows, threads_for_row(V), 0, stream>>>(
              logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>() + r0, ignore_index,
              n_valid.data_ptr<int64_t>(), need_grad, loss_rows.data_ptr<double>() + r0, V);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  const auto loss_dtype = linear_cross_entropy_loss_dtype(h);
  // float64 sum / int64 count on the device: 0/0 = nan with no valid target.
  at::Tensor loss = loss_rows.sum().div_(n_valid).to(loss_dtype);
  return {loss, grad_h, grad_weight};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("linear_cross_entropy_forward", &cuda::linear_cross_entropy_forward_cuda);
}

}  // namespace ryzen_llm
