// Python module remp_sglang._C: importing it loads this shared library, whose
// static initialisers register the torch.ops.remp.* operators (ops.cpp and,
// when built, kv_copy_cuda.cu).
#include <Python.h>
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "remp KV-cache copy kernels (ops are registered as torch.ops.remp.*)";
#if defined(REMP_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
