// Gaussian column, CPU: the arithmetic of each op over one block of at most
// kMaxNormalBlock elements held as float32 arrays. csrc/cpu/gaussian.cpp cuts tensors into
// blocks, loads them, and calls these; each loop vectorises (restrict: no aliasing).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "normal_block.h"
#include "vecmath.h"

namespace fastvae {
namespace gaussian_block {

// Gradients take `scale`, the reduction's 1 / divisor.
using Floats = const float* __restrict;
using FloatsOut = float* __restrict;

// A third of exp's instructions handle arguments whose exp is not a normal float, and
// the arithmetic below is bound by them. So each function with an exp is templated on
// kNormalRange: with it, the cheap exp runs while any |argument| > 87 (or NaN) is noted,
// and the function returns false when the block must be redone with the full-range exp;
// with_cheap_exp_first does both.
template <bool kNormalRange>
FASTVAE_VECMATH float exp_of(float x, int32_t* outside) {
  if constexpr (!kNormalRange) return vecmath::exp(x);
  *outside |= !(std::fabs(x) <= 87.0f);
  return vecmath::exp_normal_range(x);
}

// body(std::true_type{}) runs a block with the cheap exp; body(std::false_type{}) redoes it.
template <typename Body>
void with_cheap_exp_first(const Body& body) {
  if (!body(std::true_type{})) body(std::false_type{});
}

template <bool kNormalRange>
bool sample(Floats m, Floats v, Floats eps, FloatsOut z, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) z[j] = m[j] + exp_of<kNormalRange>(0.5f * v[j], &outside) * eps[j];
  return outside == 0;
}

template <bool kNormalRange>
bool sample_and_kl(Floats m, Floats v, Floats eps, FloatsOut z, FloatsOut kl, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float std_dev = exp_of<kNormalRange>(0.5f * v[j], &outside);  // exp(logvar) = std^2 shares the one exp
    z[j] = m[j] + std_dev * eps[j];
    kl[j] = 0.5f * (std_dev * std_dev + m[j] * m[j] - 1.0f - v[j]);
  }
  return outside == 0;
}

template <bool kNormalRange>
bool kl_standard(Floats m, Floats v, FloatsOut kl, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) kl[j] = 0.5f * (exp_of<kNormalRange>(v[j], &outside) + m[j] * m[j] - 1.0f - v[j]);
  return outside == 0;
}

template <bool kNormalRange>
bool kl_prior(Floats m, Floats v, Floats pm, Floats plv, FloatsOut kl, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float diff = m[j] - pm[j];
    const float var = exp_of<kNormalRange>(v[j], &outside), inv_prior_var = exp_of<kNormalRange>(-plv[j], &outside);
    kl[j] = 0.5f * (plv[j] - v[j] + (var + diff * diff) * inv_prior_var - 1.0f);
  }
  return outside == 0;
}

// Backward gradients take the block's scaled noise `noise` = std * eps (see scaled_noise).
inline void sample_grad(Floats gz, Floats noise, FloatsOut g_lv, int64_t len) {
  for (int64_t j = 0; j < len; ++j) g_lv[j] = 0.5f * gz[j] * noise[j];
}

template <bool kNormalRange>
bool sample_and_kl_grad(Floats gz, Floats gk, float scale, Floats m, Floats v, Floats noise, FloatsOut g_mu,
                        FloatsOut g_lv, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float gs = gk[j] * scale;
    g_mu[j] = gz[j] + gs * m[j];
    g_lv[j] = 0.5f * (gz[j] * noise[j] + gs * (exp_of<kNormalRange>(v[j], &outside) - 1.0f));
  }
  return outside == 0;
}

template <bool kNormalRange>
bool kl_standard_grad(Floats gk, float scale, Floats m, Floats v, FloatsOut g_mu, FloatsOut g_lv, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float gs = gk[j] * scale;
    g_mu[j] = gs * m[j];
    g_lv[j] = 0.5f * gs * (exp_of<kNormalRange>(v[j], &outside) - 1.0f);
  }
  return outside == 0;
}

template <bool kNormalRange>
bool kl_prior_grad(Floats gk, float scale, Floats m, Floats v, Floats pm, Floats plv, FloatsOut g_mu,
                   FloatsOut g_lv, FloatsOut g_pm, FloatsOut g_plv, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float gs = gk[j] * scale, diff = m[j] - pm[j], inv_prior_var = exp_of<kNormalRange>(-plv[j], &outside);
    const float gm = gs * diff * inv_prior_var;
    const float glv = 0.5f * gs * (exp_of<kNormalRange>(v[j], &outside) * inv_prior_var - 1.0f);
    g_mu[j] = gm;
    g_lv[j] = glv;
    g_pm[j] = -gm;
    g_plv[j] = -glv - 0.5f * diff * gm;
  }
  return outside == 0;
}

// The backward's std * eps for a block. Regenerating eps costs about as much as the
// forward, so where the forward's sample z is at hand (float32) the scaled noise is
// recovered as z - mu instead. z = mu + std eps rounded to float32 makes z - mu off by at
// most 2^-24 (|mu| + 2 |std eps|): where |mu| <= kRecoverRatio std that is at most
// 2^-24 std (8 + 2 |eps|), the size of the rounding of evaluating std eps afresh. Where
// |mu| is larger (z - mu has lost digits) or not finite, eps is regenerated from the
// seed: the block's few such groups one by one, or the whole block when they are many.
constexpr float kRecoverRatio = 8.0f;

template <bool kNormalRange>
bool scale_noise(Floats v, Floats eps, FloatsOut noise, int64_t len) {
  int32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) noise[j] = exp_of<kNormalRange>(0.5f * v[j], &outside) * eps[j];
  return outside == 0;
}

inline void regenerated_noise(uint64_t seed, int64_t begin, int64_t len, Floats v, FloatsOut noise) {
  alignas(64) float eps[kMaxNormalBlock];
  normal_block(seed, begin, len, eps);
  with_cheap_exp_first([&](auto cheap) { return scale_noise<decltype(cheap)::value>(v, eps, noise, len); });
}

// A power of two at most std = exp(logvar / 2) and more than std / 2, by exponent
// arithmetic alone (the recovery test needs no more; an exp would cost more than the rest
// of the backward). Defined for every input: the exponent is clamped, NaN stays NaN.
FASTVAE_VECMATH float std_lower_bound(float logvar) {
  using L = vecmath::Lanes<float>;
  float log2_std = 0.72134752044448170f * logvar;  // log2(e) / 2
  log2_std = log2_std < -126.0f ? -126.0f : log2_std;
  log2_std = log2_std > 126.0f ? 126.0f : log2_std;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: an integer-valued float plus it shows the integer in its bits
  const auto k = static_cast<L::Int>(L::bits(std::floor(log2_std) + shifter) - L::bits(shifter));
  return vecmath::pow2<float>(k);
}

inline void scaled_noise(uint64_t seed, int64_t begin, int64_t len, Floats m, Floats v, Floats z, FloatsOut noise) {
  if (z == nullptr) return regenerated_noise(seed, begin, len, v, noise);
  alignas(64) int32_t lost[kMaxNormalBlock + 4];
  int32_t lost_count = 0;
  for (int64_t j = 0; j < len; ++j) {
    noise[j] = z[j] - m[j];
    // |mu| <= kRecoverRatio * (a power of two <= std): within the bound; NaN regenerates
    lost[j] = !(std::fabs(m[j]) <= kRecoverRatio * std_lower_bound(v[j]));
    lost_count += lost[j];
  }
  if (lost_count == 0) return;
  if (lost_count > len / 16) return regenerated_noise(seed, begin, len, v, noise);
  std::fill(lost + len, lost + (len + 3) / 4 * 4, 0);
  for (int64_t first = 0; first < len; first += 4) {
    if (!(lost[first] | lost[first + 1] | lost[first + 2] | lost[first + 3])) continue;
    float eps[4];
    normal_group(seed, static_cast<uint64_t>(begin + first) / 4, eps);
    for (int64_t j = first; j < std::min(first + 4, len); ++j) noise[j] = vecmath::exp(0.5f * v[j]) * eps[j - first];
  }
}

}  // namespace gaussian_block
}  // namespace fastvae
