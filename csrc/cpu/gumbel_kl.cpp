// Gumbel column, C++ CPU kernels: the categorical KL of the discrete-VAE ELBO and its
// backward, one row (one distribution along `dim`) at a time, in parallel over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "rows.h"
#include "vec8.h"

namespace fastvae {
namespace {

using vec8::kLanes;
using vec8::VecF;

constexpr float kInf = std::numeric_limits<float>::infinity();

// KL(softmax(x) || softmax(q)) of one row, from rows loaded as float (padded with -inf to
// a multiple of kLanes; a uniform prior is a row of zeros). Sums are taken centred on each
// row's max so logits of any magnitude lose no precision.
struct LogSoftmax {
  float max, log_sum;  // log softmax(v) = v - max - log_sum; an all -inf row has sum 0
};

LogSoftmax log_softmax_of(const float* v, int64_t padded) {
  VecF top = vec8::splat(-kInf);
  for (int64_t c = 0; c < padded; c += kLanes) top = vec8::max(top, vec8::load(v + c));
  const float m = vec8::horizontal_max(top);
  if (m == -kInf) return {0.0f, -kInf};
  VecF sum{};
  for (int64_t c = 0; c < padded; c += kLanes) sum += vecmath::exp_nonpositive(vec8::load(v + c) - m);
  return {m, std::log(vec8::horizontal_sum(sum))};
}

struct KLRow {
  LogSoftmax p, q;
  float kl;
};

// Classes with p = 0 (masked logits) contribute 0 whatever q is.
KLRow kl_of_row(const float* x, const float* q, int64_t padded) {
  KLRow row{log_softmax_of(x, padded), log_softmax_of(q, padded), 0.0f};
  if (row.p.log_sum == -kInf) return row;
  VecF weighted{};
  for (int64_t c = 0; c < padded; c += kLanes) {
    const VecF xc = vec8::load(x + c) - row.p.max, qc = vec8::load(q + c) - row.q.max;
    const VecF e = vecmath::exp_nonpositive(xc);
    weighted += vec8::select(e > 0.0f, e * (xc - qc), VecF{});
  }
  row.kl = vec8::horizontal_sum(weighted) * std::exp(-row.p.log_sum) - row.p.log_sum + row.q.log_sum;
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

// Runs body(row, x_row, q_row, kl_row) over all rows, in parallel, with the rows as float.
template <typename scalar_t, typename Body>
void for_each_kl_row(const KLInputs& in, const Body& body) {
  const scalar_t* x = in.x.data_ptr<scalar_t>();
  const scalar_t* prior = in.prior.defined() ? in.prior.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, in.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(in.classes, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> x_row(in.padded), q_row(in.padded, 0.0f);
    std::fill(q_row.begin() + in.classes, q_row.end(), -kInf);
    for (int64_t row = begin; row < end; ++row) {
      load_row(x + in.x_layout.offset(row), in.x_layout.class_stride, in.classes, in.padded, -kInf, x_row.data());
      if (prior)
        load_row(prior + in.prior_layout.offset(row), in.prior_layout.class_stride, in.classes, in.padded, -kInf,
                 q_row.data());
      body(row, x_row.data(), q_row.data(), kl_of_row(x_row.data(), q_row.data(), in.padded));
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
    for_each_kl_row<scalar_t>(in, [&](int64_t row, const float*, const float*, const KLRow& r) { kl_out[row] = r.kl; });
  });
  if (reduction == "none") {
    auto shape = logits.sizes().vec();
    shape.erase(shape.begin() + dim);
    return kl.reshape(shape).to(logits.scalar_type());
  }
  auto total = kl.sum();
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
    for_each_kl_row<scalar_t>(in, [&](int64_t row, const float* x, const float* q, const KLRow& r) {
      thread_local std::vector<float> d_logits, d_prior;  // the row's gradients, then stored
      d_logits.resize(in.classes);
      d_prior.resize(in.classes);
      float* __restrict dl = d_logits.data();
      float* __restrict dq = d_prior.data();
      const float log_norm_q = r.q.max + r.q.log_sum, log_norm_p = r.p.max + r.p.log_sum, g_row = g[row];
      // d/dq of -sum p log q is q sum(p) - p; sum(p) is 0 for a row with no mass (all -inf)
      const bool has_mass = r.p.log_sum != -kInf;
      for (int64_t c = 0; c < in.classes; ++c) {  // selects, no branches: vectorises
        const float log_p = x[c] - log_norm_p, log_q = q[c] - log_norm_q;
        const float p = has_mass ? vecmath::exp(log_p) : 0.0f;
        dl[c] = p > 0.0f ? g_row * p * (log_p - log_q - r.kl) : 0.0f;
        dq[c] = g_row * ((has_mass ? vecmath::exp(log_q) : 0.0f) - p);
      }
      const int64_t base = out_layout.offset(row), stride = out_layout.class_stride;
      for (int64_t c = 0; c < in.classes; ++c) gx[base + c * stride] = static_cast<scalar_t>(dl[c]);
      if (gq) {
        for (int64_t c = 0; c < in.classes; ++c) gq[base + c * stride] = static_cast<scalar_t>(dq[c]);
      }
    });
  });
  return grads;
}

}  // namespace fastvae
