// The counter hash behind stochastic rounding: u in [0, 1) from (seed, element index), the same
// bits on the host, in the CPU kernels and in the CUDA kernels, and equal to
// ryzen_llm.ops.reference.stochastic_uniform. A hash of the index rather than a generator's
// stream, so that the result does not depend on how the work is split across threads or blocks.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RYZEN_LLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RYZEN_LLM_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace ryzen_llm {

struct SeedKey {
  uint32_t lo, hi;
};

// lowbias32 (Chris Wellons' hash-prospector): a full-avalanche 32-bit mix that vectorises.
RYZEN_LLM_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// splitmix64 of the seed, so nearby seeds give unrelated streams (computed once, on the host).
inline SeedKey seed_key(int64_t seed) {
  uint64_t z = static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return {static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32)};
}

// u in [0, 1) with 24 random bits for element index i (offset already added). The product is
// exact (24 bits times a power of two), so a multiply-add contracted around it rounds as the
// separate add would.
RYZEN_LLM_HOST_DEVICE float uniform_at(uint64_t i, SeedKey key) {
  const uint32_t h = mix32(mix32(static_cast<uint32_t>(i) ^ key.lo) ^
                           static_cast<uint32_t>(i >> 32) ^ key.hi);
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace ryzen_llm
