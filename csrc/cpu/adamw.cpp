// torch.optim.AdamW's step (decoupled weight decay, bias correction) for many tensors at once:
// all tensors are cut into blocks of BLOCK elements and one at::parallel_for runs over every
// block of every tensor, each element read once and written once (p, m, v read and written, g
// read: 28 bytes per float32 parameter, the memory-bound minimum). The per-element arithmetic
// follows torch's own sequence (mul_, lerp_, mul_ + addcmul_, sqrt / bc2_sqrt + eps, addcdiv_)
// with the scalars rounded to the tensor dtype as torch does, so float32 results agree to ulps.
// adamw_master_step_ does the same on float32 master copies of bfloat16 parameters and writes
// the rounded master back into the parameter.
// float32 parameters may keep their moments in bfloat16 (half the optimizer state's bytes): the
// update runs in float32 and the new moments are rounded stochastically, so that an update
// smaller than bfloat16's spacing (v moves by (1 - beta2) of itself per step: 0.1% at beta2
// 0.999, under bfloat16's 0.4%) still moves them on average instead of never. The random bits
// hash (step, tensor position, element): reproducible, whatever the thread count.
#include "common.h"
#include "op_checks.h"
#include "fast_math.h"
#include "stochastic_round.h"

#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace ryzen_llm {
namespace {

constexpr int64_t BLOCK = 32768;


// Moments kept in the accumulation type: stored as computed.
template <typename acc_t>
struct ExactState {
  using raw_t = acc_t;
  static RYZEN_LLM_INLINE acc_t load(raw_t v) { return v; }
  static RYZEN_LLM_INLINE raw_t store(acc_t v, uint32_t) { return v; }
};

// float32 moments kept as bfloat16: rounded stochastically with 16 random bits (added below the
// kept bits, then truncated: rounds up with probability equal to the dropped fraction). NaN
// stays NaN; a carry out of the largest finite value gives inf, as rounding to nearest would.
struct StochasticBf16State {
  using raw_t = uint16_t;
  static RYZEN_LLM_INLINE float load(uint16_t v) { return Elem<c10::BFloat16>::load(v); }
  static RYZEN_LLM_INLINE uint16_t store(float v, uint32_t random16) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    return v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>((u + random16) >> 16);
  }
};

// EP: element type of the stored parameter, EG: of the gradient, ES: of the moments; master
// (kMaster) is the float32 copy the update runs on when the parameter is bfloat16, else null.
// index is the first element's position in the stochastic rounding's hash. (kMaster is a
// template argument: with a run-time null test inside the loop GCC vectorized the master's
// loads as masked loads from the null pointer, each faulting lane suppressed by a microcode
// assist on Zen 4: the bfloat16-moment step ran at a fifth of its present speed.)
template <typename EP, typename EG, typename ES, typename acc_t, bool kMaster>
RYZEN_LLM_TARGET_CLONES void adamw_block(typename EP::raw_t* param, acc_t* master,
                                         const typename EG::raw_t* grad,
                                         typename ES::raw_t* exp_avg,
                                         typename ES::raw_t* exp_avg_sq, AdamWScalars<acc_t> s,
                                         int64_t n, SeedKey key, uint64_t index) {
  const uint32_t index_lo = static_cast<uint32_t>(index);
  const uint32_t index_hi = static_cast<uint32_t>(index >> 32) ^ key.hi;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(EG::load(grad[i])) * s.grad_scale;  // grad.mul_(scale)
    acc_t p;
    if constexpr (kMaster) p = master[i];
    else p = static_cast<acc_t>(EP::load(param[i]));
    const acc_t m_old = ES::load(exp_avg[i]);
    p = p * s.decay;                                      // param.mul_(1 - lr * wd)
    const acc_t m = m_old + s.one_minus_beta1 * (g - m_old);  // lerp_(grad, 1 - b1)
    acc_t v = ES::load(exp_avg_sq[i]) * s.beta2;          // mul_(b2)
    v = v + s.one_minus_beta2 * g * g;                    // addcmul_(g, g, 1 - b2)
    const acc_t denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    p = p + s.neg_step_size * m / denom;                  // addcdiv_(m, denom, -step_size)
    // One hash gives both moments' 16 random bits (unused for exact moments). 32-bit lanes:
    // a block never crosses a multiple of 2^32 elements (see hash_index).
    const uint32_t bits = mix32(mix32((index_lo + static_cast<uint32_t>(i)) ^ key.lo) ^ index_hi);
    exp_avg[i] = ES::store(m, bits & 0xFFFFu);
    exp_avg_sq[i] = ES::store(v, bits >> 16);
    if constexpr (kMaster) master[i] = p;
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

// Each tensor's elements hash as (position in the list << 40) + offset: distinct for any tensor
// under 2^32 elements (the fused step checks it), so that the offset's low 32 bits never carry.
constexpr int kTensorIndexShift = 40;

uint64_t hash_index(const Job& job) {
  return (static_cast<uint64_t>(job.tensor) << kTensorIndexShift) + static_cast<uint64_t>(job.begin);
}

// One block of adamw_step_: moments of the parameter's dtype, or bfloat16 for float32.
template <typename scalar_t>
void adamw_step_job(const Job& job, at::TensorList params, at::TensorList grads,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    const AdamWScalars<scalar_t>& s, SeedKey key, bool bf16_state) {
  using E = Elem<scalar_t>;
  const int64_t o = job.begin, n = job.end - job.begin;
  auto* param = E::ptr(params[job.tensor]) + o;
  const auto* grad = E::ptr(grads[job.tensor]) + o;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (bf16_state) {
      using B = Elem<c10::BFloat16>;
      adamw_block<E, E, StochasticBf16State, float, false>(
          param, nullptr, grad, B::ptr(exp_avgs[job.tensor]) + o,
          B::ptr(exp_avg_sqs[job.tensor]) + o, s, n, key, hash_index(job));
      return;
    }
  }
  adamw_block<E, E, ExactState<scalar_t>, scalar_t, false>(
      param, nullptr, grad, exp_avgs[job.tensor].data_ptr<scalar_t>() + o,
      exp_avg_sqs[job.tensor].data_ptr<scalar_t>() + o, s, n, key, hash_index(job));
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, double grad_scale) {
  const auto dtype = check_adamw_args(c10::DeviceType::CPU, params, {}, false, grads, exp_avgs,
                                      exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                                      grad_scale, /*bf16_state_ok=*/true);
  if (params.empty()) return;
  const std::vector<Job> jobs = make_jobs(params);
  const SeedKey key = seed_key(step);
  const bool bf16_state = exp_avgs[0].scalar_type() == at::kBFloat16;
  for (size_t i = 0; bf16_state && i < params.size(); ++i) {
    TORCH_CHECK(params[i].numel() < (int64_t{1} << 32), "params[", i, "]: bfloat16 moments take "
                "tensors under 2^32 elements, got ", params[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "adamw_step_", [&] {
    const auto s = adamw_scalars<scalar_t>(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
    at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        adamw_step_job<scalar_t>(jobs[j], params, grads, exp_avgs, exp_avg_sqs, s, key,
                                 bf16_state);
      }
    });
  });
}

void adamw_master_step_cpu(at::TensorList params, at::TensorList master_params,
                           at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t step, double grad_scale) {
  check_adamw_args(c10::DeviceType::CPU, params, master_params, true, grads, exp_avgs,
                   exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  const std::vector<Job> jobs = make_jobs(params);
  using E = Elem<c10::BFloat16>;
  const auto s = adamw_scalars<float>(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      const Job& job = jobs[j];
      const int64_t o = job.begin;
      adamw_block<E, E, ExactState<float>, float, true>(
          E::ptr(params[job.tensor]) + o, master_params[job.tensor].data_ptr<float>() + o,
          E::ptr(grads[job.tensor]) + o, exp_avgs[job.tensor].data_ptr<float>() + o,
          exp_avg_sqs[job.tensor].data_ptr<float>() + o, s, job.end - job.begin, SeedKey{0, 0},
          0);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw_master_step_", &adamw_master_step_cpu);
}

}  // namespace ryzen_llm
