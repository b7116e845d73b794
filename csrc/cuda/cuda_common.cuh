// Helpers shared by the CUDA kernels: argument checks for device tensors and block reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace ryzen_llm {
namespace cuda {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

// The CPU kernels' float dtypes plus float16, which only the CUDA kernels take.
inline void check_float_dtype_cuda(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, name,
              ": expected float32, float64, bfloat16 or float16, got ", d);
}

// A kernel that needs more than the default 48 KB of dynamic shared memory must ask for it.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Blocks for a grid-stride elementwise kernel over n items: enough to fill the GPU, no more.
inline int64_t elementwise_blocks(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds at least 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  T total = threadIdx.x < warps ? shared[threadIdx.x] : T(0);
  if (warp == 0) total = warp_sum(total);
  if (threadIdx.x == 0) shared[0] = total;
  __syncthreads();
  return shared[0];
}

inline int threads_for_row(int64_t C) {
  int t = 32;
  while (t < 1024 && t < C) t <<= 1;
  return t;
}

}  // namespace cuda
}  // namespace ryzen_llm
