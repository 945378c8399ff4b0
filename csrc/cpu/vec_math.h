// Lane vectors for the C++ CPU kernels: GCC vector types of 64 bytes (16 floats / 8 doubles, one AVX-512
// register), a broadcast, FMA, and exp / exp2 for floats by a polynomial (vectorised; libm's are scalar).
// Included by the CPU kernel files only (it is not __device__ code).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastnn {
namespace cpu {
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(64)));
  static constexpr int W = 8;
};
using VF = Lanes<float>::V;
using VI = Lanes<float>::I;
using VD = Lanes<double>::V;

// x in every lane. (A lane-by-lane loop here compiles to 16 masked broadcasts.)
template <typename V>
inline V splat(typename std::remove_reference<decltype(V{}[0])>::type x) {
  return x - V{};  // scalar - vector broadcasts; x - 0 is x exactly, so it folds away
}
// a * b + c, fused where the ISA has it (the build uses -ffp-contract=off, so write it out).
inline VF fmadd(VF a, VF b, VF c) {
#if defined(__AVX512F__)
  return (VF)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return a * b + c;
#endif
}
inline VD fmadd(VD a, VD b, VD c) {
#if defined(__AVX512F__)
  return (VD)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#else
  return a * b + c;
#endif
}

inline VF vmax(VF a, VF b) { return a > b ? a : b; }
inline VF vmin(VF a, VF b) { return a < b ? a : b; }

// 2^x on 16 floats: x = k + f with k = round(x), |f| <= 1/2, a degree-6 polynomial for 2^f (least-squares
// fit on Chebyshev nodes, max relative error 1e-7 in fp32, ~1 ulp), then 2^k. With AVX-512, roundscale and
// scalef (which handles under- and overflow: 0 and inf come out right); otherwise the exponent bits, with
// x clamped to [-126, 127] (results below 2^-126 come out as ~1e-38 instead of a denormal or 0).
inline VF vexp2(VF x) {
#if defined(__AVX512F__)
  const __m512 k = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const VF f = x - (VF)k;
#else
  x = vmin(vmax(x, splat<VF>(-126.0f)), splat<VF>(127.0f));
  const VF magic = splat<VF>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VF k = (x + magic) - magic;
  const VF f = x - k;
#endif
  VF p = splat<VF>(1.534580806037411e-4f);
  p = fmadd(p, f, splat<VF>(1.3399930903688073e-3f));
  p = fmadd(p, f, splat<VF>(9.618489071726799e-3f));
  p = fmadd(p, f, splat<VF>(5.550328642129898e-2f));
  p = fmadd(p, f, splat<VF>(2.4022646248340607e-1f));
  p = fmadd(p, f, splat<VF>(6.931471824645996e-1f));
  p = fmadd(p, f, splat<VF>(1.0f));
#if defined(__AVX512F__)
  return (VF)_mm512_scalef_ps((__m512)p, k);
#else
  return p * (VF)((__builtin_convertvector(k, VI) + 127) << 23);
#endif
}
inline VD vexp2(VD x) {
  for (int i = 0; i < 8; ++i) x[i] = std::exp2(x[i]);
  return x;
}
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
inline VF vexp(VF x) { return vexp2(x * float(kLog2e)); }
inline VD vexp(VD x) {
  for (int i = 0; i < 8; ++i) x[i] = std::exp(x[i]);
  return x;
}

// softplus: x above `threshold` passes through (torch's is 20); else max(x, 0) + log1p(w) with w = e^-|x|.
// log1p(w) = 2 atanh(s) for s = w / (2 + w), which is in [0, 1/3]: atanh's series to s^13 (its next term is
// below 1.5e-8 of the sum there), so no log, no exponent split and one division. With `dsoftplus`, also the
// derivative sigmoid(x) (1 above the threshold) from the same exp: 1 / (1 + w) for x > 0, w / (1 + w)
// otherwise.
inline VF vsoftplus(VF x, float threshold, VF* dsoftplus = nullptr) {
  const VF w = vexp(-(x > 0 ? x : -x));
  const VF s = w / (w + 2.0f);
  const VF s2 = s * s, s_2 = s + s;
  VF q = splat<VF>(1.0f / 13);
  q = fmadd(q, s2, splat<VF>(1.0f / 11));
  q = fmadd(q, s2, splat<VF>(1.0f / 9));
  q = fmadd(q, s2, splat<VF>(1.0f / 7));
  q = fmadd(q, s2, splat<VF>(1.0f / 5));
  q = fmadd(q, s2, splat<VF>(1.0f / 3));
  const VF l1p = fmadd(s_2 * s2, q, s_2);
  const VF sp = vmax(x, splat<VF>(0.0f)) + l1p;
  if (dsoftplus != nullptr)
    *dsoftplus = x > threshold ? splat<VF>(1.0f) : (x > 0 ? splat<VF>(1.0f) : w) / (w + 1.0f);
  return x > threshold ? x : sp;
}

// logistic sigmoid 1 / (1 + e^-x): the relative error of vexp (~1e-7) carries over, no cancellation
inline VF vsigmoid(VF x) { return 1.0f / (1.0f + vexp(-x)); }

// tanh on 16 floats. |x| < 1/2: the Taylor series to x^15 (the next term is below 1e-8 relative there);
// otherwise 1 - 2 / (e^{2|x|} + 1), whose cancellation costs at most a factor 1.2 in relative error from
// |x| = 1/2 on; e^{2|x|} = inf gives 1 exactly. The sign is put back last.
inline VF vtanh(VF x) {
  const VI sign_bit = splat<VI>(int32_t(0x80000000u));
  const VF a = (VF)((VI)x & ~sign_bit);
  const VF a2 = a * a;
  VF p = splat<VF>(-1.455834387051318e-3f);       // -929569 / 638512875
  p = fmadd(p, a2, splat<VF>(3.592128036572481e-3f));  // 21844 / 6081075
  p = fmadd(p, a2, splat<VF>(-8.863235529902197e-3f)); // -1382 / 155925
  p = fmadd(p, a2, splat<VF>(2.186948853615520e-2f));  // 62 / 2835
  p = fmadd(p, a2, splat<VF>(-5.396825396825397e-2f)); // -17 / 315
  p = fmadd(p, a2, splat<VF>(1.333333333333333e-1f));  // 2 / 15
  p = fmadd(p, a2, splat<VF>(-3.333333333333333e-1f)); // -1 / 3
  const VF small = fmadd(p * a2, a, a);
  const VF large = 1.0f - 2.0f / (vexp(a + a) + 1.0f);
  const VF t = a < 0.5f ? small : large;
  return (VF)((VI)t | ((VI)x & sign_bit));
}

#if defined(__AVX512F__)
// r[i] = row i of a 16 x 16 tile of 32-bit lanes -> r[i] = its column i: unpack, in-lane shuffle and two
// levels of 128-bit block shuffles (64 register ops; a strided scalar copy costs ~2 cycles an element).
inline __attribute__((always_inline)) void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

}  // namespace cpu
}  // namespace fastnn
