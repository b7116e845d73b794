// The pieces of the level-4 int8 linear (linear.cpp) that the int8 feed-forward
// (int8_feed_forward.cpp) composes: one quantization rule, one GEMM + dequantization.
#pragma once

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <tuple>

#include "fast_math.h"

namespace ryzen_llm {

// The int8 code of v (already multiplied by 1 / scale): round half to even, clamped to
// [-127, 127]. Callers pass v through memory (an array), not as a fresh product: fused into one
// expression GCC would contract the multiply that made v into the rounding add (FMA) and round a
// different value than reference.int8_quantize.
RYZEN_LLM_INLINE int8_t int8_code(float v) {
  float r = (v + kRoundMagic) - kRoundMagic;
  r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

// A row's scale from its absolute maximum and its codes of v (N floats, overwritten by v / scale).
RYZEN_LLM_INLINE void row_codes(float* v, float amax, int bad, float* scale, int8_t* codes,
                                int64_t N) {
  float inv;
  int8_scale(amax, bad, scale, &inv);
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) v[n] = v[n] * inv;
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) codes[n] = int8_code(v[n]);
}

// The row codes and scale of v (N floats, overwritten): int8_quantize's of a row holding v.
RYZEN_LLM_INLINE void quantize_row(float* v, float* scale, int8_t* codes, int64_t N) {
  float amax = 0.0f;
  int bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n) {
    const float m = std::fabs(v[n]);
    bad |= !(m <= FLT_MAX);
    amax = m > amax ? m : amax;
  }
  row_codes(v, amax, bad, scale, codes, N);
}

// Row codes and scales (rows) and/or column codes and scales (cols) of x (M, K), float32 or
// bfloat16, contiguous; col_mult (K,) scales x's columns for the row codes and row_mult (M,) its
// rows for the column codes (float32, contiguous; undefined: not scaled). With col_sums (cols
// only) also the float32 column sums of x, from the same read.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize(
    const at::Tensor& x, bool rows, bool cols, at::Tensor* col_sums,
    const at::Tensor& col_mult = at::Tensor(), const at::Tensor& row_mult = at::Tensor());

// Row codes (rows, K) and scales (rows,) of x (rows, K), float32 or bfloat16 bits, in the calling
// thread: int8_quantize's, for a kernel that has just written those rows (still in cache).
void quantize_rows(const float* x, int64_t rows, int64_t K, int8_t* codes, float* scales);
void quantize_rows(const uint16_t* x, int64_t rows, int64_t K, int8_t* codes, float* scales);

// x's row codes and scales: the given ones (its producer's, checked against x; *given = true)
// or int8_quantize's of x.
std::tuple<at::Tensor, at::Tensor> rows_of(const at::Tensor& x,
                                           const c10::optional<at::Tensor>& given_codes,
                                           const c10::optional<at::Tensor>& given_scales,
                                           bool* given);

// One row of a GELU'd layer's epilogue, for the int8 linear and fc1 of the int8 feed-forward:
// pre = acc * rs * cs (+ bias) stored as E, and out(n, v) with v the GELU of the stored (rounded)
// pre-activation, which backward differentiates, stored as E. kBias is a template argument: a
// null test inside the loop was vectorized as masked loads from the null bias, each a microcode
// assist on Zen 4.
template <typename E, bool kBias, typename Out>
RYZEN_LLM_INLINE void gelu_epilogue_row(const int32_t* acc, float rs, const float* cs,
                                        const float* bias, typename E::raw_t* pre, Out&& out,
                                        int64_t N) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    float u = static_cast<float>(acc[n]) * (rs * cs[n]);
    if constexpr (kBias) u += bias[n];
    const auto p = E::store(u);
    pre[n] = p;
    out(n, E::store(gelu_value(static_cast<float>(E::load(p)))));
  }
}

// y (M, N) (and pre with gelu) = (a (M, K) @ b (K, N)) * row_scales * col_scales + bias, GELU'd
// when gelu; the int32 sums through int8_gemm, each block of rows dequantized as it arrives.
void gemm_dequantize(const at::Tensor& a, const at::Tensor& b, const float* row_scales,
                     const float* col_scales, const float* bias, bool gelu, at::Tensor& y,
                     at::Tensor& pre);

}  // namespace ryzen_llm
