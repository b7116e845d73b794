// The int8 x int8 -> int32 GEMMs of the level-4 linear (csrc/cpu/linear.cpp): at::_int_mm
// (oneDNN) or this library's own AVX512-VNNI kernel (int8_gemm.cpp), chosen per shape by timing
// both on the shape's first call. Both give the same exact int32 sums, so the choice changes
// the speed, never a bit of the result.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace ryzen_llm {

// Which implementation runs: kAuto times both on a shape's first call and keeps the faster, the
// own kernel when it is within 15% (kOwnTieMargin in int8_gemm.cpp says why).
enum class Int8GemmMode : int64_t { kAuto = 0, kOwn = 1, kOneDnn = 2 };

// Receives rows [r0, r1) of the int32 result C (M, N), row r at acc + (r - r0) * N. Called
// once per block of rows, possibly from several threads at once (disjoint rows), possibly
// more than once for the same rows (the first call of a shape times both implementations):
// it must write the same values each time.
using Int8RowsFn = std::function<void(const int32_t* acc, int64_t r0, int64_t r1)>;

// C = a (M, K) @ b (K, N), int8 tensors of any strides, exact int32 sums handed to `rows`.
void int8_gemm(const at::Tensor& a, const at::Tensor& b, const Int8RowsFn& rows);

// The process-wide mode; returns the previous one.
Int8GemmMode set_int8_gemm_mode(Int8GemmMode mode);

// Per shape seen: M, N, K, threads, the implementation its last call ran (1 own, 2 oneDNN), the
// microseconds each took when auto timed them (0: not timed), and the calls counted per
// implementation.
std::vector<int64_t> int8_gemm_choices();

}  // namespace ryzen_llm
