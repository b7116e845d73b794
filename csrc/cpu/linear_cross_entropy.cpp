// Mean cross-entropy of h @ weight.T against targets without ever holding the (N, V) logits:
// rows are taken in chunks; per chunk one GEMM gives the logits, one pass per row turns them
// into the loss term and, in place, into d(loss)/d(logits) (softmax - onehot) / n_valid, and two
// more GEMMs give that chunk's grad_h and add its share of grad_weight (Liger-Kernel's scheme).
// Memory: one (chunk, V) logits block plus the gradients; backward only scales the gradients.
// int8_linear_cross_entropy_forward (level 4) makes each chunk's logits with an int8 GEMM.
#include "common.h"
#include "op_checks.h"
#include "fast_math.h"
#include "int8_linear.h"
#include "stochastic_round.h"

#include <torch/library.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace ryzen_llm {
namespace {

// Rows of logits per chunk: about 512 K elements (2 MiB in float32) so that the block stays in
// cache between its GEMM and the softmax pass, but at least 64 rows for GEMM efficiency.
int64_t rows_per_chunk(int64_t N, int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(N, std::max<int64_t>(64, (1 << 19) / V)));
}

// Row max of the logits, then sum of exp(l - max) with the exponentials kept in `ex`.
template <typename E>
RYZEN_LLM_TARGET_CLONES float row_max(const typename E::raw_t* l, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = std::max(m, static_cast<float>(E::load(l[v])));
  return m;
}

template <typename E>
RYZEN_LLM_TARGET_CLONES float row_sum_exp(const typename E::raw_t* l, float m, float* ex,
                                          int64_t V) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) {
    ex[v] = exp_nonpositive(static_cast<float>(E::load(l[v])) - m);
    s += ex[v];
  }
  return s;
}

template <typename E>
RYZEN_LLM_TARGET_CLONES void row_write_grad(typename E::raw_t* l, const float* ex, float scale,
                                            int64_t V) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) l[v] = E::store(static_cast<typename E::acc_t>(ex[v] * scale));
}

// fp64 (gradcheck) path: plain libm.
template <typename scalar_t>
void softmax_nll_rows_double(scalar_t* logits, const int64_t* targets, int64_t ignore_index,
                             double scale, bool need_grad, double* loss_rows, int64_t row_begin,
                             int64_t row_end, int64_t V) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    scalar_t* l = logits + r * V;
    const int64_t t = targets[r];
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t v = 0; v < V; ++v) m = std::max<double>(m, l[v]);
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(l[v] - m);
    const double lse = m + std::log(s);
    const bool valid = t != ignore_index;
    loss_rows[r] = valid ? lse - static_cast<double>(l[t]) : 0.0;
    if (need_grad) {
      const double row_scale = valid ? scale : 0.0;
      for (int64_t v = 0; v < V; ++v) l[v] = static_cast<scalar_t>(std::exp(l[v] - lse) * row_scale);
      if (valid) l[t] = static_cast<scalar_t>(static_cast<double>(l[t]) - scale);
    }
  }
}

template <typename scalar_t>
void softmax_nll_rows(scalar_t* logits, const int64_t* targets, int64_t ignore_index,
                      double scale, bool need_grad, double* loss_rows, int64_t row_begin,
                      int64_t row_end, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    softmax_nll_rows_double(logits, targets, ignore_index, scale, need_grad, loss_rows, row_begin,
                            row_end, V);
  } else {
    using E = Elem<scalar_t>;
    auto* raw = reinterpret_cast<typename E::raw_t*>(logits);
    std::vector<float> ex(V);
    for (int64_t r = row_begin; r < row_end; ++r) {
      auto* l = raw + r * V;
      const int64_t t = targets[r];
      const bool valid = t != ignore_index;
      const float m = row_max<E>(l, V);
      const float s = row_sum_exp<E>(l, m, ex.data(), V);
      const double lse = static_cast<double>(m) + std::log(static_cast<double>(s));
      loss_rows[r] = valid ? lse - static_cast<double>(E::load(l[t])) : 0.0;
      if (need_grad) {
        // softmax = ex / s; grad = (softmax - onehot) * scale, 0 for an ignored row.
        const float row_scale = valid ? static_cast<float>(scale / s) : 0.0f;
        if (valid) {
          const float p_t = ex[t] * row_scale;
          row_write_grad<E>(l, ex.data(), row_scale, V);
          l[t] = E::store(p_t - static_cast<float>(scale));
        } else {
          row_write_grad<E>(l, ex.data(), 0.0f, V);
        }
      }
    }
  }
}

// codes[j] = floor(v[j] + u) clamped to [-127, 127], u = uniform_at(base + j, key): one row's
// stochastic rounding (v already divided by its scale, finite).
RYZEN_LLM_INLINE void stochastic_codes_row(const float* v, uint64_t base, SeedKey key,
                                           int8_t* codes, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float q = std::floor(v[j] + uniform_at(base + j, key));
    q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
    codes[j] = static_cast<int8_t>(static_cast<int32_t>(q));
  }
}

// Row codes of g (rows [begin, end) of a chunk whose first row is row0 of h, V per row) times
// col_mult per column, with stochastic rounding: the row's absmax / 127 scale (int8_scale), then
// floor(v + u), u = uniform_at((row0 + r) * V + j, key), in [-127, 127]. Unbiased where rounding
// to nearest would zero every value under half a step: the LM head's gradient rows are one
// large entry (the target's) and V small ones, whose sum is most of grad_h.
template <typename E>
RYZEN_LLM_TARGET_CLONES void stochastic_codes_rows(const typename E::raw_t* g,
                                                   const float* col_mult, int64_t begin,
                                                   int64_t end, int64_t V, int64_t row0,
                                                   SeedKey key, int8_t* codes, float* scales,
                                                   float* v) {
  for (int64_t r = begin; r < end; ++r) {
    const auto* gr = g + r * V;
    float amax = 0.0f;
    int bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
    for (int64_t j = 0; j < V; ++j) {
      v[j] = static_cast<float>(E::load(gr[j])) * col_mult[j];
      const float a = std::fabs(v[j]);
      bad |= !(a <= FLT_MAX);
      amax = a > amax ? a : amax;
    }
    float inv;
    int8_scale(amax, bad, scales + r, &inv);
    // v * inv goes through memory before the add (see int8_code)
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) v[j] = v[j] * inv;
    stochastic_codes_row(v, static_cast<uint64_t>(row0 + r) * static_cast<uint64_t>(V), key,
                         codes + r * V, V);
  }
}

// Codes of rows [begin, end) of g (a chunk whose first row is row0 of h, V per row) for the
// weight gradient: v = g[r, j] * h_scales[row0 + r] (float32), then v * inv with inv = 1 / the one
// scale every column shares (its bound: |g| <= 1 / n_valid, times h's largest row scale, / 127),
// stochastically rounded as stochastic_codes_rows rounds (u at (row0 + r) * V + j). A row holding
// NaN or inf gets zero codes and sets *bad (the caller then makes the gradient NaN).
template <typename E>
RYZEN_LLM_TARGET_CLONES void bound_codes_rows(const typename E::raw_t* g, const float* h_scales,
                                              float inv, int64_t begin, int64_t end, int64_t V,
                                              int64_t row0, SeedKey key, int8_t* codes,
                                              int* bad_out, float* v) {
  for (int64_t r = begin; r < end; ++r) {
    const auto* gr = g + r * V;
    const float hs = h_scales[row0 + r];
    int8_t* out = codes + r * V;
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t j = 0; j < V; ++j) {
      v[j] = static_cast<float>(E::load(gr[j])) * hs;
      bad |= !(std::fabs(v[j]) <= FLT_MAX);
    }
    if (bad) {
      std::memset(out, 0, static_cast<size_t>(V));
      *bad_out = 1;
      continue;
    }
    // v * inv goes through memory before the add (see int8_code)
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) v[j] = v[j] * inv;
    stochastic_codes_row(v, static_cast<uint64_t>(row0 + r) * static_cast<uint64_t>(V), key, out,
                         V);
  }
}

// The stochastic rounding's seed of the int8 LM head: a digest of the weight's scales (FNV-1a
// over their bits), so a new weight (every optimizer step) draws new rounding and the op stays a
// function of its inputs (reference.lm_head_rounding_seed).
int64_t scales_digest(const at::Tensor& scales) {
  const auto* bits = reinterpret_cast<const uint32_t*>(scales.data_ptr<float>());
  uint64_t h = 0xcbf29ce484222325ull;
  for (int64_t i = 0; i < scales.numel(); ++i) h = (h ^ bits[i]) * 0x100000001b3ull;
  return static_cast<int64_t>(h);
}

// The int8 LM head's weight gradient G.T @ h (int8_grad_weight), as the int8 linear's: G times
// h's row scales, quantized per vocabulary column, times h's row codes. Each chunk's values are
// coded as the chunk is made (chunk), under one scale every column shares, its bound: |G| <=
// 1 / n_valid, times h's largest row scale, / 127 (a column's own maximum would need all of G,
// the logits whole, before its first code); rounded stochastically (bound_codes_rows): most
// entries are probabilities far under half a step. Then one GEMM over all N rows (finish).
// Seeded by the weight's scales' digest + 1 (the input gradient's draws use the digest).
class Int8WeightGrad {
 public:
  Int8WeightGrad(const at::Tensor& h_codes, const at::Tensor& h_scales, int64_t V, int64_t seed)
      : h_codes_(h_codes), h_scales_(h_scales), V_(V), key_(seed_key(seed)) {
    const int64_t N = h_codes.size(0);
    codes_ = at::empty({N, V}, h_codes.options());
    const float* hs = h_scales.data_ptr<float>();
    for (int64_t i = 0; i < N; ++i) {
      bad_h_ |= !(hs[i] <= FLT_MAX);  // NaN or inf
      if (hs[i] > hs_max_) hs_max_ = hs[i];
    }
  }

  void chunk(const at::Tensor& g, int64_t r0, double bound) {
    int8_scale(hs_max_ * static_cast<float>(bound), bad_h_, &scale_, &inv_);
    const int64_t n = g.size(0), V = V_;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "int8_lm_head_grad_w", [&] {
      using E = Elem<scalar_t>;
      at::parallel_for(0, n, row_grain(V), [&](int64_t b, int64_t e) {
        std::vector<float> v(V);
        int bad = 0;
        bound_codes_rows<E>(E::ptr(g), h_scales_.data_ptr<float>(), inv_, b, e, V, r0, key_,
                            codes_.data_ptr<int8_t>() + r0 * V, &bad, v.data());
        if (bad) bad_g_.store(1);
      });
    });
  }

  // (V, C) in the weight's dtype: (V, N) codes @ (N, C) h codes, times the scale (NaN when G
  // or h held NaN or inf).
  at::Tensor finish(const at::Tensor& weight) {
    if (codes_.size(0) == 0) return at::zeros_like(weight);
    const float scale = bad_g_.load() ? __builtin_nanf("") : scale_;
    const std::vector<float> row_scales(static_cast<size_t>(V_), scale);
    const std::vector<float> ones(static_cast<size_t>(h_codes_.size(1)), 1.0f);
    at::Tensor grad = at::empty({V_, h_codes_.size(1)}, weight.options().dtype(at::kFloat));
    at::Tensor none;
    gemm_dequantize(codes_.t(), h_codes_, row_scales.data(), ones.data(), nullptr, false, grad,
                    none);
    return grad.to(weight.scalar_type());
  }

 private:
  at::Tensor h_codes_, h_scales_, codes_;
  int64_t V_;
  SeedKey key_;
  float hs_max_ = 0.0f, scale_ = 0.0f, inv_ = 0.0f;
  bool bad_h_ = false;
  std::atomic<int> bad_g_{0};
};

// A chunk's d(loss)/d(logits) (rows from r0) handed to a weight gradient made after the chunks;
// bound: 1 / n_valid, the largest magnitude of its entries.
using ChunkGradFn = std::function<void(const at::Tensor& g, int64_t r0, double bound)>;

// The loss and gradients of both LM-head ops: shape checked, logits_of(r0, n) makes a chunk's
// logits (see linear_cross_entropy_chunks). With grad_weight_of the chunks skip grad_weight
// (returned empty) and hand each chunk's gradient to it instead.
template <typename Logits>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_from_logits(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& targets,
    const LinearCrossEntropyShape& shape, int64_t ignore_index, bool need_grad_h,
    bool need_grad_weight, Logits&& logits_of,
    const std::function<void(const at::Tensor&, int64_t, at::Tensor&)>& grad_h_of = nullptr,
    const ChunkGradFn& grad_weight_of = nullptr) {
  const int64_t N = shape.N, V = shape.V;

  const int64_t* tgt = targets.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = tgt[i];
    if (t == ignore_index) continue;
    TORCH_CHECK(t >= 0 && t < V, "targets: id ", t, " at position ", i,
                " is out of range [0, ", V, ") and is not ignore_index (", ignore_index, ")");
    ++n_valid;
  }
  // Mean over zero targets is 0/0 = nan, as in F.cross_entropy; the gradients are then zero.
  const double scale = n_valid > 0 ? 1.0 / static_cast<double>(n_valid) : 0.0;

  std::vector<double> loss_rows(static_cast<size_t>(N), 0.0);
  const bool need_grad = need_grad_h || need_grad_weight;
  const bool weight_outside = need_grad_weight && grad_weight_of;
  auto [grad_h, grad_weight] = linear_cross_entropy_chunks(
      h, weight, shape, rows_per_chunk(N, V), need_grad_h, need_grad_weight && !weight_outside,
      logits_of,
      [&](at::Tensor& logits, int64_t r0, int64_t rows) {
        AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "linear_cross_entropy", [&] {
          scalar_t* lp = logits.data_ptr<scalar_t>();
          at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / V), [&](int64_t b, int64_t e) {
            softmax_nll_rows<scalar_t>(lp, tgt + r0, ignore_index, scale, need_grad,
                                       loss_rows.data() + r0, b, e, V);
          });
        });
        if (weight_outside) grad_weight_of(logits, r0, scale);
      },
      grad_h_of);
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) total += loss_rows[i];
  const double loss_value = n_valid > 0 ? total / static_cast<double>(n_valid)
                                        : std::numeric_limits<double>::quiet_NaN();
  at::Tensor loss =
      at::full({}, loss_value, h.options().dtype(linear_cross_entropy_loss_dtype(h)));
  return {loss, grad_h, grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_cpu(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, bool need_grad_h, bool need_grad_weight) {
  check_cpu(h, "h");
  check_float_dtype(h, "h");
  const auto shape = check_linear_cross_entropy_args(h, weight, targets);
  return forward_from_logits(h, weight, targets, shape, ignore_index, need_grad_h,
                             need_grad_weight, plain_logits(h, weight));
}

// The same with each chunk's logits from int8 codes: h's rows quantized once (per row, absmax /
// 127), times the weight's codes per vocabulary row (w_codes, w_scales: made once per optimizer
// step by the caller), dequantized as each block of rows leaves the GEMM. The gradients are
// those of the float linear at those logits (h and weight as they are, bf16/fp32 GEMMs), but
// with int8_grad_h: each chunk's grad_h = (G * w_scales) @ w_codes as the int8 linear's input
// gradient (G = d(loss)/d(logits) times the weight's scales per vocabulary row, quantized per
// row; the forward's weight codes), and with int8_grad_weight grad_weight = G.T @ h as an int8
// GEMM too (Int8WeightGrad). given_codes, given_scales: h's row codes made by its producer (the
// final LayerNorm), used instead of quantizing h.
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_cross_entropy_forward_cpu(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& w_codes,
    const at::Tensor& w_scales, const at::Tensor& targets, int64_t ignore_index,
    bool need_grad_h, bool need_grad_weight, const c10::optional<at::Tensor>& given_codes,
    const c10::optional<at::Tensor>& given_scales, bool int8_grad_h, bool int8_grad_weight) {
  check_cpu(h, "h");
  check_int8_activations(h, "h");
  const auto shape = check_linear_cross_entropy_args(h, weight, targets);
  check_int8_codes(w_codes, w_scales, h, "h", shape.V, shape.C, shape.V, "w_codes", "w_scales");
  bool given;
  at::Tensor h_codes, h_scales;  // named, not bound: the lambda below captures them
  std::tie(h_codes, h_scales) = rows_of(h, given_codes, given_scales, &given);
  at::Tensor none;
  auto int8_logits = [&](int64_t r0, int64_t n) {
    at::Tensor logits = at::empty({n, shape.V}, h.options());
    gemm_dequantize(h_codes.narrow(0, r0, n), w_codes.t(), h_scales.data_ptr<float>() + r0,
                    w_scales.data_ptr<float>(), nullptr, false, logits, none);
    return logits;
  };
  const std::vector<float> ones(static_cast<size_t>(shape.C), 1.0f);
  const int64_t digest = scales_digest(w_scales);
  const SeedKey key = seed_key(digest);
  const int64_t V = shape.V;
  // grad_h = (G * w_scales) @ w_codes, G's rows stochastically rounded (stochastic_codes_rows)
  auto int8_input_grad = [&](const at::Tensor& g, int64_t r0, at::Tensor& out) {
    const int64_t n = g.size(0);
    at::Tensor g_rows = at::empty({n, V}, g.options().dtype(at::kChar));
    at::Tensor g_scales = at::empty({n}, g.options().dtype(at::kFloat));
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "int8_lm_head_grad_h", [&] {
      using E = Elem<scalar_t>;
      at::parallel_for(0, n, row_grain(V), [&](int64_t b, int64_t e) {
        std::vector<float> v(V);
        stochastic_codes_rows<E>(E::ptr(g), w_scales.data_ptr<float>(), b, e, V, r0, key,
                                 g_rows.data_ptr<int8_t>(), g_scales.data_ptr<float>(),
                                 v.data());
      });
    });
    gemm_dequantize(g_rows, w_codes, g_scales.data_ptr<float>(), ones.data(), nullptr, false, out,
                    none);
  };
  using GradH = std::function<void(const at::Tensor&, int64_t, at::Tensor&)>;
  if (!(int8_grad_weight && need_grad_weight)) {
    return forward_from_logits(h, weight, targets, shape, ignore_index, need_grad_h,
                               need_grad_weight, int8_logits,
                               int8_grad_h ? GradH(int8_input_grad) : GradH());
  }
  const int64_t w_seed = static_cast<int64_t>(static_cast<uint64_t>(digest) + 1);
  Int8WeightGrad weight_grad(h_codes, h_scales, V, w_seed);
  auto out = forward_from_logits(
      h, weight, targets, shape, ignore_index, need_grad_h, need_grad_weight, int8_logits,
      int8_grad_h ? GradH(int8_input_grad) : GradH(),
      [&](const at::Tensor& g, int64_t r0, double bound) { weight_grad.chunk(g, r0, bound); });
  std::get<2>(out) = weight_grad.finish(weight);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("linear_cross_entropy_forward", &linear_cross_entropy_forward_cpu);
  m.impl("int8_linear_cross_entropy_forward", &int8_linear_cross_entropy_forward_cpu);
}

}  // namespace ryzen_llm
