// Small float32 products for one-step layers (the LSTM / GRU cells). At B 4, H 64 an at::mm / addmm call
// spends ~6 us in dispatch and BLAS set-up around ~1 us of arithmetic; a cell's forward makes two such calls
// and its backward up to five. These loops run in the calling thread and allocate nothing. They are meant
// for products of at most a few hundred thousand multiply-adds (see kSmallFmas); beyond that the BLAS wins.
#pragma once
#include <cstdint>

#include "cpu/vec_math.h"

namespace fastnn {
namespace cpu {
namespace small_gemm {

// Products up to this many multiply-adds in all take these loops (a cell at B 4, H 64, I 64: 131k).
constexpr int64_t kSmallFmas = int64_t(1) << 18;

inline VF load(const float* p) {
  VF v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, VF v) { __builtin_memcpy(p, &v, sizeof v); }

inline float hsum(VF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// C[m][n] = bias_a[n] + bias_b[n] + sum_k A[m][k] W[n][k] (either bias may be null): A (M x K) and W (N x K)
// row-major with row strides lda / ldw, so W is used as it is stored (a layer's weight, no transpose).
inline void nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
               const float* bias_a, const float* bias_b, float* C, int64_t ldc) {
  constexpr int64_t R = 4;  // rows of A per pass over a row of W
  for (int64_t n = 0; n < N; ++n) {
    const float* w = W + n * ldw;
    const float bias = (bias_a ? bias_a[n] : 0.f) + (bias_b ? bias_b[n] : 0.f);
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int64_t rows = M - m0 < R ? M - m0 : R;
      VF acc[R] = {};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const VF wv = load(w + k);
        for (int64_t r = 0; r < rows; ++r) acc[r] = fmadd(load(A + (m0 + r) * lda + k), wv, acc[r]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* a = A + (m0 + r) * lda;
        float s = hsum(acc[r]);
        for (int64_t kk = k; kk < K; ++kk) s += a[kk] * w[kk];
        C[(m0 + r) * ldc + n] = bias + s;
      }
    }
  }
}

// C[m][k] (+)= sum_n G[m][n] W[n][k]: G (M x N), W (N x K), C (M x K), row-major with the given strides.
inline void nn(int64_t M, int64_t N, int64_t K, const float* G, int64_t ldg, const float* W, int64_t ldw, float* C,
               int64_t ldc, bool add) {
  constexpr int64_t R = 4;
  for (int64_t m0 = 0; m0 < M; m0 += R) {
    const int64_t rows = M - m0 < R ? M - m0 : R;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      VF acc[R] = {};
      for (int64_t n = 0; n < N; ++n) {
        const VF wv = load(W + n * ldw + k);
        for (int64_t r = 0; r < rows; ++r) acc[r] = fmadd(splat<VF>(G[(m0 + r) * ldg + n]), wv, acc[r]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* c = C + (m0 + r) * ldc + k;
        store(c, add ? load(c) + acc[r] : acc[r]);
      }
    }
    for (; k < K; ++k) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* g = G + (m0 + r) * ldg;
        float s = 0.f;
        for (int64_t n = 0; n < N; ++n) s += g[n] * W[n * ldw + k];
        float* c = C + (m0 + r) * ldc + k;
        *c = add ? *c + s : s;
      }
    }
  }
}

// C[n][k] = sum_m G[m][n] A[m][k]: the weight gradient G^T A, G (M x N), A (M x K), C (N x K).
inline void tn(int64_t M, int64_t N, int64_t K, const float* G, int64_t ldg, const float* A, int64_t lda, float* C,
               int64_t ldc) {
  for (int64_t n = 0; n < N; ++n) {
    float* c = C + n * ldc;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      VF acc = {};
      for (int64_t m = 0; m < M; ++m) acc = fmadd(splat<VF>(G[m * ldg + n]), load(A + m * lda + k), acc);
      store(c + k, acc);
    }
    for (; k < K; ++k) {
      float s = 0.f;
      for (int64_t m = 0; m < M; ++m) s += G[m * ldg + n] * A[m * lda + k];
      c[k] = s;
    }
  }
}

// out[n] = sum_m G[m][n]: a bias gradient.
inline void column_sums(int64_t M, int64_t N, const float* G, int64_t ldg, float* out) {
  for (int64_t n = 0; n < N; ++n) out[n] = 0.f;
  for (int64_t m = 0; m < M; ++m) {
    const float* g = G + m * ldg;
    for (int64_t n = 0; n < N; ++n) out[n] += g[n];
  }
}

}  // namespace small_gemm
}  // namespace cpu
}  // namespace fastnn
