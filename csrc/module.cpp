// The Python module minift._C. Importing it registers the operators of the `minift` library
// (TORCH_LIBRARY blocks in the other files); the ops are then reached as torch.ops.minift.<name>.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
