// Block-wise absmax int8 / 4-bit quantization on CUDA, the CPU kernel's algorithm and bits:
// one warp per quantization block (absmax by warp reduction, then codes), eight warps per thread
// block; the block is read twice (the second read hits L1/L2) and N or N/2 bytes plus 4 bytes per
// block written: memory-bound. Round-to-nearest codes match the CPU kernel and the reference bit
// for bit: x * (1 / scale) with correctly rounded IEEE operations (__fdiv_rn, __fmul_rn, no FMA
// contraction, no flush to zero), rint() = round half to even. Stochastic rounding hashes
// (seed, offset + element index) with the same lowbias32 / splitmix64 functions as the CPU kernel.
// Special cases as on CPU: a block holding NaN or +-inf gets scale NaN and zero codes; a block
// whose 1 / scale overflows gets scale 0; the last block may be short; empty in, empty out.
#include "cuda_common.cuh"
#include "op_checks.h"
#include "stochastic_round.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cfloat>

namespace ryzen_llm {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ int32_t code_of(float x, float inv, float qmax, bool stochastic,
                                           uint64_t index, SeedKey key) {
  const float v = __fmul_rn(x, inv);
  float r = stochastic ? floorf(__fadd_rn(v, uniform_at(index, key))) : rintf(v);
  r = r < -qmax ? -qmax : (r > qmax ? qmax : r);
  return static_cast<int32_t>(r);
}

template <typename scalar_t>
__global__ void quantize_blocks_kernel(const scalar_t* __restrict__ x, int64_t n,
                                       int64_t block_size, int64_t n_blocks, int bits,
                                       bool stochastic, SeedKey key, uint64_t offset,
                                       uint8_t* __restrict__ data, float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= n_blocks) return;  // whole warps leave together
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  const int64_t start = b * block_size;
  const int64_t len = min(block_size, n - start);
  const scalar_t* xb = x + start;
  float amax = 0.0f;
  int nonfinite = 0;
  for (int64_t i = lane; i < len; i += 32) {
    const float a = fabsf(static_cast<float>(xb[i]));
    nonfinite |= !(a <= FLT_MAX);  // NaN or inf
    amax = a > amax ? a : amax;
  }
  amax = warp_max(amax);
  nonfinite = __any_sync(0xffffffffu, nonfinite);
  float scale = __fdiv_rn(amax, qmax);
  float inv = scale > 0.0f ? __fdiv_rn(1.0f, scale) : 0.0f;
  if (!(inv <= FLT_MAX)) {  // absmax below ~1.5e-36: 1/scale overflows, the block flushes to 0
    scale = 0.0f;
    inv = 0.0f;
  }
  if (nonfinite) scale = __int_as_float(0x7fc00000);  // quiet NaN, as on CPU; every code 0 (below)
  if (lane == 0) scales[b] = scale;
  const uint64_t base = offset + static_cast<uint64_t>(start);
  if (bits == 8) {
    for (int64_t i = lane; i < len; i += 32) {
      const int32_t q = nonfinite ? 0 : code_of(static_cast<float>(xb[i]), inv, qmax, stochastic, base + i, key);
      data[start + i] = static_cast<uint8_t>(q);
    }
  } else {
    // block_size is even, so a block starts on a byte; a short odd last block pads with code 8 (0).
    const int64_t bytes = (len + 1) / 2;
    for (int64_t j = lane; j < bytes; j += 32) {
      int32_t q0 = 0, q1 = 0;
      if (!nonfinite) {
        q0 = code_of(static_cast<float>(xb[2 * j]), inv, qmax, stochastic, base + 2 * j, key);
        if (2 * j + 1 < len) {
          q1 = code_of(static_cast<float>(xb[2 * j + 1]), inv, qmax, stochastic, base + 2 * j + 1, key);
        }
      }
      data[start / 2 + j] = static_cast<uint8_t>((q0 + 8) | ((q1 + 8) << 4));
    }
  }
}

template <typename scalar_t>
__global__ void dequantize_kernel(const uint8_t* __restrict__ data, const float* __restrict__ scales,
                                  int64_t n, int64_t block_size, int bits,
                                  scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float scale = scales[i / block_size];
    int32_t code;
    if (bits == 8) {
      code = static_cast<int8_t>(data[i]);
    } else {
      code = static_cast<int32_t>((data[i >> 1] >> ((i & 1) * 4)) & 0xF) - 8;
    }
    out[i] = static_cast<scalar_t>(__fmul_rn(static_cast<float>(code), scale));
  }
}


// Non-contiguous x is quantized in its logical (row-major) element order, through one copy.
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, int64_t block_size,
                                                           int64_t bits, bool stochastic,
                                                           int64_t seed, int64_t offset) {
  check_cuda(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x: expected float32 or bfloat16, got ", x.scalar_type());
  check_block_args(block_size, bits);
  TORCH_CHECK(offset >= 0, "offset: expected a non-negative element offset, got ", offset);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const int64_t n_blocks = (n + block_size - 1) / block_size;
  auto data = at::empty({data_bytes(n, bits)}, x.options().dtype(at::kByte));
  auto scales = at::empty({n_blocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {data, scales};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t grid = (n_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(grid <= 0x7fffffff, "x: too many blocks (", n_blocks, ") for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "quantize_blockwise_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      quantize_blocks_kernel<scalar_t><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), n, block_size, n_blocks, static_cast<int>(bits), stochastic,
          seed_key(seed), static_cast<uint64_t>(offset), data.data_ptr<uint8_t>(),
          scales.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {data, scales};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& data, const at::Tensor& scales,
                                     at::IntArrayRef shape, int64_t block_size, int64_t bits,
                                     at::ScalarType dtype) {
  check_cuda(data, "data");
  const int64_t n = check_dequantize_args(data, scales, shape, block_size, bits, dtype);
  const c10::cuda::CUDAGuard guard(data.device());
  auto out = at::empty(shape, data.options().dtype(dtype));
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "dequantize_blockwise_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      dequantize_kernel<scalar_t><<<elementwise_blocks(n, 256), 256, 0, stream>>>(
          data.data_ptr<uint8_t>(), scales.data_ptr<float>(), n, block_size,
          static_cast<int>(bits), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("quantize_blockwise", &cuda::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &cuda::dequantize_blockwise_cuda);
}

}  // namespace ryzen_llm
