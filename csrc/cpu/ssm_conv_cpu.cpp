// CPU kernels of the Mamba family's depthwise causal conv1d (forward, backward) and decode steps
// (causal_conv1d_update, selective_state_update). Semantics: fastnn/reference/ssm.py; calling convention:
// csrc/families/ssm_conv.h.
//
// Layout of the work: one (batch row, channel) time series at a time, widened once into an fp32 (fp64)
// buffer holding [initial states (W - 1), x (L)], so every inner loop runs over contiguous floats with a
// compile-time width and vectorises (AVX-512 here). The backward runs per channel over all batch rows, so
// dweight / dbias are summed in a fixed order: deterministic with no partial buffers. Sums the compiler
// may not reorder are kept in 16 lane-wise partial sums (one vector register) and added at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/alloc.h"
#include "vec_math.h"
#include "../common/ssm_math.h"

namespace fastnn::cpu {
namespace {

constexpr int kLanes = 16;  // partial sums per reduction: one AVX-512 register of floats

// Bit reinterpretation without C++20's bit_cast: torch 2.11 builds extensions as C++17. A 4-byte memcpy
// compiles to a register move and vectorises like the cast.
inline int32_t float_bits(float v) {
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return i;
}
inline float float_from_bits(int32_t i) {
  float v;
  std::memcpy(&v, &i, sizeof v);
  return v;
}

// exp in plain float arithmetic that the autovectoriser turns into vector code (glibc's expf is a scalar
// call, and silu needs one per element): 2^n e^r with n = round(x log2 e), r = x - n ln 2 (Cody-Waite
// split), e^r by its degree-6 Taylor polynomial (|r| <= ln 2 / 2: truncation ~1e-7 relative, ~2 ulp).
// Large x gives inf, very negative x 0, NaN stays NaN. The integer n is read from the rounding sum's bits
// (no float -> int conversion of NaN).
inline float vexp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float shifted = xc * 1.44269504088896341f + kMagic;
  const float n = shifted - kMagic;
  const int32_t ni = float_bits(shifted) - float_bits(kMagic);
  float r = xc - n * 0.693359375f;  // 0.693359375 has 9 significant bits: n * it is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * float_from_bits((ni + 127) << 23);
  return x > 88.0f ? std::numeric_limits<float>::infinity() : (x < -87.0f ? 0.0f : e);
}

inline float exp_t(float x) { return vexp(x); }
inline double exp_t(double x) { return std::exp(x); }

// log(v) for v >= 1 in vectorisable float arithmetic: v = m 2^k with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^9 (next term ~4e-10).
inline float vlog_ge1(float v) {
  const int32_t bits = float_bits(v);
  int32_t k = ((bits >> 23) & 0xff) - 127;
  float m = float_from_bits((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  k = big ? k + 1 : k;
  const float sv = (m - 1.0f) / (m + 1.0f), s2 = sv * sv;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return static_cast<float>(k) * 0.693147180559945f + 2.0f * sv * p;
}

// softplus (torch's, threshold 20) vectorisable for float: log1p(e) = log(u) e / (u - 1) with u = 1 + e
// rounded (Goldberg), e itself when u == 1; double keeps the libm formula (the fp64 / gradcheck path)
inline float softplus_t(float x) {
  const float e = vexp(x), u = 1.0f + e;
  const float sp = u == 1.0f ? e : vlog_ge1(u) * e / (u - 1.0f);
  return x > ssm::kSoftplusThreshold ? x : sp;
}
inline double softplus_t(double x) { return ssm::softplus(x); }

#if defined(__AVX512F__)
// v[i] = f(v[i]) for i < n, 16 floats at a time (the tail through a zero-padded copy).
template <typename F>
inline void map16(float* v, int64_t n, F f) {
  int64_t i = 0;
  VF x;
  for (; i + 16 <= n; i += 16) {
    std::memcpy(&x, v + i, sizeof x);
    x = f(x);
    std::memcpy(v + i, &x, sizeof x);
  }
  if (i < n) {
    float tail[16] = {};
    std::memcpy(tail, v + i, (n - i) * sizeof(float));
    std::memcpy(&x, tail, sizeof x);
    x = f(x);
    std::memcpy(tail, &x, sizeof x);
    std::memcpy(v + i, tail, (n - i) * sizeof(float));
  }
}
#endif

template <typename T>
inline T sigmoid_t(T x) {
  return T(1) / (T(1) + exp_t(-x));
}

// bias + sum_k w[k] xc[k] over one window of the extended input: k ascending in every path (forward,
// backward, decode), so they agree bit for bit.
template <int W, typename acc_t>
inline acc_t window_sum(const acc_t* xc, const acc_t* w, acc_t bias) {
  acc_t s = bias;
#pragma GCC unroll 4
  for (int k = 0; k < W; ++k) s += w[k] * xc[k];
  return s;
}

// go * d silu(pre) / d pre
template <typename acc_t>
inline acc_t silu_backward(acc_t go, acc_t pre) {
  const acc_t s = sigmoid_t(pre);
  return go * (s * (acc_t(1) + pre * (acc_t(1) - s)));
}

// Per batch row b: the sequence id of extended-input position p (p = t + W - 1; positions before step 0
// belong to the first sequence).
inline int32_t seq_ext(const int32_t* seq, int64_t p, int W) { return p < W - 1 ? seq[0] : seq[p - (W - 1)]; }

// keep[b][k][t] = 1 where the term w[k] * xc[t + k] of output t is in t's sequence; final_keep[b][j] = 1
// where final state j is in the last step's sequence. Shared by every channel of the row.
void build_masks(const int32_t* seq, int64_t B, int64_t L, int W, std::vector<uint8_t>& keep,
                 std::vector<uint8_t>& final_keep) {
  keep.assign(static_cast<size_t>(B * W * L), 0);
  final_keep.assign(static_cast<size_t>(B * (W - 1)), 0);
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int32_t* s = seq + b * L;
      for (int k = 0; k < W; ++k) {
        uint8_t* m = keep.data() + (b * W + k) * L;
        for (int64_t t = 0; t < L; ++t) m[t] = seq_ext(s, t + k, W) == s[t];
      }
      for (int j = 0; j < W - 1; ++j) final_keep[b * (W - 1) + j] = seq_ext(s, L + j, W) == s[L - 1];
    }
  });
}

// buf = [initial states (or zeros), x row] widened to acc_t
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict xr, const scalar_t* init, int64_t L, int W, acc_t* __restrict buf) {
  for (int i = 0; i < W - 1; ++i) buf[i] = init ? static_cast<acc_t>(init[i]) : acc_t(0);
  for (int64_t t = 0; t < L; ++t) buf[W - 1 + t] = static_cast<acc_t>(xr[t]);
}

// o[t] = bias + sum_k w[k] * xc[t + k] (terms outside t's sequence dropped, by select: a NaN there must
// not leak in)
template <int W, typename acc_t>
inline void conv_row(const acc_t* __restrict buf, const acc_t* __restrict w, acc_t bias,
                     const uint8_t* __restrict keep, int64_t L, acc_t* __restrict o) {
  if (keep) {
    for (int64_t t = 0; t < L; ++t) {
      acc_t s = bias;
#pragma GCC unroll 4
      for (int k = 0; k < W; ++k) s += w[k] * (keep[k * L + t] ? buf[t + k] : acc_t(0));
      o[t] = s;
    }
  } else {
    for (int64_t t = 0; t < L; ++t) o[t] = window_sum<W>(buf + t, w, bias);
  }
}

// Without sequence masks and with float in and out: conv_row's sum and the silu in one pass straight into
// the output (two extra passes over the row otherwise).
template <int W, typename acc_t>
inline void conv_silu_row(const acc_t* __restrict buf, const acc_t* __restrict w, acc_t bias, int64_t L, bool silu,
                          acc_t* __restrict o) {
  auto pass = [&](auto silu_c) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) {
      acc_t s = window_sum<W>(buf + t, w, bias);
      if constexpr (decltype(silu_c)::value) s = s * sigmoid_t(s);
      o[t] = s;
    }
  };
  if (silu) {
    pass(std::true_type{});
  } else {
    pass(std::false_type{});
  }
}

// The row's final states: the last W - 1 extended-input entries (zero where seq_idx ends a sequence before).
template <int W, typename scalar_t, typename acc_t>
inline void store_final_states(const acc_t* buf, const uint8_t* final_keep, int64_t b, int64_t L, scalar_t* final_row) {
  for (int j = 0; j < W - 1; ++j) {
    const bool k = !final_keep || final_keep[b * (W - 1) + j];
    final_row[j] = static_cast<scalar_t>(k ? buf[L + j] : acc_t(0));
  }
}

// sum_t a[t] * b[t] (b == nullptr: sum_t a[t]) in kLanes partial sums, added in a fixed order
template <typename acc_t>
inline acc_t dot_lanes(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    if (b) {
      for (int j = 0; j < kLanes; ++j) part[j] += a[t + j] * b[t + j];
    } else {
      for (int j = 0; j < kLanes; ++j) part[j] += a[t + j];
    }
  }
  for (; t < n; ++t) part[t % kLanes] += b ? a[t] * b[t] : a[t];
  acc_t s = 0;
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

// Rows per parallel task: about 16k steps, so short sequences still share out evenly over the threads.
inline int64_t row_grain(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

template <int W, typename scalar_t>
void conv_forward(const scalar_t* x, const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* bias,
                  const uint8_t* keep, const uint8_t* final_keep, const scalar_t* init, int64_t B, int64_t D,
                  int64_t L, bool silu, scalar_t* out, scalar_t* final) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B * D, row_grain(L), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(W - 1 + L), o(L);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t b = row / D, d = row % D;
      load_row(x + row * L, init ? init + row * (W - 1) : nullptr, L, W, buf.data());
      scalar_t* orow = out + row * L;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (!keep) {  // one pass, the same arithmetic (conv_row's sum, then silu)
          conv_silu_row<W>(buf.data(), w + d * W, bias ? bias[d] : acc_t(0), L, silu, orow);
          if (final) store_final_states<W>(buf.data(), final_keep, b, L, final + row * (W - 1));
          continue;
        }
      }
      conv_row<W>(buf.data(), w + d * W, bias ? bias[d] : acc_t(0), keep ? keep + b * W * L : nullptr, L, o.data());
      if (silu) {  // in place first: fused with the bf16 rounding, GCC left this loop scalar
        for (int64_t t = 0; t < L; ++t) o[t] = o[t] * sigmoid_t(o[t]);
      }
      for (int64_t t = 0; t < L; ++t) orow[t] = static_cast<scalar_t>(o[t]);
      if (final) store_final_states<W>(buf.data(), final_keep, b, L, final + row * (W - 1));
    }
  });
}

// The backward of one row without sequence masks (the general path below makes ~12 passes over the row):
// pass 1 the gradient g at the pre-activation with the dbias / dweight lane partials, pass 2 dx (and dinit)
// from g. Same terms in the same order as the general path (dot_lanes' partials; dx from 0 adding w[k] g in
// k order, absent terms skipped, dfinal last), so both give the same bits. go: dout widened to acc_t (a
// separate loop: the bf16 conversion inside would stop the vectoriser).
template <bool kSilu, int W, typename acc_t>
void conv_grad_pass(const acc_t* __restrict buf, const acc_t* __restrict go, const acc_t* __restrict wd, acc_t bias,
                    int64_t L, acc_t* __restrict g, acc_t (&pdb)[kLanes], acc_t (&pdw)[W][kLanes]) {
  auto grad_at = [&](int64_t t) {
    if constexpr (!kSilu) {
      return go[t];
    } else {
      return silu_backward(go[t], window_sum<W>(buf + t, wd, bias));
    }
  };
  int64_t t = 0;
  for (; t + kLanes <= L; t += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const acc_t gv = grad_at(t + j);
      g[t + j] = gv;
      pdb[j] += gv;
#pragma GCC unroll 4
      for (int k = 0; k < W; ++k) pdw[k][j] += gv * buf[t + j + k];
    }
  }
  for (; t < L; ++t) {
    const acc_t gv = grad_at(t);
    g[t] = gv;
    pdb[t % kLanes] += gv;
    for (int k = 0; k < W; ++k) pdw[k][t % kLanes] += gv * buf[t + k];
  }
}

template <int W, typename scalar_t, typename acc_t>
void conv_backward_row_unmasked(const acc_t* __restrict buf, const acc_t* __restrict go, const acc_t* __restrict wd,
                                acc_t bias, bool silu, int64_t L, acc_t* __restrict g, const scalar_t* dfinal_row,
                                scalar_t* __restrict dxr, scalar_t* dinit_row, acc_t& dbd, acc_t (&dwk)[W]) {
  acc_t pdb[kLanes] = {}, pdw[W][kLanes] = {};
  if (silu) {
    conv_grad_pass<true, W>(buf, go, wd, bias, L, g, pdb, pdw);
  } else {
    conv_grad_pass<false, W>(buf, go, wd, bias, L, g, pdb, pdw);
  }
  acc_t sdb = 0;
  for (int j = 0; j < kLanes; ++j) sdb += pdb[j];
  dbd += sdb;
  for (int k = 0; k < W; ++k) {
    acc_t sdw = 0;
    for (int j = 0; j < kLanes; ++j) sdw += pdw[k][j];
    dwk[k] += sdw;
  }
  // dxc[p] = sum over k of w[k] g[p - k] (0 <= p - k < L), p = W - 1 + t for dx, p < W - 1 for dinit
  auto dxc_at = [&](int64_t p) {
    acc_t a = 0;
    for (int k = 0; k < W; ++k)
      if (p - k >= 0 && p - k < L) a += wd[k] * g[p - k];
    return a;
  };
  const int64_t full = std::max<int64_t>(0, L - (W - 1));  // outputs t < full have all W terms
#pragma omp simd
  for (int64_t u = 0; u < full; ++u) {
    acc_t a = 0;
#pragma GCC unroll 4
    for (int k = 0; k < W; ++k) a += wd[k] * g[W - 1 + u - k];
    dxr[u] = static_cast<scalar_t>(a);
  }
  for (int64_t u = full; u < L; ++u) {
    acc_t a = dxc_at(W - 1 + u);
    const int64_t j = W - 1 + u - L;  // dfinal entry j lands on extended position L + j
    if (dfinal_row && j >= 0) a += static_cast<acc_t>(dfinal_row[j]);
    dxr[u] = static_cast<scalar_t>(a);
  }
  if (dinit_row) {
    for (int i = 0; i < W - 1; ++i) {
      acc_t a = dxc_at(i);
      const int64_t j = i - L;  // L < W - 1: dfinal reaches the initial states too
      if (dfinal_row && j >= 0) a += static_cast<acc_t>(dfinal_row[j]);
      dinit_row[i] = static_cast<scalar_t>(a);
    }
  }
}

template <int W, typename scalar_t>
void conv_backward(const scalar_t* dout, const scalar_t* dfinal, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                   const at::opmath_type<scalar_t>* bias, const uint8_t* keep, const uint8_t* final_keep,
                   const scalar_t* init, int64_t B, int64_t D, int64_t L, bool silu, scalar_t* dx, scalar_t* dinit,
                   at::opmath_type<scalar_t>* dw, at::opmath_type<scalar_t>* db) {
  using acc_t = at::opmath_type<scalar_t>;
  // One task per channel range, every batch row inside: dweight[d] and dbias[d] sum in batch order.
  at::parallel_for(0, D, std::max<int64_t>(1, row_grain(L) / std::max<int64_t>(B, 1)), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(W - 1 + L), g(L), h(L), v(L), dxc(W - 1 + L);
    for (int64_t d = lo; d < hi; ++d) {
      const acc_t* wd = w + d * W;
      acc_t dwk[W] = {}, dbd = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = b * D + d;
        const uint8_t* kb = keep ? keep + b * W * L : nullptr;
        load_row(x + row * L, init ? init + row * (W - 1) : nullptr, L, W, buf.data());
        const scalar_t* gr = dout + row * L;
        if (!kb) {
          for (int64_t t = 0; t < L; ++t) h[t] = static_cast<acc_t>(gr[t]);
          conv_backward_row_unmasked<W>(buf.data(), h.data(), wd, bias ? bias[d] : acc_t(0), silu, L, g.data(),
                                        dfinal ? dfinal + row * (W - 1) : nullptr, dx + row * L,
                                        dinit ? dinit + row * (W - 1) : nullptr, dbd, dwk);
          continue;
        }
        if (silu) {  // g = dout * silu'(pre), pre recomputed; dout widened first (keeps this loop vectorised)
          conv_row<W>(buf.data(), wd, bias ? bias[d] : acc_t(0), kb, L, g.data());
          for (int64_t t = 0; t < L; ++t) h[t] = static_cast<acc_t>(gr[t]);
          for (int64_t t = 0; t < L; ++t) g[t] = silu_backward(h[t], g[t]);
        } else {
          for (int64_t t = 0; t < L; ++t) g[t] = static_cast<acc_t>(gr[t]);
        }
        dbd += dot_lanes<acc_t>(g.data(), nullptr, L);
        for (int64_t p = 0; p < W - 1 + L; ++p) dxc[p] = 0;
        for (int k = 0; k < W; ++k) {
          // term k of output t (weight k, extended input t + k) exists only within t's sequence: hk = the part
          // of g it carried back (-> dxc[t + k]), vk = the input it read (-> dweight[k]); selects, so that a
          // NaN in another sequence stays out as in the forward
          const acc_t* hk = g.data();
          const acc_t* vk = buf.data() + k;
          if (kb) {
            const uint8_t* m = kb + k * L;
            for (int64_t t = 0; t < L; ++t) {
              h[t] = m[t] ? g[t] : acc_t(0);
              v[t] = m[t] ? buf[t + k] : acc_t(0);
            }
            hk = h.data();
            vk = v.data();
          }
          dwk[k] += dot_lanes<acc_t>(g.data(), vk, L);
          const acc_t wk = wd[k];
          acc_t* __restrict dk = dxc.data() + k;
          for (int64_t t = 0; t < L; ++t) dk[t] += wk * hk[t];
        }
        if (dfinal) {
          for (int j = 0; j < W - 1; ++j) {
            const bool k = !final_keep || final_keep[b * (W - 1) + j];
            if (k) dxc[L + j] += static_cast<acc_t>(dfinal[row * (W - 1) + j]);
          }
        }
        scalar_t* dxr = dx + row * L;
        for (int64_t t = 0; t < L; ++t) dxr[t] = static_cast<scalar_t>(dxc[W - 1 + t]);
        if (dinit) {
          for (int i = 0; i < W - 1; ++i) dinit[row * (W - 1) + i] = static_cast<scalar_t>(dxc[i]);
        }
      }
      for (int k = 0; k < W; ++k) dw[d * W + k] = dwk[k];
      db[d] = dbd;
    }
  });
}

template <typename F>
void with_width(int64_t W, F&& f) {
  switch (W) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "fastnn causal_conv1d: weight width must be 2, 3 or 4, got ", W);
  }
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels index their inputs without bounds: a raw call of an op (torch.ops.fastnn.*) with a wrong size
// or index must fail here, not read or write past a tensor's end.
void check_sizes(const at::Tensor& t, at::IntArrayRef want, const char* fn, const char* name) {
  TORCH_CHECK(t.sizes() == want, "fastnn ", fn, ": ", name, " must be ", want, ", got ", t.sizes());
}

void check_optional_sizes(const c10::optional<at::Tensor>& t, at::IntArrayRef want, const char* fn, const char* name) {
  if (t && t->defined()) check_sizes(*t, want, fn, name);
}

// Cache rows named by `indices` (int32, one per batch row): each in [0, rows).
void check_cache_indices(const c10::optional<at::Tensor>& indices, int64_t batch, int64_t rows, const char* fn,
                         const char* name) {
  if (!indices) {
    TORCH_CHECK(rows == batch, "fastnn ", fn, ": without ", name, " the cache must have ", batch,
                " rows (the batch), got ", rows);
    return;
  }
  check_sizes(*indices, {batch}, fn, name);
  const int32_t* idx = indices->data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(idx[b] >= 0 && idx[b] < rows, "fastnn ", fn, ": ", name, " must be in [0, ", rows, ") (the cache's rows), got ",
                idx[b], " at ", b);
}

void check_conv_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& init) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "fastnn causal_conv1d: contiguous CPU (B, D, L) x expected");
  const auto ct = compute_type(x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == ct && weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == x.size(1),
              "fastnn causal_conv1d: weight must be a contiguous (D, W) tensor in the compute dtype");
  TORCH_CHECK(!bias || (bias->scalar_type() == ct && bias->is_contiguous() && bias->numel() == x.size(1)),
              "fastnn causal_conv1d: bias must be a contiguous (D,) tensor in the compute dtype");
  TORCH_CHECK(!seq_idx || (seq_idx->scalar_type() == at::kInt && seq_idx->is_contiguous()),
              "fastnn causal_conv1d: seq_idx must be contiguous int32");
  TORCH_CHECK(!init || (init->scalar_type() == x.scalar_type() && init->is_contiguous()),
              "fastnn causal_conv1d: initial_states must be contiguous in x's dtype");
  TORCH_CHECK(x.size(2) >= 1, "fastnn causal_conv1d: L >= 1 expected (the op layer answers empty inputs)");
  check_optional_sizes(seq_idx, {x.size(0), x.size(2)}, "causal_conv1d", "seq_idx");
  check_optional_sizes(init, {x.size(0), x.size(1), weight.size(1) - 1}, "causal_conv1d", "initial_states");
}

}  // namespace

std::vector<at::Tensor> causal_conv1d_forward(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& seq_idx,
                                              const c10::optional<at::Tensor>& initial_states,
                                              bool return_final_states, bool silu) {
  check_conv_inputs(x, weight, bias, seq_idx, initial_states);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), W = weight.size(1);
  at::Tensor out = new_output({B, D, L}, x.options());
  at::Tensor final = return_final_states ? new_output({B, D, W - 1}, x.options()) : at::empty({0}, x.options());
  std::vector<uint8_t> keep, final_keep;
  if (seq_idx) build_masks(seq_idx->data_ptr<int32_t>(), B, L, static_cast<int>(W), keep, final_keep);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_width(W, [&](auto w_c) {
      conv_forward<decltype(w_c)::value, scalar_t>(
          x.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(), bias ? bias->data_ptr<acc_t>() : nullptr,
          seq_idx ? keep.data() : nullptr, seq_idx ? final_keep.data() : nullptr,
          initial_states ? initial_states->data_ptr<scalar_t>() : nullptr, B, D, L, silu, out.data_ptr<scalar_t>(),
          return_final_states ? final.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {out, final};
}

std::vector<at::Tensor> causal_conv1d_backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states,
                                               const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias,
                                               const c10::optional<at::Tensor>& seq_idx,
                                               const c10::optional<at::Tensor>& initial_states, bool silu,
                                               bool want_dinitial_states) {
  check_conv_inputs(x, weight, bias, seq_idx, initial_states);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() && dout.is_contiguous(),
              "fastnn causal_conv1d backward: dout must be contiguous, shaped and typed like x");
  TORCH_CHECK(!dfinal_states || (dfinal_states->scalar_type() == x.scalar_type() && dfinal_states->is_contiguous()),
              "fastnn causal_conv1d backward: dfinal_states must be contiguous in x's dtype");
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), W = weight.size(1);
  check_optional_sizes(dfinal_states, {B, D, W - 1}, "causal_conv1d backward", "dfinal_states");
  at::Tensor dx = new_output({B, D, L}, x.options());
  at::Tensor dinit = want_dinitial_states ? new_output({B, D, W - 1}, x.options()) : at::empty({0}, x.options());
  at::Tensor dw = new_output({D, W}, weight.options());
  at::Tensor db = new_output({D}, weight.options());
  std::vector<uint8_t> keep, final_keep;
  if (seq_idx) build_masks(seq_idx->data_ptr<int32_t>(), B, L, static_cast<int>(W), keep, final_keep);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_width(W, [&](auto w_c) {
      conv_backward<decltype(w_c)::value, scalar_t>(
          dout.data_ptr<scalar_t>(), dfinal_states ? dfinal_states->data_ptr<scalar_t>() : nullptr,
          x.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(), bias ? bias->data_ptr<acc_t>() : nullptr,
          seq_idx ? keep.data() : nullptr, seq_idx ? final_keep.data() : nullptr,
          initial_states ? initial_states->data_ptr<scalar_t>() : nullptr, B, D, L, silu, dx.data_ptr<scalar_t>(),
          want_dinitial_states ? dinit.data_ptr<scalar_t>() : nullptr, dw.data_ptr<acc_t>(), db.data_ptr<acc_t>());
    });
  });
  return {dx, dw, db, dinit};
}

namespace {
// One decode step of one channel with a state of exactly W - 1 inputs: the pre-activation
// bias + sum_k w[k] window[k] over window = [state, x] (k ascending), and the state shifted by one.
template <int W, typename scalar_t, typename acc_t>
inline acc_t decode_conv_row(scalar_t* state, scalar_t x, const acc_t* w, acc_t bias) {
  acc_t win[W];
  for (int i = 0; i < W - 1; ++i) win[i] = static_cast<acc_t>(state[i]);
  win[W - 1] = static_cast<acc_t>(x);
  const acc_t s = window_sum<W>(win, w, bias);
  for (int i = 0; i < W - 1; ++i) state[i] = static_cast<scalar_t>(win[i + 1]);
  return s;
}

// v = v * sigmoid(v) over n values: 16 floats at a time with AVX-512 (a scalar-shaped loop with a
// division per value did not vectorise), scalar for double.
inline void silu_inplace(float* v, int64_t n) {
#if defined(__AVX512F__)
  map16(v, n, [](VF x) { return x * vsigmoid(x); });
#else
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] * sigmoid_t(v[i]);
#endif
}
inline void silu_inplace(double* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] * sigmoid_t(v[i]);
}
}  // namespace

at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, bool silu,
                                const c10::optional<at::Tensor>& conv_state_indices,
                                const c10::optional<at::Tensor>& cache_seqlens) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "fastnn causal_conv1d_update: contiguous CPU (B, D, T) x expected");
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type() &&
                  conv_state.size(1) == x.size(1),
              "fastnn causal_conv1d_update: conv_state must be a contiguous (B_cache, D, S) tensor in x's dtype");
  const auto ct = compute_type(x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == ct && weight.is_contiguous() && weight.dim() == 2,
              "fastnn causal_conv1d_update: weight must be contiguous (D, W) in the compute dtype");
  TORCH_CHECK(!bias || (bias->scalar_type() == ct && bias->is_contiguous()),
              "fastnn causal_conv1d_update: bias must be contiguous in the compute dtype");
  TORCH_CHECK(!conv_state_indices || (conv_state_indices->scalar_type() == at::kInt && conv_state_indices->is_contiguous()),
              "fastnn causal_conv1d_update: conv_state_indices must be contiguous int32");
  TORCH_CHECK(!cache_seqlens || (cache_seqlens->scalar_type() == at::kInt && cache_seqlens->is_contiguous() &&
                                 cache_seqlens->numel() == x.size(0)),
              "fastnn causal_conv1d_update: cache_seqlens must be contiguous int32 of size B");
  const int64_t B = x.size(0), D = x.size(1), T = x.size(2), S = conv_state.size(2), W = weight.size(1);
  TORCH_CHECK(weight.size(0) == D && W >= 2 && W <= 4, "fastnn causal_conv1d_update: weight must be (", D,
              ", W) with W in 2..4, got ", weight.sizes());
  check_optional_sizes(bias, {D}, "causal_conv1d_update", "bias");
  TORCH_CHECK(S >= W - 1, "fastnn causal_conv1d_update: state length must be >= W - 1");
  check_cache_indices(conv_state_indices, B, conv_state.size(0), "causal_conv1d_update", "conv_state_indices");
  at::Tensor out = new_output({B, D, T}, x.options());
  const int32_t* idx = conv_state_indices ? conv_state_indices->data_ptr<int32_t>() : nullptr;
  const int32_t* seqlens = cache_seqlens ? cache_seqlens->data_ptr<int32_t>() : nullptr;
  if (seqlens != nullptr)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(seqlens[b] >= 0, "fastnn causal_conv1d_update: cache_seqlens must be >= 0, got ", seqlens[b]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* st = conv_state.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* wp = weight.data_ptr<acc_t>();
    const acc_t* bp = bias ? bias->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, B * D, row_grain(S + T), [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> cat(S + T);
      // pre-activations of rows lo..hi (out's layout), the silu applied afterwards in one vector pass
      std::vector<acc_t> pre((hi - lo) * T);
      // b and d by counters: two integer divisions per row cost more than the row's convolution
      int64_t b = lo / D, d = lo % D;
      for (int64_t row = lo; row < hi; ++row, d = d + 1 == D ? (++b, 0) : d + 1) {
        const int64_t srow = idx ? idx[b] : b;
        scalar_t* sr = st + (srow * D + d) * S;
        const scalar_t* xr = xp + row * T;
        const acc_t* wd = wp + d * W;
        if (seqlens == nullptr && T == 1 && S == W - 1 && W >= 2 && W <= 4) {
          // one new step into a state of exactly W - 1 (the decode case): unrolled per width, the same
          // sums in the same order as the general loop below
          const acc_t b0 = bp ? bp[d] : acc_t(0);
          switch (W) {
            case 2: pre[row - lo] = decode_conv_row<2>(sr, xr[0], wd, b0); break;
            case 3: pre[row - lo] = decode_conv_row<3>(sr, xr[0], wd, b0); break;
            default: pre[row - lo] = decode_conv_row<4>(sr, xr[0], wd, b0); break;
          }
        } else if (seqlens == nullptr) {
          // the window [state, new steps] is read whole before the state row is overwritten
          for (int64_t i = 0; i < S; ++i) cat[i] = static_cast<acc_t>(sr[i]);
          for (int64_t t = 0; t < T; ++t) cat[S + t] = static_cast<acc_t>(xr[t]);
          for (int64_t t = 0; t < T; ++t) {
            acc_t s = bp ? bp[d] : acc_t(0);
            for (int64_t k = 0; k < W; ++k) s += wd[k] * cat[S - (W - 1) + t + k];
            pre[(row - lo) * T + t] = s;
          }
          for (int64_t i = 0; i < S; ++i) sr[i] = static_cast<scalar_t>(cat[i + T]);
        } else {
          // circular buffer: the W - 1 inputs before position p = cache_seqlens[b] sit at (p - W + 1 .. p - 1)
          // mod S; the window is [those, new steps], and the new steps go to p .. p + T - 1 (mod S)
          const int64_t p = seqlens[b] % S;
          for (int64_t j = 0; j < W - 1; ++j) cat[j] = static_cast<acc_t>(sr[(p - (W - 1) + j + S) % S]);
          for (int64_t t = 0; t < T; ++t) cat[W - 1 + t] = static_cast<acc_t>(xr[t]);
          for (int64_t t = 0; t < T; ++t) {
            acc_t s = bp ? bp[d] : acc_t(0);
            for (int64_t k = 0; k < W; ++k) s += wd[k] * cat[t + k];
            pre[(row - lo) * T + t] = s;
          }
          for (int64_t t = T > S ? T - S : 0; t < T; ++t) sr[(p + t) % S] = xr[t];
        }
      }
      const int64_t n = (hi - lo) * T;
      if (silu) silu_inplace(pre.data(), n);
      for (int64_t i = 0; i < n; ++i) op[lo * T + i] = static_cast<scalar_t>(pre[i]);
    });
  });
  return out;
}

namespace {

#if defined(__AVX512F__)
// One row's N states (N a multiple of 16) in registers: state = exp(A dt) state + (B dt) x, returns
// sum_n state C. The autovectorised generic loop spent ~9 cycles a state (a scalar-shaped exp, lane sums
// through memory). Same grouping as the reference, and the same halving tree over the 16 lanes as the
// generic loop (_mm512_reduce_add_ps adds lane j + 8, then j + 4, j + 2, j + 1).
inline float ssu_row_f32(float* s, const float* a, const float* bv, const float* cv, float dtv, float xv,
                         int64_t N) {
  VF lanes = splat<VF>(0.0f);
  const VF dtv_v = splat<VF>(dtv), xv_v = splat<VF>(xv);
  for (int64_t n = 0; n < N; n += kLanes) {
    VF sv, av, bn, cn;
    std::memcpy(&sv, s + n, sizeof sv);
    std::memcpy(&av, a + n, sizeof av);
    std::memcpy(&bn, bv + n, sizeof bn);
    std::memcpy(&cn, cv + n, sizeof cn);
    const VF v = sv * fastnn::cpu::vexp(av * dtv_v) + (bn * dtv_v) * xv_v;
    std::memcpy(s + n, &v, sizeof v);
    lanes += v * cn;
  }
  return _mm512_reduce_add_ps((__m512)lanes);
}
#endif

template <typename scalar_t, typename state_t>
void ssu_kernel(state_t* state, const scalar_t* x, const scalar_t* dt, const at::opmath_type<state_t>* A,
                const scalar_t* Bm, const scalar_t* Cm, const at::opmath_type<state_t>* Dp, const scalar_t* z,
                const at::opmath_type<state_t>* dt_bias, bool softplus, const int32_t* idx, int64_t Bsz, int64_t H,
                int64_t P, int64_t N, int64_t G, scalar_t* out) {
  using acc_t = at::opmath_type<state_t>;
  const int64_t heads_per_group = H / G, HP = H * P;
  at::parallel_for(0, Bsz * HP, std::max<int64_t>(1, 8192 / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
    const int64_t n_rows = hi - lo;
    std::vector<acc_t> bv(N), cv(N), dts(n_rows), xs(n_rows), gate(z ? n_rows : 0);
    // Per-row scalars first, in loops across rows (contiguous (h, p) runs within one batch row), so dt's
    // softplus and z's silu vectorise: done row by row they cost more than the N-wide state update.
    for (int64_t r0 = lo; r0 < hi;) {
      const int64_t b = r0 / HP, hp0 = r0 % HP, r1 = std::min(hi, (b + 1) * HP);
      for (int64_t r = r0; r < r1; ++r) {
        acc_t v = static_cast<acc_t>(dt[r]);
        if (dt_bias) v += dt_bias[hp0 + (r - r0)];
        dts[r - lo] = v;
        xs[r - lo] = static_cast<acc_t>(x[r]);
      }
      r0 = r1;
    }
    if (z) {
      for (int64_t i = 0; i < n_rows; ++i) gate[i] = static_cast<acc_t>(z[lo + i]);
      silu_inplace(gate.data(), n_rows);
    }
    if (softplus) {
#if defined(__AVX512F__)
      if constexpr (std::is_same<acc_t, float>::value) {
        // explicit vector code: the scalar-shaped softplus did not vectorise (a division per row)
        map16(dts.data(), n_rows, [](VF v) { return vsoftplus(v, ssm::kSoftplusThreshold); });
      } else
#endif
      {
        for (int64_t i = 0; i < n_rows; ++i) dts[i] = softplus_t(dts[i]);
      }
    }
    int64_t loaded = -1;  // the (b, group) row held in bv / cv
    // rows walk (b, h, p) with counters: three integer divisions per row cost as much as the update
    int64_t b = lo / HP, h = (lo % HP) / P, p = lo % P;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t hp = h * P + p;
      const int64_t bg = b * G + h / heads_per_group;
      if (bg != loaded) {  // consecutive rows share B and C: widen them once
        for (int64_t n = 0; n < N; ++n) {
          bv[n] = static_cast<acc_t>(Bm[bg * N + n]);
          cv[n] = static_cast<acc_t>(Cm[bg * N + n]);
        }
        loaded = bg;
      }
      const int64_t srow = idx ? idx[b] : b;
      state_t* __restrict s = state + (srow * HP + hp) * N;
      const acc_t* __restrict a = A + hp * N;
      const acc_t dtv = dts[r - lo], xv = xs[r - lo];
      acc_t y = 0;
      bool done = false;
#if defined(__AVX512F__)
      if constexpr (std::is_same<state_t, float>::value) {
        if (N % kLanes == 0) {
          y = ssu_row_f32(s, a, bv.data(), cv.data(), dtv, xv, N);
          done = true;
        }
      }
#endif
      if (!done) {
        acc_t part[kLanes] = {};
        int64_t n = 0;
        for (; n + kLanes <= N; n += kLanes) {
          for (int j = 0; j < kLanes; ++j) {
            // exp(A dt) s + (B dt) x, grouped as the reference groups it
            const acc_t v = static_cast<acc_t>(s[n + j]) * exp_t(a[n + j] * dtv) + (bv[n + j] * dtv) * xv;
            s[n + j] = static_cast<state_t>(v);
            part[j] += v * cv[n + j];
          }
        }
        for (; n < N; ++n) {
          const acc_t v = static_cast<acc_t>(s[n]) * exp_t(a[n] * dtv) + (bv[n] * dtv) * xv;
          s[n] = static_cast<state_t>(v);
          part[n % kLanes] += v * cv[n];
        }
        // lanes summed as a fixed tree (vector halving) rather than a 16-long dependent chain
        for (int w = kLanes / 2; w >= 1; w /= 2) {
          for (int j = 0; j < w; ++j) part[j] += part[j + w];
        }
        y = part[0];
      }
      if (Dp) y += xv * Dp[hp];
      if (z) y *= gate[r - lo];
      out[r] = static_cast<scalar_t>(y);
      if (++p == P) {
        p = 0;
        if (++h == H) {
          h = 0;
          ++b;
        }
      }
    }
  });
}

}  // namespace

at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                  const c10::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const c10::optional<at::Tensor>& state_batch_indices) {
  if (state.dim() == 3 && x.dim() == 2) {  // mamba 1's form is the head form with H = 1 (views, no copies)
    auto at_dim = [](const c10::optional<at::Tensor>& t, int64_t dim) {
      return t ? c10::optional<at::Tensor>(t->unsqueeze(dim)) : c10::nullopt;
    };
    return selective_state_update(state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0),
                                  B.unsqueeze(1), C.unsqueeze(1), at_dim(D, 0), at_dim(z, 1), at_dim(dt_bias, 0),
                                  dt_softplus, state_batch_indices)
        .squeeze(1);
  }
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && state.dim() == 4,
              "fastnn selective_state_update: the head form (state (B_cache, H, P, N), x (B, H, P)) or mamba 1's "
              "(state (B_cache, D, N), x (B, D)) on CPU expected");
  for (const at::Tensor* t : {&state, &x, &dt, &A, &B, &C}) {
    TORCH_CHECK(t->is_contiguous(), "fastnn selective_state_update: contiguous inputs expected");
  }
  const auto xt = x.scalar_type(), st = state.scalar_type();
  TORCH_CHECK(st == xt || st == at::kFloat, "fastnn selective_state_update: state must have x's dtype or float32");
  TORCH_CHECK((xt == at::kDouble) == (st == at::kDouble), "fastnn selective_state_update: float64 x needs a float64 state");
  const auto ct = compute_type(st);
  TORCH_CHECK(A.scalar_type() == ct && (!D || D->scalar_type() == ct) && (!dt_bias || dt_bias->scalar_type() == ct),
              "fastnn selective_state_update: A, D, dt_bias must be in the compute dtype");
  TORCH_CHECK(dt.scalar_type() == xt && B.scalar_type() == xt && C.scalar_type() == xt && (!z || z->scalar_type() == xt),
              "fastnn selective_state_update: dt, B, C, z must have x's dtype");
  TORCH_CHECK(!state_batch_indices || (state_batch_indices->scalar_type() == at::kInt &&
                                       state_batch_indices->is_contiguous()),
              "fastnn selective_state_update: state_batch_indices must be contiguous int32");
  const int64_t Bsz = x.size(0), H = x.size(1), P = x.size(2), N = state.size(3), G = B.size(1);
  TORCH_CHECK(G > 0 && H % G == 0, "fastnn selective_state_update: heads must be a multiple of groups");
  const char* fn = "selective_state_update";
  check_sizes(state, {state.size(0), H, P, N}, fn, "state");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"dt", &dt}, {"z", z ? &*z : nullptr}})
    if (t != nullptr) check_sizes(*t, {Bsz, H, P}, fn, name);
  check_sizes(A, {H, P, N}, fn, "A");
  check_sizes(B, {Bsz, G, N}, fn, "B");
  check_sizes(C, {Bsz, G, N}, fn, "C");
  check_optional_sizes(D, {H, P}, fn, "D");
  check_optional_sizes(dt_bias, {H, P}, fn, "dt_bias");
  for (const auto* t : {&D, &z, &dt_bias})
    TORCH_CHECK(!*t || (*t)->is_contiguous(), "fastnn selective_state_update: contiguous inputs expected");
  check_cache_indices(state_batch_indices, Bsz, state.size(0), fn, "state_batch_indices");
  at::Tensor out = new_output({Bsz, H, P}, x.options());
  const int32_t* idx = state_batch_indices ? state_batch_indices->data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "selective_state_update_cpu", [&] {
    auto run = [&](auto* state_ptr) {
      using state_t = std::remove_pointer_t<decltype(state_ptr)>;
      using acc_t = at::opmath_type<state_t>;
      ssu_kernel<scalar_t, state_t>(state_ptr, x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<acc_t>(),
                                    B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), D ? D->data_ptr<acc_t>() : nullptr,
                                    z ? z->data_ptr<scalar_t>() : nullptr, dt_bias ? dt_bias->data_ptr<acc_t>() : nullptr,
                                    dt_softplus, idx, Bsz, H, P, N, G, out.data_ptr<scalar_t>());
    };
    if (st == xt) {
      run(state.data_ptr<scalar_t>());
    } else {
      run(state.data_ptr<float>());
    }
  });
  return out;
}

}  // namespace fastnn::cpu
