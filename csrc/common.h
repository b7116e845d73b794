// Argument checks and small helpers shared by every kernel file.
// Every check names the argument, what was expected and what arrived, so that bad input
// surfaces as a Python RuntimeError with a useful message instead of a crash.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <string>

namespace ryzen_llm {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
              t.strides(), " for sizes ", t.sizes());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(),
              "-D with sizes ", t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16, name,
              ": expected float32, float64 or bfloat16, got ", d);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ",
              ref.scalar_type(), " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(),
              " (the device of ", ref_name, "), got ", t.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected sizes ", expected, ", got ", t.sizes());
}

// An optional (N,) float32 bias on the CPU: its values, or null without one.
inline const float* checked_float_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias: expected float32, got ",
              bias->scalar_type());
  check_shape(*bias, {N}, "bias");
  check_contiguous(*bias, "bias");
  return bias->data_ptr<float>();
}

// The activations of the decode linears (decode_linear, quantized_decode_linear): x (M, K)
// float32, contiguous, on the CPU, beside a CPU weight.
inline void check_decode_linear_input(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, "x");
  check_dim(x, 2, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x: expected float32, got ", x.scalar_type());
  check_contiguous(x, "x");
  check_cpu(weight, "weight");
}

// Rows of a row-wise kernel handed to one task of at::parallel_for: enough work per task that
// scheduling costs nothing next to it.
inline int64_t row_grain(int64_t row_len) {
  const int64_t target = 16384;  // elements per task
  return std::max<int64_t>(1, target / std::max<int64_t>(1, row_len));
}

}  // namespace ryzen_llm

// Per-function multiversioning: the compiler emits an AVX-512, an AVX2+FMA and a portable clone
// of each marked loop nest and the loader picks one from the CPU's features at run time, so one
// binary is fast on Zen 4/Sapphire Rapids and still runs on any x86-64 or ARM machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(RYZEN_LLM_NO_MULTIVERSION)
#define RYZEN_LLM_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RYZEN_LLM_TARGET_CLONES
#endif

// Hand-written AVX-512 paths (intrinsics in functions of their own target, chosen at run time):
// built with GCC >= 11 on x86-64, except in the sanitizer build, which tests the portable code.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(RYZEN_LLM_NO_MULTIVERSION)
#define RYZEN_LLM_AVX512 1
#include <immintrin.h>
#define RYZEN_LLM_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define RYZEN_LLM_AVX512_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,fma,avx512bf16")))
#define RYZEN_LLM_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
namespace ryzen_llm {
inline bool avx512_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
// vdpbf16ps: bfloat16 pairs multiplied and summed into float32 lanes
inline bool avx512_bf16_available() {
  static const bool ok = avx512_available() && __builtin_cpu_supports("avx512bf16");
  return ok;
}
// vpdpbusd: u8 x s8 quadruples multiplied and summed into int32 lanes
inline bool avx512_vnni_available() {
  static const bool ok = avx512_available() && __builtin_cpu_supports("avx512vnni");
  return ok;
}
}  // namespace ryzen_llm
#else
namespace ryzen_llm {
inline bool avx512_available() { return false; }
inline bool avx512_bf16_available() { return false; }
inline bool avx512_vnni_available() { return false; }
}  // namespace ryzen_llm
#endif
