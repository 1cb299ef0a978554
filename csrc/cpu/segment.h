// Deterministic segment sums for the VQ column (k-means updates, codebook gradients):
// rows grouped by an index without atomics, summed in a fixed order.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastvae {

// A counting sort of rows by segment: the rows of segment c are order[offset[c] ..
// offset[c + 1]) in increasing row order, whatever the thread count.
struct Segments {
  std::vector<int64_t> offset, order;

  // idx[i * stride] is row i's segment, checked to lie in [0, k).
  Segments(const int64_t* idx, int64_t n, int64_t k, const char* op, int64_t stride = 1)
      : offset(k + 1, 0), order(n) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = idx[i * stride];
      TORCH_CHECK(c >= 0 && c < k, op, ": index ", c, " out of range [0, ", k, ")");
      ++offset[c + 1];
    }
    for (int64_t c = 0; c < k; ++c) offset[c + 1] += offset[c];
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[idx[i * stride]]++] = i;
  }
  int64_t count(int64_t c) const { return offset[c + 1] - offset[c]; }
};

// out[c * d .. (c + 1) * d) = finish(c, sum over the rows i of segment c, in row order, of
// add_row(i, acc)), in parallel over segments. add_row(i, acc) adds row i's d values to
// acc; finish(c, acc, out_row) writes the segment's output row (also for empty segments,
// with acc all zero).
template <typename AddRow, typename Finish>
void segment_sums(const Segments& segments, int64_t k, int64_t d, AddRow add_row, Finish finish) {
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = segments.offset[c]; p < segments.offset[c + 1]; ++p) add_row(segments.order[p], acc.data());
      finish(c, acc.data());
    }
  });
}

}  // namespace fastvae
