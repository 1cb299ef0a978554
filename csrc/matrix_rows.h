// How the Gaussian kernels (csrc/cpu/gaussian.cpp, csrc/cuda/gaussian.cu) address their
// inputs: each as a (rows, cols) matrix in the output's row-major layout, cols = the last
// dimension of mu. Host code.
#pragma once
#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <cstdint>
#include <vector>

namespace fastvae {

// An input broadcast to `shape` as such a matrix: row_stride 0 repeats a row (a (D,)
// prior), col_stride 0 repeats a value along a row (a (B, 1) prior or a scalar); a
// row-strided slice such as h[:, :D] is read in place. Layouts that fit none of these are
// made contiguous.
struct Rows {
  at::Tensor tensor;
  int64_t row_stride, col_stride;
};

inline Rows as_rows(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t cols = shape.empty() ? 1 : shape.back();
  const int64_t rows = cols == 0 ? 0 : c10::multiply_integers(shape) / cols;
  // A tensor already of that shape and dtype is used as it is: to() and expand() would
  // return views of it with the same strides, at a dispatcher call each.
  const at::Tensor expanded = t.scalar_type() == dtype && t.sizes().equals(shape) ? t : t.to(dtype).expand(shape);
  if (rows > 0) {
    const std::vector<int64_t> matrix = {rows, cols};
    if (const auto strides = at::detail::computeStride(expanded.sizes(), expanded.strides(), at::IntArrayRef(matrix))) {
      const int64_t row_stride = rows == 1 ? 0 : (*strides)[0];
      const int64_t col_stride = cols == 1 ? 0 : (*strides)[1];
      if (col_stride == 0 || col_stride == 1) return {expanded, row_stride, col_stride};
    }
  }
  return {expanded.contiguous(), cols, 1};
}

}  // namespace fastvae
