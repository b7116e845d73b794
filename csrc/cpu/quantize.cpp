// Block-wise absmax quantization: the flattened tensor is cut into blocks of block_size values;
// each block stores scale = absmax / qmax (float32) and q = round(x / scale) in [-qmax, qmax]
// (qmax 127 for 8 bits, stored as int8 bits in uint8; qmax 7 for 4 bits, two values per byte,
// q + 8 in the low nibble for the even element). One read of x per pass (absmax, then quantize,
// the block still in L1) and one write of N or N/2 bytes plus 4 bytes per block: memory-bound.
// Stochastic rounding adds u in [0, 1) from a counter hash of (seed, offset + element index)
// before floor(), so it is reproducible and independent of the thread count.
// Special cases: a block holding NaN or +-inf gets scale NaN and zero codes (it dequantizes to
// NaN everywhere); an all-zero block (or one with absmax < ~1.5e-36) has scale 0; the last block may be short; empty in, empty out.
#include "common.h"
#include "cpu/avx512_codes.h"
#include "op_checks.h"
#include "stochastic_round.h"
#include "fast_math.h"

#include <torch/library.h>

#include <cfloat>
#include <cstring>
#include <vector>

namespace ryzen_llm {
namespace {

template <typename scalar_t>
RYZEN_LLM_TARGET_CLONES void quantize_blocks(
    const typename Elem<scalar_t>::raw_t* x, int64_t n, int64_t block_size, int bits,
    bool stochastic, SeedKey key, uint64_t offset, int64_t block_begin, int64_t block_end,
    uint8_t* data, float* scales, float* v, int32_t* q) {
  using E = Elem<scalar_t>;
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * block_size;
    const int64_t len = std::min(block_size, n - start);
    const auto* xb = x + start;
    float amax = 0.0f;
    int nonfinite = 0;
#pragma omp simd reduction(max : amax) reduction(| : nonfinite)
    for (int64_t i = 0; i < len; ++i) {
      const float a = std::fabs(static_cast<float>(E::load(xb[i])));
      nonfinite |= !(a <= FLT_MAX);  // NaN or inf
      amax = a > amax ? a : amax;
    }
    float scale = amax / qmax;
    float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    if (!(inv <= FLT_MAX)) {  // absmax below ~1.5e-36: 1/scale overflows, the block flushes to 0
      scale = 0.0f;
      inv = 0.0f;
    }
    if (nonfinite) {
      scale = __builtin_nanf("");
      inv = 0.0f;  // every code 0: the block reads back as NaN * 0 = NaN
    }
    scales[b] = scale;
    // v = x / scale goes through memory before it is rounded: in one expression GCC would fuse
    // the multiply into the add (FMA) and round a different value than the reference does.
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(E::load(xb[i])) * inv;
    if (stochastic) {
      const uint64_t base = offset + static_cast<uint64_t>(start);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        float r = std::floor(v[i] + uniform_at(base + i, key));
        r = r < -qmax ? -qmax : (r > qmax ? qmax : r);
        q[i] = static_cast<int32_t>(r);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        float r = (v[i] + kRoundMagic) - kRoundMagic;
        r = r < -qmax ? -qmax : (r > qmax ? qmax : r);
        q[i] = static_cast<int32_t>(r);
      }
    }
    if (bits == 8) {
      uint8_t* out = data + start;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = static_cast<uint8_t>(q[i]);
    } else {
      // block_size is even, so a block starts on a byte; a short odd last block pads with code 8 (0).
      if (len & 1) q[len] = 0;
      uint8_t* out = data + start / 2;
      const int64_t bytes = (len + 1) / 2;
#pragma omp simd
      for (int64_t j = 0; j < bytes; ++j) {
        out[j] = static_cast<uint8_t>((q[2 * j] + 8) | ((q[2 * j + 1] + 8) << 4));
      }
    }
  }
}

#if defined(RYZEN_LLM_AVX512)
// The 8-bit, round-to-nearest blocks [block_begin, block_end), all full, of a block_size that is
// a multiple of 16: quantize_blocks' values (the same scale, v = x * inv rounded half to even
// by vcvtps2dq, clamped, the low byte stored), in registers: quantize_blocks' five short loops
// per 64-value block cost more than the work itself.
template <typename raw_t>
RYZEN_LLM_AVX512_TARGET void quantize_blocks8_avx512(const raw_t* x, int64_t block_size,
                                                     int64_t block_begin, int64_t block_end,
                                                     uint8_t* data, float* scales) {
  if constexpr (std::is_same_v<raw_t, double>) {
    return;  // fp64 (gradcheck) never takes this path
  } else {
    const __m512 finite_max = _mm512_set1_ps(FLT_MAX);
    for (int64_t b = block_begin; b < block_end; ++b) {
      const raw_t* xb = x + b * block_size;
      uint8_t* out = data + b * block_size;
      __m512 m = _mm512_setzero_ps();
      __mmask16 nonfinite = 0;
      for (int64_t i = 0; i < block_size; i += 16) {
        const __m512 a = _mm512_abs_ps(load16(xb + i));
        nonfinite |= _mm512_cmp_ps_mask(a, finite_max, _CMP_NLE_UQ);  // NaN or inf
        m = _mm512_max_ps(m, a);
      }
      if (nonfinite) {  // scale NaN, zero codes, as quantize_blocks writes them
        scales[b] = __builtin_nanf("");
        std::memset(out, 0, static_cast<size_t>(block_size));
        continue;
      }
      float scale = _mm512_reduce_max_ps(m) / 127.0f;
      float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
      if (!(inv <= FLT_MAX)) {
        scale = 0.0f;
        inv = 0.0f;
      }
      scales[b] = scale;
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < block_size; i += 16) {
        store16_codes(reinterpret_cast<int8_t*>(out + i), _mm512_mul_ps(load16(xb + i), vinv));
      }
    }
  }
}
#endif

template <typename scalar_t>
RYZEN_LLM_TARGET_CLONES void dequantize_blocks(
    const uint8_t* data, const float* scales, int64_t n, int64_t block_size, int bits,
    int64_t block_begin, int64_t block_end, typename Elem<scalar_t>::raw_t* out) {
  using E = Elem<scalar_t>;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * block_size;
    const int64_t len = std::min(block_size, n - start);
    const float scale = scales[b];
    auto* ob = out + start;
    if (bits == 8) {
      const int8_t* db = reinterpret_cast<const int8_t*>(data + start);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) ob[i] = E::store(static_cast<float>(db[i]) * scale);
    } else {
      const uint8_t* db = data + start / 2;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const int32_t code = (db[i >> 1] >> ((i & 1) * 4)) & 0xF;
        ob[i] = E::store(static_cast<float>(code - 8) * scale);
      }
    }
  }
}


int64_t grain_blocks(int64_t block_size) {
  return std::max<int64_t>(1, 32768 / block_size);
}

// Non-contiguous x is quantized in its logical (row-major) element order, through one copy.
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, int64_t block_size,
                                                          int64_t bits, bool stochastic,
                                                          int64_t seed, int64_t offset) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x: expected float32 or bfloat16, got ", x.scalar_type());
  check_block_args(block_size, bits);
  TORCH_CHECK(offset >= 0, "offset: expected a non-negative element offset, got ", offset);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const int64_t n_blocks = (n + block_size - 1) / block_size;
  auto data = at::empty({data_bytes(n, bits)}, x.options().dtype(at::kByte));
  auto scales = at::empty({n_blocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {data, scales};
  const SeedKey key = seed_key(seed);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "quantize_blockwise", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const auto* xp = Elem<scalar_t>::ptr(xc);
      uint8_t* dp = data.data_ptr<uint8_t>();
      float* sp = scales.data_ptr<float>();
      // full blocks through the AVX-512 path where it applies; the rest through the portable one
      int64_t fast_end = 0;
#if defined(RYZEN_LLM_AVX512)
      if (bits == 8 && !stochastic && block_size % 16 == 0 && avx512_available() &&
          !std::is_same_v<scalar_t, double>) {
        fast_end = n / block_size;
      }
#endif
      at::parallel_for(0, n_blocks, grain_blocks(block_size), [&](int64_t begin, int64_t end) {
        const int64_t split = std::min(std::max(begin, fast_end), end);
#if defined(RYZEN_LLM_AVX512)
        if (split > begin) quantize_blocks8_avx512(xp, block_size, begin, split, dp, sp);
#endif
        if (split == end) return;
        std::vector<float> v(block_size);
        std::vector<int32_t> q(block_size + 1);
        quantize_blocks<scalar_t>(xp, n, block_size, static_cast<int>(bits), stochastic, key,
                                  static_cast<uint64_t>(offset), split, end, dp, sp, v.data(),
                                  q.data());
      });
    }
  });
  return {data, scales};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& data, const at::Tensor& scales,
                                    at::IntArrayRef shape, int64_t block_size, int64_t bits,
                                    at::ScalarType dtype) {
  check_cpu(data, "data");
  const int64_t n = check_dequantize_args(data, scales, shape, block_size, bits, dtype);
  const int64_t n_blocks = (n + block_size - 1) / block_size;
  auto out = at::empty(shape, data.options().dtype(dtype));
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "dequantize_blockwise", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      auto* op = Elem<scalar_t>::ptr(out);
      const uint8_t* dp = data.data_ptr<uint8_t>();
      const float* sp = scales.data_ptr<float>();
      at::parallel_for(0, n_blocks, grain_blocks(block_size), [&](int64_t begin, int64_t end) {
        dequantize_blocks<scalar_t>(dp, sp, n, block_size, static_cast<int>(bits), begin, end, op);
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace ryzen_llm
