// Selective-scan math shared by the CPU and CUDA kernels: one formula, compiled twice.
//
//  - softplus with torch's threshold (x > 20 passes through) and its derivative;
//  - silu gating and its derivative;
//  - the scan element h -> a * h + b (a = exp(dt * A), b = dt * B * u) and its associative combine,
//    with a reset (new sequence) folded in as a = 0, b += a_reset * h_start, so a segmented scan is an
//    ordinary scan over these pairs;
//  - the reverse (adjoint) element for the backward: g_t = a_{t+1} * g_{t+1} + C_t * dy_t.
// Semantics: fastnn/reference/ssm.py.
#pragma once

#include "hd.h"

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace fastnn {
namespace ssm {

constexpr float kSoftplusThreshold = 20.0f;

FASTNN_HD float exp_(float x) { return expf(x); }
FASTNN_HD double exp_(double x) { return exp(x); }
FASTNN_HD float log1p_(float x) { return log1pf(x); }
FASTNN_HD double log1p_(double x) { return log1p(x); }

// a * b + c. On the GPU one fused multiply-add: the build passes --fmad=false (bit-exact box and RoI math
// elsewhere), which stops nvcc contracting a * b + c, but not an explicit fmaf. The scan's recurrences are
// mostly such terms, so this halves their instructions. On the host, two roundings as before.
#if defined(__CUDA_ARCH__)
FASTNN_HD float madd(float a, float b, float c) { return fmaf(a, b, c); }
FASTNN_HD double madd(double a, double b, double c) { return fma(a, b, c); }
#else
FASTNN_HD float madd(float a, float b, float c) { return a * b + c; }
FASTNN_HD double madd(double a, double b, double c) { return a * b + c; }
#endif

// torch.nn.functional.softplus(x, beta=1, threshold=20)
template <typename T>
FASTNN_HD T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : log1p_(exp_(x));
}

// d softplus / dx = sigmoid(x) below the threshold, 1 above it (where softplus is the identity)
template <typename T>
FASTNN_HD T softplus_grad(T x) {
  return x > T(kSoftplusThreshold) ? T(1) : T(1) / (T(1) + exp_(-x));
}

template <typename T>
FASTNN_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

template <typename T>
FASTNN_HD T silu(T z) {
  return z * sigmoid(z);
}

// d silu / dz = s * (1 + z * (1 - s)), s = sigmoid(z)
template <typename T>
FASTNN_HD T silu_grad(T z) {
  const T s = sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

// h -> a * h + b
template <typename T>
struct Affine {
  T a, b;
};

// `first` then `second`: h -> second.a * (first.a * h + first.b) + second.b
template <typename T>
FASTNN_HD Affine<T> combine(Affine<T> first, Affine<T> second) {
  return {second.a * first.a, madd(second.a, first.b, second.b)};
}

// The map applied to a state: m.a * h + m.b
template <typename T>
FASTNN_HD T apply(Affine<T> m, T h) {
  return madd(m.a, h, m.b);
}

// The element of step t: a = exp(dt * A), b = dt * B * u; at a sequence start the incoming state is
// replaced by h_start (the initial state or 0): the map becomes the constant a * h_start + b.
template <typename T>
FASTNN_HD Affine<T> step_element(T a, T b, bool reset, T h_start) {
  return reset ? Affine<T>{T(0), madd(a, h_start, b)} : Affine<T>{a, b};
}

}  // namespace ssm
}  // namespace fastnn
