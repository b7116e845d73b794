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
  const at::Tensor x2 = x.reshape({s.N, s.C});
  at::Tensor h_pre = at::mm(x2, w1.t());  // (N, F), becomes fc1(x) + b1 in place
  at::Tensor h_act = at::empty_like(h_pre);
  bias_gelu_forward_impl(h_pre, b1, h_pre, h_act);
  at::Tensor y = at::addmm(b2, h_act, w2.t()).view(x.sizes());  // (N, C) -> x's shape
  if (recompute) h_act = at::empty({0}, x.options());
  return {y, h_pre, h_act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gelu_feed_forward_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                               const at::Tensor& w2, const at::Tensor& h_pre,
                               const at::Tensor& h_act, bool recompute) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x: expected a (N, C) or (B, T, C) tensor, got ",
              x.dim(), "-D with sizes ", x.sizes());
  const int64_t C = x.size(-1);
  const int64_t N = x.numel() / std::max<int64_t>(1, C);
  check_like(grad_y, x, "grad_y", "x");
  check_shape(grad_y, x.sizes(), "grad_y");
  check_like(w1, x, "w1", "x");
  check_dim(w1, 2, "w1");
  const int64_t F = w1.size(0);
  check_shape(w1, {F, C}, "w1");
  check_like(w2, x, "w2", "x");
  check_shape(w2, {C, F}, "w2");
  check_like(h_pre, x, "h_pre", "x");
  check_shape(h_pre, {N, F}, "h_pre");
  if (recompute) {
    check_shape(h_act, {0}, "h_act");
  } else {
    check_like(h_act, x, "h_act", "x");
    check_shape(h_act, {N, F}, "h_act");
  }
  const at::Tensor gy = grad_y.reshape({N, C});
  const at::Tensor x2 = x.reshape({N, C});
  at::Tensor grad_b2 = gy.sum(0);
  at::Tensor grad_h = at::mm(gy, w2);  // (N, F): dL/dGELU, becomes dL/dh_pre in place
  at::Tensor act = recompute ? at::empty_like(h_pre) : h_act;
  at::Tensor grad_b1 =
      bias_gelu_backward_impl(grad_h, h_pre, c10::nullopt, grad_h, recompute ? act : at::Tensor());
  at::Tensor grad_w2 = at::mm(gy.t(), act);       // (C, F)
  at::Tensor grad_w1 = at::mm(grad_h.t(), x2);    // (F, C)
  at::Tensor grad_x = at::mm(grad_h, w1).view(x.sizes());
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("bias_gelu_forward", &bias_gelu_forward_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
  m.impl("gelu_feed_forward_forward", &gelu_feed_forward_forward_cpu);
  m.impl("gelu_feed_forward_backward", &gelu_feed_forward_backward_cpu);
}

}  // namespace ryzen_llm
