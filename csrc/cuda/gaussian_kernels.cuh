// The Gaussian column's CUDA kernels, device code: one kernel template for the six ops
// (gaussian_kernel, specialised by what a call computes) and the fixed-order reduction of
// its partials (sum_kernel). csrc/cuda/gaussian.cu, the host side, fills in their Args and
// launches them; its top comment describes the scheme.
#pragma once
#include <cstdint>

#include "../philox.h"

namespace fastvae::cuda::gaussian_kernels {

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

}  // namespace fastvae::cuda::gaussian_kernels
