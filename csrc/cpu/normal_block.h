// The Gaussian noise stream of philox.h for a block of consecutive elements, CPU side:
// Philox-4x32-10 eight groups at a time (AVX2; one group at a time without it), then
// Box-Muller with the vectorisable math of vecmath.h. Bit for bit the uniforms of
// philox.h / fastvae/reference.py; the normals agree with them within float rounding.
#pragma once
#include <cmath>
#include <cstdint>

#include "../philox.h"
#include "vecmath.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastvae {

constexpr int64_t kMaxNormalBlock = 512;  // elements normal_block makes per call, at most

constexpr float uniform_of(uint32_t r) { return static_cast<float>(r >> 9) * 0x1p-23f + 0x1p-24f; }

#if defined(__AVX2__)
// 32-bit hi/lo products of 8 lanes by a constant: two even/odd 32x32->64 multiplies.
inline void mulhilo8(__m256i x, __m256i multiplier, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), multiplier);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __m256 uniform8(__m256i r) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 9)), _mm256_set1_ps(0x1p-23f),
                         _mm256_set1_ps(0x1p-24f));
}

// out[0..15] = a0 b0 a1 b1 ... a7 b7
inline void store_interleaved(float* out, __m256 a, __m256 b) {
  const __m256 low = _mm256_unpacklo_ps(a, b), high = _mm256_unpackhi_ps(a, b);  // per 128-bit half
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(low, high, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(low, high, 0x31));
}
#endif

// Philox-4x32-10 of `groups` consecutive groups from first_group, as Box-Muller inputs:
// pair 2j takes lanes (0, 1) of group j, pair 2j + 1 lanes (2, 3).
inline void philox_uniforms(uint64_t seed, uint64_t first_group, int64_t groups, float* u_radius, float* u_angle) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (; j + 8 <= groups; j += 8) {
    const uint64_t group = first_group + static_cast<uint64_t>(j);
    const __m256i group_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group)));
    __m256i c0 = _mm256_add_epi32(group_lo, iota);
    // Lanes whose low word wrapped (c0 < group_lo, unsigned) carry 1 into the high word.
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(group_lo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group >> 32))), wrapped);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mulhilo8(c0, mul_a, &hi_a, &lo_a);
      mulhilo8(c2, mul_b, &hi_b, &lo_b);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo_b;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    store_interleaved(u_radius + 2 * j, uniform8(c0), uniform8(c2));
    store_interleaved(u_angle + 2 * j, uniform8(c1), uniform8(c3));
  }
#endif
  for (; j < groups; ++j) {
    const Draw4 d = philox4x32_10(static_cast<uint32_t>(first_group + j), static_cast<uint32_t>((first_group + j) >> 32),
                                  0u, 0u, seed);
    u_radius[2 * j] = uniform_of(d.v[0]);
    u_angle[2 * j] = uniform_of(d.v[1]);
    u_radius[2 * j + 1] = uniform_of(d.v[2]);
    u_angle[2 * j + 1] = uniform_of(d.v[3]);
  }
}

// The Gaussian noise of elements [begin, begin + len), begin a multiple of 4: Box-Muller
// pairs p = (u_radius[p], u_angle[p]) give elements 2p (cos) and 2p + 1 (sin), as
// fastvae/reference.py defines.
inline void normal_block(uint64_t seed, int64_t begin, int64_t len, float* eps) {
  const int64_t groups = (len + 3) / 4;
  alignas(64) float u_radius[kMaxNormalBlock / 2], u_angle[kMaxNormalBlock / 2];
  philox_uniforms(seed, static_cast<uint64_t>(begin) / 4, groups, u_radius, u_angle);
  for (int64_t p = 0; p < 2 * groups; ++p) {
    const float radius = std::sqrt(-2.0f * vecmath::log(u_radius[p]));
    float c, s;
    vecmath::cos_sin_turns(u_angle[p], &c, &s);
    eps[2 * p] = radius * c;
    eps[2 * p + 1] = radius * s;
  }
}

}  // namespace fastvae
