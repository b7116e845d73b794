// Branch-free float math that GCC auto-vectorises inside `#pragma omp simd` loops (glibc's scalar
// expf/erff calls would stop vectorisation without -ffast-math). Both functions are only needed
// for non-positive exponents (softmax after subtracting the row max; exp(-x^2/2) in GELU), which
// keeps the 2^k scaling free of overflow handling.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/ATen.h>

// Helpers called from RYZEN_LLM_TARGET_CLONES functions must be always_inline: GCC refuses to
// inline a plain inline function into a clone whose arch= differs, and an out-of-line call in a
// simd loop stops vectorisation.
#define RYZEN_LLM_INLINE inline __attribute__((always_inline))

namespace ryzen_llm {

// Element access that the vectoriser understands: c10::BFloat16's own conversions carry a NaN
// branch and a struct type that stop GCC, so kernels see bfloat16 as raw uint16_t bits.
// Rounding float -> bfloat16 is to nearest even, NaN kept quiet.
template <typename scalar_t>
struct Elem {
  using raw_t = scalar_t;
  using acc_t = scalar_t;
  static RYZEN_LLM_INLINE acc_t load(raw_t v) { return v; }
  static RYZEN_LLM_INLINE raw_t store(acc_t v) { return v; }
  static RYZEN_LLM_INLINE raw_t* ptr(const at::Tensor& t) { return t.data_ptr<scalar_t>(); }
};

template <>
struct Elem<c10::BFloat16> {
  using raw_t = uint16_t;
  using acc_t = float;
  static RYZEN_LLM_INLINE float load(uint16_t v) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
  }
  static RYZEN_LLM_INLINE uint16_t store(float v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
  static RYZEN_LLM_INLINE uint16_t* ptr(const at::Tensor& t) {
    return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>());
  }
};

// exp(x) for x <= 0, about 1 ulp: x = k ln2 + r with |r| <= ln2/2, degree-7 Taylor series for
// e^r (truncation error < 6e-9 relative), 2^k put into the exponent bits. Below -87 the result
// is clamped to exp(-87) ~ 1.6e-38 instead of flushing towards 0: callers multiply it by a
// bounded factor, so the difference is far below any tolerance.
RYZEN_LLM_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693145751953125f;  // ln2 split in a part exact in k * hi and the rest
  r = r - k * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // shifted as unsigned: for a NaN x, k converts to INT_MIN and a signed shift would be undefined
  const float scale =
      __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  return p * scale;
}

// Exact-erf GELU pieces for one pre-activation u, in float:
//   Phi(u) = 0.5 * erfc(-u / sqrt2), GELU(u) = u * Phi(u), GELU'(u) = Phi(u) + u * phi(u).
// erfc(z) for z = |u| / sqrt2 is e^{-z^2} * R(z) with R fitted (least squares, relative error
// 5.5e-9 in exact arithmetic, ~3e-7 evaluated in float) as t * P(t), t = 1 / (1 + z/2), over
// z in [0, 6]; beyond that e^{-z^2} < 3e-16 so R's error no longer matters. Computing the small
// tail erfc(z) directly (instead of 1 - erf) keeps Phi relatively accurate for negative u, where
// torch's 1 + erf(x) formulation loses digits. e^{-z^2} = e^{-u^2/2} is shared with phi(u).
struct GeluParts {
  float phi_cdf;   // Phi(u)
  float exp_term;  // e^{-u^2/2}
};

RYZEN_LLM_INLINE GeluParts gelu_parts(float u) {
  const float z = std::fabs(u) * 0.70710678118654752f;
  const float zc = z < 6.0f ? z : 6.0f;
  const float t = 1.0f / (1.0f + 0.5f * zc);
  float p = 2.483790927e-02f;
  p = p * t - 1.231906787e-01f;
  p = p * t + 1.960303783e-01f;
  p = p * t + 3.661889117e-03f;
  p = p * t - 3.188883960e-01f;
  p = p * t + 2.361984551e-01f;
  p = p * t - 3.683441877e-02f;
  p = p * t + 2.134990245e-01f;
  p = p * t + 2.397719473e-01f;
  p = p * t + 2.828546166e-01f;
  p = p * t + 2.820592523e-01f;
  const float e = exp_nonpositive(-0.5f * u * u);
  const float half_erfc = 0.5f * e * (t * p);  // 0.5 * erfc(z)
  return {u >= 0.0f ? 1.0f - half_erfc : half_erfc, e};
}

constexpr float kInvSqrt2Pi = 0.398942280401432678f;

RYZEN_LLM_INLINE float gelu_value(float u) { return u * gelu_parts(u).phi_cdf; }

RYZEN_LLM_INLINE float gelu_grad(float u) {
  const GeluParts g = gelu_parts(u);
  return g.phi_cdf + u * kInvSqrt2Pi * g.exp_term;
}

// The fp64 path (gradcheck) uses libm.
RYZEN_LLM_INLINE double gelu_value(double u) { return 0.5 * u * std::erfc(-u * 0.70710678118654752440); }

RYZEN_LLM_INLINE double gelu_grad(double u) {
  return 0.5 * std::erfc(-u * 0.70710678118654752440) +
         u * 0.39894228040143267794 * std::exp(-0.5 * u * u);
}

// The epilogue of the decode linears (decode_linear, quantized_decode_linear) on one vector's
// worth of outputs: v += b (bias or zeros), then GELU when asked, on all 16 lanes at once.
RYZEN_LLM_INLINE void epilogue16(float* v, const float* b, bool gelu) {
  if (gelu) {
#pragma omp simd simdlen(16)
    for (int f = 0; f < 16; ++f) v[f] = gelu_value(v[f] + b[f]);
  } else {
#pragma omp simd simdlen(16)
    for (int f = 0; f < 16; ++f) v[f] += b[f];
  }
}

// ---- int8 quantization (absmax / 127) -----------------------------------------------------
// Shared by the int8 kernels (quantized_decode_linear's activations, the level-4 linear's
// activations, gradients and weights): one rule, so that every kernel and
// reference.int8_quantize / quantize_activations_int8 agree bit for bit.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 to nearest even

// The scale and 1 / scale of values with absolute maximum amax: scale = amax / 127; an all-zero
// run, or one whose 1 / scale overflows, gets scale 0 and inv 0 (zero codes); one holding NaN or
// inf (nonfinite) scale NaN and inv 0 (zero codes that read back as NaN).
RYZEN_LLM_INLINE void int8_scale(float amax, bool nonfinite, float* scale, float* inv) {
  *scale = amax / 127.0f;
  *inv = *scale > 0.0f ? 1.0f / *scale : 0.0f;
  if (!(*inv <= FLT_MAX)) {
    *scale = 0.0f;
    *inv = 0.0f;
  }
  if (nonfinite) {
    *scale = __builtin_nanf("");
    *inv = 0.0f;
  }
}

// ---- attention's softmax ------------------------------------------------------------------
// The flash attention kernels (cpu/causal_attention.cpp) keep their own exp and bfloat16 store:
// softmax_exp gives exactly 0 for -inf and below -87 (a masked key contributes nothing), where
// exp_nonpositive clamps to ~1.6e-38; and both are written with memcpy rather than
// __builtin_bit_cast, the form GCC 12 vectorises inside those loops.
// exp for softmax arguments (x <= ~0): Cephes-style range reduction + degree-6 polynomial,
// written so that `#pragma omp simd` loops vectorise it (glibc's expf does not without
// -ffast-math). exp(-inf) and anything below -87 give exactly 0.
RYZEN_LLM_INLINE float softmax_exp(float x) {
  const float lo = -87.0f, hi = 88.0f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // Round to nearest by the 1.5 * 2^23 trick (floor() and __builtin_bit_cast keep GCC 12 from
  // vectorising the loop; memcpy does not). Needs IEEE arithmetic: no -ffast-math.
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // unsigned: see above
  float s;
  std::memcpy(&s, &e, sizeof(s));
  return x < lo ? 0.0f : y * s;
}

// acc -> storage dtype in a form `#pragma omp simd` vectorises (c10's bf16 conversion does not):
// round to nearest even, NaN kept as a quiet NaN.
template <typename scalar_t, typename acc_t>
RYZEN_LLM_INLINE scalar_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    u = v != v ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
    return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}
RYZEN_LLM_INLINE double softmax_exp(double x) { return std::exp(x); }

}  // namespace ryzen_llm
