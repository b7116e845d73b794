// The op catalog: every ryzen_llm schema, one line each. Kernels register their device
// implementations in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the Python face of each op
// (register_fake, register_autograd, the wrapper) lives in ryzen_llm/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(ryzen_llm, m) {
  // sum = x + residual (empty when residual is None); out = LayerNorm(sum); mean/rstd per row (float32; float64 for float64 x).
  m.def("add_layer_norm_forward(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_backward(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
