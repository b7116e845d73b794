// int8 linear layers for training (level 4): y = x @ W.T + b with the GEMMs in int8 x int8 ->
// int32, as SwitchBack and similar recipes do. One set of codes per operand, made once:
//
//   forward:      x quantized per row (absmax / 127), W per output channel  -> y
//   grad input:   grad_y @ W = (grad_y * w_scales) @ W_codes: the weight's output-channel
//                 scales folded into grad_y, which is then quantized per row -> grad_x
//   weight grad:  grad_y.T @ x = (grad_y * x_scales).T @ x_codes: x's row scales folded into
//                 grad_y, which is then quantized per column (output channel)
//                                                                          -> grad_W (int8 mode),
//                 or grad_y.T @ x in the activations' dtype (bfloat16 under autocast)
//
// So the forward's codes of W and of x are the only ones: W is quantized once per optimizer
// step, x once per forward, and the codes x's forward GEMM used are what backward keeps.
// Each int32 sum is exact; the dequantization multiplies it by its row's and its column's scale
// (in float32), adds the bias and applies GELU when asked, in one pass (the epilogue). The GEMMs
// run through at::_int_mm (oneDNN: AVX512-VNNI / AMX-int8 where the CPU has them) or the own
// AVX512-VNNI kernel, the faster per shape (int8_gemm.h).
//
// Quantization (int8_quantize) is one op for activations, gradients and weights: per row, per
// column, or both from one read of x for the absolute maxima and one for the codes; the
// backward's calls scale the values first (per column for the row codes, per row for the column
// codes). Codes are round(v * (1 / scale)) half to even, clamped to [-127, 127]; a row or column
// holding NaN or inf gets scale NaN and zero codes (its results read back as NaN, as a float
// GEMM's would); an all-zero one (or one whose 1 / scale overflows) gets scale 0.
#include "common.h"
#include "cpu/avx512_codes.h"
#include "fast_math.h"
#include "op_checks.h"
#include "cpu/int8_gemm.h"
#include "cpu/int8_linear.h"

#include <torch/library.h>

#include <cfloat>
#include <vector>

namespace ryzen_llm {
namespace {

// One row's absolute maximum of x[k] * col_mult[k] (into amax/bad) and, folded into col_amax, the
// columns' maxima of x[k] * rm, +inf for a NaN or inf (finite values are <= FLT_MAX: a column
// maximum of +inf marks the column non-finite, without a flag array beside it, which kept GCC
// from vectorising this loop at full width); kSum also adds the row into col_sum.
template <typename E, bool kSum>
RYZEN_LLM_INLINE void absmax_row_and_columns(const typename E::raw_t* xr, int64_t K,
                                             const float* col_mult, float rm, float& amax,
                                             int& bad, float* col_amax, float* col_sum) {
  float m = amax;
  int b = bad;
#pragma omp simd reduction(max : m) reduction(| : b)
  for (int64_t k = 0; k < K; ++k) {
    const float v = E::load(xr[k]);
    const float a = std::fabs(v * col_mult[k]);
    float c = std::fabs(v * rm);
    c = c <= FLT_MAX ? c : INFINITY;
    b |= !(a <= FLT_MAX);
    m = a > m ? a : m;
    col_amax[k] = c > col_amax[k] ? c : col_amax[k];
    if constexpr (kSum) col_sum[k] += v;
  }
  amax = m;
  bad = b;
}

// Absolute maxima of rows [begin, end) of x scaled for each kind of code: per row of
// x[r, k] * col_mult[k] into row_amax/row_bad (when non-null), and folded into this task's column
// maxima col_amax (when non-null; +inf: non-finite) of x[r, k] * row_mult[r]; with col_sum
// (non-null only with col_amax) the columns' sums of x too (unscaled: the bias gradient), from
// the same read. col_mult and row_mult are never null (ones where nothing is scaled).
template <typename E>
RYZEN_LLM_TARGET_CLONES void absmax_rows(const typename E::raw_t* x, int64_t begin, int64_t end,
                                         int64_t K, const float* col_mult, const float* row_mult,
                                         float* row_amax, uint8_t* row_bad, float* col_amax,
                                         float* col_sum) {
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = x + r * K;
    float amax = 0.0f;
    int bad = 0;
    if (col_sum != nullptr) {
      absmax_row_and_columns<E, true>(xr, K, col_mult, row_mult[r], amax, bad, col_amax,
                                      col_sum);
    } else if (col_amax != nullptr) {
      absmax_row_and_columns<E, false>(xr, K, col_mult, row_mult[r], amax, bad, col_amax,
                                       nullptr);
    } else {
#pragma omp simd reduction(max : amax) reduction(| : bad)
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(E::load(xr[k]) * col_mult[k]);
        bad |= !(a <= FLT_MAX);
        amax = a > amax ? a : amax;
      }
    }
    if (row_amax != nullptr) {
      row_amax[r] = amax;
      row_bad[r] = static_cast<uint8_t>(bad);
    }
  }
}

// Codes of rows [begin, end): per row (row_inv) of x * col_mult and/or per column (col_inv) of
// x * row_mult. Each value is one float32 product, then the multiply by 1 / scale, as in
// reference.int8_quantize of the scaled tensor.
template <typename E>
RYZEN_LLM_TARGET_CLONES void codes_rows(const typename E::raw_t* x, int64_t begin, int64_t end,
                                        int64_t K, const float* col_mult, const float* row_mult,
                                        const float* row_inv, int8_t* row_codes,
                                        const float* col_inv, int8_t* col_codes, float* v) {
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = x + r * K;
    if (row_codes != nullptr) {
      const float inv = row_inv[r];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const float u = E::load(xr[k]) * col_mult[k];
        v[k] = u * inv;
      }
      int8_t* out = row_codes + r * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out[k] = int8_code(v[k]);
    }
    if (col_codes != nullptr) {
      const float rm = row_mult[r];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const float u = E::load(xr[k]) * rm;
        v[k] = u * col_inv[k];
      }
      int8_t* out = col_codes + r * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out[k] = int8_code(v[k]);
    }
  }
}

#if defined(RYZEN_LLM_AVX512)
// absmax_rows and codes_rows in registers, for K a multiple of 16 (the same values: one float32
// product per scaling, the maxima and sums per column in row order, int8_code's rounding): GCC
// vectorises the portable loops, but with a loop per kind of code and row the overheads and the
// scratch row cost about as much as the arithmetic.
template <typename raw_t>
RYZEN_LLM_AVX512_TARGET void absmax_rows_avx512(const raw_t* x, int64_t begin, int64_t end,
                                                int64_t K, const float* col_mult,
                                                const float* row_mult, float* row_amax,
                                                uint8_t* row_bad, float* col_amax,
                                                float* col_sum) {
  const __m512 finite_max = _mm512_set1_ps(FLT_MAX), inf = _mm512_set1_ps(INFINITY);
  for (int64_t r = begin; r < end; ++r) {
    const raw_t* xr = x + r * K;
    const __m512 rm = _mm512_set1_ps(row_mult[r]);
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = load16(xr + k);
      if (row_amax != nullptr) {
        const __m512 a = _mm512_abs_ps(_mm512_mul_ps(v, _mm512_loadu_ps(col_mult + k)));
        bad |= _mm512_cmp_ps_mask(a, finite_max, _CMP_NLE_UQ);
        m = _mm512_max_ps(m, a);
      }
      if (col_amax != nullptr) {
        __m512 c = _mm512_abs_ps(_mm512_mul_ps(v, rm));
        c = _mm512_mask_mov_ps(c, _mm512_cmp_ps_mask(c, finite_max, _CMP_NLE_UQ), inf);
        _mm512_storeu_ps(col_amax + k, _mm512_max_ps(_mm512_loadu_ps(col_amax + k), c));
        if (col_sum != nullptr) {
          _mm512_storeu_ps(col_sum + k, _mm512_add_ps(_mm512_loadu_ps(col_sum + k), v));
        }
      }
    }
    if (row_amax != nullptr) {
      row_amax[r] = _mm512_reduce_max_ps(m);
      row_bad[r] = static_cast<uint8_t>(bad != 0);
    }
  }
}

template <typename raw_t>
RYZEN_LLM_AVX512_TARGET void codes_rows_avx512(const raw_t* x, int64_t begin, int64_t end,
                                               int64_t K, const float* col_mult,
                                               const float* row_mult, const float* row_inv,
                                               int8_t* row_codes, const float* col_inv,
                                               int8_t* col_codes) {
  for (int64_t r = begin; r < end; ++r) {
    const raw_t* xr = x + r * K;
    const __m512 inv = _mm512_set1_ps(row_codes != nullptr ? row_inv[r] : 0.0f);
    const __m512 rm = _mm512_set1_ps(row_mult[r]);
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = load16(xr + k);
      if (row_codes != nullptr) {
        const __m512 u = _mm512_mul_ps(v, _mm512_loadu_ps(col_mult + k));
        store16_codes(row_codes + r * K + k, _mm512_mul_ps(u, inv));
      }
      if (col_codes != nullptr) {
        const __m512 u = _mm512_mul_ps(v, rm);
        store16_codes(col_codes + r * K + k, _mm512_mul_ps(u, _mm512_loadu_ps(col_inv + k)));
      }
    }
  }
}
#endif

// Whether quantize's passes run the AVX-512 variants for this element type and row length.
template <typename E>
bool quantize_in_registers(int64_t K) {
#if defined(RYZEN_LLM_AVX512)
  return !std::is_same_v<typename E::raw_t, double> && K % 16 == 0 && avx512_available();
#else
  return false;
#endif
}

// absmax_rows / codes_rows, through their AVX-512 variants where quantize_in_registers.
template <typename E>
void absmax_pass(const typename E::raw_t* x, int64_t begin, int64_t end, int64_t K,
                 const float* col_mult, const float* row_mult, float* row_amax, uint8_t* row_bad,
                 float* col_amax, float* col_sum) {
#if defined(RYZEN_LLM_AVX512)
  if constexpr (!std::is_same_v<typename E::raw_t, double>) {
    if (quantize_in_registers<E>(K)) {
      absmax_rows_avx512(x, begin, end, K, col_mult, row_mult, row_amax, row_bad, col_amax,
                         col_sum);
      return;
    }
  }
#endif
  absmax_rows<E>(x, begin, end, K, col_mult, row_mult, row_amax, row_bad, col_amax, col_sum);
}

template <typename E>
void codes_pass(const typename E::raw_t* x, int64_t begin, int64_t end, int64_t K,
                const float* col_mult, const float* row_mult, const float* row_inv,
                int8_t* row_codes, const float* col_inv, int8_t* col_codes) {
#if defined(RYZEN_LLM_AVX512)
  if constexpr (!std::is_same_v<typename E::raw_t, double>) {
    if (quantize_in_registers<E>(K)) {
      codes_rows_avx512(x, begin, end, K, col_mult, row_mult, row_inv, row_codes, col_inv,
                        col_codes);
      return;
    }
  }
#endif
  std::vector<float> v(K);
  codes_rows<E>(x, begin, end, K, col_mult, row_mult, row_inv, row_codes, col_inv, col_codes,
                v.data());
}

template <typename E>
void quantize_rows_here(const typename E::raw_t* x, int64_t rows, int64_t K, int8_t* codes,
                        float* scales) {
  if (rows <= 0) return;
  // per-thread scratch, kept between calls: a producer calls this for every few rows
  thread_local std::vector<float> ones, amax, inv;
  thread_local std::vector<uint8_t> bad;
  const size_t n = static_cast<size_t>(std::max<int64_t>(K, rows));
  if (ones.size() < n) ones.assign(n, 1.0f);
  if (amax.size() < static_cast<size_t>(rows)) {
    amax.resize(rows);
    inv.resize(rows);
    bad.resize(rows);
  }
  absmax_pass<E>(x, 0, rows, K, ones.data(), ones.data(), amax.data(), bad.data(), nullptr,
                 nullptr);
  for (int64_t r = 0; r < rows; ++r) int8_scale(amax[r], bad[r], scales + r, &inv[r]);
  codes_pass<E>(x, 0, rows, K, ones.data(), ones.data(), inv.data(), codes, nullptr, nullptr);
}

}  // namespace

void quantize_rows(const float* x, int64_t rows, int64_t K, int8_t* codes, float* scales) {
  quantize_rows_here<Elem<float>>(x, rows, K, codes, scales);
}

void quantize_rows(const uint16_t* x, int64_t rows, int64_t K, int8_t* codes, float* scales) {
  quantize_rows_here<Elem<c10::BFloat16>>(x, rows, K, codes, scales);
}

std::tuple<at::Tensor, at::Tensor> rows_of(const at::Tensor& x,
                                           const c10::optional<at::Tensor>& given_codes,
                                           const c10::optional<at::Tensor>& given_scales,
                                           bool* given) {
  *given = check_given_row_codes(x, given_codes, given_scales);
  if (*given) return {*given_codes, *given_scales};
  auto [codes, scales, unused_codes, unused_scales] = quantize(x, true, false, nullptr);
  return {codes, scales};
}

// int8_quantize, and the backward's scaled variants (int8_linear.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize(
    const at::Tensor& x, bool rows, bool cols, at::Tensor* col_sums,
    const at::Tensor& col_mult, const at::Tensor& row_mult) {
  check_cpu(x, "x");
  check_int8_activations(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto i8 = x.options().dtype(at::kChar);
  at::Tensor row_codes = at::empty({rows ? M : 0, rows ? K : 0}, i8);
  at::Tensor row_scales = at::empty({rows ? M : 0}, f32);
  at::Tensor col_codes = at::empty({cols ? M : 0, cols ? K : 0}, i8);
  at::Tensor col_scales = at::empty({cols ? K : 0}, f32);
  if (col_sums != nullptr) *col_sums = at::zeros({K}, f32);
  if (M == 0 || K == 0 || (!rows && !cols)) {
    if (cols) col_scales.zero_();
    if (rows) row_scales.zero_();
    return {row_codes, row_scales, col_codes, col_scales};
  }
  std::vector<float> row_amax(rows ? M : 0), row_inv(rows ? M : 0);
  std::vector<uint8_t> row_bad(rows ? M : 0);
  // column maxima: one partial per task, folded afterwards
  const int64_t tasks = cols ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M)) : 1;
  const int64_t chunk = (M + tasks - 1) / tasks;
  std::vector<float> col_amax(cols ? tasks * K : 0, 0.0f), col_inv(cols ? K : 0);
  std::vector<float> col_sum(col_sums != nullptr ? tasks * K : 0, 0.0f);
  // Multipliers: the given ones, or ones.
  std::vector<float> ones(static_cast<size_t>(std::max(M, K)), 1.0f);
  const float* cm = col_mult.defined() ? col_mult.data_ptr<float>() : ones.data();
  const float* rm = row_mult.defined() ? row_mult.data_ptr<float>() : ones.data();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int8_quantize", [&] {
    using E = Elem<scalar_t>;
    const auto* xp = E::ptr(x);
    if (cols) {
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          absmax_pass<E>(xp, t * chunk, std::min(M, (t + 1) * chunk), K, cm, rm,
                         rows ? row_amax.data() : nullptr, rows ? row_bad.data() : nullptr,
                         col_amax.data() + t * K, col_sum.empty() ? nullptr : col_sum.data() + t * K);
        }
      });
      float* cs = col_scales.data_ptr<float>();
      float* sums = col_sums != nullptr ? col_sums->data_ptr<float>() : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        float amax = 0.0f;
        for (int64_t t = 0; t < tasks; ++t) {
          amax = std::max(amax, col_amax[t * K + k]);
          if (sums != nullptr) sums[k] += col_sum[t * K + k];
        }
        int8_scale(amax, !(amax <= FLT_MAX), cs + k, &col_inv[k]);
      }
    } else {
      at::parallel_for(0, M, row_grain(K), [&](int64_t b, int64_t e) {
        absmax_pass<E>(xp, b, e, K, cm, rm, row_amax.data(), row_bad.data(), nullptr, nullptr);
      });
    }
    if (rows) {
      float* rs = row_scales.data_ptr<float>();
      for (int64_t r = 0; r < M; ++r) int8_scale(row_amax[r], row_bad[r], rs + r, &row_inv[r]);
    }
    at::parallel_for(0, M, row_grain(K), [&](int64_t b, int64_t e) {
      codes_pass<E>(xp, b, e, K, cm, rm, rows ? row_inv.data() : nullptr,
                    rows ? row_codes.data_ptr<int8_t>() : nullptr,
                    cols ? col_inv.data() : nullptr,
                    cols ? col_codes.data_ptr<int8_t>() : nullptr);
    });
  });
  return {row_codes, row_scales, col_codes, col_scales};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_quantize_cpu(
    const at::Tensor& x, bool rows, bool cols) {
  return quantize(x, rows, cols, nullptr);
}

// y = acc * row_scale * col_scale (+ bias), and with gelu: pre = that, y = GELU(pre); per row.
template <typename E>
RYZEN_LLM_TARGET_CLONES void dequantize_row(const int32_t* acc, float row_scale,
                                            const float* col_scales, const float* bias,
                                            bool gelu, typename E::raw_t* pre,
                                            typename E::raw_t* y, int64_t N) {
  if (gelu) {
    // (bias tested outside the loop: a GELU'd layer without bias ran 1.3-1.6x slower before)
    auto to_y = [y](int64_t n, typename E::raw_t v) { y[n] = v; };
    if (bias != nullptr) {
      gelu_epilogue_row<E, true>(acc, row_scale, col_scales, bias, pre, to_y, N);
    } else {
      gelu_epilogue_row<E, false>(acc, row_scale, col_scales, bias, pre, to_y, N);
    }
  } else if (bias != nullptr) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      y[n] = E::store(static_cast<float>(acc[n]) * (row_scale * col_scales[n]) + bias[n]);
    }
  } else {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      y[n] = E::store(static_cast<float>(acc[n]) * (row_scale * col_scales[n]));
    }
  }
}

// Rows [r0, r1) of acc (row r at acc + r * N) into y (and pre), dtype float32 or bfloat16.
void dequantize_rows(const int32_t* acc, int64_t r0, int64_t r1, const float* row_scales,
                     const float* col_scales, const float* bias, bool gelu, at::Tensor& y,
                     at::Tensor& pre) {
  const int64_t N = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "int8_dequantize", [&] {
    using E = Elem<scalar_t>;
    auto* yp = E::ptr(y);
    auto* pp = gelu ? E::ptr(pre) : nullptr;
    at::parallel_for(r0, r1, row_grain(N), [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r) {
        dequantize_row<E>(acc + r * N, row_scales[r], col_scales, bias, gelu,
                          pp ? pp + r * N : nullptr, yp + r * N, N);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> int8_dequantize_cpu(const at::Tensor& acc,
                                                       const at::Tensor& row_scales,
                                                       const at::Tensor& col_scales,
                                                       const c10::optional<at::Tensor>& bias,
                                                       bool gelu, at::ScalarType dtype) {
  check_cpu(acc, "acc");
  check_dim(acc, 2, "acc");
  check_contiguous(acc, "acc");
  TORCH_CHECK(acc.scalar_type() == at::kInt, "acc: expected int32, got ", acc.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "dtype: expected float32 or bfloat16, got ", dtype);
  const int64_t M = acc.size(0), N = acc.size(1);
  for (auto [t, name, len] : {std::tuple{&row_scales, "row_scales", M},
                              std::tuple{&col_scales, "col_scales", N}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, ": expected float32, got ", t->scalar_type());
    check_shape(*t, {len}, name);
    check_contiguous(*t, name);
  }
  const float* b = checked_float_bias(bias, N);
  auto opts = acc.options().dtype(dtype);
  at::Tensor y = at::empty({M, N}, opts);
  at::Tensor pre = at::empty({gelu ? M : 0, gelu ? N : 0}, opts);
  dequantize_rows(acc.data_ptr<int32_t>(), 0, M, row_scales.data_ptr<float>(),
                  col_scales.data_ptr<float>(), b, gelu, y, pre);
  return {y, pre};
}

}  // namespace

// The int32 sums from int8_gemm (at::_int_mm or the own kernel), dequantized per block of rows.
void gemm_dequantize(const at::Tensor& a, const at::Tensor& b, const float* row_scales,
                     const float* col_scales, const float* bias, bool gelu, at::Tensor& y,
                     at::Tensor& pre) {
  const int64_t N = b.size(1);
  int8_gemm(a, b, [&](const int32_t* acc, int64_t r0, int64_t r1) {
    dequantize_rows(acc - r0 * N, r0, r1, row_scales, col_scales, bias, gelu, y, pre);
  });
}

namespace {

// grad_pre = grad_y * GELU'(pre), row by row; grad_bias_part (this task's) accumulates it.
template <typename E>
RYZEN_LLM_TARGET_CLONES void gelu_grad_row(const typename E::raw_t* grad,
                                           const typename E::raw_t* pre, typename E::raw_t* out,
                                           float* grad_bias_part, int64_t N) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const float d = static_cast<float>(E::load(grad[n])) * gelu_grad(static_cast<float>(E::load(pre[n])));
    out[n] = E::store(d);
    grad_bias_part[n] += d;
  }
}

template <typename E>
RYZEN_LLM_TARGET_CLONES void sum_row(const typename E::raw_t* grad, float* part, int64_t N) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) part[n] += static_cast<float>(E::load(grad[n]));
}

// The gradient at the GEMM's output (through GELU when gelu) and its column sums (grad_bias).
std::tuple<at::Tensor, at::Tensor> output_grad(const at::Tensor& grad_y, const at::Tensor& pre,
                                               bool gelu) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  at::Tensor g = gelu ? at::empty_like(grad_y) : grad_y;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  const int64_t chunk = std::max<int64_t>(1, (M + tasks - 1) / tasks);
  std::vector<float> parts(tasks * N, 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_y.scalar_type(), "int8_linear_grad", [&] {
    using E = Elem<scalar_t>;
    const auto* gy = E::ptr(grad_y);
    const auto* pp = gelu ? E::ptr(pre) : nullptr;
    auto* gp = E::ptr(g);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* part = parts.data() + t * N;
        for (int64_t r = t * chunk; r < std::min(M, (t + 1) * chunk); ++r) {
          if (gelu) {
            gelu_grad_row<E>(gy + r * N, pp + r * N, gp + r * N, part, N);
          } else {
            sum_row<E>(gy + r * N, part, N);
          }
        }
      }
    });
  });
  at::Tensor grad_bias = at::zeros({N}, grad_y.options().dtype(at::kFloat));
  float* gb = grad_bias.data_ptr<float>();
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t n = 0; n < N; ++n) gb[n] += parts[t * N + n];
  }
  return {g, grad_bias};
}

// weight: the float weight the codes were made from; only autograd uses it (its gradient is the
// backward's grad_weight), the kernel checks that its shape matches the codes'. given_codes,
// given_scales: x's row codes made by its producer (then x itself is not read, and the codes are
// not returned: the caller holds them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& w_codes, const at::Tensor& w_scales, bool gelu, bool save_codes,
    const c10::optional<at::Tensor>& given_codes, const c10::optional<at::Tensor>& given_scales) {
  check_cpu(x, "x");
  check_int8_activations(x, "x");
  const int64_t N = check_int8_linear_forward_args(x, weight, bias, w_codes, w_scales);
  bool given;
  auto [x_codes, x_scales] = rows_of(x, given_codes, given_scales, &given);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor pre = at::empty({gelu ? M : 0, gelu ? N : 0}, x.options());
  gemm_dequantize(x_codes, w_codes.t(), x_scales.data_ptr<float>(), w_scales.data_ptr<float>(),
                  bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr, gelu,
                  y, pre);
  if (!save_codes || given) {
    x_codes = at::empty({0, 0}, x_codes.options());
    x_scales = at::empty({0}, x_scales.options());
  }
  return {y, pre, x_codes, x_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& pre, const at::Tensor& x_saved,
    const at::Tensor& x_scales, const at::Tensor& w_codes, const at::Tensor& w_scales, bool gelu,
    bool need_grad_x, bool int8_weight_grad) {
  check_cpu(grad_y, "grad_y");
  check_int8_activations(grad_y, "grad_y");
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  const int64_t K = check_int8_linear_backward_args(grad_y, pre, x_saved, x_scales, w_codes,
                                                    w_scales, gelu, int8_weight_grad);
  // The gradient at the GEMM's output and its column sums (grad_bias): through GELU in a pass of
  // its own; without GELU the sums come from the quantization's read of grad_y.
  at::Tensor g = grad_y, grad_bias;
  if (gelu || !int8_weight_grad) std::tie(g, grad_bias) = output_grad(grad_y, pre, gelu);
  // Row codes of g * w_scales (per output channel) for grad_x, column codes of g * x_scales (per
  // token) for grad_weight, from one pair of reads of g.
  auto [g_rows, g_row_scales, g_cols, g_col_scales] =
      quantize(g, need_grad_x, int8_weight_grad, grad_bias.defined() ? nullptr : &grad_bias,
               w_scales, int8_weight_grad ? x_scales : at::Tensor());
  const std::vector<float> ones(static_cast<size_t>(K > 0 ? K : 0), 1.0f);
  at::Tensor none;
  at::Tensor grad_x = at::empty({need_grad_x ? M : 0, need_grad_x ? K : 0}, grad_y.options());
  if (need_grad_x) {  // (M, N) @ (N, K): the codes the forward used
    gemm_dequantize(g_rows, w_codes, g_row_scales.data_ptr<float>(), ones.data(), nullptr, false,
                    grad_x, none);
  }
  at::Tensor grad_w;
  if (int8_weight_grad) {  // (N, M) @ (M, K): summed over the M tokens
    grad_w = at::empty({N, K}, grad_y.options().dtype(at::kFloat));
    gemm_dequantize(g_cols.t(), x_saved, g_col_scales.data_ptr<float>(), ones.data(), nullptr,
                    false, grad_w, none);
  } else {
    grad_w = at::mm(g.t(), x_saved).to(at::kFloat);
  }
  return {grad_x, grad_w, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("int8_quantize", &int8_quantize_cpu);
  m.impl("int8_dequantize", &int8_dequantize_cpu);
  m.impl("int8_linear_forward", &int8_linear_forward_cpu);
  m.impl("int8_linear_backward", &int8_linear_backward_cpu);
}

}  // namespace ryzen_llm
