// empty_output (common.h): new CPU tensors for the kernels to write, with large ones
// served from a bounded cache of blocks that earlier outputs released.
//
// Why: the allocator returns a multi-MiB block to the OS when it is freed and maps it
// anew for the next one, and the first touch of fresh memory costs a page fault (and the
// kernel zeroing the page) per page. A training loop frees and remakes outputs of the
// same sizes every step, and on this project's machine those faults took as long as the
// kernels: reparameterize's backward at (4096, 512) spent 5.2 ms per call (median, 509
// faults) against 2.3 ms when its outputs reused warm memory. Cached blocks are reused
// as they are (an output is written whole before it is read), so in a steady loop no
// output faults at all.
//
// Blocks are whole multiples of 2 MiB, 2 MiB-aligned, and advised onto transparent huge
// pages, so a block that does fault takes few, cheap faults. At most kDefaultCapacityMb
// MiB of released blocks are kept (oldest dropped first); FASTVAE_OUTPUT_CACHE_MB sets
// that bound in MiB (0: keep nothing; at most kMaxCapacityMb), FASTVAE_HUGE_PAGES=0 drops
// the huge-page advice. A value that is not such a number is reported and ignored.
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>

#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastvae {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinBytes = size_t{4} << 20;      // smaller outputs take PyTorch's allocator
// Larger outputs take PyTorch's allocator too: after multi-GiB allocations elsewhere,
// finding hundreds of free huge pages can stall in compaction (a 1 GiB output was
// measured 2x slower with the advice), and one such block would crowd out the rest.
constexpr size_t kMaxBytes = size_t{256} << 20;
constexpr size_t kDefaultCapacityMb = 256;
constexpr size_t kMaxCapacityMb = size_t{1} << 16;  // 64 GiB: far above any use, far below overflow

// The environment variable `name` as a whole decimal number in [0, max], or `fallback`
// (with a warning naming the variable) when it is set to anything else: strtoull would
// read "-1" as no bound at all and "1e3" as 1.
size_t setting(const char* name, size_t fallback, size_t max) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  const std::string text(value);
  size_t number = 0;
  bool valid = !text.empty();
  for (size_t i = 0; valid && i < text.size(); ++i) {  // number <= max keeps number * 10 from overflowing
    valid = text[i] >= '0' && text[i] <= '9' && (number = number * 10 + (text[i] - '0')) <= max;
  }
  if (valid) return number;
  TORCH_WARN("fastvae: ignoring ", name, "=\"", text, "\": it must be a whole number from 0 to ", max,
             "; using the default, ", fallback);
  return fallback;
}

struct Block {
  void* data;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  at::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes || nbytes > kMaxBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(bytes);
    if (block == nullptr) block = fresh(bytes);
    return {block->data, block, &release, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  // A cached block of exactly `bytes`, or nullptr.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // newest first: warmest in cache
      if ((*it)->bytes != bytes) continue;
      Block* block = *it;
      free_.erase(std::next(it).base());
      cached_bytes_ -= bytes;
      return block;
    }
    return nullptr;
  }

  static Block* fresh(size_t bytes) {
    void* data = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(data != nullptr, "fastvae: out of memory allocating ", bytes, " bytes for an output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    static const bool huge_pages = setting("FASTVAE_HUGE_PAGES", 1, 1) != 0;
    if (huge_pages) madvise(data, bytes, MADV_HUGEPAGE);  // a hint: the OS may ignore it
#endif
    return new Block{data, bytes};
  }

  static void release(void* context) { instance().keep(static_cast<Block*>(context)); }

  // Caches a released block, dropping the oldest ones beyond the capacity.
  void keep(Block* block) {
    std::deque<Block*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block->bytes <= capacity_) {
        free_.push_back(block);
        cached_bytes_ += block->bytes;
      } else {
        dropped.push_back(block);
      }
      while (cached_bytes_ > capacity_) {
        cached_bytes_ -= free_.front()->bytes;
        dropped.push_back(free_.front());
        free_.pop_front();
      }
    }
    for (Block* b : dropped) {
      std::free(b->data);
      delete b;
    }
  }

 public:
  // Never destroyed: outputs still alive at exit release into it.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::deque<Block*> free_;  // oldest first
  size_t cached_bytes_ = 0;
  const size_t capacity_ = setting("FASTVAE_OUTPUT_CACHE_MB", kDefaultCapacityMb, kMaxCapacityMb) << 20;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "fastvae: empty_output makes CPU tensors");
  return at::detail::empty_generic(shape, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace fastvae
