// The VQ search's SIMD register (csrc/cpu/vq_search.cpp): one register of float lanes at the
// level's ISA, 16 with AVX-512, 8 with AVX2, 4 at the x86-64 baseline (SSE2) and
// elsewhere, and the few lane operations the search needs, each one or a few
// instructions of that ISA (GCC lowers a vector wider than the ISA's registers through
// the stack, and its generic comparisons and reductions lane by lane).
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastvae {
namespace vq_lanes {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// GCC/Clang vector types; aligned(4) makes plain dereference an unaligned load.
typedef float VecF __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));

inline VecF splat(float v) {  // one broadcast (VecF{} + v adds 0 first, since -0 + 0 is +0)
#if defined(__AVX512F__)
  return reinterpret_cast<VecF>(_mm512_set1_ps(v));
#elif defined(__AVX2__)
  return reinterpret_cast<VecF>(_mm256_set1_ps(v));
#elif defined(__SSE2__)
  return reinterpret_cast<VecF>(_mm_set1_ps(v));
#else
  return VecF{} + v;
#endif
}
inline VecF load(const float* p) { return *reinterpret_cast<const VecF*>(p); }

inline uint32_t lane_bits(VecI mask) {  // bit l set where lane l is set
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(mask), reinterpret_cast<__m512i>(mask));
#elif defined(__AVX2__)
  return static_cast<uint32_t>(_mm256_movemask_ps(reinterpret_cast<__m256>(mask)));
#elif defined(__SSE2__)
  return static_cast<uint32_t>(_mm_movemask_ps(reinterpret_cast<__m128>(mask)));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= (mask[l] ? 1u : 0u) << l;
  return bits;
#endif
}

inline bool any_lane(VecI mask) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  return !_mm256_testz_si256(reinterpret_cast<__m256i>(mask), reinterpret_cast<__m256i>(mask));
#else
  return lane_bits(mask) != 0;
#endif
}

inline VecF vmin(VecF a, VecF b) { return a < b ? a : b; }

inline float horizontal_min(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_min_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX2__)
  __m256 m = reinterpret_cast<__m256>(v);
  m = _mm256_min_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_min_ps(m, _mm256_permute_ps(m, 0x4e));
  m = _mm256_min_ps(m, _mm256_permute_ps(m, 0xb1));
  return _mm256_cvtss_f32(m);
#elif defined(__SSE2__)
  __m128 m = reinterpret_cast<__m128>(v);
  m = _mm_min_ps(m, _mm_shuffle_ps(m, m, 0x4e));
  m = _mm_min_ps(m, _mm_shuffle_ps(m, m, 0xb1));
  return _mm_cvtss_f32(m);
#else
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::min(m, v[l]);
  return m;
#endif
}

}  // namespace vq_lanes
}  // namespace fastvae
