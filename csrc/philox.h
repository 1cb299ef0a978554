// Counter-based random streams shared by every fastvae kernel (C++ and CUDA).
// The definitions, bit for bit, are those of fastvae/reference.py and kernels/_rng.py:
// Philox-4x32-10 keyed by the 64-bit seed; a draw r becomes u = ((r >> 9) + 0.5) * 2^-23,
// in [2^-24, 1 - 2^-24] and exact in float32, so log(u) and log(-log(u)) stay finite.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTVAE_HD __host__ __device__ __forceinline__
#define FASTVAE_UNROLL _Pragma("unroll")
#else
#define FASTVAE_UNROLL _Pragma("GCC unroll 16")
#define FASTVAE_HD inline
#endif

namespace fastvae {

struct Draw4 {
  uint32_t v[4];
};

// The ten rounds of Philox-4x32 on a 32-bit word type W: uint32_t here, one-register
// vectors in csrc/cpu/simd.h. mulhilo(x, multiplier, &lo) returns the high half.
template <typename W, typename MulHiLo>
FASTVAE_HD void philox_rounds(W& c0, W& c1, W& c2, W& c3, uint64_t seed, MulHiLo mulhilo) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
FASTVAE_UNROLL
  for (int round = 0; round < 10; ++round) {
    W lo_a, lo_b;
    const W hi_a = mulhilo(c0, 0xD2511F53u, &lo_a);
    const W hi_b = mulhilo(c2, 0xCD9E8D57u, &lo_b);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

struct ScalarMulHiLo {
  FASTVAE_HD uint32_t operator()(uint32_t a, uint32_t b, uint32_t* lo) const {
    const uint64_t product = static_cast<uint64_t>(a) * b;
    *lo = static_cast<uint32_t>(product);
    return static_cast<uint32_t>(product >> 32);
  }
};

FASTVAE_HD Draw4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  philox_rounds(c0, c1, c2, c3, seed, ScalarMulHiLo{});
  return Draw4{{c0, c1, c2, c3}};
}

FASTVAE_HD float uint_to_uniform(uint32_t r) {
  return static_cast<float>(r >> 9) * 0x1p-23f + 0x1p-24f;
}

// Four N(0, 1) values for group g of the Gaussian stream (elements 4g .. 4g+3).
FASTVAE_HD void normal4(uint64_t seed, uint64_t group, float out[4]) {
  const Draw4 d = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u, seed);
  const float two_pi = 6.283185307179586f;
  const float r01 = sqrtf(-2.0f * logf(uint_to_uniform(d.v[0])));
  const float r23 = sqrtf(-2.0f * logf(uint_to_uniform(d.v[2])));
  const float t01 = two_pi * uint_to_uniform(d.v[1]);
  const float t23 = two_pi * uint_to_uniform(d.v[3]);
  out[0] = r01 * cosf(t01);
  out[1] = r01 * sinf(t01);
  out[2] = r23 * cosf(t23);
  out[3] = r23 * sinf(t23);
}

// Four Gumbel(0, 1) values for columns 4q .. 4q+3 of row `row` of the Gumbel stream.
FASTVAE_HD void gumbel4(uint64_t seed, uint64_t row, uint32_t quad, float out[4]) {
  const Draw4 d = philox4x32_10(quad, static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), 0u, seed);
FASTVAE_UNROLL
  for (int lane = 0; lane < 4; ++lane) out[lane] = -logf(-logf(uint_to_uniform(d.v[lane])));
}

}  // namespace fastvae
