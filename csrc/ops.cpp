// admm_kernels._C: a Python module with no Python functions of its own. Importing it runs the static
// registrations of every translation unit (TORCH_LIBRARY_IMPL(admm_kernels, CPU/CUDA, m) blocks in
// csrc/cpu/*.cpp and csrc/cuda/*.cu). The op schemas themselves are defined once, in Python
// (admm_kernels/_ops.py), so the package also works with no _C at all.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
