// Gaussian column, CUDA kernels: reparameterize, gaussian_kl, reparameterize_kl and their
// backwards (the backend interface of fastvae/reference.py) for CUDA tensors.
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
// (sample, chunk) blocks, each within one sample, and sums each sample's partials so. The seed stays on the device (read in the kernel):
// no host sync, and the launch can be captured in a CUDA graph.
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
#include "../philox.h"

namespace fastvae::cuda {
namespace {

constexpr int kThreads = 256;              // one Philox group (4 elements) per thread
constexpr int64_t kBlock = 4 * kThreads;   // elements per block, and per reduction partial
constexpr int kSumThreads = 1024;

enum Operand { kMu, kLogvar, kPriorMu, kPriorLogvar, kGradZ, kGradKL, kOperands };
// Output slots. Forward: z, elementwise KL. Backward: mu, logvar, prior_mu, prior_logvar.
enum Slot { kZ = 0, kKL = 1, kGradMu = 0, kGradLogvar = 1, kGradPriorMu = 2, kGradPriorLogvar = 3, kSlots = 4 };

template <typename T>
struct In {
  const T* data = nullptr;
  int64_t row_stride = 0, col_stride = 0;
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
struct Args {
  In<T> in[kOperands];
  T* out[kSlots] = {};
  float* partials = nullptr;      // forward with a reduction: one KL sum per block
  const int64_t* seed = nullptr;  // device memory
  int64_t n = 0, cols = 1;
  float scale = 1.0f;             // backward: 1 / the reduction's divisor
  bool flat = false;              // inputs contiguous and 4-element aligned: index i, vector loads
  bool reduce = false;            // forward: KL summed; backward: grad_kl is one scalar
  // per_sample: forward, block b takes chunk b % chunks of sample b / chunks; backward,
  // grad_kl holds one value per sample (contiguous). A sample has `inner` elements.
  bool per_sample = false;
  int64_t inner = 1, chunks = 1;
};

// The elements i .. i + 3 of `in` (those below end) as float32. (row, col) is element i's
// place in the matrix view; only the strided path uses it.
template <typename T>
__device__ __forceinline__ void load4(const In<T>& in, const Args<T>& a, int64_t i, int64_t end, int64_t row,
                                      int64_t col, float x[4]) {
  if (a.flat && i + 4 <= end && i % 4 == 0) {
    const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(in.data + i);
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = static_cast<float>(v.v[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t offset = a.flat ? i + j : row * in.row_stride + col * in.col_stride;
    x[j] = i + j < end ? static_cast<float>(in.data[offset]) : 0.0f;
    if (++col == a.cols) {  // the group runs on into the next row
      col = 0;
      ++row;
    }
  }
}

// Outputs are fresh contiguous tensors, so aligned where i is: a full group is one vector store.
template <typename T>
__device__ __forceinline__ void store4(T* out, int64_t i, int64_t n, const float x[4]) {
  if (i + 4 <= n && i % 4 == 0) {
    Vec4<T> v;
#pragma unroll
    for (int j = 0; j < 4; ++j) v.v[j] = static_cast<T>(x[j]);
    *reinterpret_cast<Vec4<T>*>(out + i) = v;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // a constant trip count keeps x in registers
    if (i + j < n) out[i + j] = static_cast<T>(x[j]);
  }
}

// Sum of `value` over the block in a fixed tree (warp shuffles, then the warp totals);
// the result is in thread 0. Every thread of the block must call it.
template <int kBlockThreads>
__device__ __forceinline__ float block_sum(float value) {
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ float warp_sums[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = lane < kWarps ? warp_sums[lane] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// eps[j] = the noise of element i + j: lane (i + j) % 4 of Philox group (i + j) / 4, so an
// unaligned i (a per_sample chunk) takes two groups.
__device__ __forceinline__ void noise4(uint64_t seed, int64_t i, float eps[4]) {
  if (i % 4 == 0) return normal4(seed, static_cast<uint64_t>(i / 4), eps);
  float both[8];
  normal4(seed, static_cast<uint64_t>(i / 4), both);
  normal4(seed, static_cast<uint64_t>(i / 4 + 1), both + 4);
#pragma unroll
  for (int j = 0; j < 4; ++j) eps[j] = both[i % 4 + j];
}

template <typename T, bool kBackward, bool kSample, bool kKL, bool kPrior>
__global__ void __launch_bounds__(kThreads) gaussian_kernel(const Args<T> a) {
  // i: the thread's first element; end: where its elements stop (the tensor's or, for a
  // per_sample forward, its sample's end)
  int64_t i, end = a.n;
  bool active;  // no early return: a reduction's block_sum needs every thread
  if (!kBackward && a.per_sample) {
    const int64_t sample = blockIdx.x / a.chunks, local = (blockIdx.x % a.chunks) * kBlock + 4 * threadIdx.x;
    i = sample * a.inner + local;
    end = i - local + a.inner;
    active = local < a.inner;
  } else {
    i = 4 * (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x);
    active = i < a.n;
  }
  const int64_t row = a.flat || !active ? 0 : i / a.cols, col = a.flat || !active ? 0 : i - row * a.cols;
  float kl_sum = 0.0f;
  if (active) {
    float m[4] = {};  // stays zero where a lone sample's backward does not load it
    float v[4], pm[4], plv[4], eps[4], gz[4], gk[4], res[kSlots][4];
    load4(a.in[kLogvar], a, i, end, row, col, v);
    if constexpr (kKL || !kBackward) load4(a.in[kMu], a, i, end, row, col, m);
    if constexpr (kPrior) {
      load4(a.in[kPriorMu], a, i, end, row, col, pm);
      load4(a.in[kPriorLogvar], a, i, end, row, col, plv);
    }
    if constexpr (kSample) noise4(static_cast<uint64_t>(*a.seed), i, eps);
    if constexpr (kBackward && kSample) load4(a.in[kGradZ], a, i, end, row, col, gz);
    if constexpr (kBackward && kKL) {
      if (a.per_sample) {  // one gradient per sample, shared by its elements
#pragma unroll
        for (int j = 0; j < 4; ++j) gk[j] = i + j < end ? static_cast<float>(a.in[kGradKL].data[(i + j) / a.inner]) : 0.0f;
      } else if (a.reduce) {
        const float scalar = static_cast<float>(*a.in[kGradKL].data);
#pragma unroll
        for (int j = 0; j < 4; ++j) gk[j] = scalar;
      } else {
        load4(a.in[kGradKL], a, i, end, row, col, gk);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float std_dev = expf(0.5f * v[j]), var = std_dev * std_dev;  // one exp for both
      const float diff = kPrior ? m[j] - pm[j] : m[j], inv_prior_var = kPrior ? expf(-plv[j]) : 1.0f;
      if constexpr (kBackward) {
        float g_lv = kSample ? 0.5f * gz[j] * std_dev * eps[j] : 0.0f;  // d z / d logvar = std eps / 2
        if constexpr (kKL) {
          const float gs = gk[j] * a.scale;
          const float g_mu = gs * diff * inv_prior_var, g_lv_kl = 0.5f * gs * (var * inv_prior_var - 1.0f);
          res[kGradMu][j] = kSample ? gz[j] + g_mu : g_mu;  // reparameterize_kl: z passes grad_z to mu
          res[kGradPriorMu][j] = -g_mu;
          res[kGradPriorLogvar][j] = -g_lv_kl - 0.5f * diff * g_mu;
          g_lv += g_lv_kl;
        } else if constexpr (kSample) {
          res[kGradMu][j] = gz[j];  // written only when the call asks for a dense mu gradient
        }
        res[kGradLogvar][j] = g_lv;
      } else {
        if constexpr (kSample) res[kZ][j] = m[j] + std_dev * eps[j];
        if constexpr (kKL) {
          res[kKL][j] = 0.5f * (kPrior ? plv[j] - v[j] + (var + diff * diff) * inv_prior_var - 1.0f
                                       : var + m[j] * m[j] - 1.0f - v[j]);
          if (i + j < end) kl_sum += res[kKL][j];
        }
      }
    }
    if constexpr (kBackward) {
      store4(a.out[kGradLogvar], i, a.n, res[kGradLogvar]);
      if (kKL || a.out[kGradMu] != nullptr) store4(a.out[kGradMu], i, a.n, res[kGradMu]);
      if constexpr (kPrior) {
        store4(a.out[kGradPriorMu], i, a.n, res[kGradPriorMu]);
        store4(a.out[kGradPriorLogvar], i, a.n, res[kGradPriorLogvar]);
      }
    } else {
      if constexpr (kSample) store4(a.out[kZ], i, end, res[kZ]);
      if (kKL && !a.reduce) store4(a.out[kKL], i, a.n, res[kKL]);
    }
  }
  if (!kBackward && kKL && a.reduce) {
    kl_sum = block_sum<kThreads>(kl_sum);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = kl_sum;
  }
}

// out[b] = (sum of the partials[b * count, (b + 1) * count)) / divisor, block b: strided
// per-thread sums, then a fixed tree.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    sum_kernel(const float* partials, int64_t count, float divisor, T* out) {
  partials += static_cast<int64_t>(blockIdx.x) * count;
  out += blockIdx.x;
  float sum = 0.0f;
  for (int64_t k = threadIdx.x; k < count; k += kSumThreads) sum += partials[k];
  sum = block_sum<kSumThreads>(sum);
  if (threadIdx.x == 0) *out = static_cast<T>(sum / divisor);
}

template <typename T>
using Kernel = void (*)(Args<T>);

// The kernel for a call: sampling alone, KL alone (with or without a prior), or both.
template <typename T, bool kBackward>
Kernel<T> kernel_for(bool sample, bool kl, bool prior) {
  if (sample) {
    return kl ? gaussian_kernel<T, kBackward, true, true, false> : gaussian_kernel<T, kBackward, true, false, false>;
  }
  return prior ? gaussian_kernel<T, kBackward, false, true, true> : gaussian_kernel<T, kBackward, false, true, false>;
}

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
