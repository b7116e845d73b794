// The op catalog: every ryzen_llm schema, one line each. Kernels register their device
// implementations in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the Python face of each op
// (register_fake, register_autograd, the wrapper) lives in ryzen_llm/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ryzen_llm, m) {
  // sum = x + residual (empty when residual is None); out = LayerNorm(sum); mean/rstd float32 per row.
  m.def("add_layer_norm_forward(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_backward(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Causal attention over q, k, v (B, nh, T, hs); mask (B, T) True = real key; lse (B, nh, T) in the accumulation type (fp32; fp64 for fp64).
  m.def("causal_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale) -> (Tensor out, Tensor lse)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // One new query (B, nh, 1, hs) against the first cache_lengths[b] rows of k/v caches (B, nh, Tmax, hs).
  m.def("causal_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lengths, float scale) -> Tensor");
}

// `import ryzen_llm._C` loads the library and runs the registrations above; the module itself
// exposes nothing (the ops are reached through torch.ops.ryzen_llm).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
