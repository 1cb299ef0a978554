// The Gaussian noise stream of philox.h for a block of consecutive elements, CPU side:
// Philox-4x32-10 simd::kLanes groups at a time (simd.h), then Box-Muller with the vectorisable
// math of vecmath.h. Bit for bit the uniforms of philox.h / fastvae/reference.py; the
// normals agree with them within float rounding.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../philox.h"
#include "simd.h"
#include "vecmath.h"

namespace fastvae {

constexpr int64_t kMaxNormalBlock = 512;  // elements normal_block makes per call, at most

// Philox-4x32-10 of kSets kLanes groups, group g's counter (c0[g], c1[g], 0, 0) (g = s kLanes
// + lane: lane `lane` of set s), as Box-Muller inputs: pair 2g takes lanes (0, 1) of group
// g, pair 2g + 1 lanes (2, 3).
template <int kSets>
FASTVAE_VEC_INLINE void philox_uniforms_vector(uint64_t seed, const simd::VecU (&c0)[kSets],
                                               const simd::VecU (&c1)[kSets], float* u_radius, float* u_angle) {
  using namespace simd;
  VecU draws[kSets][4], zeros[kSets] = {};
  philox<kSets>(seed, c0, c1, zeros, draws);
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) {
    // Group g's lanes 0, 2 are radius draws 2g, 2g + 1; lanes 1, 3 the matching angles.
    store(u_radius + 2 * kLanes * s, uniform(draws[s][0]), uniform(draws[s][2]));
    store(u_angle + 2 * kLanes * s, uniform(draws[s][1]), uniform(draws[s][3]));
  }
}

// philox_uniforms_vector of the kSets kLanes consecutive groups from first_group.
template <int kSets>
FASTVAE_VEC_INLINE void philox_uniforms_consecutive(uint64_t seed, uint64_t first_group, float* u_radius,
                                                    float* u_angle) {
  using namespace simd;
  VecU c0[kSets], c1[kSets];
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) {
    const uint64_t group = first_group + static_cast<uint64_t>(kLanes * s);
    const VecU group_lo = splat_u(static_cast<uint32_t>(group));
    c0[s] = group_lo + (VecU)lane_index();
    // Lanes whose low word wrapped carry into the high word (a true comparison is -1).
    c1[s] = splat_u(static_cast<uint32_t>(group >> 32)) - (VecU)(c0[s] < group_lo);
  }
  philox_uniforms_vector<kSets>(seed, c0, c1, u_radius, u_angle);
}

#if defined(__AVX512F__)
// At the AVX-512 level the block's Philox runs on 16 groups at once in 512-bit registers
// (simd.h's vectors hold 8: Philox was two thirds of reparameterize's time there): the
// same counters and the same arithmetic as philox_uniforms_vector, so the same bits.
namespace philox16 {
typedef uint32_t VecU __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));
typedef float VecF __attribute__((vector_size(64)));
typedef uint64_t VecU64 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

struct Word {  // as simd::PhiloxWord: even and odd lanes in the low halves of 64-bit lanes
  VecU64 even, odd;
};
FASTVAE_VEC_INLINE Word operator^(Word a, Word b) { return {a.even ^ b.even, a.odd ^ b.odd}; }
FASTVAE_VEC_INLINE Word operator^(Word a, uint32_t key) {
  return {a.even ^ static_cast<uint64_t>(key), a.odd ^ static_cast<uint64_t>(key)};
}
FASTVAE_VEC_INLINE VecU64 multiply_low_words(VecU64 a, uint32_t factor) {
  __m512i x;
  std::memcpy(&x, &a, sizeof x);
  const __m512i product = _mm512_mul_epu32(x, _mm512_set1_epi64(factor));
  VecU64 out;
  std::memcpy(&out, &product, sizeof out);
  return out;
}
FASTVAE_VEC_INLINE VecF uniform(VecU bits) {
  return __builtin_convertvector((VecI)(bits >> 9), VecF) * 0x1p-23f + 0x1p-24f;
}
FASTVAE_VEC_INLINE void store_pairs(float* p, VecF a, VecF b) {  // p[0 .. 32) = a0 b0 a1 b1 ... a15 b15
  const VecF lo = __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const VecF hi = __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  std::memcpy(p, &lo, sizeof lo);
  std::memcpy(p + kLanes, &hi, sizeof hi);
}

// philox_uniforms_vector of the 16 groups first_group .. first_group + 15.
FASTVAE_VEC_INLINE void uniforms(uint64_t seed, uint64_t first_group, float* u_radius, float* u_angle) {
  const VecU group_lo = VecU{} + static_cast<uint32_t>(first_group);
  const VecU c0 = group_lo + VecU{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const VecU c1 = (VecU{} + static_cast<uint32_t>(first_group >> 32)) - (VecU)(c0 < group_lo);  // carries
  auto split = [](VecU c) { return Word{(VecU64)c, (VecU64)c >> 32}; };
  Word w[4] = {split(c0), split(c1), Word{}, Word{}};
  philox_rounds(w[0], w[1], w[2], w[3], seed, [](Word a, uint32_t factor, Word* lo) {
    lo->even = multiply_low_words(a.even, factor);
    lo->odd = multiply_low_words(a.odd, factor);
    return Word{lo->even >> 32, lo->odd >> 32};
  });
  VecU draws[4];
  for (int k = 0; k < 4; ++k) draws[k] = (VecU)((w[k].even & 0xffffffffu) | (w[k].odd << 32));
  store_pairs(u_radius, uniform(draws[0]), uniform(draws[2]));
  store_pairs(u_angle, uniform(draws[1]), uniform(draws[3]));
}
}  // namespace philox16
#endif

// philox_uniforms_vector of group first_group + j alone, by philox.h's scalar Philox.
FASTVAE_VEC_INLINE void philox_uniforms_scalar(uint64_t seed, uint64_t first_group, int64_t j, float* u_radius,
                                               float* u_angle) {
  const uint64_t group = first_group + static_cast<uint64_t>(j);
  const Draw4 d = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u, seed);
  u_radius[2 * j] = uint_to_uniform(d.v[0]);
  u_angle[2 * j] = uint_to_uniform(d.v[1]);
  u_radius[2 * j + 1] = uint_to_uniform(d.v[2]);
  u_angle[2 * j + 1] = uint_to_uniform(d.v[3]);
}

// Groups that the SSE2 baseline's scalar integer units take alongside each two vector
// sets: they are idle while the vector units run the sets (on Zen 5, 2 groups per 8
// took the baseline's Philox from 1.02 to 0.83 ms per million elements; 3 or 4, or any
// at AVX2, were slower).
#if defined(__AVX2__)
constexpr int64_t kScalarGroups = 0;
#else
constexpr int64_t kScalarGroups = 2;
#endif

// philox_uniforms_vector of `groups` consecutive groups from first_group.
inline void philox_uniforms(uint64_t seed, uint64_t first_group, int64_t groups, float* u_radius, float* u_angle) {
  using namespace simd;
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + philox16::kLanes <= groups; j += philox16::kLanes) {
    philox16::uniforms(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j, u_angle + 2 * j);
  }
#endif
  // Two sets at a time (see simd::PhiloxWord), then one.
  for (; j + 2 * kLanes + kScalarGroups <= groups; j += 2 * kLanes + kScalarGroups) {
    philox_uniforms_consecutive<2>(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j, u_angle + 2 * j);
    for (int64_t g = j + 2 * kLanes; g < j + 2 * kLanes + kScalarGroups; ++g) {
      philox_uniforms_scalar(seed, first_group, g, u_radius, u_angle);
    }
  }
  for (; j + kLanes <= groups; j += kLanes) {
    philox_uniforms_consecutive<1>(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j, u_angle + 2 * j);
  }
  for (; j < groups; ++j) philox_uniforms_scalar(seed, first_group, j, u_radius, u_angle);
}

// Box-Muller: pairs p = (u_radius[p], u_angle[p]) give eps[2p] (cos) and eps[2p + 1] (sin).
inline void box_muller(const float* u_radius, const float* u_angle, int64_t pairs, float* eps) {
  for (int64_t p = 0; p < pairs; ++p) {
    const float radius = std::sqrt(-2.0f * vecmath::log(u_radius[p]));
    float c, s;
    vecmath::cos_sin_turns(u_angle[p], &c, &s);
    eps[2 * p] = radius * c;
    eps[2 * p + 1] = radius * s;
  }
}

// The Gaussian noise of elements [begin, begin + len), begin a multiple of 4, as
// fastvae/reference.py defines it.
inline void normal_block(uint64_t seed, int64_t begin, int64_t len, float* eps) {
  const int64_t groups = (len + 3) / 4;
  alignas(64) float u_radius[kMaxNormalBlock / 2], u_angle[kMaxNormalBlock / 2];
  philox_uniforms(seed, static_cast<uint64_t>(begin) / 4, groups, u_radius, u_angle);
  box_muller(u_radius, u_angle, 2 * groups, eps);
}

// The noise of scattered groups: eps[4 i .. 4 i + 3] are the values of group
// groups[i] (elements 4 groups[i] .. 4 groups[i] + 3), the same bits as normal_block.
// kLanes groups at a time: eps must have room for `count` rounded up to a multiple of
// kLanes groups (the padding repeats the last group); count <= kMaxNormalBlock / 4.
inline void normal_groups(uint64_t seed, const uint64_t* groups, int64_t count, float* eps) {
  alignas(64) float u_radius[kMaxNormalBlock / 2], u_angle[kMaxNormalBlock / 2];
  const int64_t padded = (count + simd::kLanes - 1) / simd::kLanes * simd::kLanes;
  for (int64_t j = 0; j < padded; j += simd::kLanes) {
    simd::VecU c0[1], c1[1];
    for (int lane = 0; lane < simd::kLanes; ++lane) {
      const uint64_t group = groups[std::min(j + lane, count - 1)];  // padding repeats the last
      c0[0][lane] = static_cast<uint32_t>(group);
      c1[0][lane] = static_cast<uint32_t>(group >> 32);
    }
    philox_uniforms_vector<1>(seed, c0, c1, u_radius + 2 * j, u_angle + 2 * j);
  }
  box_muller(u_radius, u_angle, 2 * padded, eps);
}

}  // namespace fastvae
