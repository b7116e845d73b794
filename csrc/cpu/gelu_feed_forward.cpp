// Bias + exact-erf GELU, alone and inside the whole feed-forward fc2(GELU(fc1(x))).
// bias_gelu: one pass reads x (and the bias row) and writes GELU(x + b); its backward reads
// grad_y and x once, writes grad_x and reduces grad_bias from per-task partial rows in the same
// pass. gelu_feed_forward: the two GEMMs stay ATen's (oneDNN/MKL); bias + GELU runs as one pass
// over the fc1 output that writes the pre-activation in place and the activation beside it. The
// backward fuses dGELU with the grad_b1 reduction (and, with recompute, with recomputing the
// activation for grad_w2), so the (N, F) hidden tensors are touched once between the GEMMs.
#include "common.h"
#include "op_checks.h"
#include "fast_math.h"

#include <torch/library.h>

#include <vector>

namespace ryzen_llm {
namespace {

// One row per call, one simd loop per function: GCC gives up on simd loops that sit in the
// branches of a row loop ("control flow in loop"), so each variant is its own clone set.
// E is Elem<scalar_t> (fast_math.h); `pre` may alias `in`; `grad_in` may alias `grad`.

// u = in + bias rounded to the storage dtype (the saved pre-activation and the activation must
// describe the same tensor); pre = u, act = GELU(u).
template <typename E>
RYZEN_LLM_TARGET_CLONES void bias_gelu_row_save(const typename E::raw_t* in,
                                                const typename E::raw_t* bias,
                                                typename E::raw_t* pre, typename E::raw_t* act,
                                                int64_t F) {
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    const auto u = E::store(E::load(in[c]) + E::load(bias[c]));
    pre[c] = u;
    act[c] = E::store(gelu_value(E::load(u)));
  }
}

template <typename E>
RYZEN_LLM_TARGET_CLONES void bias_gelu_row(const typename E::raw_t* in,
                                           const typename E::raw_t* bias, typename E::raw_t* act,
                                           int64_t F) {
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    const auto u = E::load(E::store(E::load(in[c]) + E::load(bias[c])));
    act[c] = E::store(gelu_value(u));
  }
}

// grad_in = grad * GELU'(in + bias); grad_bias_part (this task's row) accumulates it unrounded.
template <typename E>
RYZEN_LLM_TARGET_CLONES void bias_gelu_backward_row(
    const typename E::raw_t* grad, const typename E::raw_t* in, const typename E::raw_t* bias,
    typename E::raw_t* grad_in, typename E::acc_t* grad_bias_part, int64_t F) {
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    const auto u = E::load(E::store(E::load(in[c]) + E::load(bias[c])));
    const auto d = E::load(grad[c]) * gelu_grad(u);
    grad_in[c] = E::store(d);
    grad_bias_part[c] += d;
  }
}

// The same with the bias already in `in` (the saved pre-activation).
template <typename E>
RYZEN_LLM_TARGET_CLONES void gelu_backward_row(const typename E::raw_t* grad,
                                               const typename E::raw_t* in,
                                               typename E::raw_t* grad_in,
                                               typename E::acc_t* grad_bias_part, int64_t F) {
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    const auto d = E::load(grad[c]) * gelu_grad(E::load(in[c]));
    grad_in[c] = E::store(d);
    grad_bias_part[c] += d;
  }
}

// ... and recomputing the activation act = GELU(in) in the same pass.
template <typename E>
RYZEN_LLM_TARGET_CLONES void gelu_backward_recompute_row(const typename E::raw_t* grad,
                                                         const typename E::raw_t* in,
                                                         typename E::raw_t* grad_in,
                                                         typename E::raw_t* act,
                                                         typename E::acc_t* grad_bias_part,
                                                         int64_t F) {
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    const auto u = E::load(in[c]);
    const auto d = E::load(grad[c]) * gelu_grad(u);
    act[c] = E::store(gelu_value(u));
    grad_in[c] = E::store(d);
    grad_bias_part[c] += d;
  }
}

template <typename E>
void bias_gelu_rows(const typename E::raw_t* in, const typename E::raw_t* bias,
                    typename E::raw_t* pre, typename E::raw_t* act, int64_t row_begin,
                    int64_t row_end, int64_t F) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (pre != nullptr) {
      bias_gelu_row_save<E>(in + r * F, bias, pre + r * F, act + r * F, F);
    } else {
      bias_gelu_row<E>(in + r * F, bias, act + r * F, F);
    }
  }
}

template <typename E>
void bias_gelu_backward_rows(const typename E::raw_t* grad, const typename E::raw_t* in,
                             const typename E::raw_t* bias, typename E::raw_t* grad_in,
                             typename E::raw_t* act, typename E::acc_t* grad_bias_part,
                             int64_t row_begin, int64_t row_end, int64_t F) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t o = r * F;
    if (act != nullptr) {
      gelu_backward_recompute_row<E>(grad + o, in + o, grad_in + o, act + o, grad_bias_part, F);
    } else if (bias != nullptr) {
      bias_gelu_backward_row<E>(grad + o, in + o, bias, grad_in + o, grad_bias_part, F);
    } else {
      gelu_backward_row<E>(grad + o, in + o, grad_in + o, grad_bias_part, F);
    }
  }
}

void bias_gelu_forward_impl(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre,
                            const at::Tensor& act) {
  const int64_t F = in.size(-1);
  const int64_t N = F > 0 ? in.numel() / F : 0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.scalar_type(), "bias_gelu_forward", [&] {
    using E = Elem<scalar_t>;
    const auto* in_ptr = E::ptr(in);
    const auto* b_ptr = E::ptr(bias);
    auto* pre_ptr = pre.defined() ? E::ptr(pre) : nullptr;
    auto* act_ptr = E::ptr(act);
    at::parallel_for(0, N, row_grain(F), [&](int64_t begin, int64_t end) {
      bias_gelu_rows<E>(in_ptr, b_ptr, pre_ptr, act_ptr, begin, end, F);
    });
  });
}

// Returns grad_bias (dtype of grad); writes grad_in (and act when defined).
at::Tensor bias_gelu_backward_impl(const at::Tensor& grad, const at::Tensor& in,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& grad_in,
                                   const at::Tensor& act) {
  const int64_t F = in.size(-1);
  const int64_t N = F > 0 ? in.numel() / F : 0;
  at::Tensor grad_bias = at::empty({F}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.scalar_type(), "bias_gelu_backward", [&] {
    using E = Elem<scalar_t>;
    using acc_t = typename E::acc_t;
    // A few chunks per thread (load balance), each big enough to be worth a task.
    const int64_t chunks = std::max<int64_t>(
        1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()) * 4, N,
                              std::max<int64_t>(1, N * F / 16384)}));
    const int64_t per_chunk = (N + chunks - 1) / chunks;
    // One partial grad_bias row per chunk, summed in chunk order: deterministic.
    std::vector<acc_t> partial(static_cast<size_t>(chunks) * F, acc_t(0));
    const auto* g_ptr = E::ptr(grad);
    const auto* in_ptr = E::ptr(in);
    const auto* b_ptr = bias.has_value() ? E::ptr(*bias) : nullptr;
    auto* gi_ptr = E::ptr(grad_in);
    auto* act_ptr = act.defined() ? E::ptr(act) : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t begin = chunk * per_chunk;
        const int64_t end = std::min(N, begin + per_chunk);
        if (begin >= end) continue;
        bias_gelu_backward_rows<E>(g_ptr, in_ptr, b_ptr, gi_ptr, act_ptr,
                                   partial.data() + chunk * F, begin, end, F);
      }
    });
    auto* gb = E::ptr(grad_bias);
    for (int64_t c = 0; c < F; ++c) {
      acc_t s = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * F + c];
      gb[c] = E::store(s);
    }
  });
  return grad_bias;
}

void check_float_input(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_float_dtype(t, name);
  check_contiguous(t, name);
}


at::Tensor bias_gelu_forward_cpu(const at::Tensor& x, const at::Tensor& bias) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a 0-D tensor");
  check_like(bias, x, "bias", "x");
  check_shape(bias, {x.size(-1)}, "bias");
  at::Tensor y = at::empty_like(x);
  bias_gelu_forward_impl(x, bias, at::Tensor(), y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& grad_y,
                                                          const at::Tensor& x,
                                                          const at::Tensor& bias) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a 0-D tensor");
  check_like(grad_y, x, "grad_y", "x");
  check_shape(grad_y, x.sizes(), "grad_y");
  check_like(bias, x, "bias", "x");
  check_shape(bias, {x.size(-1)}, "bias");
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_bias = bias_gelu_backward_impl(grad_y, x, bias, grad_x, at::Tensor());
  return {grad_x, grad_bias};
}

FeedForwardShape check_feed_forward(const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2) {
  check_float_input(x, "x");
  return check_feed_forward_shapes(x, w1, b1, w2, b2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_feed_forward_forward_cpu(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, bool recompute) {
  const auto s = check_feed_forward(x, w1, b1, w2, b2);
  return feed_forward_forward(x, s, w1, b1, w2, b2, recompute, bias_gelu_forward_impl);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gelu_feed_forward_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                               const at::Tensor& w2, const at::Tensor& h_pre,
                               const at::Tensor& h_act, bool recompute) {
  check_cpu(x, "x");
  check_float_dtype(x, "x");
  const auto s = check_feed_forward_backward_args(grad_y, x, w1, w2, h_pre, h_act, recompute);
  return feed_forward_backward(
      grad_y, x, s, w1, w2, h_pre, h_act, recompute,
      [](const at::Tensor& grad, const at::Tensor& in, const at::Tensor& grad_in,
         const at::Tensor& act) { return bias_gelu_backward_impl(grad, in, c10::nullopt, grad_in, act); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("bias_gelu_forward", &bias_gelu_forward_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
  m.impl("gelu_feed_forward_forward", &gelu_feed_forward_forward_cpu);
  m.impl("gelu_feed_forward_backward", &gelu_feed_forward_backward_cpu);
}

}  // namespace ryzen_llm
