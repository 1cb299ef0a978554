// The Gaussian noise stream of philox.h for a block of consecutive elements, CPU side:
// Philox-4x32-10 on vectors of groups (simd.h's philox: 16 groups in a 512-bit register at
// the AVX-512 level, two simd::VecUs side by side below), then Box-Muller with the vectorisable
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

// Philox-4x32-10 of the groups whose counters (c0[g], c1[g], 0, 0) fill kSets vectors U
// (group g = s n + lane: lane `lane` of set s, n U's lanes), as Box-Muller inputs: pair 2g
// takes lanes (0, 1) of group g, pair 2g + 1 lanes (2, 3).
template <typename U, int kSets>
FASTVAE_VEC_INLINE void philox_uniforms_vector(uint64_t seed, const U (&c0)[kSets], const U (&c1)[kSets],
                                               float* u_radius, float* u_angle) {
  using namespace simd;
  constexpr int n = SameSize<U>::kLanes32;
  U draws[kSets][4], zeros[kSets] = {};
  philox(seed, c0, c1, zeros, draws);
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) {
    // Group g's lanes 0, 2 are radius draws 2g, 2g + 1; lanes 1, 3 the matching angles.
    store(u_radius + 2 * n * s, uniform(draws[s][0]), uniform(draws[s][2]));
    store(u_angle + 2 * n * s, uniform(draws[s][1]), uniform(draws[s][3]));
  }
}

// philox_uniforms_vector of the kSets vectors U of consecutive groups from first_group.
template <typename U, int kSets>
FASTVAE_VEC_INLINE void philox_uniforms_consecutive(uint64_t seed, uint64_t first_group, float* u_radius,
                                                    float* u_angle) {
  using namespace simd;
  constexpr int n = SameSize<U>::kLanes32;
  U c0[kSets], c1[kSets];
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) {
    const uint64_t group = first_group + static_cast<uint64_t>(n * s);
    const U group_lo = U{} + static_cast<uint32_t>(group);
    c0[s] = group_lo + (U)lane_index<typename SameSize<U>::I>();
    // Lanes whose low word wrapped carry into the high word (a true comparison is -1).
    c1[s] = (U{} + static_cast<uint32_t>(group >> 32)) - (U)(c0[s] < group_lo);
  }
  philox_uniforms_vector(seed, c0, c1, u_radius, u_angle);
}

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
  // 16 groups a register (simd.h's VecU holds 8; Philox was two thirds of
  // reparameterize's time at this level), four registers side by side: one set's ten
  // rounds are a chain of multiplies, each waiting on the last, and the sets fill those
  // waits (reparameterize at (256, 128), one thread: 20.3 us with one set, 17.9 with two,
  // 17.5 with four).
  for (; j + 4 * kWideLanes <= groups; j += 4 * kWideLanes) {
    philox_uniforms_consecutive<Wide::U, 4>(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j,
                                            u_angle + 2 * j);
  }
  for (; j + kWideLanes <= groups; j += kWideLanes) {
    philox_uniforms_consecutive<Wide::U, 1>(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j,
                                            u_angle + 2 * j);
  }
#endif
  // Two sets at a time (see simd::PhiloxWord), then one.
  for (; j + 2 * kLanes + kScalarGroups <= groups; j += 2 * kLanes + kScalarGroups) {
    philox_uniforms_consecutive<VecU, 2>(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j,
                                         u_angle + 2 * j);
    for (int64_t g = j + 2 * kLanes; g < j + 2 * kLanes + kScalarGroups; ++g) {
      philox_uniforms_scalar(seed, first_group, g, u_radius, u_angle);
    }
  }
  for (; j + kLanes <= groups; j += kLanes) {
    philox_uniforms_consecutive<VecU, 1>(seed, first_group + static_cast<uint64_t>(j), u_radius + 2 * j,
                                         u_angle + 2 * j);
  }
  for (; j < groups; ++j) philox_uniforms_scalar(seed, first_group, j, u_radius, u_angle);
}

// Box-Muller: pairs p = (u_radius[p], u_angle[p]) give eps[2p] (cos) and eps[2p + 1] (sin).
// At the AVX-512 level two vectors a step: log's and sin/cos's polynomials are long
// chains, and a second vector's overlap them (about 0.8 us less at (256, 128)). The
// narrower levels keep one: they measured no faster with two.
inline void box_muller(const float* u_radius, const float* u_angle, int64_t pairs, float* eps) {
#if defined(__AVX512F__)
#pragma GCC unroll 2
#endif
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
    philox_uniforms_vector(seed, c0, c1, u_radius + 2 * j, u_angle + 2 * j);
  }
  box_muller(u_radius, u_angle, 2 * padded, eps);
}

}  // namespace fastvae
