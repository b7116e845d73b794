// The CPU kernel of ryzen_llm::quantized_decode_linear (csrc/cpu/quantized_decode_linear.cpp),
// declared for decode_linear, which hands it the packed int8 and int4 weights (3-D) so that
// every caller of decode_linear (the fused decode and prefill steps) runs any weight format.
#pragma once

#include <ATen/ATen.h>

namespace ryzen_llm {

at::Tensor quantized_decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, bool gelu,
                                       int64_t out_features);

}  // namespace ryzen_llm
