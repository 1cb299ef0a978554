// Branch-free float32 exp, log and sin/cos of whole turns, written so that GCC/Clang
// auto-vectorise loops calling them (libm calls do not vectorise without -ffast-math).
// Accuracy: about 1-2 ulp over the ranges the kernels use (checked against float64 by
// tests/test_gaussian.py through the samplers and the KL).
#pragma once
#include <cstdint>
#include <cstring>

// Forced inline: a call left out of line stops the loop around it from vectorising.
#define FASTVAE_VECMATH inline __attribute__((always_inline))

namespace fastvae {
namespace vecmath {

FASTVAE_VECMATH float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

FASTVAE_VECMATH uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// 2^k for integer k in [-252, 254], as two exponent-field factors so that results in
// the subnormal or overflow range still come out right when multiplied in.
FASTVAE_VECMATH float pow2_half(int32_t k) { return bits_to_float(static_cast<uint32_t>((k >> 1) + 127) << 23); }
FASTVAE_VECMATH float pow2_rest(int32_t k) { return bits_to_float(static_cast<uint32_t>(k - (k >> 1) + 127) << 23); }

// exp(x): x = k ln2 + r, |r| <= ln2 / 2, Taylor to r^7 (truncation < 1e-8 relative).
// Overflows to inf, underflows through subnormals to 0, propagates NaN.
FASTVAE_VECMATH float exp(float x) {
  x = x < -104.0f ? -104.0f : x;  // written as selects so that NaN passes through
  x = x > 89.0f ? 89.0f : x;
  // Round x / ln2 to an integer with the 1.5 * 2^23 shifter: exact, and well defined for NaN.
  const float shifter = 12582912.0f;
  const float shifted = x * 1.4426950408889634f + shifter;
  const int32_t k = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(shifter));
  const float kf = shifted - shifter;
  const float r = (x - kf * 0.693359375f) + kf * 2.1219444005469057e-4f;  // ln2 split hi + lo
  float p = 1.9841269841269841e-4f;
  p = p * r + 1.3888888888888889e-3f;
  p = p * r + 8.3333333333333333e-3f;
  p = p * r + 4.1666666666666664e-2f;
  p = p * r + 0.16666666666666666f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2_half(k) * pow2_rest(k);
}

// log(x) for positive normal x: x = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log(m) = f - f^2/2 + f^3 Q(f), f = m - 1 exact; Q is a least-squares fit (relative
// error) of degree 7 on that interval, max error 2.1 ulp in float32 arithmetic.
FASTVAE_VECMATH float log(float x) {
  const uint32_t bits = float_to_bits(x);
  // Shift by sqrt(1/2)'s bits so that mantissas above sqrt(2) move to the next exponent.
  const uint32_t offset = bits - 0x3f3504f3u;
  const int32_t e = static_cast<int32_t>(offset) >> 23;
  const float m = bits_to_float((offset & 0x007fffffu) + 0x3f3504f3u);
  const float f = m - 1.0f;
  float q = -0.07362867891788483f;
  q = q * f + 0.1262032687664032f;
  q = q * f - 0.13202103972434998f;
  q = q * f + 0.14227114617824554f;
  q = q * f - 0.16621370613574982f;
  q = q * f + 0.19999825954437256f;
  q = q * f - 0.2500085234642029f;
  q = q * f + 0.3333335518836975f;
  const float f2 = f * f;
  const float ef = static_cast<float>(e);
  const float log_m = f - 0.5f * f2 + f2 * f * q;
  return (log_m - ef * 2.1219444005469057e-4f) + ef * 0.693359375f;  // e ln2, split hi + lo
}

// cos(2 pi t) and sin(2 pi t) for t in [0, 1]: t = q/4 + f with f in [-1/8, 1/8] exact
// (t is a multiple of 2^-24 in the samplers), Taylor polynomials of 2 pi f (error < 2e-9),
// then the quadrant q permutes and negates them.
FASTVAE_VECMATH void cos_sin_turns(float t, float* cos_out, float* sin_out) {
  const int32_t quadrant = static_cast<int32_t>(t * 4.0f + 0.5f);
  const float f = t - 0.25f * static_cast<float>(quadrant);
  const float f2 = f * f;
  float s = 42.058693944897634f;
  s = s * f2 - 76.70585975306136f;
  s = s * f2 + 81.60524927607504f;
  s = s * f2 - 41.341702240399755f;
  s = s * f2 + 6.283185307179586f;
  s = s * f;
  float c = -26.426256783374388f;
  c = c * f2 + 60.24464137187664f;
  c = c * f2 - 85.45681720669371f;
  c = c * f2 + 64.93939402266828f;
  c = c * f2 - 19.739208802178716f;
  c = c * f2 + 1.0f;
  const bool odd = quadrant & 1;
  const float cos_abs = odd ? s : c, sin_abs = odd ? c : s;
  // cos(q pi/2 + x): q=0 cos x, 1 -sin x, 2 -cos x, 3 sin x; sin: sin x, cos x, -sin x, -cos x.
  *cos_out = ((quadrant + 1) & 2) ? -cos_abs : cos_abs;
  *sin_out = (quadrant & 2) ? -sin_abs : sin_abs;
}

}  // namespace vecmath
}  // namespace fastvae
