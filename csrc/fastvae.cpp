// The one registration file of the extension fastvae._C: binds the native backend's
// functions (declared in ops.h) with pybind11; a direct pybind call keeps per-call
// overhead at about a microsecond.
#include <torch/extension.h>

#include "ops.h"

namespace {

std::vector<std::string> devices() {
#ifdef FASTVAE_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvae native backend: C++ CPU kernels (and CUDA kernels where built with CUDA)";
  m.def("devices", &devices, "Device types this build runs");
  m.def("philox4x32", &fastvae::philox4x32, "Raw Philox-4x32-10 of (n, 4) uint32 counters held in int64");
  m.def("normal_stream", &fastvae::normal_stream, "The first n values of the Gaussian ops' noise stream");
  m.def("gumbel_stream", &fastvae::gumbel_stream, "The (rows, cols) Gumbel noise of the Gumbel ops");
  // ---- Gaussian column
  m.def("reparameterize", &fastvae::reparameterize);
  // ---- Gumbel column
  m.def("gumbel_softmax", &fastvae::gumbel_softmax);
  m.def("gumbel_softmax_backward", &fastvae::gumbel_softmax_backward);
  m.def("gumbel_softmax_backward_from_sample", &fastvae::gumbel_softmax_backward_from_sample);
  m.def("categorical_kl", &fastvae::categorical_kl);
  m.def("categorical_kl_backward", &fastvae::categorical_kl_backward);
  // ---- VQ column
}
