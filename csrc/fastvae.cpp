// The one registration file of the extension fastvae._C: binds the native backend's
// functions (declared in ops.h) with pybind11; a direct pybind call keeps per-call
// overhead at about a microsecond.
#include <torch/extension.h>

#include "eager.h"
#include "ops.h"

namespace {

std::vector<std::string> devices() {
#ifdef FASTVAE_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

// The backend-interface functions with a CUDA kernel (csrc/cuda/); the others run on CPU
// only, so the backend registry sends their CUDA tensors elsewhere.
std::vector<std::string> cuda_ops() {
#ifdef FASTVAE_WITH_CUDA
  return {"reparameterize",    "reparameterize_backward",    "gaussian_kl", "gaussian_kl_backward",
          "reparameterize_kl", "reparameterize_kl_backward"};
#else
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvae native backend: C++ CPU kernels (and CUDA kernels where built with CUDA)";
  m.def("devices", &devices, "Device types this build runs");
  m.def("cuda_ops", &cuda_ops, "Names of the functions with CUDA kernels in this build");
  m.def("philox4x32", &fastvae::philox4x32, "Raw Philox-4x32-10 of (n, 4) uint32 counters held in int64");
  m.def("normal_stream", &fastvae::normal_stream, "The first n values of the Gaussian ops' noise stream");
  m.def("gumbel_stream", &fastvae::gumbel_stream, "The (rows, cols) Gumbel noise of the Gumbel ops");
  // ---- Gaussian column
  m.def("reparameterize", &fastvae::reparameterize, "z = mu + exp(logvar / 2) * eps, eps from the seed's stream");
  m.def("reparameterize_backward", &fastvae::reparameterize_backward,
        "Gradients of reparameterize: [logvar], or [mu, logvar] with dense_grad_mu");
  m.def("gaussian_kl", &fastvae::gaussian_kl, "KL of diagonal Gaussians to a (broadcast) prior, reduced");
  m.def("gaussian_kl_backward", &fastvae::gaussian_kl_backward,
        "Gradients of gaussian_kl: mu, logvar[, prior_mu, prior_logvar at mu's shape]");
  m.def("reparameterize_kl", &fastvae::reparameterize_kl, "(z, KL to N(0, I)) in one pass");
  m.def("reparameterize_kl_backward", &fastvae::reparameterize_kl_backward, "Gradients of reparameterize_kl");
  // ---- Gumbel column
  m.def("gumbel_softmax", &fastvae::gumbel_softmax);
  m.def("gumbel_softmax_backward", &fastvae::gumbel_softmax_backward);
  m.def("gumbel_softmax_backward_from_sample", &fastvae::gumbel_softmax_backward_from_sample);
  m.def("categorical_kl", &fastvae::categorical_kl);
  m.def("categorical_kl_backward", &fastvae::categorical_kl_backward);
  m.def("gumbel_quantize", &fastvae::gumbel_quantize);
  m.def("gumbel_quantize_backward", &fastvae::gumbel_quantize_backward);
  m.def("gumbel_quantize_kl", &fastvae::gumbel_quantize_kl);
  m.def("gumbel_quantize_kl_backward", &fastvae::gumbel_quantize_kl_backward);
  // ---- VQ column
  m.def("nearest_code", &fastvae::nearest_code);
  m.def("vector_quantize", &fastvae::vector_quantize);
  m.def("vector_quantize_backward", &fastvae::vector_quantize_backward);
  m.def("vector_quantize_rotation_backward", &fastvae::vector_quantize_rotation_backward);
  m.def("residual_quantize", &fastvae::residual_quantize);
  m.def("residual_quantize_backward", &fastvae::residual_quantize_backward);
  m.def("residual_segment_sums", &fastvae::residual_segment_sums);
  m.def("segment_mean", &fastvae::segment_mean);
  // ---- The per-call path of plain eager CPU calls (csrc/eager.cpp): the result, or None
  // for a call the Python path must take.
  m.def("eager_reparameterize", &fastvae::eager_reparameterize);
  m.def("eager_gaussian_kl", &fastvae::eager_gaussian_kl);
  m.def("eager_reparameterize_kl", &fastvae::eager_reparameterize_kl);
  m.def("eager_gumbel_softmax", &fastvae::eager_gumbel_softmax);
  m.def("eager_vector_quantize", &fastvae::eager_vector_quantize);
}
