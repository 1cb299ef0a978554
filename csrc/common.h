// Helpers shared by the C++ CPU kernels.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/ATen.h>

#include <cstdint>

namespace fastvae {

// The seed a kernel keys its Philox stream with (drawn by fastvae.ops, one int64 element).
inline uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be a one-element int64 tensor");
  return static_cast<uint64_t>(seed.cpu().data_ptr<int64_t>()[0]);
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastvae native CPU kernel: ", name, " must be a CPU tensor");
}

// The temperature of the Gumbel ops: a one-element CPU tensor (read here, no device to wait for).
inline double read_tau(const at::Tensor& tau) {
  TORCH_CHECK(tau.numel() == 1 && tau.is_floating_point(), "tau must be a one-element floating-point tensor");
  check_cpu(tau, "tau");
  return tau.item<double>();
}

// A new contiguous CPU tensor for a kernel to write (uninitialised, like at::empty).
// Large ones come from a bounded cache of warm blocks: see csrc/output_cache.cpp.
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace fastvae

// Dispatch over the float types fastvae's kernels take; scalar_t is the storage type.
#define FASTVAE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
