// Rows of a tensor around a dimension `dim`, as the Gumbel column's CPU kernels
// (gumbel.cpp, gumbel_kl.cpp) walk them: the (rows, K) view with `dim` moved last,
// without moving any data.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace fastvae {

// A tensor seen as (outer, K, inner) around `dim`: row r of the (rows, K) view with `dim`
// moved last is (o, i) = (r / inner, r % inner), its column c at
// o * outer_stride + i * inner_stride + c * class_stride.
struct RowLayout {
  int64_t inner = 1, outer_stride = 0, inner_stride = 0, class_stride = 0;
  int64_t offset(int64_t row) const { return row / inner * outer_stride + row % inner * inner_stride; }
};

// The stride that steps dims [begin, end) of t as one flattened dim, if one does.
inline bool flattened_stride(const at::Tensor& t, int64_t begin, int64_t end, int64_t* stride) {
  *stride = 0;
  int64_t expected = -1;
  for (int64_t d = end - 1; d >= begin; --d) {
    if (t.size(d) == 1) continue;
    if (expected >= 0 && t.stride(d) != expected) return false;
    if (expected < 0) *stride = t.stride(d);
    expected = t.stride(d) * t.size(d);
  }
  return true;
}

// t's RowLayout around dim; t becomes contiguous first when the dims before or after
// `dim` do not flatten (never for dense or broadcast tensors of the usual layouts).
inline RowLayout row_layout(at::Tensor& t, int64_t dim) {
  RowLayout layout;
  for (int64_t d = dim + 1; d < t.dim(); ++d) layout.inner *= t.size(d);
  if (!flattened_stride(t, 0, dim, &layout.outer_stride) || !flattened_stride(t, dim + 1, t.dim(), &layout.inner_stride))
    t = t.contiguous();
  flattened_stride(t, 0, dim, &layout.outer_stride);
  flattened_stride(t, dim + 1, t.dim(), &layout.inner_stride);
  layout.class_stride = t.stride(dim);
  return layout;
}

// Row `n` values from src (element stride `stride`) as float into dst, padded with `pad`
// up to `padded`.
template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, int64_t padded, float pad, float* dst) {
  if (stride == 1) {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c * stride]);
  }
  std::fill(dst + n, dst + padded, pad);
}

}  // namespace fastvae
