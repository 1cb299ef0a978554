// Gaussian column, CUDA: reparameterize, gaussian_kl, reparameterize_kl and their
// backwards (the backend interface of fastvae/reference.py) for CUDA tensors. The kernels
// are in gaussian_kernels.cuh; this file checks the inputs, lays them out and launches.
//
// One kernel template does all six, specialised by what the call computes. Each thread
// takes one Philox group, the four elements 4g .. 4g+3 of the row-major flat index, so
// its noise is exactly normal4(seed, g), made in registers and never stored; backward
// makes it again (on a GPU that is cheaper than reading the forward's sample z). Every
// input is addressed as a (rows, cols) matrix in the output's layout (as_rows): a
// row-strided slice or a broadcast prior is read in place; when every input is
// contiguous and aligned, a group is one vector load. A KL reduction writes one float32
// partial per block, and one block adds the partials in a fixed order (sum_kernel):
// same input, same bits, no atomics. The per_sample reduction's forward runs a grid of
// (sample, chunk) blocks, each within one sample, and sums each sample's partials so. The
// seed stays on the device (read in the kernel): no host sync, and the launch can be
// captured in a CUDA graph.
#include "gaussian.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

#include "../matrix_rows.h"
#include "gaussian_kernels.cuh"

namespace fastvae::cuda {
namespace {

using namespace gaussian_kernels;

// The one launch helper: `blocks` blocks on the current stream, launch errors raised.
template <typename... Params, typename... Values>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, Values... values) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastvae CUDA kernel: tensor too large");
  kernel<<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(values...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

double reduction_divisor(const std::string& reduction, const at::Tensor& like) {
  if (reduction == "none" || reduction == "sum") return 1.0;
  if (reduction == "mean") return static_cast<double>(std::max<int64_t>(like.numel(), 1));
  TORCH_CHECK(reduction == "batchmean", "unknown reduction '", reduction, "'");
  return like.dim() ? static_cast<double>(like.size(0)) : 1.0;  // 0 for an empty batch: NaN, as the reference
}

// What one call computes; the public functions below fill it in.
struct Call {
  at::Tensor in[kOperands];  // undefined: not used by this call
  at::Tensor seed;           // defined: the call samples (or differentiates a sample)
  bool backward = false, kl = false;
  bool dense_grad_mu = false;  // a sampling backward also writes mu's gradient (grad_z)
  std::string reduction = "none";
};

// The call's outputs in their slots (Slot); a reduced KL is in slot kKL.
std::array<at::Tensor, kSlots> run(const Call& c) {
  const at::Tensor& like = c.in[kLogvar];  // every output has logvar's shape and dtype
  const c10::cuda::CUDAGuard guard(like.device());
  const auto shape = like.sizes();
  const auto dtype = like.scalar_type();
  const int64_t n = like.numel();
  const bool sample = c.seed.defined(), prior = c.in[kPriorMu].defined() || c.in[kPriorLogvar].defined();
  const bool per_sample = c.kl && c.reduction == "per_sample", reduce = c.kl && c.reduction != "none";
  const int64_t samples = per_sample ? shape[0] : 1, inner = samples ? n / samples : 0;
  const int64_t chunks = (inner + kBlock - 1) / kBlock;
  const int64_t blocks = per_sample && !c.backward ? samples * chunks : (n + kBlock - 1) / kBlock;
  const double divisor = per_sample ? 1.0 : reduction_divisor(c.reduction, like);
  if (sample) {
    TORCH_CHECK(c.seed.numel() == 1 && c.seed.scalar_type() == at::kLong && c.seed.device() == like.device(),
                "seed must be a one-element int64 tensor on ", like.device());
  }
  std::array<at::Tensor, kSlots> out;
  const bool used[kSlots] = {c.backward ? c.kl || c.dense_grad_mu : sample, c.backward || (c.kl && !reduce), c.backward && prior,
                             c.backward && prior};
  for (int s = 0; s < kSlots; ++s) {
    if (used[s]) out[s] = at::empty(shape, like.options());
  }
  std::vector<at::Tensor> inputs;  // the views or copies the kernel reads, alive until it is queued
  AT_DISPATCH_V2(dtype, "fastvae_gaussian_cuda", AT_WRAP([&] {
    Args<scalar_t> a;
    a.n = n;
    a.cols = shape.empty() ? 1 : shape.back();
    a.reduce = reduce;
    a.per_sample = per_sample;
    a.inner = std::max<int64_t>(inner, 1);
    a.chunks = std::max<int64_t>(chunks, 1);
    a.scale = static_cast<float>(1.0 / divisor);
    a.flat = true;
    // A prior given by one half has mean 0 or log-variance 0 for the other.
    const bool half_prior = prior && !(c.in[kPriorMu].defined() && c.in[kPriorLogvar].defined());
    const at::Tensor zero = half_prior ? at::zeros({}, like.options()) : at::Tensor();
    for (int k = 0; k < kOperands; ++k) {
      const bool missing_prior = prior && (k == kPriorMu || k == kPriorLogvar) && !c.in[k].defined();
      if (!c.in[k].defined() && !missing_prior) continue;
      const at::Tensor& t = missing_prior ? zero : c.in[k];
      TORCH_CHECK(t.device() == like.device(), "fastvae CUDA kernel: every input must be on ", like.device());
      if (k == kGradKL && reduce) {  // the gradient of a reduced KL: a scalar, or one per sample
        inputs.push_back(t.to(dtype).contiguous());
        a.in[k].data = inputs.back().const_data_ptr<scalar_t>();
        continue;
      }
      Rows r = as_rows(t, shape, dtype);
      a.in[k] = {r.tensor.const_data_ptr<scalar_t>(), r.row_stride, r.col_stride};
      a.flat = a.flat && r.tensor.is_contiguous() &&
               reinterpret_cast<uintptr_t>(a.in[k].data) % sizeof(Vec4<scalar_t>) == 0;
      inputs.push_back(std::move(r.tensor));
    }
    for (int s = 0; s < kSlots; ++s) a.out[s] = used[s] ? out[s].mutable_data_ptr<scalar_t>() : nullptr;
    a.seed = sample ? c.seed.const_data_ptr<int64_t>() : nullptr;
    at::Tensor partials;
    if (reduce && !c.backward) {
      partials = at::empty({blocks}, like.options().dtype(at::kFloat));
      a.partials = partials.mutable_data_ptr<float>();
    }
    const Kernel<scalar_t> kernel = c.backward ? kernel_for<scalar_t, true>(sample, c.kl, prior)
                                               : kernel_for<scalar_t, false>(sample, c.kl, prior);
    launch(kernel, blocks, kThreads, a);
    if (partials.defined()) {  // also for an empty input: 0 / divisor (NaN for an empty batch)
      out[kKL] = per_sample ? at::empty({samples}, like.options()) : at::empty({}, like.options());
      launch(sum_kernel<scalar_t>, samples, kSumThreads, a.partials, per_sample ? chunks : blocks,
             static_cast<float>(divisor), out[kKL].mutable_data_ptr<scalar_t>());
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed) {
  Call c;
  c.in[kMu] = mu;
  c.in[kLogvar] = logvar;
  c.seed = seed;
  return run(c)[kZ];
}

// z is not read: regenerating eps in registers costs less than reading z (and mu).
std::vector<at::Tensor> reparameterize_backward(const at::Tensor& grad_z, const at::Tensor&, const at::Tensor& logvar,
                                                const at::Tensor&, const at::Tensor& seed, bool dense_grad_mu) {
  Call c;
  c.in[kGradZ] = grad_z;
  c.in[kLogvar] = logvar;
  c.seed = seed;
  c.backward = true;
  c.dense_grad_mu = dense_grad_mu;
  const auto out = run(c);
  if (!dense_grad_mu) return {out[kGradLogvar]};
  return {out[kGradMu], out[kGradLogvar]};
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& prior_mu,
                       const c10::optional<at::Tensor>& prior_logvar, const std::string& reduction) {
  Call c;
  c.in[kMu] = mu;
  c.in[kLogvar] = logvar;
  c.in[kPriorMu] = prior_mu.value_or(at::Tensor());
  c.in[kPriorLogvar] = prior_logvar.value_or(at::Tensor());
  c.kl = true;
  c.reduction = reduction;
  return run(c)[kKL];
}

std::vector<at::Tensor> gaussian_kl_backward(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
                                             const c10::optional<at::Tensor>& prior_mu,
                                             const c10::optional<at::Tensor>& prior_logvar,
                                             const std::string& reduction) {
  Call c;
  c.in[kGradKL] = grad;
  c.in[kMu] = mu;
  c.in[kLogvar] = logvar;
  c.in[kPriorMu] = prior_mu.value_or(at::Tensor());
  c.in[kPriorLogvar] = prior_logvar.value_or(at::Tensor());
  c.backward = c.kl = true;
  c.reduction = reduction;
  auto out = run(c);
  if (!out[kGradPriorMu].defined()) return {out[kGradMu], out[kGradLogvar]};
  return {out.begin(), out.end()};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                     const at::Tensor& seed, const std::string& reduction) {
  Call c;
  c.in[kMu] = mu;
  c.in[kLogvar] = logvar;
  c.seed = seed;
  c.kl = true;
  c.reduction = reduction;
  auto out = run(c);
  return {out[kZ], out[kKL]};
}

std::vector<at::Tensor> reparameterize_kl_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                   const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor&,
                                                   const at::Tensor& seed, const std::string& reduction) {
  Call c;
  c.in[kGradZ] = grad_z;
  c.in[kGradKL] = grad_kl;
  c.in[kMu] = mu;
  c.in[kLogvar] = logvar;
  c.seed = seed;
  c.backward = c.kl = true;
  c.reduction = reduction;
  auto out = run(c);
  return {out[kGradMu], out[kGradLogvar]};
}

}  // namespace fastvae::cuda
