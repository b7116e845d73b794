// Helpers shared by the CUDA kernels: argument checks for device tensors and block reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

namespace ryzen_llm {
namespace cuda {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
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
