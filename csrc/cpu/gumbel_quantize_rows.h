// The per-row work of csrc/cpu/gumbel_quantize.cpp (which runs it over row blocks, with the
// GEMMs): a row's Gumbel perturbation, its sample weights and statistics, its softmax
// backward, and the row's KL to the uniform prior with its gradient, each a pass over the
// row in cache. Rows are float32, padded with -inf to whole Philox steps (kChunk columns).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "float_limits.h"
#include "rows.h"
#include "simd.h"

namespace fastvae {
namespace gumbel_rows {

using simd::kLanes;
using simd::VecF;
using simd::VecI;
using simd::kWideLanes;
using WideF = simd::Wide::F;
using WideI = simd::Wide::I;

constexpr int kChunk = 4 * kWideLanes;  // columns per Philox step of the row noise

struct Problem {
  uint64_t seed;
  float inv_tau;
  int64_t K, padded;
};

struct RowScan {
  float top;      // max of z (NaN when the row holds a NaN or +inf)
  int64_t index;  // argmax of z as torch.argmax: the first NaN, else the first maximum
};

// buf (a row's logits, padded with -inf) -> z = logits + noise of `row` in place; its max
// and argmax. visit(x, column) sees each kLanes logits before their noise is added (the KL's
// work, while the row is in cache).
template <typename Visit>
RowScan add_noise(const Problem& p, int64_t row, float* buf, const Visit& visit) {
  WideF top = WideF{} - kInf;
  WideI finite = ~WideI{};
  for (int64_t j = 0; j < p.padded / kChunk; ++j) {
    WideF noise[4];
    simd::gumbel_noise_of_chunk(p.seed, row, j, noise);
    for (int v = 0; v < 4; ++v) {
      const int64_t column = kChunk * j + kWideLanes * v;
      float* at = buf + column;
      for (int part = 0; part < kWideLanes; part += kLanes) visit(simd::load(at + part), column + part);
      const WideF z = simd::load<WideF>(at) + noise[v];
      simd::store(at, z);
      finite &= z < kInf;
      top = simd::max(top, z);
    }
  }
  if (simd::lane_bits(finite) != (1u << kWideLanes) - 1) {
    int64_t first_nan = -1, first_inf = -1;
    for (int64_t c = 0; c < p.K && first_nan < 0; ++c) {
      if (std::isnan(buf[c])) first_nan = c;
      else if (buf[c] == kInf && first_inf < 0) first_inf = c;
    }
    return {kNaN, first_nan >= 0 ? first_nan : first_inf};
  }
  const float m = simd::horizontal_max(top);
  return {m, std::find(buf, buf + p.K, m) - buf};  // an all -inf row: 0
}

constexpr auto kNoVisit = [](VecF, int64_t) {};

// KL(softmax(logits) || uniform) of one row, and lse = logsumexp(logits), which the
// backward needs to rebuild log softmax(logits) = logits - lse.
struct UniformKL {
  float kl, lse;
};

// add_noise, also taking the row's UniformKL from the logits in the same pass: sums of
// exp(x - max) and exp(x - max) (x - max), centred on the logits' own max (a pass over the
// row in cache). A NaN or +inf logit gives NaN, an all -inf row KL 0 and lse -inf.
inline RowScan add_noise_with_kl(const Problem& p, int64_t row, float* buf, UniformKL* kl) {
  VecF top = simd::splat(-kInf);
  for (int64_t c = 0; c < p.padded; c += kLanes) top = simd::max(top, simd::load(buf + c));
  const float x_max = simd::horizontal_max(top);
  const float shift = x_max == -kInf ? 0.0f : x_max;  // an all -inf row: every exp is 0
  const VecF shift_v = simd::splat(shift);
  VecF sum{}, weighted{};
  const RowScan scan = add_noise(p, row, buf, [&](VecF x, int64_t) {
    const VecF centred = x - shift_v;
    const VecF e = vecmath::exp_nonpositive(centred);
    sum += e;
    weighted += simd::select(e > 0.0f, e * centred, VecF{});
  });
  const float total = simd::horizontal_sum(sum);
  if (std::isnan(scan.top)) {
    *kl = {kNaN, kNaN};
  } else if (total == 0.0f) {
    *kl = {0.0f, -kInf};
  } else {
    const float log_total = std::log(total);
    *kl = {simd::horizontal_sum(weighted) / total - log_total + std::log(static_cast<float>(p.K)), shift + log_total};
  }
  return scan;
}

// buf (z) -> exp((z - top) / tau) in place; returns log of its sum. top is finite.
inline float exponentiate_row(const Problem& p, float top, float* buf) {
  VecF sum{};
  for (int64_t c = 0; c < p.padded; c += kLanes) {
    const VecF e = vecmath::exp_nonpositive((simd::load(buf + c) - top) * p.inv_tau);
    simd::store(buf + c, e);
    sum += e;
  }
  return std::log(simd::horizontal_sum(sum));
}

// One row's unnormalised sample weights exp((z - m) / tau) into buf (from its logits), its
// statistics (m, log_sum) and index; with `kl`, also its UniformKL.
template <typename scalar_t>
int64_t sample_row(const Problem& p, const scalar_t* logits_row, int64_t row, float* buf, float* stats,
                   UniformKL* kl) {
  load_row(logits_row, 1, p.K, p.padded, -kInf, buf);
  const RowScan scan = kl != nullptr ? add_noise_with_kl(p, row, buf, kl) : add_noise(p, row, buf, kNoVisit);
  if (std::isnan(scan.top) || scan.top == -kInf) {  // NaN row: NaN; all -inf: nothing to sample, zeros
    std::fill(buf, buf + p.padded, scan.top == -kInf ? 0.0f : kNaN);
    stats[0] = stats[1] = scan.top;
    return scan.index;
  }
  stats[0] = scan.top, stats[1] = exponentiate_row(p, scan.top, buf);
  return scan.index;
}

// One row of the backward: y (holding z) becomes the sample exp((z - m) / tau - log_sum),
// g (holding d_y) becomes the logits' gradient y (d_y - s) / tau with s = sum(y d_y), plus
// kl_grad (the KL's gradient at the row, padded) when not null.
// Returns the row's share of tau's gradient, -sum(grad * log y) = -(sum(y d_y t) - s sum(y t)) / tau
// with t = (z - m) / tau (the row's gradient sums to 0, so log_sum drops out; y = 0 terms are 0).
inline double softmax_backward_row(const Problem& p, float top, float log_sum, float* y, float* g,
                                  const float* kl_grad) {
  const int64_t K = p.K;
  VecF dot{}, dot_t{}, y_t{};
  for (int64_t c = 0; c < p.padded; c += kLanes) {
    const VecF t = (simd::load(y + c) - top) * p.inv_tau;
    const VecF e = vecmath::exp_nonpositive(t - log_sum);
    const VecF t_or_0 = simd::select(e > 0.0f, t, VecF{});
    simd::store(y + c, e);
    const VecF d = simd::load_first(g + std::min(c, K), std::clamp<int64_t>(K - c, 0, kLanes));
    dot += e * d;
    dot_t += e * d * t_or_0;
    y_t += e * t_or_0;
  }
  const float s = simd::horizontal_sum(dot);
  const VecF s_v = simd::splat(s), inv_tau = simd::splat(p.inv_tau);
  for (int64_t c = 0; c < K; c += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, K - c);
    VecF grad = simd::load(y + c) * (simd::load_first(g + c, count) - s_v) * inv_tau;
    if (kl_grad != nullptr) grad += simd::load(kl_grad + c);
    simd::store_first(g + c, grad, count);
  }
  return -(static_cast<double>(simd::horizontal_sum(dot_t)) - static_cast<double>(s) * simd::horizontal_sum(y_t)) *
         p.inv_tau;
}

// The KL's gradient at one row's logits (buf, padded), into kl_grad, as add_noise turns buf
// into z: p (log p - sum(p log p)) grad_kl with log p = x - lse, sum(p log p) = kl - log K
// (0 where p = 0).
inline RowScan add_noise_with_kl_gradient(const Problem& p, int64_t row, float* buf, const UniformKL& kl, float grad_kl,
                                   float* kl_grad) {
  const VecF lse = simd::splat(kl.lse), grad = simd::splat(grad_kl);
  const VecF p_log_p = simd::splat(kl.kl - std::log(static_cast<float>(p.K)));
  return add_noise(p, row, buf, [&](VecF x, int64_t c) {
    const VecF log_prob = x - lse;
    const VecF prob = vecmath::exp_nonpositive(log_prob);
    simd::store(kl_grad + c, simd::select(prob > 0.0f, prob * (log_prob - p_log_p) * grad, VecF{}));
  });
}

}  // namespace gumbel_rows
}  // namespace fastvae
