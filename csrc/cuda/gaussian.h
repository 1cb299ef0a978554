// The Gaussian column's CUDA kernels (csrc/cuda/gaussian.cu). The public functions of
// csrc/cpu/gaussian.cpp hand CUDA tensors to these: same names, same signatures.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastvae::cuda {

at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed);
std::vector<at::Tensor> reparameterize_backward(const at::Tensor& grad_z, const at::Tensor& mu,
                                                const at::Tensor& logvar, const at::Tensor& z, const at::Tensor& seed,
                                                bool dense_grad_mu);
at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& prior_mu,
                       const c10::optional<at::Tensor>& prior_logvar, const std::string& reduction);
std::vector<at::Tensor> gaussian_kl_backward(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
                                             const c10::optional<at::Tensor>& prior_mu,
                                             const c10::optional<at::Tensor>& prior_logvar,
                                             const std::string& reduction);
std::tuple<at::Tensor, at::Tensor> reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                     const at::Tensor& seed, const std::string& reduction);
std::vector<at::Tensor> reparameterize_kl_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                   const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& z,
                                                   const at::Tensor& seed, const std::string& reduction);

}  // namespace fastvae::cuda

// First line of a public function in namespace fastvae: `call` (a function of
// fastvae::cuda) answers when `tensor` is on CUDA; a CPU-only build compiles it away.
#ifdef FASTVAE_WITH_CUDA
#define FASTVAE_ON_CUDA(tensor, call) \
  if ((tensor).is_cuda()) return cuda::call
#else
#define FASTVAE_ON_CUDA(tensor, call)
#endif
