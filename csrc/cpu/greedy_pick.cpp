// What the engine needs from each row of a decode step's logits, in one op: the greedy token (the
// first index of the largest value, as torch.argmax), its log-probability under softmax (what
// log_softmax gives there: -log(sum(exp(x - max)))) and the row's log-sum-exp (for the
// log-probability of a sampled token, x[token] - lse). It replaces log_softmax, argmax and a
// gather, three ops and three passes over the logits (benchmarks/bench_greedy_pick.py times
// both). Rows with a NaN (or +inf) get NaN log-probabilities, and the
// first NaN (else the first maximum) as token, as torch.argmax picks. Inference only.
#include "common.h"
#include "fast_math.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace ryzen_llm {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// sum over the row of exp(x - mx), mx the row's maximum (NaN when the row has a NaN or mx is
// infinite: x - mx is then NaN somewhere).
RYZEN_LLM_TARGET_CLONES float sum_exp(const float* x, int64_t V, float mx) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) sum += exp_nonpositive(x[v] - mx);
  return sum;
}

// The row's maximum (NaNs ignored) and the first index holding it.
#if defined(RYZEN_LLM_AVX512)
RYZEN_LLM_AVX512_TARGET std::pair<float, int64_t> max_first_avx512(const float* x, int64_t V) {
  __m512 best = _mm512_set1_ps(kNegInf);
  __m512i where = _mm512_setzero_si512();
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t v = 0; v < V; v += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, V - v));
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 xv = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), m, x + v);
    const __mmask16 gt = _mm512_cmp_ps_mask(xv, best, _CMP_GT_OQ);  // strict: a lane keeps its first
    best = _mm512_mask_mov_ps(best, gt, xv);
    where = _mm512_mask_mov_epi32(where, gt, at);
    at = _mm512_add_epi32(at, step);
  }
  const float mx = _mm512_reduce_max_ps(best);
  // the smallest index among the lanes that hold the maximum (lane indexes fit int32: V < 2^31)
  const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(mx), _CMP_EQ_OQ);
  const int first = _mm512_mask_reduce_min_epi32(top, where);
  return {mx, static_cast<int64_t>(first)};
}
#endif

std::pair<float, int64_t> max_first(const float* x, int64_t V) {
#if defined(RYZEN_LLM_AVX512)
  if (avx512_available() && V < (int64_t{1} << 31)) return max_first_avx512(x, V);
#endif
  float mx = kNegInf;
  int64_t first = 0;
  for (int64_t v = 0; v < V; ++v)
    if (x[v] > mx) mx = x[v], first = v;
  return {mx, first};
}

void pick_row(const float* x, int64_t V, int64_t* token, float* logprob, float* lse) {
  auto [mx, first] = max_first(x, V);
  const float sum = sum_exp(x, V, mx);
  if (std::isfinite(sum) && sum > 0.0f) {
    *token = first;
    const float log_sum = std::log(sum);
    *logprob = -log_sum;
    *lse = mx + log_sum;
    return;
  }
  // a NaN, +inf, or nothing but -inf: torch.argmax takes the first NaN, else the first maximum
  const float* nan = std::find_if(x, x + V, [](float f) { return f != f; });
  *token = nan != x + V ? nan - x : first;
  *logprob = std::numeric_limits<float>::quiet_NaN();
  *lse = nan != x + V ? std::numeric_limits<float>::quiet_NaN() : mx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_pick_cpu(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  check_dim(logits, 2, "logits");
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "logits: expected float32, got ",
              logits.scalar_type());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "logits: expected at least one column (the vocabulary), got sizes ",
              logits.sizes());
  const at::Tensor x = logits.contiguous();
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options());
  auto lse = at::empty({B}, logits.options());
  const float* xp = x.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  at::parallel_for(0, B, row_grain(V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) pick_row(xp + b * V, V, tp + b, lp + b, sp + b);
  });
  return {tokens, logprobs, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) { m.impl("greedy_pick", &greedy_pick_cpu); }

}  // namespace ryzen_llm
