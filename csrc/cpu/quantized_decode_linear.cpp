// y = x @ W.T + bias (optionally GELU'd) for decode-shaped GEMMs with quantized weights, packed
// once by ryzen_llm.ops.quantized_decode_linear. Activations are quantized per row (int8 format)
// or per group of 32 along K (int4 format) to int8 at run time, and the products are summed
// exactly in int32 by AVX512-VNNI vpdpbusd (u8 x s8, 64 multiply-adds per instruction); floats
// appear only in the epilogue. Memory traffic: each weight byte is read once per call (1 byte per
// weight for int8, 0.625 for int4 with its scales) and reused from L1/L2 by every group of up to
// 4 rows; x's codes are M * K bytes.
//
// int8 format: int8 (ceil(N/16), ceil(K/4) + 2, 64). Block b holds outputs 16b..16b+15; row kk
// is 16 lanes of 4 consecutive K codes (lane j: w[16b+j][4kk..4kk+3]), then one row of 16 float32
// scales (absmax/127 per output) and one of 16 int32 corrections 128 * sum_k w. x's codes enter
// as u8 (q + 128), so sum_k (q+128) w - 128 sum_k w = sum_k q w, exactly.
// int4 format: uint8 (ceil(N/16), 5 * ceil(K/32), 64). Per block and group of 32 K: 4 rows of
// codes, lane j byte t of row z holding w[16b+j][32g+8z+t] + 8 (low nibble) and
// w[16b+j][32g+8z+4+t] + 8 (high nibble), then one row of 16 float32 group scales. The nibbles are
// unsigned (0..15), x's codes signed, so sum (w+8) q - 8 sum q = sum w q per group.
//
// Batch invariance: each row's codes and scale depend on that row alone, the int32 sums are
// exact, and the float epilogue (and the int4 sum over groups, in K order) is the same vector
// code for every output whatever the tile: a row's bits do not depend on M, its neighbours or the
// thread count. The float multiplies and adds are never fused (no FMA), so the plain-PyTorch
// references (reference.quantized_decode_linear_int8/int4) reproduce them bit for bit.
#include "common.h"
#include "fast_math.h"
#include "cpu/quantized_decode_linear.h"

#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

namespace ryzen_llm {
namespace {

constexpr int64_t kGroup = 32;        // int4: K values per weight scale and per activation scale
constexpr int64_t kInt4GroupRows = 5;  // int4: 64-byte rows per (block, group): 4 codes, 1 scales

struct Epilogue {
  const float* bias;  // (N,) or nullptr
  bool gelu;
};

// ---- activations ------------------------------------------------------------------------
// Codes of len values of x: scale = absmax / 127, q = round_half_even(x * (1 / scale)) clamped
// to [-127, 127]; written as q + offset (offset 128: the u8 operand of vpdpbusd; 0: int8). A run
// holding NaN or inf gets scale NaN and zero codes (its outputs are NaN); an all-zero run, or
// one whose 1 / scale overflows, gets scale 0 and zero codes. Returns the scale; *sum receives
// the sum of the q (the int4 correction). reference.quantize_activations_int8 is the same math.
// The scale of a run: int8_scale (fast_math.h).

#if defined(RYZEN_LLM_AVX512)
// quantize_run below with AVX-512, 16 values at a time (the same operations per value: a
// multiply, a round to nearest even, a clamp): a prefill quantizes hundreds of rows per linear.
template <int Offset>
RYZEN_LLM_AVX512_TARGET float quantize_run_avx512(const float* x, int64_t len, uint8_t* q,
                                                 int32_t* sum) {
  const __m512 big = _mm512_set1_ps(FLT_MAX);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - i)) - 1u);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i));
    bad |= _mm512_mask_cmp_ps_mask(m, a, big, _CMP_NLE_UQ);  // NaN or inf
    vmax = _mm512_max_ps(vmax, a);
  }
  float scale, inv;
  int8_scale(_mm512_reduce_max_ps(vmax), bad != 0, &scale, &inv);
  if (bad != 0) {  // a non-finite run: every code 0
    std::memset(q, Offset, len);
    if (sum != nullptr) *sum = 0;
    return scale;
  }
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f),
               hi = _mm512_set1_ps(127.0f);
  __m512i vsum = _mm512_setzero_si512();
  for (i = 0; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - i)) - 1u);
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vinv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i qi = _mm512_cvtps_epi32(v);
    vsum = _mm512_add_epi32(vsum, qi);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(qi, _mm512_set1_epi32(Offset))));
  }
  if (sum != nullptr) *sum = _mm512_reduce_add_epi32(vsum);
  return scale;
}
#endif

template <int Offset>
RYZEN_LLM_TARGET_CLONES float quantize_run_portable(const float* x, int64_t len, uint8_t* q,
                                                    int32_t* sum) {
  float amax = 0.0f;
  int nonfinite = 0;
#pragma omp simd reduction(max : amax) reduction(| : nonfinite)
  for (int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(x[i]);
    nonfinite |= !(a <= FLT_MAX);
    amax = a > amax ? a : amax;
  }
  float scale, inv;
  int8_scale(amax, nonfinite != 0, &scale, &inv);
  int32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) {
    float v = std::nearbyint(x[i] * inv);
    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
    v = v == v ? v : 0.0f;  // NaN * 0 in a non-finite run
    const int32_t qi = static_cast<int32_t>(v);
    s += qi;
    q[i] = static_cast<uint8_t>(qi + Offset);
  }
  if (sum != nullptr) *sum = s;
  return scale;
}

template <int Offset>
float quantize_run(const float* x, int64_t len, uint8_t* q, int32_t* sum) {
#if defined(RYZEN_LLM_AVX512)
  if (avx512_available()) return quantize_run_avx512<Offset>(x, len, q, sum);
#endif
  return quantize_run_portable<Offset>(x, len, q, sum);
}

// int8 format: each row of x (M, K) -> ldq u8 codes (q + 128; the pad 128 meets zero weights)
// and one scale per row.
void quantize_rows_u8(const float* x, int64_t M, int64_t K, int64_t ldq, uint8_t* q,
                      float* scales) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)),
                   [&](int64_t m0, int64_t m1) {
                     for (int64_t m = m0; m < m1; ++m) {
                       uint8_t* qm = q + m * ldq;
                       scales[m] = quantize_run<128>(x + m * K, K, qm, nullptr);
                       std::memset(qm + K, 128, ldq - K);
                     }
                   });
}

// int4 format: each row of x (M, K) -> G * 32 int8 codes (zero pad), per (row, group) a scale and
// 8 * sum of its codes (the correction for the weights' unsigned nibbles).
void quantize_groups_s8(const float* x, int64_t M, int64_t K, int64_t G, int8_t* q, float* scales,
                        int32_t* corr) {
  const int64_t ldq = G * kGroup;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)),
                   [&](int64_t m0, int64_t m1) {
                     for (int64_t m = m0; m < m1; ++m) {
                       uint8_t* qm = reinterpret_cast<uint8_t*>(q + m * ldq);
                       std::memset(qm, 0, ldq);
                       for (int64_t g = 0; g < G; ++g) {
                         const int64_t len = std::min(kGroup, K - g * kGroup);
                         int32_t s = 0;
                         scales[m * G + g] =
                             quantize_run<0>(x + m * K + g * kGroup, len, qm + g * kGroup, &s);
                         corr[m * G + g] = 8 * s;
                       }
                     }
                   });
}

#if defined(RYZEN_LLM_AVX512)
// Multiplies and adds through builtins that GCC never contracts into an FMA (the plain
// intrinsics are vector arithmetic it may fuse): the references round after every operation.
RYZEN_LLM_INLINE RYZEN_LLM_VNNI_TARGET __m512 mul_ps(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_CUR_DIRECTION);
}
RYZEN_LLM_INLINE RYZEN_LLM_VNNI_TARGET __m512 add_ps(__m512 a, __m512 b) {
  return _mm512_add_round_ps(a, b, _MM_FROUND_CUR_DIRECTION);
}

RYZEN_LLM_INLINE RYZEN_LLM_VNNI_TARGET __m512i broadcast4(const void* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return _mm512_set1_epi32(word);
}

// v (16 outputs of one row, before bias) through the epilogue into y[n .. n + valid).
RYZEN_LLM_INLINE RYZEN_LLM_VNNI_TARGET void store16(__m512 v, const float* b, bool gelu, float* y,
                                                  __mmask16 m) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  epilogue16(t, b, gelu);
  _mm512_mask_storeu_ps(y, m, _mm512_load_ps(t));
}

// int8 format: R rows against NV blocks of 16 outputs; R * NV int32 sums in flight over all K.
template <int R, int NV>
RYZEN_LLM_VNNI_TARGET void int8_tile(const uint8_t* xq, int64_t ldq, const float* xs,
                                     const int8_t* w, int64_t K4, int64_t b0, int64_t nblocks,
                                     float* y, int64_t N, Epilogue ep) {
  const int64_t bstride = (K4 + 2) * 64;
  const int8_t* wb[NV];
  for (int j = 0; j < NV; ++j) wb[j] = w + std::min<int64_t>(b0 + j, nblocks - 1) * bstride;
  __m512i acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < K4; ++kk) {
    __m512i wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(wb[j] + kk * 64);
    for (int i = 0; i < R; ++i) {
      const __m512i xv = broadcast4(xq + i * ldq + 4 * kk);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
    }
  }
  for (int j = 0; j < NV && b0 + j < nblocks; ++j) {
    const int64_t n = (b0 + j) * 16;
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - n)) - 1u);
    const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(wb[j] + K4 * 64));
    const __m512i corr = _mm512_loadu_si512(wb[j] + (K4 + 1) * 64);
    alignas(64) float b[16];
    _mm512_store_ps(b, ep.bias != nullptr ? _mm512_maskz_loadu_ps(m, ep.bias + n)
                                          : _mm512_setzero_ps());
    for (int i = 0; i < R; ++i) {
      const __m512 s = mul_ps(_mm512_set1_ps(xs[i]), ws);
      const __m512 v = mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], corr)), s);
      store16(v, b, ep.gelu, y + i * N + n, m);
    }
  }
}

// int4 format: R rows against NV blocks; per group of 32 K an exact int32 sum, then the float
// sum over groups in K order (y += float(sum) * (x scale * w scale)).
template <int R, int NV>
RYZEN_LLM_VNNI_TARGET void int4_tile(const int8_t* xq, int64_t ldq, const float* xs,
                                     const int32_t* xc, int64_t G, const uint8_t* w, int64_t b0,
                                     int64_t nblocks, float* y, int64_t N, Epilogue ep) {
  const int64_t bstride = G * kInt4GroupRows * 64;
  const uint8_t* wb[NV];
  for (int j = 0; j < NV; ++j) wb[j] = w + std::min<int64_t>(b0 + j, nblocks - 1) * bstride;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 yacc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) yacc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[R][NV];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int z = 0; z < 4; ++z) {
      __m512i lo[NV], hi[NV];
      for (int j = 0; j < NV; ++j) {
        const __m512i v = _mm512_loadu_si512(wb[j] + (g * kInt4GroupRows + z) * 64);
        lo[j] = _mm512_and_si512(v, low4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      for (int i = 0; i < R; ++i) {
        const int8_t* xr = xq + i * ldq + g * kGroup + 8 * z;
        const __m512i x0 = broadcast4(xr), x1 = broadcast4(xr + 4);
        for (int j = 0; j < NV; ++j) {
          acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], x0);
          acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], x1);
        }
      }
    }
    for (int j = 0; j < NV; ++j) {
      const __m512 ws = _mm512_loadu_ps(
          reinterpret_cast<const float*>(wb[j] + (g * kInt4GroupRows + 4) * 64));
      for (int i = 0; i < R; ++i) {
        const __m512 s = mul_ps(_mm512_set1_ps(xs[i * G + g]), ws);
        const __m512i d = _mm512_sub_epi32(acc[i][j], _mm512_set1_epi32(xc[i * G + g]));
        yacc[i][j] = add_ps(yacc[i][j], mul_ps(_mm512_cvtepi32_ps(d), s));
      }
    }
  }
  for (int j = 0; j < NV && b0 + j < nblocks; ++j) {
    const int64_t n = (b0 + j) * 16;
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - n)) - 1u);
    alignas(64) float b[16];
    _mm512_store_ps(b, ep.bias != nullptr ? _mm512_maskz_loadu_ps(m, ep.bias + n)
                                          : _mm512_setzero_ps());
    for (int i = 0; i < R; ++i) store16(yacc[i][j], b, ep.gelu, y + i * N + n, m);
  }
}

// Blocks b0..b1-1 of every row: a panel of NV blocks (in L1/L2) against groups of up to 4 rows.
// tile(r, m, b) runs rows m..m+r-1 against the panel starting at block b.
template <int NV, typename Tile>
RYZEN_LLM_INLINE void panels(int64_t M, int64_t b0, int64_t b1, Tile tile) {
  for (int64_t b = b0; b < b1; b += NV) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>(), m, b);
    switch (M - m) {
      case 3: tile(std::integral_constant<int, 3>(), m, b); break;
      case 2: tile(std::integral_constant<int, 2>(), m, b); break;
      case 1: tile(std::integral_constant<int, 1>(), m, b); break;
      default: break;
    }
  }
}
#endif

// ---- the portable path: the same integer sums and the same float operations in plain loops ----
// (no multiversioning and no FP contraction: the epilogue must round like the AVX-512 one)
__attribute__((optimize("fp-contract=off"))) void int8_blocks_portable(
    const uint8_t* xq, int64_t ldq, const float* xs, const int8_t* w, int64_t K4, int64_t M,
    int64_t b0, int64_t b1, float* y, int64_t N, Epilogue ep) {
  const int64_t bstride = (K4 + 2) * 64;
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* wb = w + b * bstride;
    float ws[16];
    int32_t corr[16];
    std::memcpy(ws, wb + K4 * 64, sizeof(ws));
    std::memcpy(corr, wb + (K4 + 1) * 64, sizeof(corr));
    float bias[16] = {0};
    for (int j = 0; j < 16 && b * 16 + j < N; ++j)
      if (ep.bias != nullptr) bias[j] = ep.bias[b * 16 + j];
    for (int64_t m = 0; m < M; ++m) {
      int32_t acc[16] = {0};
      const uint8_t* xr = xq + m * ldq;
      for (int64_t kk = 0; kk < K4; ++kk)
        for (int j = 0; j < 16; ++j)
          for (int t = 0; t < 4; ++t)
            acc[j] += static_cast<int32_t>(xr[4 * kk + t]) * wb[kk * 64 + 4 * j + t];
      float v[16];
      for (int j = 0; j < 16; ++j) {
        const float s = xs[m] * ws[j];
        v[j] = static_cast<float>(acc[j] - corr[j]) * s;
      }
      epilogue16(v, bias, ep.gelu);
      for (int j = 0; j < 16 && b * 16 + j < N; ++j) y[m * N + b * 16 + j] = v[j];
    }
  }
}

__attribute__((optimize("fp-contract=off"))) void int4_blocks_portable(
    const int8_t* xq, int64_t ldq, const float* xs, const int32_t* xc, int64_t G,
    const uint8_t* w, int64_t M, int64_t b0, int64_t b1, float* y, int64_t N, Epilogue ep) {
  const int64_t bstride = G * kInt4GroupRows * 64;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* wb = w + b * bstride;
    float bias[16] = {0};
    for (int j = 0; j < 16 && b * 16 + j < N; ++j)
      if (ep.bias != nullptr) bias[j] = ep.bias[b * 16 + j];
    for (int64_t m = 0; m < M; ++m) {
      float v[16] = {0};
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* wg = wb + g * kInt4GroupRows * 64;
        const int8_t* xr = xq + m * ldq + g * kGroup;
        int32_t acc[16] = {0};
        for (int z = 0; z < 4; ++z)
          for (int j = 0; j < 16; ++j)
            for (int t = 0; t < 4; ++t) {
              const uint8_t byte = wg[z * 64 + 4 * j + t];
              acc[j] += (byte & 0x0F) * xr[8 * z + t] + (byte >> 4) * xr[8 * z + 4 + t];
            }
        float ws[16];
        std::memcpy(ws, wg + 4 * 64, sizeof(ws));
        for (int j = 0; j < 16; ++j) {
          const float s = xs[m * G + g] * ws[j];
          v[j] = v[j] + static_cast<float>(acc[j] - xc[m * G + g]) * s;
        }
      }
      epilogue16(v, bias, ep.gelu);
      for (int j = 0; j < 16 && b * 16 + j < N; ++j) y[m * N + b * 16 + j] = v[j];
    }
  }
}

}  // namespace

at::Tensor quantized_decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, bool gelu,
                                       int64_t out_features) {
  check_decode_linear_input(x, weight);
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == 64 &&
                  (int8 || weight.scalar_type() == at::kByte),
              "weight: expected a packed quantized weight, int8 (ceil(N/16), ceil(K/4) + 2, 64) "
              "or int4 as uint8 (ceil(N/16), 5 * ceil(K/32), 64), got ", weight.scalar_type(),
              " of sizes ", weight.sizes());
  check_contiguous(weight, "weight");
  const int64_t M = x.size(0), K = x.size(1), nblocks = weight.size(0);
  const int64_t K4 = (K + 3) / 4, G = (K + kGroup - 1) / kGroup;
  if (int8) {
    TORCH_CHECK(weight.size(1) == K4 + 2, "weight: an int8 weight packed for ",
                4 * (weight.size(1) - 2), " input features (rounded up to 4), x has ", K);
  } else {
    TORCH_CHECK(weight.size(1) == kInt4GroupRows * G, "weight: an int4 weight packed for ",
                kGroup * (weight.size(1) / kInt4GroupRows),
                " input features (rounded up to 32), x has ", K);
  }
  const int64_t N = out_features >= 0 ? out_features : (bias.has_value() ? bias->numel() : -1);
  TORCH_CHECK(N >= 0, "out_features: required with a packed weight and no bias");
  TORCH_CHECK((N + 15) / 16 == nblocks, "out_features: ", N, " outputs do not fit the packed "
              "weight's ", nblocks, " blocks of 16");
  const Epilogue ep{checked_float_bias(bias, N), gelu};
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Enough weight bytes per task to amortise its start, yet every thread gets blocks at 1 row.
  const int64_t threads = at::get_num_threads();
  const int64_t share = ((nblocks + threads - 1) / threads + 3) / 4 * 4;
  const int64_t grain = std::max<int64_t>(
      4, std::min(share, (16384 / std::max<int64_t>(1, K * M)) / 4 * 4));
  const bool vnni = avx512_vnni_available();
  if (int8) {
    const int64_t ldq = 4 * K4;
    at::Tensor codes = at::empty({M, ldq}, x.options().dtype(at::kByte));
    at::Tensor scales = at::empty({M}, x.options());
    uint8_t* xq = codes.data_ptr<uint8_t>();
    float* xs = scales.data_ptr<float>();
    quantize_rows_u8(xp, M, K, ldq, xq, xs);
    const int8_t* wp = weight.data_ptr<int8_t>();
    at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
#if defined(RYZEN_LLM_AVX512)
      if (vnni) {
        panels<4>(M, b0, b1, [&](auto r, int64_t m, int64_t b) {
          int8_tile<decltype(r)::value, 4>(xq + m * ldq, ldq, xs + m, wp, K4, b, b1, yp + m * N,
                                           N, ep);
        });
        return;
      }
#endif
      int8_blocks_portable(xq, ldq, xs, wp, K4, M, b0, b1, yp, N, ep);
    });
    return y;
  }
  const int64_t ldq = G * kGroup;
  at::Tensor codes = at::empty({M, ldq}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M, G}, x.options());
  at::Tensor corr = at::empty({M, G}, x.options().dtype(at::kInt));
  int8_t* xq = codes.data_ptr<int8_t>();
  float* xs = scales.data_ptr<float>();
  int32_t* xc = corr.data_ptr<int32_t>();
  quantize_groups_s8(xp, M, K, G, xq, xs, xc);
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
#if defined(RYZEN_LLM_AVX512)
    if (vnni) {
      // 1-2 rows: 4 blocks per panel keep 16 sums in flight; 3-4 rows: 2 blocks (registers)
      if (M <= 2) {
        panels<4>(M, b0, b1, [&](auto r, int64_t m, int64_t b) {
          int4_tile<decltype(r)::value, 4>(xq + m * ldq, ldq, xs + m * G, xc + m * G, G, wp, b,
                                           b1, yp + m * N, N, ep);
        });
      } else {
        panels<2>(M, b0, b1, [&](auto r, int64_t m, int64_t b) {
          int4_tile<decltype(r)::value, 2>(xq + m * ldq, ldq, xs + m * G, xc + m * G, G, wp, b,
                                           b1, yp + m * N, N, ep);
        });
      }
      return;
    }
#endif
    int4_blocks_portable(xq, ldq, xs, xc, G, wp, M, b0, b1, yp, N, ep);
  });
  return y;
}

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("quantized_decode_linear", &quantized_decode_linear_cpu);
}

}  // namespace ryzen_llm
