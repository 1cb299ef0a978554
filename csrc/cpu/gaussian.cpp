// Gaussian column, C++ CPU kernels.
#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "../philox.h"

namespace fastvae {

at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed) {
  check_cpu(mu, "mu");
  const uint64_t key = read_seed(seed);
  auto mu_c = mu.contiguous(), logvar_c = logvar.contiguous();
  auto z = at::empty(mu.sizes(), mu.options());
  const int64_t n = mu.numel(), groups = (n + 3) / 4;
  FASTVAE_DISPATCH_FLOATS(mu.scalar_type(), "reparameterize", [&] {
    const scalar_t* m = mu_c.data_ptr<scalar_t>();
    const scalar_t* lv = logvar_c.data_ptr<scalar_t>();
    scalar_t* out = z.data_ptr<scalar_t>();
    at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
      float eps[4];
      for (int64_t g = begin; g < end; ++g) {
        normal4(key, static_cast<uint64_t>(g), eps);
        for (int64_t i = 4 * g, lane = 0; lane < 4 && i < n; ++lane, ++i)
          out[i] = static_cast<scalar_t>(static_cast<float>(m[i]) + std::exp(0.5f * static_cast<float>(lv[i])) * eps[lane]);
      }
    });
  });
  return z;
}

}  // namespace fastvae
