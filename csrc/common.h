// Helpers shared by the C++ CPU kernels.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastvae {

// The seed a kernel keys its Philox stream with (drawn by fastvae.ops, one int64 element).
inline uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be a one-element int64 tensor");
  return static_cast<uint64_t>(seed.cpu().data_ptr<int64_t>()[0]);
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastvae native CPU kernel: ", name, " must be a CPU tensor");
}

// A new tensor for a kernel to write. A large one is advised to use transparent huge
// pages: a fresh multi-MiB output (the allocator maps large blocks anew on every call)
// otherwise costs one page fault per 4 KiB on first touch, which can take longer than the
// kernel itself (measured here: 30 ms of first touch for 64 MiB against 6 ms with huge
// pages). Only the 2 MiB-aligned interior is advised, so no memory is added, and only up
// to kMaxHugePageBytes: after multi-GiB allocations elsewhere, finding hundreds of free
// huge pages can stall in compaction (1 GiB outputs were measured 2x slower then). The
// advice is a hint the kernel may ignore. FASTVAE_HUGE_PAGES=0 turns it off (PyTorch's
// own THP_MEM_ALLOC_ENABLE=1 gives every tensor huge pages).
constexpr size_t kMaxHugePageBytes = size_t{256} << 20;

inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  static const bool enabled = [] {
    const char* setting = std::getenv("FASTVAE_HUGE_PAGES");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (enabled && out.device().is_cpu() && last > first && out.nbytes() <= kMaxHugePageBytes) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace fastvae

// Dispatch over the float types fastvae's kernels take; scalar_t is the storage type.
#define FASTVAE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
