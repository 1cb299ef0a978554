// k-means update step on CPU: the mean of the rows assigned to each cluster, as a
// deterministic segment sum (counting sort by cluster, each cluster's rows summed in row
// order: the same bits every run and for any thread count, no float atomics).
#include "../common.h"
#include "../ops.h"
#include "segment.h"

namespace fastvae {

std::tuple<at::Tensor, at::Tensor> segment_mean(const at::Tensor& x, const at::Tensor& indices,
                                                int64_t num_segments) {
  check_cpu(x, "x");
  check_cpu(indices, "indices");
  TORCH_CHECK(x.dim() == 2 && indices.dim() == 1 && indices.size(0) == x.size(0),
              "segment_mean: x must be (N, D) and indices (N,)");
  TORCH_CHECK(num_segments >= 1, "segment_mean: num_segments must be positive");
  const int64_t n = x.size(0), d = x.size(1), k = num_segments;
  const at::Tensor xf = x.to(at::kFloat).contiguous(), idx = indices.to(at::kLong).contiguous();
  const float* xp = xf.data_ptr<float>();
  const Segments segments(idx.data_ptr<int64_t>(), n, k, "segment_mean");
  at::Tensor means = at::empty({k, d}, xf.options());
  at::Tensor counts = at::empty({k}, idx.options());
  float* mp = means.data_ptr<float>();
  int64_t* cp = counts.data_ptr<int64_t>();
  segment_sums(
      segments, k, d,
      [&](int64_t i, float* acc) {
        const float* row = xp + i * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += row[j];
      },
      [&](int64_t c, const float* acc) {
        const int64_t count = segments.count(c);
        const float denom = static_cast<float>(std::max<int64_t>(count, 1));  // an empty cluster's mean is 0
        for (int64_t j = 0; j < d; ++j) mp[c * d + j] = acc[j] / denom;
        cp[c] = count;
      });
  return {means, counts};
}

}  // namespace fastvae
