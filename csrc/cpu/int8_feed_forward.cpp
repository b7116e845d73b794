// The level-4 feed-forward, fc2(GELU(fc1(x))), as one op over the int8 linear's pieces
// (linear.cpp, int8_linear.h), so that each int8 operand is written by the kernel that produces
// its values instead of by a pass of its own over a bfloat16 tensor:
//
//   forward:  fc1's epilogue dequantizes a block of rows while the GEMM's int32 sums are in
//             cache, adds b1, stores the pre-activation (backward's), and quantizes GELU of it per
//             row: the activation exists only as fc2's codes and row scales, never as a tensor.
//   backward: fc2's grad_y is quantized as the int8 linear's backward quantizes it (one read for
//             both kinds of codes). The GEMM giving grad_h = grad_y @ W2 hands its rows to an
//             epilogue that applies GELU'(pre), writes grad_pre, quantizes it per row for fc1's
//             input gradient and takes its column maxima for fc1's weight gradient; one more
//             pass over grad_pre writes the column codes and sums grad_b1.
//
// Every value is the one two int8_linear calls compute (the same roundings in the same order), so
// outputs and gradients are bit-identical to them, except grad_b1: it sums the stored (rounded)
// grad_pre, as reference.int8_linear_backward does, where the linear sums the unrounded values.
#include "common.h"
#include "fast_math.h"
#include "op_checks.h"
#include "cpu/int8_gemm.h"
#include "cpu/int8_linear.h"

#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <vector>

namespace ryzen_llm {
namespace {

// One row of fc1's epilogue: pre = acc * rs * cs + bias (stored), the activation GELU(pre)
// rounded as a stored tensor would be, its absmax scale and its codes; act: N floats of scratch.
template <typename E, bool kBias>
RYZEN_LLM_TARGET_CLONES void gelu_codes_row(const int32_t* acc, float rs, const float* cs,
                                            const float* bias, typename E::raw_t* pre, float* act,
                                            int8_t* codes, float* scale, int64_t N) {
  gelu_epilogue_row<E, kBias>(acc, rs, cs, bias, pre,
                              [act](int64_t n, typename E::raw_t v) {
                                act[n] = static_cast<float>(E::load(v));
                              },
                              N);
  quantize_row(act, scale, codes, N);
}

// fc1 through its epilogue: pre (M, F), the activation's codes (M, F) and row scales (M,).
void fc1_gelu_codes(const at::Tensor& x_codes, const at::Tensor& w1_codes, const float* x_scales,
                    const float* w1_scales, const float* b1, at::Tensor& pre, at::Tensor& h_codes,
                    float* h_scales) {
  const int64_t F = pre.size(1);
  int8_t* hc = h_codes.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pre.scalar_type(), "int8_feed_forward", [&] {
    using E = Elem<scalar_t>;
    auto* pp = E::ptr(pre);
    int8_gemm(x_codes, w1_codes.t(), [&](const int32_t* acc, int64_t r0, int64_t r1) {
      at::parallel_for(r0, r1, row_grain(F), [&](int64_t i0, int64_t i1) {
        std::vector<float> act(F);
        for (int64_t r = i0; r < i1; ++r) {
          const int32_t* a = acc + (r - r0) * F;
          if (b1 != nullptr) {
            gelu_codes_row<E, true>(a, x_scales[r], w1_scales, b1, pp + r * F, act.data(),
                                    hc + r * F, h_scales + r, F);
          } else {
            gelu_codes_row<E, false>(a, x_scales[r], w1_scales, nullptr, pp + r * F, act.data(),
                                     hc + r * F, h_scales + r, F);
          }
        }
      });
    });
  });
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
int8_feed_forward_forward_cpu(const at::Tensor& x, const at::Tensor& w1,
                              const c10::optional<at::Tensor>& b1, const at::Tensor& w1_codes,
                              const at::Tensor& w1_scales, const at::Tensor& w2,
                              const c10::optional<at::Tensor>& b2, const at::Tensor& w2_codes,
                              const at::Tensor& w2_scales,
                              const c10::optional<at::Tensor>& given_codes,
                              const c10::optional<at::Tensor>& given_scales) {
  check_cpu(x, "x");
  check_int8_activations(x, "x");
  const int64_t C = x.size(1);
  const int64_t F = check_int8_weight(x, "x", C, w1, b1, w1_codes, w1_scales,
                                      {"w1", "b1", "w1_codes", "w1_scales"});
  const int64_t C2 = check_int8_weight(x, "x", F, w2, b2, w2_codes, w2_scales,
                                       {"w2", "b2", "w2_codes", "w2_scales"});
  TORCH_CHECK(C2 == C, "w2: expected ", C, " output features (x's), got ", C2);
  const int64_t M = x.size(0);
  // x's row codes: its producer's (then not returned: the caller holds them), or made here
  bool given;
  auto [x_codes, x_scales] = rows_of(x, given_codes, given_scales, &given);
  at::Tensor pre = at::empty({M, F}, x.options());
  at::Tensor h_codes = at::empty({M, F}, x.options().dtype(at::kChar));
  at::Tensor h_scales = at::empty({M}, x.options().dtype(at::kFloat));
  fc1_gelu_codes(x_codes, w1_codes, x_scales.data_ptr<float>(), w1_scales.data_ptr<float>(),
                 bias_ptr(b1), pre, h_codes, h_scales.data_ptr<float>());
  at::Tensor y = at::empty({M, C}, x.options());
  at::Tensor none;
  gemm_dequantize(h_codes, w2_codes.t(), h_scales.data_ptr<float>(), w2_scales.data_ptr<float>(),
                  bias_ptr(b2), false, y, none);
  if (given) {
    x_codes = at::empty({0, 0}, x_codes.options());
    x_scales = at::empty({0}, x_scales.options());
  }
  return {y, pre, x_codes, x_scales, h_codes, h_scales};
}

// The scratch of grad_h's epilogue: fc1's input-gradient codes per row, and the column maxima
// for its weight-gradient codes, one partial per thread (max is idempotent, so an epilogue run
// twice over the same rows, as int8_gemm may, leaves them as once).
struct GradPreCodes {
  int8_t* row_codes;  // null: no input gradient
  float* row_scales;
  std::vector<float> col_amax;  // threads x F; +inf: the column holds a NaN or inf
};

// One row of grad_h's epilogue: grad_pre = round(round(acc * rs) * GELU'(pre)) stored in gp; the
// row codes of grad_pre * w1_scales; the column maxima of grad_pre * xs folded into col_amax.
template <typename E>
RYZEN_LLM_TARGET_CLONES void gelu_grad_codes_row(const int32_t* acc, float rs,
                                                 const typename E::raw_t* pre,
                                                 typename E::raw_t* gp, const float* w1_scales,
                                                 float xs, float* u, int8_t* codes, float* scale,
                                                 float* col_amax, int64_t N) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const auto dh = E::store(static_cast<float>(acc[n]) * rs);
    const float d =
        static_cast<float>(E::load(dh)) * gelu_grad(static_cast<float>(E::load(pre[n])));
    const auto g = E::store(d);
    gp[n] = g;
    u[n] = static_cast<float>(E::load(g));
  }
  // A non-finite column value marks its maximum +inf (finite ones are <= FLT_MAX).
  float amax = 0.0f;
  int bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n) {
    const float v = u[n];
    const float w = v * w1_scales[n];
    const float a = std::fabs(w);
    float c = std::fabs(v * xs);
    c = c <= FLT_MAX ? c : INFINITY;
    u[n] = w;
    bad |= !(a <= FLT_MAX);
    amax = a > amax ? a : amax;
    col_amax[n] = c > col_amax[n] ? c : col_amax[n];
  }
  if (codes == nullptr) return;
  row_codes(u, amax, bad, scale, codes, N);
}

// grad_pre (M, F) = (grad_y codes @ W2 codes, dequantized) * GELU'(pre), with out's row codes
// and column maxima filled in the GEMM's epilogue.
void grad_pre_through_epilogue(const at::Tensor& g_rows, const float* g_row_scales,
                               const at::Tensor& w2_codes, const at::Tensor& pre,
                               const float* w1_scales, const float* x_scales, at::Tensor& gp,
                               GradPreCodes& out) {
  const int64_t F = gp.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gp.scalar_type(), "int8_feed_forward_grad", [&] {
    using E = Elem<scalar_t>;
    const auto* pp = E::ptr(pre);
    auto* gpp = E::ptr(gp);
    int8_gemm(g_rows, w2_codes, [&](const int32_t* acc, int64_t r0, int64_t r1) {
      // Called inside a parallel region (the own GEMM's tasks), the parallel_for below runs
      // inline and numbers itself thread 0: the partial is then the calling thread's.
      const bool nested = at::in_parallel_region();
      const int64_t caller = at::get_thread_num();
      at::parallel_for(r0, r1, row_grain(F), [&](int64_t i0, int64_t i1) {
        const int64_t t = nested ? caller : at::get_thread_num();
        std::vector<float> u(F);
        for (int64_t r = i0; r < i1; ++r) {
          gelu_grad_codes_row<E>(acc + (r - r0) * F, g_row_scales[r], pp + r * F, gpp + r * F,
                                 w1_scales, x_scales[r], u.data(),
                                 out.row_codes ? out.row_codes + r * F : nullptr,
                                 out.row_scales + r, out.col_amax.data() + t * F, F);
        }
      });
    });
  });
}

// One row's column codes of g * xs (col_inv: the columns' 1 / scale); sum accumulates g.
template <typename E>
RYZEN_LLM_TARGET_CLONES void column_codes_row(const typename E::raw_t* g, float xs,
                                              const float* col_inv, float* v, int8_t* codes,
                                              float* sum, int64_t N) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const float a = static_cast<float>(E::load(g[n]));
    const float u = a * xs;
    v[n] = u * col_inv[n];
    sum[n] += a;
  }
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) codes[n] = int8_code(v[n]);
}

// The column codes (M, F) and scales (F,) of gp * x_scales from the epilogue's column maxima,
// and grad_b1 (F,), the column sums of gp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> column_codes(const at::Tensor& gp,
                                                            const float* x_scales,
                                                            const GradPreCodes& stats) {
  const int64_t M = gp.size(0), F = gp.size(1);
  const int64_t threads = static_cast<int64_t>(stats.col_amax.size()) / std::max<int64_t>(F, 1);
  at::Tensor scales = at::empty({F}, gp.options().dtype(at::kFloat));
  std::vector<float> inv(F);
  float* cs = scales.data_ptr<float>();
  for (int64_t n = 0; n < F; ++n) {
    float amax = 0.0f;
    for (int64_t t = 0; t < threads; ++t) amax = std::max(amax, stats.col_amax[t * F + n]);
    int8_scale(amax, !(amax <= FLT_MAX), cs + n, &inv[n]);
  }
  at::Tensor codes = at::empty({M, F}, gp.options().dtype(at::kChar));
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  const int64_t chunk = std::max<int64_t>(1, (M + tasks - 1) / tasks);
  std::vector<float> parts(tasks * F, 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gp.scalar_type(), "int8_feed_forward_cols", [&] {
    using E = Elem<scalar_t>;
    const auto* g = E::ptr(gp);
    int8_t* c = codes.data_ptr<int8_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> v(F);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t r = t * chunk; r < std::min(M, (t + 1) * chunk); ++r) {
          column_codes_row<E>(g + r * F, x_scales[r], inv.data(), v.data(), c + r * F,
                              parts.data() + t * F, F);
        }
      }
    });
  });
  at::Tensor grad_b1 = at::zeros({F}, gp.options().dtype(at::kFloat));
  float* gb = grad_b1.data_ptr<float>();
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t n = 0; n < F; ++n) gb[n] += parts[t * F + n];
  }
  return {codes, scales, grad_b1};
}

void check_feed_forward_backward_args(const at::Tensor& grad_y, const at::Tensor& pre,
                                      const at::Tensor& x_codes, const at::Tensor& x_scales,
                                      const at::Tensor& h_codes, const at::Tensor& h_scales,
                                      const at::Tensor& w1_codes, const at::Tensor& w1_scales,
                                      const at::Tensor& w2_codes, const at::Tensor& w2_scales) {
  const int64_t M = grad_y.size(0), C = grad_y.size(1);
  const int64_t F = w1_codes.dim() == 2 ? w1_codes.size(0) : -1;
  check_int8_codes(w1_codes, w1_scales, grad_y, "grad_y", F, C, F, "w1_codes", "w1_scales");
  check_int8_codes(w2_codes, w2_scales, grad_y, "grad_y", C, F, C, "w2_codes", "w2_scales");
  check_like(pre, grad_y, "pre", "grad_y");
  check_sizes(pre, {M, F}, "pre");
  check_int8_codes(x_codes, x_scales, grad_y, "grad_y", M, C, M, "x_codes", "x_scales");
  check_int8_codes(h_codes, h_scales, grad_y, "grad_y", M, F, M, "h_codes", "h_scales");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
int8_feed_forward_backward_cpu(const at::Tensor& grad_y, const at::Tensor& pre,
                               const at::Tensor& x_codes, const at::Tensor& x_scales,
                               const at::Tensor& h_codes, const at::Tensor& h_scales,
                               const at::Tensor& w1_codes, const at::Tensor& w1_scales,
                               const at::Tensor& w2_codes, const at::Tensor& w2_scales,
                               bool need_grad_x) {
  check_cpu(grad_y, "grad_y");
  check_int8_activations(grad_y, "grad_y");
  check_feed_forward_backward_args(grad_y, pre, x_codes, x_scales, h_codes, h_scales, w1_codes,
                                   w1_scales, w2_codes, w2_scales);
  const int64_t M = grad_y.size(0), C = grad_y.size(1), F = w1_codes.size(0);
  const auto f32 = grad_y.options().dtype(at::kFloat);
  const std::vector<float> ones(static_cast<size_t>(std::max(C, F)), 1.0f);
  at::Tensor none;
  // fc2, as int8_linear_backward without GELU: row codes of grad_y * w2_scales, column codes of
  // grad_y * h_scales and grad_b2 from one pair of reads.
  at::Tensor grad_b2;
  auto [g_rows, g_row_scales, g_cols, g_col_scales] =
      quantize(grad_y, true, true, &grad_b2, w2_scales, h_scales);
  at::Tensor grad_w2 = at::empty({C, F}, f32);
  gemm_dequantize(g_cols.t(), h_codes, g_col_scales.data_ptr<float>(), ones.data(), nullptr,
                  false, grad_w2, none);
  // fc1's gradient at its pre-activation, with its codes, from grad_h's epilogue
  at::Tensor gp = at::empty({M, F}, grad_y.options());
  at::Tensor gp_rows = at::empty({need_grad_x ? M : 0, need_grad_x ? F : 0},
                                 grad_y.options().dtype(at::kChar));
  at::Tensor gp_row_scales = at::empty({M}, f32);
  const int64_t threads = at::get_num_threads();
  GradPreCodes stats{need_grad_x ? gp_rows.data_ptr<int8_t>() : nullptr,
                     gp_row_scales.data_ptr<float>(), std::vector<float>(threads * F, 0.0f)};
  const float* xs = x_scales.data_ptr<float>();
  grad_pre_through_epilogue(g_rows, g_row_scales.data_ptr<float>(), w2_codes, pre,
                            w1_scales.data_ptr<float>(), xs, gp, stats);
  auto [gp_cols, gp_col_scales, grad_b1] = column_codes(gp, xs, stats);
  at::Tensor grad_x = at::empty({need_grad_x ? M : 0, need_grad_x ? C : 0}, grad_y.options());
  if (need_grad_x) {
    gemm_dequantize(gp_rows, w1_codes, gp_row_scales.data_ptr<float>(), ones.data(), nullptr,
                    false, grad_x, none);
  }
  at::Tensor grad_w1 = at::empty({F, C}, f32);
  gemm_dequantize(gp_cols.t(), x_codes, gp_col_scales.data_ptr<float>(), ones.data(), nullptr,
                  false, grad_w1, none);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("int8_feed_forward_forward", &int8_feed_forward_forward_cpu);
  m.impl("int8_feed_forward_backward", &int8_feed_forward_backward_cpu);
}

}  // namespace ryzen_llm
