// The random streams of philox.h as tensors, for tests against fastvae/reference.py.
#include "../ops.h"
#include "../philox.h"

namespace fastvae {

at::Tensor philox4x32(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              "counters must be an (n, 4) int64 tensor");
  auto in = counters.contiguous();
  auto out = at::empty_like(in);
  const int64_t* c = in.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.size(0); ++i) {
    const Draw4 d = philox4x32_10(static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                                  static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3]),
                                  static_cast<uint64_t>(seed));
    for (int lane = 0; lane < 4; ++lane) o[4 * i + lane] = d.v[lane];
  }
  return out;
}

at::Tensor normal_stream(int64_t seed, int64_t n) {
  auto out = at::empty({(n + 3) / 4 * 4}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t g = 0; g < (n + 3) / 4; ++g) normal4(static_cast<uint64_t>(seed), static_cast<uint64_t>(g), o + 4 * g);
  return out.narrow(0, 0, n);
}

at::Tensor gumbel_stream(int64_t seed, int64_t rows, int64_t cols) {
  const int64_t quads = (cols + 3) / 4;
  auto out = at::empty({rows, quads * 4}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < quads; ++q)
      gumbel4(static_cast<uint64_t>(seed), static_cast<uint64_t>(r), static_cast<uint32_t>(q), o + r * quads * 4 + 4 * q);
  return out.narrow(1, 0, cols);
}

}  // namespace fastvae
