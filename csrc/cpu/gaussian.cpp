// Gaussian column, C++ CPU kernels: reparameterize, gaussian_kl, reparameterize_kl and
// their backwards (the backend interface of fastvae/reference.py).
//
// The row-major flat index range is cut into fixed blocks of kBlock elements (whole
// Philox groups, whole vectors). Per block, every input is seen as a float32 array: the
// tensor itself when it is contiguous float32, else converted/gathered into an L1
// scratch array (half types, row-strided slices, broadcast priors). The block's noise is
// generated group-parallel into scratch (it never reaches main memory), the arithmetic
// runs over plain float arrays (gaussian_block.h), and each output is written once; the
// sampling backward reads its inputs and writes its outputs in one pass (sample_grad_pass).
// A KL reduction keeps one partial per block (per_sample: one per piece of a sample the
// block holds); the partials are added in block order in double, so the result has the
// same bits run after run and for any thread count.

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../matrix_rows.h"
#include "../cuda/gaussian.h"
#include "../ops.h"
// GCC's generic tuning keeps auto-vectorised loops at 256 bits even where AVX-512 is
// enabled; CPUs with AVX-512 (Zen 4/5, recent Intel) run 512-bit vectors, so at the
// AVX-512 level the Gaussian loops (Box-Muller, the exp arithmetic, the block sums) take
// twice the lanes: the same arithmetic per element, so the same bits. Set before
// gaussian_block.h and gaussian_io.h so that their inline functions compile under it too.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "gaussian_block.h"
#include "gaussian_io.h"

namespace fastvae {
namespace {

using namespace gaussian_block;

enum class Reduction { kNone, kSum, kMean, kBatchMean, kPerSample };

Reduction parse_reduction(const std::string& reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "per_sample") return Reduction::kPerSample;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  TORCH_CHECK(reduction == "batchmean", "unknown reduction '", reduction, "'");
  return Reduction::kBatchMean;
}

// The denominator of a reduction: the reduced KL is (sum of elements) / divisor.
double reduction_divisor(Reduction reduction, const at::Tensor& mu) {
  if (reduction == Reduction::kMean) return static_cast<double>(std::max<int64_t>(mu.numel(), 1));
  if (reduction == Reduction::kBatchMean) return mu.dim() ? static_cast<double>(mu.size(0)) : 1.0;
  return 1.0;
}

// The prior operand `t` for a call against a prior (a missing part is 0: mean 0 or
// log-variance 0); nothing for a call against N(0, I), which never reads it.
Rows prior_rows(const at::Tensor& t, bool prior, const at::Tensor& like) {
  if (!prior) return Rows{};
  return as_rows(t.defined() ? t : at::zeros({}, like.options()), like.sizes(), like.scalar_type());
}

// What one forward call computes; the tensors are prepared by the public functions below.
struct Forward {
  at::Tensor mu, logvar, prior_mu, prior_logvar;  // priors undefined for N(0, I)
  bool sample = false, kl = false;
  Reduction reduction = Reduction::kNone;
  uint64_t seed = 0;
};

std::tuple<at::Tensor, at::Tensor> run_forward(const Forward& fw) {
  const auto shape = fw.mu.sizes();
  const int64_t n = fw.mu.numel(), cols = shape.empty() ? 1 : shape.back();
  const auto dtype = fw.mu.scalar_type();
  const bool prior = fw.prior_mu.defined() || fw.prior_logvar.defined();
  at::Tensor z = fw.sample ? empty_output(shape, fw.mu.options()) : at::Tensor();
  const bool per_sample = fw.reduction == Reduction::kPerSample;
  const int64_t samples = per_sample ? shape[0] : 0;
  at::Tensor kl;
  if (fw.kl) {
    kl = empty_output(fw.reduction == Reduction::kNone ? shape
                      : per_sample                     ? shape.slice(0, 1)
                                                       : at::IntArrayRef{},
                      fw.mu.options());
  }
  const SamplePieces pieces(per_sample ? n : 0, samples ? std::max<int64_t>(n / samples, 1) : 1);
  const Rows mu_rows = as_rows(fw.mu, shape, dtype), lv_rows = as_rows(fw.logvar, shape, dtype);
  const Rows pm_rows = prior_rows(fw.prior_mu, prior, fw.mu), plv_rows = prior_rows(fw.prior_logvar, prior, fw.mu);
  std::vector<double> partials(!fw.kl || fw.reduction == Reduction::kNone ? 0
                               : per_sample ? pieces.offset.back()
                                            : (n + kBlock - 1) / kBlock);
  FASTVAE_DISPATCH_FLOATS(dtype, "gaussian_forward", [&] {
    const Input<scalar_t> mu(mu_rows, cols), lv(lv_rows, cols), pm(pm_rows, cols), plv(plv_rows, cols);
    const Output<scalar_t> z_out{fw.sample ? z.data_ptr<scalar_t>() : nullptr};
    const Output<scalar_t> kl_out{fw.kl && fw.reduction == Reduction::kNone ? kl.data_ptr<scalar_t>() : nullptr};
    for_each_block(n, kGrainBlocks, [&](int64_t block, int64_t begin, int64_t len) {
      alignas(64) float s_mu[kBlock], s_lv[kBlock], s_pm[kBlock], s_plv[kBlock], eps[kBlock], s_z[kBlock],
          s_kl[kBlock];
      if (fw.sample) {  // float32 loads are deferred to the arithmetic, after the noise
        mu.prefetch(begin, begin + len);
        lv.prefetch(begin, begin + len);
        z_out.prefetch(begin, begin + len);
      }
      const float* m = mu.load(begin, begin + len, s_mu);
      const float* v = lv.load(begin, begin + len, s_lv);
      float* klv = kl_out.data ? kl_out.view(begin, s_kl) : s_kl;
      if (fw.sample) {
        normal_block(fw.seed, begin, len, eps);
        float* zv = z_out.view(begin, s_z);
        with_cheap_exp_first([&](auto cheap) {
          constexpr bool kCheap = decltype(cheap)::value;
          return fw.kl ? sample_and_kl<kCheap>(m, v, eps, zv, klv, len) : sample<kCheap>(m, v, eps, zv, len);
        });
        z_out.commit(begin, len, zv);
      } else if (!prior) {
        with_cheap_exp_first([&](auto cheap) { return kl_standard<decltype(cheap)::value>(m, v, klv, len); });
      } else {
        const float* p_m = pm.load(begin, begin + len, s_pm);
        const float* p_lv = plv.load(begin, begin + len, s_plv);
        with_cheap_exp_first(
            [&](auto cheap) { return kl_prior<decltype(cheap)::value>(m, v, p_m, p_lv, klv, len); });
      }
      if (kl_out.data) kl_out.commit(begin, len, klv);
      else if (per_sample) pieces.sum(block, begin, len, klv, partials.data());
      else if (fw.kl) partials[block] = block_sum(klv, len);
    });
    if (per_sample) {
      pieces.combine(partials, samples, kl.data_ptr<scalar_t>());
    } else if (fw.kl && fw.reduction != Reduction::kNone) {
      double total = 0.0;
      for (const double partial : partials) total += partial;
      *kl.data_ptr<scalar_t>() = static_cast<scalar_t>(total / reduction_divisor(fw.reduction, fw.mu));
    }
  });
  return {z, kl};
}

// What one backward call computes. grad_z defined: the sampling term (its mu gradient is
// grad_z itself, written only for the KL or on request); grad_kl defined: the KL term, a
// scalar for the reductions.
struct Backward {
  at::Tensor grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, z;  // z: the forward's sample
  bool dense_grad_mu = false;
  Reduction reduction = Reduction::kNone;
  uint64_t seed = 0;
};

// Gradients for (logvar) with only grad_z ((mu, logvar) with dense_grad_mu), else (mu,
// logvar[, prior_mu, prior_logvar]).
std::vector<at::Tensor> run_backward(const Backward& bw) {
  const auto shape = bw.logvar.sizes();
  const int64_t n = bw.logvar.numel(), cols = shape.empty() ? 1 : shape.back();
  const auto dtype = bw.logvar.scalar_type();
  const bool sample = bw.grad_z.defined(), kl = bw.grad_kl.defined();
  const bool prior = bw.prior_mu.defined() || bw.prior_logvar.defined();
  const float scale = kl ? static_cast<float>(1.0 / reduction_divisor(bw.reduction, bw.logvar)) : 1.0f;
  // per_sample: grad_kl holds one value per sample, spread over the sample's elements per block
  const bool per_sample = kl && bw.reduction == Reduction::kPerSample;
  const at::Tensor sample_grad = per_sample ? bw.grad_kl.to(at::kFloat).contiguous() : at::Tensor();
  const SamplePieces pieces(0, per_sample && shape[0] ? std::max<int64_t>(n / shape[0], 1) : 1);
  auto rows_of = [&](const at::Tensor& t) { return t.defined() ? as_rows(t, shape, dtype) : Rows{}; };
  const Rows gz_rows = rows_of(bw.grad_z), gk_rows = per_sample ? Rows{} : rows_of(bw.grad_kl),
             mu_rows = rows_of(bw.mu),
             lv_rows = rows_of(bw.logvar), z_rows = rows_of(bw.z);
  const Rows pm_rows = prior_rows(bw.prior_mu, prior, bw.logvar),
             plv_rows = prior_rows(bw.prior_logvar, prior, bw.logvar);
  // Half-precision samples keep too few digits to recover the noise from (RecoveredNoise).
  const bool recover = sample && bw.z.defined() && bw.mu.defined() && dtype == at::kFloat;
  std::vector<at::Tensor> grads;
  for (int count = prior ? 4 : kl || bw.dense_grad_mu ? 2 : 1; count > 0; --count) {
    grads.push_back(empty_output(shape, bw.logvar.options()));
  }
  FASTVAE_DISPATCH_FLOATS(dtype, "gaussian_backward", [&] {
    const Input<scalar_t> gz(gz_rows, cols), gk(gk_rows, cols), mu(mu_rows, cols), lv(lv_rows, cols),
        pm(pm_rows, cols), plv(plv_rows, cols), z(z_rows, cols);
    Output<scalar_t> out[4];
    for (size_t i = 0; i < grads.size(); ++i) out[i].data = grads[i].data_ptr<scalar_t>();
    const Output<scalar_t>& g_mu_out = out[0];
    const Output<scalar_t>& g_lv_out = grads.size() > 1 ? out[1] : out[0];
    // The noise is regenerated where z cannot give it back (half types, no z).
    for_each_block(n, kGrainBlocks, [&](int64_t, int64_t begin, int64_t len) {
      alignas(64) float s_gz[kBlock], s_gk[kBlock], s_mu[kBlock], s_lv[kBlock], s_pm[kBlock], s_plv[kBlock],
          s_z[kBlock], noise[kBlock], s_out[4][kBlock];
      const float* v = lv.load(begin, begin + len, s_lv);
      const float* m = kl || recover ? mu.load(begin, begin + len, s_mu) : nullptr;
      float* g_lv = g_lv_out.view(begin, s_out[1]);
      const float* g_z = sample ? gz.load(begin, begin + len, s_gz) : nullptr;
      const float* z_v = recover ? z.load(begin, begin + len, s_z) : nullptr;  // null: regenerate the noise
      if (!kl) {
        float* g_mu = bw.dense_grad_mu ? g_mu_out.view(begin, s_out[0]) : nullptr;
        sample_grad_pass(bw.seed, begin, len, g_z, m, v, z_v, g_lv, g_mu);
        if (g_mu != nullptr) g_mu_out.commit(begin, len, g_mu);
      } else {
        if (sample) scaled_noise(bw.seed, begin, len, m, v, z_v, noise);
        const float* g = s_gk;
        if (per_sample) pieces.spread(sample_grad.data_ptr<float>(), begin, len, s_gk);
        else g = gk.load(begin, begin + len, s_gk);
        float* g_mu = g_mu_out.view(begin, s_out[0]);
        if (sample) {
          with_cheap_exp_first([&](auto cheap) {
            return sample_and_kl_grad<decltype(cheap)::value>(g_z, g, scale, m, v, noise, g_mu, g_lv, len);
          });
        } else if (!prior) {
          with_cheap_exp_first(
              [&](auto cheap) { return kl_standard_grad<decltype(cheap)::value>(g, scale, m, v, g_mu, g_lv, len); });
        } else {
          float* g_pm = out[2].view(begin, s_out[2]);
          float* g_plv = out[3].view(begin, s_out[3]);
          const float* p_m = pm.load(begin, begin + len, s_pm);
          const float* p_lv = plv.load(begin, begin + len, s_plv);
          with_cheap_exp_first([&](auto cheap) {
            return kl_prior_grad<decltype(cheap)::value>(g, scale, m, v, p_m, p_lv, g_mu, g_lv, g_pm, g_plv, len);
          });
          out[2].commit(begin, len, g_pm);
          out[3].commit(begin, len, g_plv);
        }
        g_mu_out.commit(begin, len, g_mu);
      }
      g_lv_out.commit(begin, len, g_lv);
    });
  });
  return grads;
}

}  // namespace

// Each public function checks the device (check_cpu: a CUDA tensor in a CPU-only build)
// and says what to compute; run_forward / run_backward do the rest.
at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed) {
  FASTVAE_ON_CUDA(mu, reparameterize(mu, logvar, seed));
  check_cpu(mu, "mu");
  return std::get<0>(run_forward({.mu = mu, .logvar = logvar, .sample = true, .seed = read_seed(seed)}));
}

std::vector<at::Tensor> reparameterize_backward(const at::Tensor& grad_z, const at::Tensor& mu,
                                                const at::Tensor& logvar, const at::Tensor& z, const at::Tensor& seed,
                                                bool dense_grad_mu) {
  FASTVAE_ON_CUDA(logvar, reparameterize_backward(grad_z, mu, logvar, z, seed, dense_grad_mu));
  check_cpu(logvar, "logvar");
  return run_backward({.grad_z = grad_z,
                       .mu = mu,
                       .logvar = logvar,
                       .z = z,
                       .dense_grad_mu = dense_grad_mu,
                       .seed = read_seed(seed)});
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& prior_mu,
                       const c10::optional<at::Tensor>& prior_logvar, const std::string& reduction) {
  FASTVAE_ON_CUDA(mu, gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction));
  check_cpu(mu, "mu");
  return std::get<1>(run_forward({.mu = mu,
                                  .logvar = logvar,
                                  .prior_mu = prior_mu.value_or(at::Tensor()),
                                  .prior_logvar = prior_logvar.value_or(at::Tensor()),
                                  .kl = true,
                                  .reduction = parse_reduction(reduction)}));
}

std::vector<at::Tensor> gaussian_kl_backward(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
                                             const c10::optional<at::Tensor>& prior_mu,
                                             const c10::optional<at::Tensor>& prior_logvar,
                                             const std::string& reduction) {
  FASTVAE_ON_CUDA(mu, gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, reduction));
  check_cpu(mu, "mu");
  return run_backward({.grad_kl = grad,
                       .mu = mu,
                       .logvar = logvar,
                       .prior_mu = prior_mu.value_or(at::Tensor()),
                       .prior_logvar = prior_logvar.value_or(at::Tensor()),
                       .reduction = parse_reduction(reduction)});
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                     const at::Tensor& seed, const std::string& reduction) {
  FASTVAE_ON_CUDA(mu, reparameterize_kl(mu, logvar, seed, reduction));
  check_cpu(mu, "mu");
  return run_forward({.mu = mu,
                      .logvar = logvar,
                      .sample = true,
                      .kl = true,
                      .reduction = parse_reduction(reduction),
                      .seed = read_seed(seed)});
}

std::vector<at::Tensor> reparameterize_kl_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                   const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& z,
                                                   const at::Tensor& seed, const std::string& reduction) {
  FASTVAE_ON_CUDA(mu, reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, z, seed, reduction));
  check_cpu(mu, "mu");
  return run_backward({.grad_z = grad_z,
                       .grad_kl = grad_kl,
                       .mu = mu,
                       .logvar = logvar,
                       .z = z,
                       .reduction = parse_reduction(reduction),
                       .seed = read_seed(seed)});
}

}  // namespace fastvae
