// Gaussian column, CPU: the arithmetic of each op over one block of at most
// kMaxNormalBlock elements held as float32 arrays. csrc/cpu/gaussian.cpp cuts tensors into
// blocks, loads them, and calls these; each loop vectorises (restrict: no aliasing), and
// the backward's noise recovery, which needs lane masks, is written with simd.h vectors.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "normal_block.h"
#include "simd.h"
#include "vecmath.h"
#include "vq_lanes.h"

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
//
// The note: the sign bit of *outside gets set where |x| > 87 or x is NaN, as |x|'s bits
// plus 2^31 - 1 - 87.0f's bits carry into it (three SSE2 instructions; a comparison and
// its conversion to an integer take four).
template <bool kNormalRange>
FASTVAE_VECMATH float exp_of(float x, uint32_t* outside) {
  if constexpr (!kNormalRange) return vecmath::exp(x);
  *outside |= (vecmath::Lanes<float>::bits(x) & 0x7fffffffu) + (0x7fffffffu - 0x42ae0000u);  // 87.0f
  return vecmath::exp_normal_range(x);
}

// Whether the arguments behind an exp_of note all lay inside the cheap exp's range.
FASTVAE_VECMATH bool all_in_range(uint32_t outside) { return (outside >> 31) == 0; }

// body(std::true_type{}) runs a block with the cheap exp; body(std::false_type{}) redoes it.
template <typename Body>
void with_cheap_exp_first(const Body& body) {
  if (!body(std::true_type{})) body(std::false_type{});
}

template <bool kNormalRange>
bool sample(Floats m, Floats v, Floats eps, FloatsOut z, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) z[j] = m[j] + exp_of<kNormalRange>(0.5f * v[j], &outside) * eps[j];
  return all_in_range(outside);
}

template <bool kNormalRange>
bool sample_and_kl(Floats m, Floats v, Floats eps, FloatsOut z, FloatsOut kl, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float std_dev = exp_of<kNormalRange>(0.5f * v[j], &outside);  // exp(logvar) = std^2 shares the one exp
    z[j] = m[j] + std_dev * eps[j];
    kl[j] = 0.5f * (std_dev * std_dev + m[j] * m[j] - 1.0f - v[j]);
  }
  return all_in_range(outside);
}

template <bool kNormalRange>
bool kl_standard(Floats m, Floats v, FloatsOut kl, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) kl[j] = 0.5f * (exp_of<kNormalRange>(v[j], &outside) + m[j] * m[j] - 1.0f - v[j]);
  return all_in_range(outside);
}

template <bool kNormalRange>
bool kl_prior(Floats m, Floats v, Floats pm, Floats plv, FloatsOut kl, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float diff = m[j] - pm[j];
    const float var = exp_of<kNormalRange>(v[j], &outside), inv_prior_var = exp_of<kNormalRange>(-plv[j], &outside);
    kl[j] = 0.5f * (plv[j] - v[j] + (var + diff * diff) * inv_prior_var - 1.0f);
  }
  return all_in_range(outside);
}

// Backward gradients take the block's scaled noise `noise` = std * eps (see scaled_noise).
inline void sample_grad(Floats gz, Floats noise, FloatsOut g_lv, int64_t len) {
  for (int64_t j = 0; j < len; ++j) g_lv[j] = 0.5f * gz[j] * noise[j];
}

template <bool kNormalRange>
bool sample_and_kl_grad(Floats gz, Floats gk, float scale, Floats m, Floats v, Floats noise, FloatsOut g_mu,
                        FloatsOut g_lv, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float gs = gk[j] * scale;
    g_mu[j] = gz[j] + gs * m[j];
    g_lv[j] = 0.5f * (gz[j] * noise[j] + gs * (exp_of<kNormalRange>(v[j], &outside) - 1.0f));
  }
  return all_in_range(outside);
}

template <bool kNormalRange>
bool kl_standard_grad(Floats gk, float scale, Floats m, Floats v, FloatsOut g_mu, FloatsOut g_lv, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float gs = gk[j] * scale;
    g_mu[j] = gs * m[j];
    g_lv[j] = 0.5f * gs * (exp_of<kNormalRange>(v[j], &outside) - 1.0f);
  }
  return all_in_range(outside);
}

template <bool kNormalRange>
bool kl_prior_grad(Floats gk, float scale, Floats m, Floats v, Floats pm, Floats plv, FloatsOut g_mu,
                   FloatsOut g_lv, FloatsOut g_pm, FloatsOut g_plv, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const float gs = gk[j] * scale, diff = m[j] - pm[j], inv_prior_var = exp_of<kNormalRange>(-plv[j], &outside);
    const float gm = gs * diff * inv_prior_var;
    const float glv = 0.5f * gs * (exp_of<kNormalRange>(v[j], &outside) * inv_prior_var - 1.0f);
    g_mu[j] = gm;
    g_lv[j] = glv;
    g_pm[j] = -gm;
    g_plv[j] = -glv - 0.5f * diff * gm;
  }
  return all_in_range(outside);
}

// The backward's std * eps for a block. Regenerating eps costs about as much as the
// forward, so where the forward's sample z is at hand (float32) the scaled noise is
// recovered as z - mu instead. z = mu + std eps rounded to float32 makes z - mu off by at
// most 2^-24 (|mu| + 2 |std eps|): where |mu| <= 8 std that is at most 2^-24 std
// (8 + 2 |eps|), the size of the rounding of evaluating std eps afresh. Where |mu| is
// larger (z - mu has lost digits) or not finite, eps is regenerated from the seed: the
// block's few such groups together, or the whole block when they are many.
template <bool kNormalRange>
bool scale_noise(Floats v, Floats eps, FloatsOut noise, int64_t len) {
  uint32_t outside = 0;
  for (int64_t j = 0; j < len; ++j) noise[j] = exp_of<kNormalRange>(0.5f * v[j], &outside) * eps[j];
  return all_in_range(outside);
}

inline void regenerated_noise(uint64_t seed, int64_t begin, int64_t len, Floats v, FloatsOut noise) {
  alignas(64) float eps[kMaxNormalBlock];
  normal_block(seed, begin, len, eps);
  with_cheap_exp_first([&](auto cheap) { return scale_noise<decltype(cheap)::value>(v, eps, noise, len); });
}

// Lanes where z - mu has lost digits: |mu| > 8 * a lower bound of std = exp(logvar / 2),
// or mu not finite. The bound costs a few instructions where an exp would cost more than
// the rest of the backward: with log2(std) = k + f, k an integer and f in [0, 1),
// 2^k (1 + f ln 2) <= 2^(k + f) (the tangent at 0 lies below the convex 2^f) and is
// within 16% of it, so few elements are redone needlessly (N(0, 1) mu and logvar: 0.08%,
// against 0.06% lost by the exact test). log2(std) is clamped to [-126, 124] so that
// the bound is a normal float; a NaN logvar gives -126 (regenerated).
// The same lanes at any width (`VecF` any float vector type): the selects are vector ?:.
template <typename VecF>
FASTVAE_VECMATH auto digits_lost(VecF mu, VecF logvar) {
  using VecI = decltype(mu < mu);
  const VecF lowest = VecF{} - 126.0f, highest = VecF{} + 124.0f;
  VecF log2_std = 0.72134752044448170f * logvar;  // log2(e) / 2
  log2_std = log2_std >= lowest ? log2_std : lowest;
  log2_std = log2_std <= highest ? log2_std : highest;
  VecI k = __builtin_convertvector(log2_std, VecI);  // rounds toward zero:
  k += (VecI)(log2_std < __builtin_convertvector(k, VecF));  // -1 where that rounded up
  const VecF fraction = log2_std - __builtin_convertvector(k, VecF);
  const VecF pow2_k = (VecF)((k + 127) << 23);  // 2^k in the exponent field, as vecmath::pow2
  const VecF std_lower = pow2_k * (1.0f + 0.69314718055994531f * fraction);
  const VecF abs_mu = (VecF)((VecI)mu & 0x7fffffff);
  return ~(abs_mu <= 8.0f * std_lower);  // a NaN mu compares false: lost
}

// The register RecoveredNoise's pass works in: 16 lanes at the AVX-512 level (vq_lanes.h),
// where simd.h's vectors hold 8 (the 8-lane pass was the sampling backward's largest cost
// there); simd.h's at the other levels. The same arithmetic per lane, so the same bits.
#if defined(__AVX512F__)
namespace recovery = vq_lanes;
#else
namespace recovery = simd;
#endif

// The first `count` lanes of a recovery::VecF (all when count is recovery::kLanes); lanes
// past count are zero.
FASTVAE_VECMATH recovery::VecF load_lanes(const float* p, int64_t count) {
  recovery::VecF v{};
  std::memcpy(&v, p, sizeof(float) * (count == recovery::kLanes ? recovery::kLanes : count));
  return v;
}
FASTVAE_VECMATH void store_lanes(float* p, recovery::VecF v, int64_t count) {
  std::memcpy(p, &v, sizeof(float) * (count == recovery::kLanes ? recovery::kLanes : count));
}

// A pass over a block with z - mu standing for std * eps: pass(j, count, z - mu) for
// elements j .. j + count - 1 (count = recovery::kLanes but at the block's ragged end; lanes past count
// are zero), noting where the digits were lost.
class RecoveredNoise {
 public:
  static constexpr int64_t kMaxLostGroups = kMaxNormalBlock / 16;  // more: the block is regenerated

  template <typename Pass>
  RecoveredNoise(Floats m, Floats v, Floats z, int64_t len, const Pass& pass) {
    using namespace recovery;
    const auto step = [&](int64_t j, int64_t count) __attribute__((always_inline)) {
      const VecF mu = load_lanes(m + j, count);
      pass(j, count, load_lanes(z + j, count) - mu);
      const uint32_t bits = lane_bits((VecI)digits_lost(mu, load_lanes(v + j, count)));  // mu 0 past count: never lost
      lost_[j / 64] |= static_cast<uint64_t>(bits) << (j % 64);
      lost_count_ += __builtin_popcount(bits);
    };
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) step(j, kLanes);  // count a constant: plain loads and stores
    if (j < len) step(j, len - j);
  }

  // Redoes the lost elements: redo(e, std * eps regenerated) for each element e of a group
  // holding one (e < len), the groups kLanes at a time. Returns false, redoing nothing,
  // where so many were lost that regenerating the whole block costs less.
  template <typename Redo>
  bool redo_lost(uint64_t seed, int64_t begin, int64_t len, Floats v, const Redo& redo) const {
    if (lost_count_ == 0) return true;
    if (lost_count_ > kMaxLostGroups * len / kMaxNormalBlock) return false;
    uint64_t groups[kMaxLostGroups];
    int64_t count = 0;
    for (int64_t word = 0; word < kMaxNormalBlock / 64; ++word) {
      for (uint64_t bits = lost_[word]; bits != 0;) {
        const int group_in_word = __builtin_ctzll(bits) / 4;
        groups[count++] = static_cast<uint64_t>(begin + 64 * word) / 4 + group_in_word;  // begin: a multiple of 4
        bits &= ~(uint64_t{0xf} << (4 * group_in_word));
      }
    }
    alignas(64) float eps[4 * kMaxLostGroups], lost_v[4 * kMaxLostGroups] = {}, lost_eps[4 * kMaxLostGroups] = {},
        scaled[4 * kMaxLostGroups];
    normal_groups(seed, groups, count, eps);
    int64_t elements[4 * kMaxLostGroups], lost_elements = 0;  // the groups' elements inside the block
    for (int64_t i = 0; i < 4 * count; ++i) {
      const int64_t e = static_cast<int64_t>(4 * groups[i / 4]) - begin + i % 4;
      if (e >= len) continue;
      elements[lost_elements] = e;
      lost_v[lost_elements] = v[e];
      lost_eps[lost_elements++] = eps[i];
    }
    with_cheap_exp_first([&](auto cheap) {
      return scale_noise<decltype(cheap)::value>(lost_v, lost_eps, scaled, lost_elements);
    });
    for (int64_t k = 0; k < lost_elements; ++k) redo(elements[k], scaled[k]);
    return true;
  }

 private:
  uint64_t lost_[kMaxNormalBlock / 64] = {};  // element j: bit j % 64 of lost_[j / 64]
  int64_t lost_count_ = 0;
};

inline void scaled_noise(uint64_t seed, int64_t begin, int64_t len, Floats m, Floats v, Floats z, FloatsOut noise) {
  if (z == nullptr) return regenerated_noise(seed, begin, len, v, noise);
  const RecoveredNoise recovered(m, v, z, len, [&](int64_t j, int64_t count, recovery::VecF scaled) {
    store_lanes(noise + j, scaled, count);
  });
  if (!recovered.redo_lost(seed, begin, len, v, [&](int64_t e, float scaled) { noise[e] = scaled; })) {
    regenerated_noise(seed, begin, len, v, noise);
  }
}

// The sampling backward alone, g_lv = gz std eps / 2 (and g_mu = gz where asked), in one
// pass over memory where z is at hand: the loads and the stores that miss the cache then
// overlap (a pass per output measured 1.5x slower on one core at (4096, 512)).
inline void sample_grad_pass(uint64_t seed, int64_t begin, int64_t len, Floats gz, Floats m, Floats v, Floats z,
                             FloatsOut g_lv, FloatsOut g_mu) {
  if (z != nullptr) {
    const RecoveredNoise recovered(m, v, z, len, [&](int64_t j, int64_t count, recovery::VecF scaled) {
      const recovery::VecF g = load_lanes(gz + j, count);
      store_lanes(g_lv + j, 0.5f * g * scaled, count);
      if (g_mu != nullptr) store_lanes(g_mu + j, g, count);
    });
    if (recovered.redo_lost(seed, begin, len, v, [&](int64_t e, float scaled) { g_lv[e] = 0.5f * gz[e] * scaled; })) {
      return;
    }
  } else if (g_mu != nullptr) {
    std::copy(gz, gz + len, g_mu);
  }
  alignas(64) float noise[kMaxNormalBlock];
  regenerated_noise(seed, begin, len, v, noise);
  sample_grad(gz, noise, g_lv, len);
}

}  // namespace gaussian_block
}  // namespace fastvae
