// Gumbel column, C++ CPU kernels: the categorical KL of the discrete-VAE ELBO and its
// backward, one row (one distribution along `dim`) at a time, in parallel over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "float_limits.h"
#include "rows.h"
#include "simd.h"

namespace fastvae {
namespace {

using simd::kLanes;
using simd::VecF;
using simd::VecI;

// KL(softmax(x) || softmax(q)) of one row, from rows loaded as float and padded with -inf
// to a multiple of kLanes; q is null for the uniform prior. Two sweeps: the maxima, then
// one exp sweep for the sums and the weighted sum (the exponentials are kept for the
// backward when it passes buffers). Sums are centred on each row's max, so logits of any
// magnitude lose no precision: log softmax(x)_c = (x_c - x_max) - log_sum_p.
// A row whose logits or prior hold a NaN or +inf has KL NaN (sum_p NaN marks it for the
// backward): the max would drop a NaN, so the max sweep also checks every value < +inf.
struct KLRow {
  float x_max = 0.0f, log_sum_p = -kInf, sum_p = 0.0f;  // an all -inf row has no mass: sum 0
  float q_max = 0.0f, log_sum_q = 0.0f, sum_q = 0.0f;
  float kl = 0.0f;
};

// The max of a padded row; clears *finite if a value is NaN or +inf.
float row_max(const float* v, int64_t padded, bool* finite) {
  VecF top = simd::splat(-kInf);
  VecI below_inf = ~VecI{};
  for (int64_t c = 0; c < padded; c += kLanes) {
    const VecF values = simd::load(v + c);
    top = simd::max(top, values);
    below_inf &= values < kInf;
  }
  *finite = *finite && simd::lane_bits(below_inf) == (1u << kLanes) - 1;
  return simd::horizontal_max(top);
}

// Classes with p = 0 (masked logits) contribute 0 whatever q is; mass where q = 0 gives
// +inf (an all -inf prior too). e_p / e_q: where not null, exp(x - x_max) and
// exp(q - q_max) are stored there.
KLRow kl_of_row(const float* x, const float* q, int64_t padded, int64_t classes, float* e_p, float* e_q) {
  KLRow row;
  bool finite = true;
  row.x_max = row_max(x, padded, &finite);
  if (q != nullptr) row.q_max = row_max(q, padded, &finite);
  if (!finite) {
    row.kl = row.sum_p = kNaN;
    return row;
  }
  if (row.x_max == -kInf) return row;
  if (row.q_max == -kInf) row.q_max = 0.0f;  // no prior mass: log q = -inf, KL = inf
  VecF sum_p{}, sum_q{}, weighted{};
  for (int64_t c = 0; c < padded; c += kLanes) {
    const VecF xc = simd::load(x + c) - row.x_max;
    const VecF qc = q != nullptr ? simd::load(q + c) - row.q_max : VecF{};
    const VecF e = vecmath::exp_nonpositive(xc);
    sum_p += e;
    weighted += simd::select(e > 0.0f, e * (xc - qc), VecF{});
    if (e_p != nullptr) simd::store(e_p + c, e);
    if (q != nullptr) {
      const VecF eq = vecmath::exp_nonpositive(qc);
      sum_q += eq;
      if (e_q != nullptr) simd::store(e_q + c, eq);
    }
  }
  row.sum_p = simd::horizontal_sum(sum_p);
  row.log_sum_p = std::log(row.sum_p);
  row.sum_q = q != nullptr ? simd::horizontal_sum(sum_q) : static_cast<float>(classes);
  // The uniform prior: log q_c = -log K. With no prior mass the weighted sum is already
  // +inf; log 0 would make it inf - inf.
  row.log_sum_q = row.sum_q > 0.0f ? std::log(row.sum_q) : 0.0f;
  row.kl = simd::horizontal_sum(weighted) / row.sum_p - row.log_sum_p + row.log_sum_q;
  return row;
}

struct KLInputs {
  at::Tensor x, prior;  // prior undefined for the uniform prior
  RowLayout x_layout, prior_layout;
  int64_t rows, classes, padded;
};

KLInputs kl_inputs(const at::Tensor& logits, const c10::optional<at::Tensor>& prior_logits, int64_t dim) {
  check_cpu(logits, "logits");
  KLInputs in;
  in.x = logits;
  in.x_layout = row_layout(in.x, dim);
  if (prior_logits.has_value() && prior_logits->defined()) {
    in.prior = prior_logits->expand(logits.sizes());
    in.prior_layout = row_layout(in.prior, dim);
  }
  in.classes = logits.size(dim);
  in.rows = in.classes ? logits.numel() / in.classes : 0;
  in.padded = (in.classes + kLanes - 1) / kLanes * kLanes;
  return in;
}

// Runs body(row, x_row, q_row, kl_row, e_p, e_q) over all rows in parallel, the rows as
// float (q_row null for the uniform prior); with `keep_exp`, e_p and e_q hold the rows'
// exponentials (kl_of_row; untouched for a row with no mass) and are the body's to
// overwrite, else they are null.
template <typename scalar_t, typename Body>
void for_each_kl_row(const KLInputs& in, bool keep_exp, const Body& body) {
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const scalar_t* prior = in.prior.defined() ? in.prior.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, in.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(in.classes, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> x_row(in.padded), q_row(prior ? in.padded : 0);
    std::vector<float> e_p(keep_exp ? in.padded : 0), e_q(keep_exp && prior ? in.padded : 0);
    for (int64_t row = begin; row < end; ++row) {
      load_row(x + in.x_layout.offset(row), in.x_layout.class_stride, in.classes, in.padded, -kInf, x_row.data());
      if (prior)
        load_row(prior + in.prior_layout.offset(row), in.prior_layout.class_stride, in.classes, in.padded, -kInf,
                 q_row.data());
      float* ep = keep_exp ? e_p.data() : nullptr;
      float* eq = keep_exp && prior ? e_q.data() : nullptr;
      const float* q = prior ? q_row.data() : nullptr;
      body(row, x_row.data(), q, kl_of_row(x_row.data(), q, in.padded, in.classes, ep, eq), ep, eq);
    }
  });
}

}  // namespace

at::Tensor categorical_kl(const at::Tensor& logits, const c10::optional<at::Tensor>& prior_logits, int64_t dim,
                          const std::string& reduction) {
  const KLInputs in = kl_inputs(logits, prior_logits, dim);
  auto kl = at::zeros({in.rows}, logits.options().dtype(at::kFloat));
  float* kl_out = kl.data_ptr<float>();
  FASTVAE_DISPATCH_FLOATS(logits.scalar_type(), "categorical_kl", [&] {
    for_each_kl_row<scalar_t>(in, false, [&](int64_t row, const float*, const float*, const KLRow& r, float*, float*) {
      kl_out[row] = r.kl;
    });
  });
  if (reduction == "none") {
    auto shape = logits.sizes().vec();
    shape.erase(shape.begin() + dim);
    return kl.reshape(shape).to(logits.scalar_type());
  }
  auto total = kl.sum(at::kDouble);  // float64: the same bits whatever the thread count
  if (reduction == "mean") total = total / static_cast<double>(std::max<int64_t>(in.rows, 1));
  if (reduction == "batchmean") total = total / static_cast<double>(logits.dim() > 1 ? logits.size(0) : 1);
  return total.to(logits.scalar_type());
}

std::vector<at::Tensor> categorical_kl_backward(const at::Tensor& grad, const at::Tensor& logits,
                                                const c10::optional<at::Tensor>& prior_logits, int64_t dim,
                                                const std::string& reduction) {
  const KLInputs in = kl_inputs(logits, prior_logits, dim);
  // Upstream gradient of each row's KL.
  at::Tensor row_grad;
  if (reduction == "none") {
    row_grad = grad.reshape({in.rows}).to(at::kFloat).contiguous();
  } else {
    double scale = 1.0;
    if (reduction == "mean") scale = 1.0 / static_cast<double>(std::max<int64_t>(in.rows, 1));
    if (reduction == "batchmean") scale = 1.0 / static_cast<double>(logits.dim() > 1 ? logits.size(0) : 1);
    row_grad = (grad.to(at::kFloat).reshape({1}) * scale).expand({in.rows}).contiguous();
  }
  const float* g = row_grad.data_ptr<float>();
  auto grad_logits = empty_output(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<at::Tensor> grads{grad_logits};
  if (in.prior.defined()) grads.push_back(empty_output(grad_logits.sizes(), grad_logits.options()));
  if (in.rows == 0) return grads;
  at::Tensor out = grad_logits;
  const RowLayout out_layout = row_layout(out, dim);
  FASTVAE_DISPATCH_FLOATS(logits.scalar_type(), "categorical_kl_backward", [&] {
    scalar_t* gx = grad_logits.data_ptr<scalar_t>();
    scalar_t* gq = in.prior.defined() ? grads[1].data_ptr<scalar_t>() : nullptr;
    for_each_kl_row<scalar_t>(in, true, [&](int64_t row, const float* x, const float* q, const KLRow& r, float* e_p,
                                            float* e_q) {
      // The row's gradients replace its exponentials in e_p (logits) and e_q (prior).
      if (r.sum_p > 0.0f) {
        const float g_row = g[row], inv_sum_p = 1.0f / r.sum_p, inv_sum_q = 1.0f / r.sum_q;
        if (gq) {  // d/dq of -sum p log q is q sum(p) - p
          for (int64_t c = 0; c < in.classes; ++c) e_q[c] = g_row * (e_q[c] * inv_sum_q - e_p[c] * inv_sum_p);
        }
        for (int64_t c = 0; c < in.classes; ++c) {  // selects, no branches: vectorises
          const float p = e_p[c] * inv_sum_p;
          const float log_p = (x[c] - r.x_max) - r.log_sum_p;
          const float log_q = (q != nullptr ? q[c] - r.q_max : 0.0f) - r.log_sum_q;
          e_p[c] = p > 0.0f ? g_row * p * (log_p - log_q - r.kl) : 0.0f;
        }
      } else {  // a row with no mass (all -inf) has zero gradients, a NaN row NaN ones
        const float fill = r.sum_p == 0.0f ? 0.0f : kNaN;
        std::fill(e_p, e_p + in.classes, fill);
        if (gq) std::fill(e_q, e_q + in.classes, fill);
      }
      const int64_t base = out_layout.offset(row), stride = out_layout.class_stride;
      for (int64_t c = 0; c < in.classes; ++c) gx[base + c * stride] = static_cast<scalar_t>(e_p[c]);
      if (gq) {
        for (int64_t c = 0; c < in.classes; ++c) gq[base + c * stride] = static_cast<scalar_t>(e_q[c]);
      }
    });
  });
  return grads;
}

}  // namespace fastvae
