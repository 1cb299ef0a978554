// VQ column, C++ CPU kernels: the forward entry points nearest_code, vector_quantize and
// residual_quantize over the nearest-code search of csrc/cpu/vq_search.cpp (their
// backward kernels are in csrc/cpu/vq_grad.cpp).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "vq_search.h"

namespace fastvae {

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& codebook) {
  vq_search::check_inputs(x, codebook);
  const at::Tensor xc = x.contiguous();
  at::Tensor indices = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  at::Tensor sq_dist = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  vq_search::nearest_codes(xc, codebook, indices.data_ptr<int64_t>(), sq_dist.data_ptr<float>());
  return {indices, sq_dist.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize(const at::Tensor& x, const at::Tensor& codebook,
                                                               double beta) {
  vq_search::check_inputs(x, codebook);
  const at::Tensor xc = x.contiguous(), cbc = codebook.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  std::vector<float> sq_dist(n);
  vq_search::nearest_codes(xc, cbc, indices.data_ptr<int64_t>(), sq_dist.data());
  // Gather the winners (bit copies of codebook rows, never a one-hot product).
  at::Tensor quantized = empty_output({n, d}, x.options());
  const int64_t row_bytes = d * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(cbc.data_ptr());
  char* dst = static_cast<char*>(quantized.data_ptr());
  const int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * row_bytes, src + idx[i] * row_bytes, row_bytes);
  });
  double total = 0;  // sequential sum: the same bits every run
  for (int64_t i = 0; i < n; ++i) total += sq_dist[i];
  const double loss = (1.0 + beta) * total / static_cast<double>(std::max<int64_t>(n * d, 1));
  return {quantized, indices, at::scalar_tensor(loss, x.options())};
}

// residual_quantize: all R stages in one call. A row block's residual lives in a
// thread-local float32 buffer (L2) through the stages: each stage searches it with the
// same kernel as nearest_code, then subtracts the winners in place; neither the residuals
// nor any (N, K) matrix reach memory. quantized is the float32 sum of the chosen codes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_quantize(const at::Tensor& x, const at::Tensor& codebooks,
                                                                 double beta) {
  check_cpu(x, "x");
  check_cpu(codebooks, "codebooks");
  TORCH_CHECK(x.dim() == 2 && codebooks.dim() == 3 && x.size(1) == codebooks.size(2) && codebooks.size(0) >= 1,
              "residual_quantize: x must be (N, D) and codebooks (R, K, D) with R >= 1");
  TORCH_CHECK(x.scalar_type() == codebooks.scalar_type(), "residual_quantize: x and codebooks must share a dtype");
  using vq_search::kRowBlock;
  using vq_search::RowBest;
  const int64_t n = x.size(0), d = x.size(1), stages = codebooks.size(0);
  std::vector<vq_search::Codebook> books;
  books.reserve(stages);
  for (int64_t r = 0; r < stages; ++r) {
    vq_search::check_inputs(x, codebooks[r]);
    books.emplace_back(codebooks[r]);
  }
  const vq_search::SearchBlock search_block = vq_search::block_search(d);
  const at::Tensor xc = x.contiguous();
  at::Tensor indices = at::empty({n, stages}, x.options().dtype(at::kLong));
  std::vector<float> sq_dist(n * stages);  // (N, R): summed in a fixed order for the losses
  at::Tensor quantized = empty_output({n, d}, x.options().dtype(at::kFloat));
  int64_t* idx = indices.data_ptr<int64_t>();
  float* qp = quantized.data_ptr<float>();
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  FASTVAE_DISPATCH_FLOATS(x.scalar_type(), "residual_quantize", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<float> residual(kRowBlock * d), pad;
      std::vector<RowBest> state(kRowBlock);
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t begin = block * kRowBlock, end = std::min(n, begin + kRowBlock), rows = end - begin;
        for (int64_t i = 0; i < rows * d; ++i) residual[i] = static_cast<float>(xp[begin * d + i]);
        std::fill(qp + begin * d, qp + end * d, 0.f);
        for (int64_t r = 0; r < stages; ++r) {
          const bool expand = books[r].norms_finite;  // see nearest_codes(): non-finite codebooks scan exactly
          if (expand) search_block(books[r], residual.data(), rows, pad, state.data());
          for (int64_t row = 0; row < rows; ++row) {
            const int64_t i = begin + row;
            float* res = residual.data() + row * d;
            vq_search::finish_row(books[r], res, expand ? &state[row] : nullptr, idx + i * stages + r,
                                  sq_dist.data() + i * stages + r);
            const float* e = books[r].code(idx[i * stages + r]);
            for (int64_t j = 0; j < d; ++j) res[j] -= e[j], qp[i * d + j] += e[j];
          }
        }
      }
    });
  });
  std::vector<double> totals(stages, 0.0);  // sequential sums: the same bits every run
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < stages; ++r) totals[r] += sq_dist[i * stages + r];
  at::Tensor losses = at::empty({stages}, x.options().dtype(at::kDouble));
  for (int64_t r = 0; r < stages; ++r)
    losses.data_ptr<double>()[r] = (1.0 + beta) * totals[r] / static_cast<double>(std::max<int64_t>(n * d, 1));
  return {quantized.to(x.scalar_type()), indices, losses.to(x.scalar_type())};
}

}  // namespace fastvae

