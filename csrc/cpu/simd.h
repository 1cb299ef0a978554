// One-register float/uint32 vectors (GCC/Clang vector extensions) and the vectorised
// pieces of the random streams: Philox-4x32-10 on kLanes counters at once and the uniform
// mapping of philox.h; exp and log are vecmath.h's, instantiated for these vectors.
//
// kLanes 32-bit lanes fill one register of the level's ISA: eight with AVX2 (and at the
// AVX-512 level too), four at the x86-64 baseline (SSE2) and elsewhere. A vector wider
// than the ISA's registers is lowered element by element for comparisons and selects
// (through the stack), which made the baseline level 5-10x slower than AVX2.
// kWideLanes (16 at the AVX-512 level, else kLanes) is the width of the Wide vectors that
// the Gumbel noise loops use; the helpers below are templates over the vector type.
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

#include "../philox.h"
#include "vecmath.h"
#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors are only passed between inlined helpers

#define FASTVAE_VEC_INLINE static inline __attribute__((always_inline))

namespace fastvae {
namespace simd {

#if defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VecU __attribute__((vector_size(4 * kLanes)));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes)));
#if defined(__AVX512F__)
constexpr int kWideLanes = 16;
#else
constexpr int kWideLanes = kLanes;
#endif

FASTVAE_VEC_INLINE VecF splat(float v) { return VecF{} + v; }
FASTVAE_VEC_INLINE VecU splat_u(uint32_t v) { return VecU{} + v; }

// The vectors of kBytes: 32-bit float, int and uint lanes, 64-bit uint lanes.
template <int kBytes>
struct VectorsOf {
  typedef float F __attribute__((vector_size(kBytes)));
  typedef int32_t I __attribute__((vector_size(kBytes)));
  typedef uint32_t U __attribute__((vector_size(kBytes)));
  typedef uint64_t U64 __attribute__((vector_size(kBytes)));
  static constexpr int kLanes32 = kBytes / 4;
};
// Those of vector type V's size.
template <typename V>
using SameSize = VectorsOf<sizeof(V)>;
// kWideLanes lanes.
using Wide = VectorsOf<4 * kWideLanes>;

template <typename I, size_t... kLane>
FASTVAE_VEC_INLINE I lane_index(std::index_sequence<kLane...>) {
  return I{static_cast<int32_t>(kLane)...};
}
// 0, 1, 2, ... in the lanes of I (32-bit lanes).
template <typename I = VecI>
FASTVAE_VEC_INLINE I lane_index() {
  return lane_index<I>(std::make_index_sequence<SameSize<I>::kLanes32>{});
}

template <typename F = VecF>
FASTVAE_VEC_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename F>
FASTVAE_VEC_INLINE void store(float* p, F v) {
  std::memcpy(p, &v, sizeof v);
}
// The first `count` (at most kLanes) lanes only: a block's ragged end. Loaded lanes past
// count are zero.
FASTVAE_VEC_INLINE VecF load_first(const float* p, int64_t count) {
  if (count == kLanes) return load(p);
  VecF v{};
  std::memcpy(&v, p, sizeof(float) * count);
  return v;
}
FASTVAE_VEC_INLINE void store_first(float* p, VecF v, int64_t count) {
  if (count == kLanes) return store(p, v);
  std::memcpy(p, &v, sizeof(float) * count);
}
template <typename F, size_t... kLane>
FASTVAE_VEC_INLINE void store(float* p, F a, F b, std::index_sequence<kLane...>) {
  constexpr size_t n = sizeof(F) / 4;
  const F low = __builtin_shufflevector(a, b, (kLane % 2 ? n + kLane / 2 : kLane / 2)...);
  const F high = __builtin_shufflevector(a, b, (kLane % 2 ? n + n / 2 + kLane / 2 : n / 2 + kLane / 2)...);
  std::memcpy(p, &low, sizeof low);
  std::memcpy(p + n, &high, sizeof high);
}
// p[0 .. 2 n) = a0 b0 a1 b1 ... a(n-1) b(n-1), n the lanes of F (float lanes).
template <typename F>
FASTVAE_VEC_INLINE void store(float* p, F a, F b) {
  store(p, a, b, std::make_index_sequence<SameSize<F>::kLanes32>{});
}

// mask ? a : b, per lane (mask lanes all ones or all zeros, as comparisons give); V a
// float or int vector, I the int vector of its size.
template <typename I, typename V>
FASTVAE_VEC_INLINE V select(I mask, V a, V b) {
  return (V)(((I)a & mask) | ((I)b & ~mask));
}
template <typename F>
FASTVAE_VEC_INLINE F max(F a, F b) {
  return select(a > b, a, b);
}

// Bit l set where lane l of mask is true.
#if defined(__AVX512F__)
FASTVAE_VEC_INLINE uint32_t lane_bits(Wide::I mask) {
  __m512i m;
  std::memcpy(&m, &mask, sizeof m);
  return static_cast<uint32_t>(_mm512_cmplt_epi32_mask(m, _mm512_setzero_si512()));
}
#endif
FASTVAE_VEC_INLINE uint32_t lane_bits(VecI mask) {
#if defined(__AVX2__)
  __m256 m;
  std::memcpy(&m, &mask, sizeof m);
  return static_cast<uint32_t>(_mm256_movemask_ps(m));
#elif defined(__SSE2__)
  __m128 m;
  std::memcpy(&m, &mask, sizeof m);
  return static_cast<uint32_t>(_mm_movemask_ps(m));
#else
  uint32_t bits = 0;
  for (int lane = 0; lane < kLanes; ++lane) bits |= static_cast<uint32_t>(mask[lane] != 0) << lane;
  return bits;
#endif
}

}  // namespace simd

// vecmath.h's exp and log on the lanes of a vector F at once.
template <typename F>
struct VectorLanes {
  using Int = typename simd::SameSize<F>::I;
  using UInt = typename simd::SameSize<F>::U;
  static FASTVAE_VECMATH F splat(float v) { return F{} + v; }
  static FASTVAE_VECMATH UInt bits(F f) { return (UInt)f; }
  static FASTVAE_VECMATH F from_bits(UInt u) { return (F)u; }
  static FASTVAE_VECMATH F to_float(Int i) { return __builtin_convertvector(i, F); }
  static FASTVAE_VECMATH F select(Int mask, F a, F b) { return simd::select(mask, a, b); }
};
template <>
struct vecmath::Lanes<simd::VecF> : VectorLanes<simd::VecF> {};
#if defined(__AVX512F__)
template <>
struct vecmath::Lanes<simd::Wide::F> : VectorLanes<simd::Wide::F> {};
#endif

namespace simd {

template <typename F>
FASTVAE_VEC_INLINE float horizontal_max(F v) {
  float m = v[0];
  for (int lane = 1; lane < SameSize<F>::kLanes32; ++lane) m = v[lane] > m ? v[lane] : m;
  return m;
}
template <typename F>
FASTVAE_VEC_INLINE float horizontal_sum(F v) {
  float s = 0.0f;
  for (int lane = 0; lane < SameSize<F>::kLanes32; ++lane) s += v[lane];
  return s;
}

// Philox's rounds see a vector U of 32-bit counters as two registers of 64-bit lanes, the
// even lanes and the odd lanes, each in the low half of a 64-bit lane (the high half is
// don't-care): x86 multiplies the low words of 64-bit lanes into full products, so in this
// layout a round needs no shuffles, and the two registers make independent chains that
// overlap. A PhiloxWord holds kSets such Us: each set's round waits on a multiply, a
// shuffle and an xor, so one set alone leaves an SSE2 core idle most of the time (its next
// set is too far ahead for the out-of-order window), and sets side by side fill it.
template <typename U, int kSets>
struct PhiloxWord {
  typename SameSize<U>::U64 even[kSets], odd[kSets];
};
template <typename U, int kSets>
FASTVAE_VEC_INLINE PhiloxWord<U, kSets> operator^(PhiloxWord<U, kSets> a, PhiloxWord<U, kSets> b) {
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) a.even[s] ^= b.even[s], a.odd[s] ^= b.odd[s];
  return a;
}
template <typename U, int kSets>
FASTVAE_VEC_INLINE PhiloxWord<U, kSets> operator^(PhiloxWord<U, kSets> a, uint32_t key) {
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) a.even[s] ^= static_cast<uint64_t>(key), a.odd[s] ^= static_cast<uint64_t>(key);
  return a;
}

// The 64-bit products of the low words of a's lanes and factor: one instruction on x86's
// registers (the overloads below), elsewhere the compiler's.
template <typename U64>
FASTVAE_VEC_INLINE U64 multiply_low_words(U64 a, uint32_t factor) {
  return (a & 0xffffffffu) * static_cast<uint64_t>(factor);
}
// `a` through an intrinsic's register type R.
template <typename R, typename V, typename Op>
FASTVAE_VEC_INLINE V through(V a, const Op& op) {
  R r;
  std::memcpy(&r, &a, sizeof r);
  r = op(r);
  std::memcpy(&a, &r, sizeof a);
  return a;
}
#if defined(__SSE2__)
FASTVAE_VEC_INLINE VectorsOf<16>::U64 multiply_low_words(VectorsOf<16>::U64 a, uint32_t factor) {
  return through<__m128i>(a, [factor](__m128i x) { return _mm_mul_epu32(x, _mm_set1_epi64x(factor)); });
}
#endif
#if defined(__AVX2__)
FASTVAE_VEC_INLINE VectorsOf<32>::U64 multiply_low_words(VectorsOf<32>::U64 a, uint32_t factor) {
  return through<__m256i>(a, [factor](__m256i x) { return _mm256_mul_epu32(x, _mm256_set1_epi64x(factor)); });
}
#endif
#if defined(__AVX512F__)
FASTVAE_VEC_INLINE VectorsOf<64>::U64 multiply_low_words(VectorsOf<64>::U64 a, uint32_t factor) {
  return through<__m512i>(a, [factor](__m512i x) { return _mm512_mul_epu32(x, _mm512_set1_epi64(factor)); });
}
#endif

// The high word of each 64-bit lane moved to the low half (the low word, now in the high
// half, is don't-care): one shuffle, where a shift needs a copy first in SSE2's
// two-operand form.
template <typename U64, size_t... kLane>
FASTVAE_VEC_INLINE U64 high_words_down(U64 a, std::index_sequence<kLane...>) {
  const auto words = (typename SameSize<U64>::U)a;
  return (U64)__builtin_shufflevector(words, words, (kLane ^ 1)...);
}

// philox_rounds' mulhilo: the product's low word stays in place, its high word moves down.
template <typename U, int kSets>
FASTVAE_VEC_INLINE PhiloxWord<U, kSets> mulhilo(PhiloxWord<U, kSets> a, uint32_t factor, PhiloxWord<U, kSets>* lo) {
  constexpr auto lanes = std::make_index_sequence<SameSize<U>::kLanes32>{};
  PhiloxWord<U, kSets> hi;
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) {
    lo->even[s] = multiply_low_words(a.even[s], factor);
    lo->odd[s] = multiply_low_words(a.odd[s], factor);
    hi.even[s] = high_words_down(lo->even[s], lanes);
    hi.odd[s] = high_words_down(lo->odd[s], lanes);
  }
  return hi;
}

// philox4x32_10 of philox.h on the counters (c0, c1, c2, 0) of kSets vectors U at once;
// out[s][k] is lane k of set s.
template <typename U, int kSets>
FASTVAE_VEC_INLINE void philox(uint64_t seed, const U (&c0)[kSets], const U (&c1)[kSets], const U (&c2)[kSets],
                               U (&out)[kSets][4]) {
  using U64 = typename SameSize<U>::U64;
  PhiloxWord<U, kSets> w[4] = {};
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s) {
    const U c[3] = {c0[s], c1[s], c2[s]};
    for (int k = 0; k < 3; ++k) w[k].even[s] = (U64)c[k], w[k].odd[s] = (U64)c[k] >> 32;
  }
  philox_rounds(w[0], w[1], w[2], w[3], seed,
                [](PhiloxWord<U, kSets> a, uint32_t b, PhiloxWord<U, kSets>* lo) { return mulhilo(a, b, lo); });
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s)
    for (int k = 0; k < 4; ++k) out[s][k] = (U)((w[k].even[s] & 0xffffffffu) | (w[k].odd[s] << 32));
}
FASTVAE_VEC_INLINE void philox(uint64_t seed, VecU c0, VecU c1, VecU c2, VecU out[4]) {
  VecU sets_out[1][4];
  philox<VecU, 1>(seed, {c0}, {c1}, {c2}, sets_out);
  for (int k = 0; k < 4; ++k) out[k] = sets_out[0][k];
}

// uint_to_uniform of philox.h on a vector of draws, bit for bit: the 23 bits as the
// mantissa of a float in [1, 2) less 1 - 2^-24, exact as the result is a float32 (three
// instructions where the int-to-float conversion takes four).
template <typename U>
FASTVAE_VEC_INLINE typename SameSize<U>::F uniform(U bits) {
  return (typename SameSize<U>::F)((bits >> 9) | 0x3f800000u) - (1.0f - 0x1p-24f);
}

// Gumbel(0, 1) noise -log(-log(u)) from raw draws.
template <typename U>
FASTVAE_VEC_INLINE typename SameSize<U>::F gumbel_from_bits(U bits) {
  return -vecmath::log(-vecmath::log(uniform(bits)));
}

// interleave4's shuffle indices for lane l of a result of n lanes (`half`, 0 or n / 2,
// picks the sources' low or high half): pair_lane interleaves two vectors a, b lane by
// lane (a[half] b[half] a[half + 1] b[half + 1] ...), quad_lane alternates two lanes of
// such an ab pair with two of a cd pair, which puts lanes 0..3 of each quad side by side.
template <int n>
constexpr int pair_lane(int l, int half) {
  return (l % 2 ? n : 0) + l / 2 + half;
}
template <int n>
constexpr int quad_lane(int l, int half) {
  return (l / 2 % 2 ? n : 0) + 2 * (l / 4) + l % 2 + half;
}
template <typename F, size_t... kLane>
FASTVAE_VEC_INLINE void interleave4(const F lanes[4], F out[4], std::index_sequence<kLane...>) {
  constexpr int n = sizeof...(kLane);
  const F ab_lo = __builtin_shufflevector(lanes[0], lanes[1], pair_lane<n>(kLane, 0)...);
  const F cd_lo = __builtin_shufflevector(lanes[2], lanes[3], pair_lane<n>(kLane, 0)...);
  const F ab_hi = __builtin_shufflevector(lanes[0], lanes[1], pair_lane<n>(kLane, n / 2)...);
  const F cd_hi = __builtin_shufflevector(lanes[2], lanes[3], pair_lane<n>(kLane, n / 2)...);
  out[0] = __builtin_shufflevector(ab_lo, cd_lo, quad_lane<n>(kLane, 0)...);
  out[1] = __builtin_shufflevector(ab_lo, cd_lo, quad_lane<n>(kLane, n / 2)...);
  out[2] = __builtin_shufflevector(ab_hi, cd_hi, quad_lane<n>(kLane, 0)...);
  out[3] = __builtin_shufflevector(ab_hi, cd_hi, quad_lane<n>(kLane, n / 2)...);
}
// Four vectors holding lanes 0..3 of n Philox quads (n the lanes of F) -> the 4 n values
// in column order (quad q, lane k at position 4q + k).
template <typename F>
FASTVAE_VEC_INLINE void interleave4(const F lanes[4], F out[4]) {
  interleave4(lanes, out, std::make_index_sequence<SameSize<F>::kLanes32>{});
}

// Gumbel noise of columns 4 n * chunk .. 4 n * (chunk + 1) - 1 of `row` (the Gumbel ops'
// stream, reference.py), in column order, n the lanes of F: column c is lane c % 4 of
// Philox quad c / 4 whatever n.
template <typename F = VecF>
FASTVAE_VEC_INLINE void gumbel_noise_of_chunk(uint64_t seed, uint64_t row, int64_t chunk, F out[4]) {
  using U = typename SameSize<F>::U;
  constexpr int n = SameSize<F>::kLanes32;
  U bits[1][4];
  philox<U, 1>(seed, {(U)lane_index<typename SameSize<F>::I>() + static_cast<uint32_t>(n * chunk)},
               {U{} + static_cast<uint32_t>(row)}, {U{} + static_cast<uint32_t>(row >> 32)}, bits);
  F lanes[4];
  for (int k = 0; k < 4; ++k) lanes[k] = gumbel_from_bits(bits[0][k]);
  interleave4(lanes, out);
}

}  // namespace simd
}  // namespace fastvae
