// The Gaussian column's CPU kernels (gaussian.cpp) see a tensor as fixed blocks of kBlock
// consecutive elements of its row-major flat index: here are the block's float32 views of
// the inputs (Input: in place or through L1 scratch) and outputs (Output), the parallel
// loop over blocks, and the block sums the KL reductions add in a fixed order.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../matrix_rows.h"
#include "normal_block.h"

namespace fastvae {
namespace {  // gaussian.cpp's alone: internal linkage lets GCC inline and specialise these into its loops

constexpr int64_t kBlock = kMaxNormalBlock;  // elements per block: 2 KiB per float array, all in L1
// Blocks per parallel task, at least: 16K elements, half of PyTorch's own elementwise
// grain, as ours cost more per element (on one core of this project's machine at the
// AVX-512 level: about 0.5 ns an element with the noise, 0.2-0.35 ns without). So the
// sample-and-KL step at (256, 128) runs its four kernels on two threads, 5-9 us a task
// against a fork/join of one or two while the second thread still spins. Measured on the
// idle two-core machine (README, "Per-call overhead"), the step went from 88-93 us on one
// thread to 73-80 us in 13 processes of 19, and to 126-147 us in the 6 others (a state of
// the VM that slowed eager too); with the second core busy, a split waits for it.
constexpr int64_t kGrainBlocks = 32;
constexpr int64_t kLanes = 16;         // float32 partial sums per block (two AVX2 vectors)

template <typename T>
struct Input {
  const T* data = nullptr;
  int64_t row_stride = 0, col_stride = 0, cols = 1;
  bool flat = false;  // element i is data[i]

  Input() = default;
  Input(const Rows& r, int64_t cols_)  // an undefined tensor: an operand this call never reads
      : data(r.tensor.defined() ? r.tensor.data_ptr<T>() : nullptr), row_stride(r.row_stride),
        col_stride(r.col_stride), cols(cols_),
        flat(r.tensor.defined() && r.tensor.is_contiguous()) {}  // broadcast dims are never contiguous

  // Asks for elements [begin, end)'s cache lines ahead of use, so that their loads
  // overlap the noise generation rather than follow it.
  void prefetch(int64_t begin, int64_t end) const {
    if (!flat) return;
    for (int64_t i = begin; i < end; i += 64 / sizeof(T)) __builtin_prefetch(data + i);
  }

  // Elements [begin, end) as float32: in place when possible, else through `scratch`.
  const float* load(int64_t begin, int64_t end, float* scratch) const {
    if (flat) {
      if constexpr (std::is_same_v<T, float>) return data + begin;
      for (int64_t i = begin; i < end; ++i) scratch[i - begin] = static_cast<float>(data[i]);
      return scratch;
    }
    if (row_stride == 0 && col_stride == 0) {  // one value (sum()'s expanded gradient): one fill, not one per row
      std::fill(scratch, scratch + (end - begin), static_cast<float>(*data));
      return scratch;
    }
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / cols, col = i - row * cols, len = std::min(end - i, cols - col);
      const T* src = data + row * row_stride + col * col_stride;
      float* dst = scratch + (i - begin);
      if (col_stride == 1) {
        for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
      } else {
        std::fill(dst, dst + len, static_cast<float>(*src));
      }
      i += len;
    }
    return scratch;
  }
};

// A contiguous output: blocks compute straight into it (float32) or into scratch then convert.
template <typename T>
struct Output {
  T* data = nullptr;

  void prefetch(int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; i += 64 / sizeof(T)) __builtin_prefetch(data + i, 1);
  }

  float* view(int64_t begin, float* scratch) const {
    if constexpr (std::is_same_v<T, float>) return data + begin;
    return scratch;
  }
  void commit(int64_t begin, int64_t len, const float* values) const {
    if constexpr (!std::is_same_v<T, float>) {
      for (int64_t j = 0; j < len; ++j) data[begin + j] = static_cast<T>(values[j]);
    }
  }
};

// Sum of values[0, len) in kLanes float32 lanes (a fixed order), lanes added in double.
inline double block_sum(const float* values, int64_t len) {
  const int64_t whole = len / kLanes * kLanes;
  float lanes[kLanes] = {};
  for (int64_t j = 0; j < whole; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += values[j + l];
  for (int64_t j = whole; j < len; ++j) lanes[j - whole] += values[j];
  double total = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// per_sample: the samples (of `inner` elements each) that block b's elements belong to, and
// where their partial sums start in a buffer holding every block's in block order.
struct SamplePieces {
  int64_t inner;
  std::vector<int64_t> offset;  // block b's pieces are [offset[b], offset[b + 1])

  SamplePieces(int64_t n, int64_t inner_) : inner(inner_) {
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    offset.assign(blocks + 1, 0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
      offset[b + 1] = offset[b] + (end - 1) / inner - begin / inner + 1;
    }
  }

  // The sums of values[0, len) (block elements begin ..) sample by sample, into partials.
  void sum(int64_t block, int64_t begin, int64_t len, const float* values, double* partials) const {
    double* out = partials + offset[block];
    for (int64_t j = 0; j < len;) {
      const int64_t piece = std::min(len - j, inner - (begin + j) % inner);
      *out++ = block_sum(values + j, piece);
      j += piece;
    }
  }

  // The per-sample totals: each block's pieces added in block order, in double.
  template <typename T>
  void combine(const std::vector<double>& partials, int64_t samples, T* out) const {
    std::vector<double> totals(samples, 0.0);
    for (size_t b = 0; b + 1 < offset.size(); ++b) {
      const int64_t first = static_cast<int64_t>(b) * kBlock / inner;
      for (int64_t k = offset[b]; k < offset[b + 1]; ++k) totals[first + k - offset[b]] += partials[k];
    }
    for (int64_t s = 0; s < samples; ++s) out[s] = static_cast<T>(totals[s]);
  }

  // Block elements [begin, begin + len) of a per-sample gradient `grad` spread over their samples.
  void spread(const float* grad, int64_t begin, int64_t len, float* values) const {
    for (int64_t j = 0; j < len;) {
      const int64_t piece = std::min(len - j, inner - (begin + j) % inner);
      std::fill(values + j, values + j + piece, grad[(begin + j) / inner]);
      j += piece;
    }
  }
};

// Runs body(block, begin, len) over all blocks in parallel, `grain` blocks per task at
// least; returns the block count.
template <typename Body>
int64_t for_each_block(int64_t n, int64_t grain, const Body& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) body(b, b * kBlock, std::min(kBlock, n - b * kBlock));
  });
  return blocks;
}

}  // namespace
}  // namespace fastvae
