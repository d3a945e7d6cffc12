// The Python module rkd_fast._C. Kernels register themselves with the dispatcher (TORCH_LIBRARY_IMPL in
// cpu/ and cuda/); the op schemas are defined in Python (rkd_fast/ops), so importing this module only has
// to load the shared library.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rkd_fast kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
