// `import ryzen_llm._C` loads the shared library, which runs the TORCH_LIBRARY registrations of
// registration.cpp and the kernel files; the module itself exposes nothing (the ops are reached
// through torch.ops.ryzen_llm). Kept apart so the C++ tests link the kernels without Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
