// The Python module nanotrain._C. It holds no functions (the ops live in torch.ops.nanotrain, registered
// by the static initialisers of the other sources when this library is loaded), only the facts that were
// fixed at build time, so nanotrain.ops._ext can say how the extension was built.
#include <Python.h>

#ifndef NANOTRAIN_WITH_CUDA
#define NANOTRAIN_WITH_CUDA 0
#endif
#ifndef NANOTRAIN_CUDA_ARCHES
#define NANOTRAIN_CUDA_ARCHES ""
#endif
#ifndef NANOTRAIN_TORCH_VERSION
#define NANOTRAIN_TORCH_VERSION "unknown"
#endif
#ifndef NANOTRAIN_CUDA_VERSION
#define NANOTRAIN_CUDA_VERSION ""
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "nanotrain's compiled ops; call them as torch.ops.nanotrain.<name> (see nanotrain.ops._ext).",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "WITH_CUDA", NANOTRAIN_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHES", NANOTRAIN_CUDA_ARCHES) < 0 ||
      PyModule_AddStringConstant(module, "CUDA_VERSION", NANOTRAIN_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", NANOTRAIN_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
