// torch.optim.AdamW's step (decoupled weight decay, bias correction) for many tensors at once:
// all tensors are cut into blocks of BLOCK elements and one at::parallel_for runs over every
// block of every tensor, each element read once and written once (p, m, v read and written, g
// read: 28 bytes per float32 parameter, the memory-bound minimum). The per-element arithmetic
// follows torch's own sequence (mul_, lerp_, mul_ + addcmul_, sqrt / bc2_sqrt + eps, addcdiv_)
// with the scalars rounded to the tensor dtype as torch does, so float32 results agree to ulps.
// adamw_master_step_ does the same on float32 master copies of bfloat16 parameters and writes
// the rounded master back into the parameter.
#include "common.h"
#include "op_checks.h"
#include "fast_math.h"

#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

namespace ryzen_llm {
namespace {

constexpr int64_t BLOCK = 32768;


// EP: element type of the stored parameter, EG: of the gradient; master (nullable) is the
// float32 copy the update runs on when the parameter is bfloat16.
template <typename EP, typename EG, typename acc_t>
RYZEN_LLM_TARGET_CLONES void adamw_block(typename EP::raw_t* param, acc_t* master,
                                         const typename EG::raw_t* grad, acc_t* exp_avg,
                                         acc_t* exp_avg_sq, AdamWScalars<acc_t> s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(EG::load(grad[i]));
    acc_t p = master != nullptr ? master[i] : static_cast<acc_t>(EP::load(param[i]));
    p = p * s.decay;                                      // param.mul_(1 - lr * wd)
    const acc_t m = exp_avg[i] + s.one_minus_beta1 * (g - exp_avg[i]);  // lerp_(grad, 1 - b1)
    acc_t v = exp_avg_sq[i] * s.beta2;                    // mul_(b2)
    v = v + s.one_minus_beta2 * g * g;                    // addcmul_(g, g, 1 - b2)
    const acc_t denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    p = p + s.neg_step_size * m / denom;                  // addcdiv_(m, denom, -step_size)
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (master != nullptr) master[i] = p;
    param[i] = EP::store(static_cast<typename EP::acc_t>(p));
  }
}

struct Job {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Job> make_jobs(at::TensorList params) {
  std::vector<Job> jobs;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += BLOCK) jobs.push_back({i, b, std::min(n, b + BLOCK)});
  }
  return jobs;
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step) {
  const auto dtype = check_adamw_args(c10::DeviceType::CPU, params, {}, false, grads, exp_avgs,
                                      exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step);
  if (params.empty()) return;
  const std::vector<Job> jobs = make_jobs(params);
  AT_DISPATCH_FLOATING_TYPES(dtype, "adamw_step_", [&] {
    using E = Elem<scalar_t>;
    const auto s = adamw_scalars<scalar_t>(lr, beta1, beta2, eps, weight_decay, step);
    at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        const Job& job = jobs[j];
        const int64_t o = job.begin;
        adamw_block<E, E, scalar_t>(E::ptr(params[job.tensor]) + o, nullptr,
                                    E::ptr(grads[job.tensor]) + o,
                                    exp_avgs[job.tensor].data_ptr<scalar_t>() + o,
                                    exp_avg_sqs[job.tensor].data_ptr<scalar_t>() + o, s,
                                    job.end - job.begin);
      }
    });
  });
}

void adamw_master_step_cpu(at::TensorList params, at::TensorList master_params,
                           at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t step) {
  check_adamw_args(c10::DeviceType::CPU, params, master_params, true, grads, exp_avgs,
                   exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step);
  const std::vector<Job> jobs = make_jobs(params);
  using E = Elem<c10::BFloat16>;
  const auto s = adamw_scalars<float>(lr, beta1, beta2, eps, weight_decay, step);
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      const Job& job = jobs[j];
      const int64_t o = job.begin;
      adamw_block<E, E, float>(E::ptr(params[job.tensor]) + o,
                               master_params[job.tensor].data_ptr<float>() + o,
                               E::ptr(grads[job.tensor]) + o,
                               exp_avgs[job.tensor].data_ptr<float>() + o,
                               exp_avg_sqs[job.tensor].data_ptr<float>() + o, s,
                               job.end - job.begin);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw_master_step_", &adamw_master_step_cpu);
}

}  // namespace ryzen_llm
