// AVX-512 pieces of the CPU int8 quantizers (csrc/cpu/quantize.cpp, csrc/cpu/linear.cpp): CPU
// translation units only (the CUDA sources include common.h, not this).
#pragma once

#include "common.h"

#if defined(RYZEN_LLM_AVX512)
namespace ryzen_llm {
// 16 float32 or bfloat16 (raw bits) values as float32 lanes.
RYZEN_LLM_AVX512_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
RYZEN_LLM_AVX512_TARGET inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
// 16 int8 codes of v (already multiplied by 1 / scale) as int8_code writes them: rounded half to
// even (vcvtps2dq under the default rounding mode), clamped to [-127, 127], 0 for NaN.
RYZEN_LLM_AVX512_TARGET inline void store16_codes(int8_t* out, __m512 v) {
  __m512i q = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
  q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(q));
}
}  // namespace ryzen_llm
#endif
