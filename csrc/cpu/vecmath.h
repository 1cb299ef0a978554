// Branch-free float32 exp and log for whole vectors of lanes, and sin/cos of whole turns.
// exp and log are templates over the lane type: float, in loops that GCC/Clang
// auto-vectorise (libm calls do not vectorise without -ffast-math), and the explicit
// one-register simd::VecF (simd.h supplies its Lanes traits). One polynomial each serves
// the Gaussian and the Gumbel kernels. Accuracy: about one ulp over the ranges the
// kernels use (checked against float64 by the tests through the samplers and the KLs).
#pragma once
#include <cstdint>
#include <cstring>

// Forced inline: a call left out of line stops the loop around it from vectorising.
#define FASTVAE_VECMATH inline __attribute__((always_inline))

namespace fastvae {
namespace vecmath {

// What exp and log need of a lane type F: integer types of its width, bit casts,
// int-to-float conversion, per-lane select (a mask is what F's comparisons return).
template <typename F>
struct Lanes;

template <>
struct Lanes<float> {
  using Int = int32_t;
  using UInt = uint32_t;
  static FASTVAE_VECMATH float splat(float v) { return v; }
  static FASTVAE_VECMATH UInt bits(float f) {
    UInt u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static FASTVAE_VECMATH float from_bits(UInt u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static FASTVAE_VECMATH float to_float(Int i) { return static_cast<float>(i); }
  static FASTVAE_VECMATH float select(bool mask, float a, float b) { return mask ? a : b; }
};

// Estrin's scheme for c[kBegin] + ... + c[kBegin + kCount - 1] x^(kCount - 1): the low
// half of the terms plus x^(a power of two) times the high half.
template <int kBegin, int kCount, int N, typename F>
FASTVAE_VECMATH F estrin(F x, const float (&c)[N]) {
  if constexpr (kCount == 1) {
    return Lanes<F>::splat(c[kBegin]);
  } else if constexpr (kCount == 2) {
    return x * c[kBegin + 1] + c[kBegin];
  } else {
    static_assert(kCount <= 16);
    constexpr int kLow = kCount > 4 ? (kCount > 8 ? 8 : 4) : 2;  // the largest power of two below kCount
    const F x2 = x * x, x4 = x2 * x2;
    const F x_to_low = kLow == 2 ? x2 : kLow == 4 ? x4 : x4 * x4;
    return estrin<kBegin, kLow>(x, c) + x_to_low * estrin<kBegin + kLow, kCount - kLow>(x, c);
  }
}

// c[0] + c[1] x + ... + c[N - 1] x^(N - 1). With FMA, by Horner's rule: one FMA per
// coefficient. Without (the x86-64 baseline), by Estrin's scheme: the same terms summed
// in a tree of depth log2(N), whose independent products the core overlaps, where
// Horner's chain of dependent multiplies and adds left it waiting on their latency.
template <int N, typename F>
FASTVAE_VECMATH F polynomial(F x, const float (&c)[N]) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  F p = Lanes<F>::splat(c[N - 1]);
#pragma GCC unroll 16
  for (int i = N - 2; i >= 0; --i) p = p * x + c[i];
  return p;
#else
  return estrin<0, N>(x, c);
#endif
}

// exp(r) for x = k ln2 + r, |r| <= ln2 / 2, by 1 + r + r^2/2 + a minimax fit of the rest
// to r^6: a term fewer than Taylor's to r^7, and with float32 coefficients 1.4e-8
// relative error (Taylor's 0.7e-8; exp measured 1.8 ulp at most without FMA, 1.0 with);
// x must be finite or NaN (NaN propagates) and k fit an exponent field. Returns exp(r),
// sets k.
template <typename F>
FASTVAE_VECMATH F exp_of_remainder(F x, typename Lanes<F>::Int* k) {
  using L = Lanes<F>;
  const F shifter = L::splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const F shifted = x * 1.44269504088896341f + shifter;
  const F n = shifted - shifter;
  F r = n * -0.693359375f + x;  // ln2 in two parts: n * ln2 stays exact
  r = n * 2.12194440e-4f + r;
  *k = (typename L::Int)(L::bits(shifted) - L::bits(shifter));
  return polynomial(r, {1.0f, 1.0f, 0.5f, 0.16666521f, 4.1668389e-2f, 8.3687240e-3f, 1.3814584e-3f});
}

// 2^k for k in [-126, 127], built in the exponent field.
template <typename F>
FASTVAE_VECMATH F pow2(typename Lanes<F>::Int k) {
  return Lanes<F>::from_bits((typename Lanes<F>::UInt)((k + 127) << 23));
}

// exp(x) for any x: overflows to inf, underflows through subnormals to 0, NaN propagates.
// 2^k is applied as two factors so that subnormal results (k < -126) come out right.
template <typename F>
FASTVAE_VECMATH F exp(F x) {
  using L = Lanes<F>;
  x = L::select(x < L::splat(-104.0f), L::splat(-104.0f), x);  // selects, so that NaN passes through
  x = L::select(x > L::splat(89.0f), L::splat(89.0f), x);
  typename L::Int k;
  const F e = exp_of_remainder(x, &k);
  const auto half = k >> 1;
  return e * pow2<F>(half) * pow2<F>(k - half);
}

// exp(x) for |x| <= 87, where the result is a normal float: no clamps, 2^k in one factor
// (for blocks checked to lie in that range).
template <typename F>
FASTVAE_VECMATH F exp_normal_range(F x) {
  typename Lanes<F>::Int k;
  const F e = exp_of_remainder(x, &k);
  return e * pow2<F>(k);
}

// exp(x) for softmax arguments x <= 0 (after the max is subtracted): -inf, NaN (from
// -inf - -inf in a fully masked row) and x < -87.33 give 0, never a subnormal.
template <typename F>
FASTVAE_VECMATH F exp_nonpositive(F x) {
  using L = Lanes<F>;
  const F lowest = L::splat(-87.33f);
  const auto in_range = x > lowest;
  typename L::Int k;
  const F e = exp_of_remainder(L::select(in_range, x, lowest), &k);
  return L::select(in_range, e * pow2<F>(k), L::splat(0.0f));
}

// log(x) for positive normal x: x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)),
// log(1 + f) by a minimax polynomial, e ln2 in two parts. Error below one ulp.
template <typename F>
FASTVAE_VECMATH F log(F x) {
  using L = Lanes<F>;
  const auto shifted = L::bits(x) - 0x3f3504f3u;  // bits of sqrt(1/2)
  const F exponent = L::to_float((typename L::Int)shifted >> 23);
  const F f = L::from_bits((shifted & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const F f2 = f * f;
  const F p = polynomial(f, {3.3333331174e-1f, -2.4999993993e-1f, 2.0000714765e-1f, -1.6668057665e-1f,
                             1.4249322787e-1f, -1.2420140846e-1f, 1.1676998740e-1f, -1.1514610310e-1f,
                             7.0376836292e-2f});
  const F r = f * f2 * p + exponent * -2.12194440e-4f - 0.5f * f2;
  return (f + r) + exponent * 0.693359375f;
}

// cos(2 pi t) and sin(2 pi t) for t in [0, 1]: 4t = q + x with q an integer and x in
// [-1/2, 1/2] exact (t is a multiple of 2^-24 in the samplers), minimax polynomials of
// x^2 for cos and sin of (pi/2) x (a term fewer each than Taylor's; with float32
// coefficients 4.2e-8 relative error, Taylor's 3.5e-8), then the quadrant q permutes and
// negates them. q is rounded by adding 1.5 * 2^23, whose low mantissa bits then hold it:
// four instructions for q and x where conversions to and from integers took six.
FASTVAE_VECMATH void cos_sin_turns(float t, float* cos_out, float* sin_out) {
  using L = Lanes<float>;
  const float shifter = 12582912.0f, quarters = t * 4.0f;
  const float shifted = quarters + shifter;
  const float x = quarters - (shifted - shifter);
  const uint32_t quadrant = L::bits(shifted);  // its low bits
  const float x2 = x * x;
  const float s = x * polynomial(x2, {1.5707963705062866f, -0.6459634304046631f, 0.07968003302812576f,
                                      -0.0046016499400138855f});
  const float c = polynomial(x2, {1.0f, -1.2337005138397217f, 0.2536691725254059f, -0.020859934389591217f,
                                  0.0009033613605424762f});
  // cos(q pi/2 + x): q=0 cos x, 1 -sin x, 2 -cos x, 3 sin x; sin: sin x, cos x, -sin x, -cos x.
  // The swap and the signs in bit operations: SSE2, which has no blend, spends three
  // instructions on a select.
  const uint32_t swap = (L::bits(s) ^ L::bits(c)) & (0u - (quadrant & 1));
  const uint32_t cos_sign = ((quadrant + 1) & 2) << 30;
  const uint32_t sin_sign = (quadrant & 2) << 30;
  *cos_out = L::from_bits(L::bits(c) ^ swap ^ cos_sign);
  *sin_out = L::from_bits(L::bits(s) ^ swap ^ sin_sign);
}

}  // namespace vecmath
}  // namespace fastvae
