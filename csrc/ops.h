// Declarations of the native backend's functions. Each mirrors, name and signature, a
// function of fastvae/reference.py (the backend interface); csrc/fastvae.cpp binds them.
#pragma once
#include <ATen/ATen.h>

namespace fastvae {

// ---- Gaussian column: csrc/cpu/gaussian.cpp
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

// ---- Gumbel column: csrc/cpu/gumbel.cpp (sampling), csrc/cpu/gumbel_kl.cpp (KL)
// tau: a one-element floating-point tensor (a learned temperature is read, never synced)
at::Tensor gumbel_softmax(const at::Tensor& logits, const at::Tensor& seed, const at::Tensor& tau, bool hard,
                          int64_t dim);
at::Tensor gumbel_softmax_backward(const at::Tensor& grad_y, const at::Tensor& logits, const at::Tensor& seed,
                                   const at::Tensor& tau, int64_t dim);
at::Tensor gumbel_softmax_backward_from_sample(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& tau,
                                               int64_t dim);
at::Tensor categorical_kl(const at::Tensor& logits, const c10::optional<at::Tensor>& prior_logits, int64_t dim,
                          const std::string& reduction);
std::vector<at::Tensor> categorical_kl_backward(const at::Tensor& grad, const at::Tensor& logits,
                                                const c10::optional<at::Tensor>& prior_logits, int64_t dim,
                                                const std::string& reduction);
// csrc/cpu/gumbel_quantize.cpp: the sample over codes mixed with the codebook, never written
std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_quantize(const at::Tensor& logits, const at::Tensor& codebook,
                                                               const at::Tensor& seed, const at::Tensor& tau,
                                                               bool hard);
std::vector<at::Tensor> gumbel_quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& logits,
                                                 const at::Tensor& codebook, const at::Tensor& seed,
                                                 const at::Tensor& tau, const at::Tensor& stats,
                                                 const c10::optional<at::Tensor>& indices);
// gumbel_quantize with each row's KL(softmax(logits) || uniform) from the same pass (GumbelQuantizer's
// loss): (quantized, indices, stats (N, 3) = (m, log_sum, logsumexp(logits)), kl (N,)); the backward
// adds the KL's gradient (grad_kl (N,)) to the logits' gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gumbel_quantize_kl(const at::Tensor& logits,
                                                                              const at::Tensor& codebook,
                                                                              const at::Tensor& seed,
                                                                              const at::Tensor& tau, bool hard);
std::vector<at::Tensor> gumbel_quantize_kl_backward(const at::Tensor& grad_quantized, const at::Tensor& grad_kl,
                                                    const at::Tensor& logits, const at::Tensor& codebook,
                                                    const at::Tensor& seed, const at::Tensor& tau,
                                                    const at::Tensor& stats, const at::Tensor& kl,
                                                    const c10::optional<at::Tensor>& indices);

// ---- VQ column: csrc/cpu/vq.cpp (forward), csrc/cpu/vq_grad.cpp (backward)
std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& codebook);
std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize(const at::Tensor& x, const at::Tensor& codebook,
                                                               double beta);
std::tuple<at::Tensor, at::Tensor> vector_quantize_backward(const at::Tensor& grad_quantized,
                                                            const at::Tensor& grad_loss, const at::Tensor& x,
                                                            const at::Tensor& codebook, const at::Tensor& indices,
                                                            double beta);

// csrc/cpu/vq.cpp (residual_quantize), csrc/cpu/vq_grad.cpp, csrc/cpu/kmeans.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_quantize(const at::Tensor& x, const at::Tensor& codebooks,
                                                                 double beta);
std::tuple<at::Tensor, at::Tensor> residual_quantize_backward(const at::Tensor& grad_quantized,
                                                              const at::Tensor& grad_losses, const at::Tensor& x,
                                                              const at::Tensor& codebooks, const at::Tensor& indices,
                                                              double beta, bool codebook_grad);
std::tuple<at::Tensor, at::Tensor> residual_segment_sums(const at::Tensor& x, const at::Tensor& codebooks,
                                                         const at::Tensor& indices);
std::tuple<at::Tensor, at::Tensor> vector_quantize_rotation_backward(const at::Tensor& grad_quantized,
                                                                     const at::Tensor& grad_loss, const at::Tensor& x,
                                                                     const at::Tensor& codebook,
                                                                     const at::Tensor& indices, double beta);
std::tuple<at::Tensor, at::Tensor> segment_mean(const at::Tensor& x, const at::Tensor& indices, int64_t num_segments);

// csrc/cpu/rng.cpp: the raw streams, exposed so tests can check them against the reference.
at::Tensor philox4x32(const at::Tensor& counters, int64_t seed);
at::Tensor normal_stream(int64_t seed, int64_t n);
at::Tensor gumbel_stream(int64_t seed, int64_t rows, int64_t cols);

}  // namespace fastvae
