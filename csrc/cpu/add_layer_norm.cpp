// LayerNorm fused with the residual add: sum = x + residual; out = (sum - mean) * rstd * w + b.
// One pass reads x and residual and writes sum and out (4 row-sized streams instead of the 6 of
// an add followed by a LayerNorm); only mean and rstd (2 floats per row) are saved besides sum.
// Backward: one pass per row for grad_input, per-thread partial sums for grad_weight/grad_bias.
//
// Under bf16 autocast the residual stream stays float32 while the branches run in bfloat16: a
// float32 x then takes a bfloat16 residual, emits out in bfloat16 (out_dtype) for the next
// linear, and in the backward reads a bfloat16 grad_out and writes the residual's bfloat16
// gradient beside grad_input. Each of those four tensors would otherwise be a separate cast
// (a read and a write of the whole activation); the values are the same bits as those casts.
#include "common.h"
#include "fast_math.h"
#include "op_checks.h"
#include "cpu/int8_linear.h"

#include <torch/library.h>

#include <vector>

namespace ryzen_llm {
namespace {

// Element types are seen through Elem<scalar_t> (raw bits for bfloat16) so that the conversions
// inline into every multiversioned clone and the loops vectorise.
// res_t: the residual's element type; out_t: out's (both scalar_t unless mixed, see above).
template <typename scalar_t, typename res_t, typename out_t, typename acc_t,
          typename raw_t = typename Elem<scalar_t>::raw_t,
          typename res_raw_t = typename Elem<res_t>::raw_t,
          typename out_raw_t = typename Elem<out_t>::raw_t>
RYZEN_LLM_TARGET_CLONES void add_layer_norm_rows(
    const raw_t* x, const res_raw_t* residual, const raw_t* weight, const raw_t* bias,
    out_raw_t* out, raw_t* sum, acc_t* mean_out, acc_t* rstd_out, acc_t* scratch,
    int64_t row_begin, int64_t row_end, int64_t C, double eps) {
  using E = Elem<scalar_t>;
  using ER = Elem<res_t>;
  using EO = Elem<out_t>;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const raw_t* xr = x + r * C;
    acc_t mean = 0;
    if (residual != nullptr) {
      const res_raw_t* rr = residual + r * C;
      raw_t* sr = sum + r * C;
#pragma omp simd reduction(+ : mean)
      for (int64_t c = 0; c < C; ++c) {
        // Round the sum to the storage dtype first: the saved sum and the normalised output
        // must describe the same tensor.
        raw_t s = E::store(E::load(xr[c]) + ER::load(rr[c]));
        sr[c] = s;
        scratch[c] = E::load(s);
        mean += scratch[c];
      }
    } else {
#pragma omp simd reduction(+ : mean)
      for (int64_t c = 0; c < C; ++c) {
        scratch[c] = E::load(xr[c]);
        mean += scratch[c];
      }
    }
    mean /= static_cast<acc_t>(C);
    acc_t var = 0;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < C; ++c) {
      acc_t d = scratch[c] - mean;
      var += d * d;
    }
    var /= static_cast<acc_t>(C);
    const acc_t rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
    out_raw_t* outr = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      outr[c] = EO::store((scratch[c] - mean) * rstd * E::load(weight[c]) + E::load(bias[c]));
    }
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// grad_input = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_sum, with g = grad_out * w.
// grad_weight / grad_bias accumulate into this thread's partial rows. gout_t: grad_out's element
// type; grad_residual (gres_t), when not null, receives the same values as grad_input.
template <typename scalar_t, typename gout_t, typename gres_t, typename acc_t,
          typename raw_t = typename Elem<scalar_t>::raw_t,
          typename gout_raw_t = typename Elem<gout_t>::raw_t,
          typename gres_raw_t = typename Elem<gres_t>::raw_t>
RYZEN_LLM_TARGET_CLONES void add_layer_norm_backward_rows(
    const gout_raw_t* grad_out, const raw_t* grad_sum, const raw_t* input, const raw_t* weight,
    const acc_t* mean, const acc_t* rstd, raw_t* grad_input, gres_raw_t* grad_residual,
    acc_t* grad_weight_part, acc_t* grad_bias_part, acc_t* xhat, int64_t row_begin,
    int64_t row_end, int64_t C) {
  using E = Elem<scalar_t>;
  using EG = Elem<gout_t>;
  using ER = Elem<gres_t>;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const gout_raw_t* go = grad_out + r * C;
    const raw_t* in = input + r * C;
    const acc_t m = mean[r];
    const acc_t s = rstd[r];
    acc_t sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t c = 0; c < C; ++c) {
      acc_t xh = (E::load(in[c]) - m) * s;
      acc_t dy = EG::load(go[c]);
      xhat[c] = xh;
      grad_weight_part[c] += dy * xh;
      grad_bias_part[c] += dy;
      acc_t g = dy * E::load(weight[c]);
      sum_g += g;
      sum_gx += g * xh;
    }
    const acc_t mean_g = sum_g / static_cast<acc_t>(C);
    const acc_t mean_gx = sum_gx / static_cast<acc_t>(C);
    raw_t* gi = grad_input + r * C;
    const raw_t* gs = grad_sum != nullptr ? grad_sum + r * C : nullptr;
    if (grad_residual != nullptr) {
      gres_raw_t* gr = grad_residual + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        acc_t g = EG::load(go[c]) * E::load(weight[c]);
        acc_t v = s * (g - mean_g - xhat[c] * mean_gx);
        if (gs != nullptr) v += E::load(gs[c]);
        const raw_t stored = E::store(v);
        gi[c] = stored;
        gr[c] = ER::store(E::load(stored));  // as grad_input.to(residual dtype)
      }
    } else if (gs != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        acc_t g = EG::load(go[c]) * E::load(weight[c]);
        gi[c] = E::store(s * (g - mean_g - xhat[c] * mean_gx) + E::load(gs[c]));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        acc_t g = EG::load(go[c]) * E::load(weight[c]);
        gi[c] = E::store(s * (g - mean_g - xhat[c] * mean_gx));
      }
    }
  }
}

// The element types a float32 LayerNorm may mix with: its own, or bfloat16 (autocast's CPU
// dtype). Calls f(type tag) with c10::BFloat16 or float.
template <typename F>
void with_mixed_type(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) {
    f(c10::BFloat16());
  } else {
    f(float());
  }
}

// float32 input may come with a bfloat16 residual, gradient or output (see the top of the file).
constexpr at::ScalarType kMixable[] = {at::kBFloat16};

at::ScalarType stats_dtype(const at::Tensor& x) { return layer_norm_stats_dtype(x); }

// Rows normalised, then quantized, at a time: 16 rows of 512 bfloat16 values are 16 KB.
constexpr int64_t kCodeRows = 16;

// out, sum, mean, rstd and, with codes (float32 or bfloat16 out), out's int8 row codes (N, C)
// and scales (N,) as int8_quantize makes them, written while each row is in cache.
std::vector<at::Tensor> add_layer_norm_forward_impl(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps, c10::optional<at::ScalarType> out_dtype, bool codes) {
  check_cpu(x, "input");
  check_float_dtype(x, "input");
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  check_add_layer_norm_forward_args(x, residual, weight, bias, eps, out_type, kMixable);
  TORCH_CHECK(!codes || out_type == at::kFloat || out_type == at::kBFloat16,
              "add_layer_norm_int8_forward: out must be float32 or bfloat16 for int8 codes, got ",
              out_type);
  const bool has_residual = residual.has_value();
  const int64_t C = x.size(-1);
  const int64_t N = x.numel() / C;
  auto out = at::empty_like(x, x.options().dtype(out_type));
  auto sum = has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  auto mean = at::empty(stat_shape, x.options().dtype(stats_dtype(x)));
  auto rstd = at::empty(stat_shape, x.options().dtype(stats_dtype(x)));
  auto row_codes = at::empty({codes ? N : 0, codes ? C : 0}, x.options().dtype(at::kChar));
  auto row_scales = at::empty({codes ? N : 0}, x.options().dtype(at::kFloat));
  const at::ScalarType res_type = has_residual ? residual->scalar_type() : x.scalar_type();
  auto run = [&](auto x_tag, auto res_tag, auto out_tag) {
    using scalar_t = decltype(x_tag);
    using res_t = decltype(res_tag);
    using out_t = decltype(out_tag);
    using acc_t = at::opmath_type<scalar_t>;
    using E = Elem<scalar_t>;
    const auto* res_ptr = has_residual ? Elem<res_t>::ptr(*residual) : nullptr;
    auto* out_ptr = Elem<out_t>::ptr(out);
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(C);
      // with codes: kCodeRows rows at a time, quantized while they are in L1
      const int64_t step = codes ? kCodeRows : end - begin;
      for (int64_t r0 = begin; r0 < end; r0 += step) {
        const int64_t r1 = std::min(end, r0 + step);
        add_layer_norm_rows<scalar_t, res_t, out_t, acc_t>(
            E::ptr(x), res_ptr, E::ptr(weight), E::ptr(bias), out_ptr,
            has_residual ? E::ptr(sum) : nullptr, mean.data_ptr<acc_t>(),
            rstd.data_ptr<acc_t>(), scratch.data(), r0, r1, C, eps);
        if constexpr (!std::is_same_v<out_t, double>) {
          if (codes) {
            quantize_rows(out_ptr + r0 * C, r1 - r0, C, row_codes.data_ptr<int8_t>() + r0 * C,
                          row_scales.data_ptr<float>() + r0);
          }
        }
      }
    });
  };
  if (x.scalar_type() == at::kFloat && (res_type != at::kFloat || out_type != at::kFloat)) {
    with_mixed_type(res_type, [&](auto res_tag) {
      with_mixed_type(out_type, [&](auto out_tag) { run(float(), res_tag, out_tag); });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_layer_norm_forward",
                                   [&] { run(scalar_t(), scalar_t(), scalar_t()); });
  }
  return {out, sum, mean, rstd, row_codes, row_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps, c10::optional<at::ScalarType> out_dtype) {
  auto r = add_layer_norm_forward_impl(x, residual, weight, bias, eps, out_dtype, false);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
add_layer_norm_int8_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                const at::Tensor& weight, const at::Tensor& bias, double eps,
                                c10::optional<at::ScalarType> out_dtype) {
  auto r = add_layer_norm_forward_impl(x, residual, weight, bias, eps, out_dtype, true);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// grad_residual: the residual's gradient in residual_dtype when that differs from input's (the
// values of grad_input, rounded once); otherwise empty and grad_input serves both.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_sum,
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, c10::optional<at::ScalarType> residual_dtype) {
  check_cpu(input, "input");
  check_float_dtype(input, "input");
  const at::ScalarType res_type = residual_dtype.value_or(input.scalar_type());
  const int64_t N = check_add_layer_norm_backward_args(grad_out, grad_sum, input, weight, mean,
                                                       rstd, res_type, kMixable);
  const int64_t C = input.size(-1);
  const bool has_grad_sum = grad_sum.has_value();
  const bool separate_residual = res_type != input.scalar_type();
  auto grad_input = at::empty_like(input);
  auto grad_residual = separate_residual ? at::empty_like(input, input.options().dtype(res_type))
                                         : at::empty({0}, input.options());
  at::Tensor grad_weight, grad_bias;
  auto run = [&](auto in_tag, auto gout_tag, auto gres_tag) {
    using scalar_t = decltype(in_tag);
    using gout_t = decltype(gout_tag);
    using gres_t = decltype(gres_tag);
    using acc_t = at::opmath_type<scalar_t>;
    using E = Elem<scalar_t>;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
    const int64_t per_chunk = (N + chunks - 1) / chunks;
    // One partial (grad_weight, grad_bias) row pair per chunk, reduced in a fixed order so the
    // result does not depend on thread timing.
    std::vector<acc_t> partial(static_cast<size_t>(chunks) * 2 * C, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> xhat(C);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t begin = chunk * per_chunk;
        const int64_t end = std::min(N, begin + per_chunk);
        if (begin >= end) continue;
        acc_t* part = partial.data() + chunk * 2 * C;
        add_layer_norm_backward_rows<scalar_t, gout_t, gres_t, acc_t>(
            Elem<gout_t>::ptr(grad_out), has_grad_sum ? E::ptr(*grad_sum) : nullptr,
            E::ptr(input), E::ptr(weight), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
            E::ptr(grad_input), separate_residual ? Elem<gres_t>::ptr(grad_residual) : nullptr,
            part, part + C, xhat.data(), begin, end, C);
      }
    });
    std::vector<acc_t> gw(C, acc_t(0)), gb(C, acc_t(0));
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const acc_t* part = partial.data() + chunk * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        gw[c] += part[c];
        gb[c] += part[C + c];
      }
    }
    grad_weight = at::empty({C}, weight.options());
    grad_bias = at::empty({C}, weight.options());
    for (int64_t c = 0; c < C; ++c) {
      grad_weight.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(gw[c]);
      grad_bias.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(gb[c]);
    }
  };
  if (input.scalar_type() == at::kFloat &&
      (grad_out.scalar_type() != at::kFloat || separate_residual)) {
    with_mixed_type(grad_out.scalar_type(), [&](auto gout_tag) {
      with_mixed_type(res_type, [&](auto gres_tag) { run(float(), gout_tag, gres_tag); });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "add_layer_norm_backward",
                                   [&] { run(scalar_t(), scalar_t(), scalar_t()); });
  }
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("add_layer_norm_forward", &add_layer_norm_forward_cpu);
  m.impl("add_layer_norm_int8_forward", &add_layer_norm_int8_forward_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace ryzen_llm
