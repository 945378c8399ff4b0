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
  return {second.a * first.a, second.a * first.b + second.b};
}

// The element of step t: a = exp(dt * A), b = dt * B * u; at a sequence start the incoming state is
// replaced by h_start (the initial state or 0): the map becomes the constant a * h_start + b.
template <typename T>
FASTNN_HD Affine<T> step_element(T a, T b, bool reset, T h_start) {
  return reset ? Affine<T>{T(0), a * h_start + b} : Affine<T>{a, b};
}

}  // namespace ssm
}  // namespace fastnn
