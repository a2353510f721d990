// Python module ltdist._C. The ops register themselves with the dispatcher under the
// "ltdist" namespace (torch.ops.ltdist.*) from their own translation units; importing this
// module is what loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltdist C++/CUDA ops; use them through torch.ops.ltdist";
#ifdef LTDIST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
