// torch's fp32 brgemm (at::native::cpublas: oneDNN's kernels where torch has them), shared by the CPU
// attention and the recurrent layers' input projection.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>

// The fp32 brgemm and the is_vnni argument exist in the torch releases fastnn supports from their
// CPUBlas.h on (which announces them with CPUBLAS_BRGEMM_F32F32F32); a torch without them still builds:
// fp32 falls back to plain loops (and the attention's bf16 to its converted-fp32 path).
#if defined(CPUBLAS_BRGEMM_F32F32F32)
#define FASTNN_HAVE_BRGEMM 1
#else
#define FASTNN_HAVE_BRGEMM 0
#endif

namespace fastnn {
namespace cpu {

template <typename T>
inline void gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!add) std::fill(c, c + N, T(0));
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = A[i * lda + kk];
      const T* b = B + kk * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// C[M x N] (+)= A[M x K] (row-major, lda) * B (row-major, ld = ldb; rows [koff, koff + K) of it).
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool add, int64_t koff = 0) {
  if (M <= 0 || N <= 0) return;
  B += koff * ldb;
  if (K <= 0) {
    if (!add) for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
#if FASTNN_HAVE_BRGEMM
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
#else
  gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, add);
#endif
}

}  // namespace cpu
}  // namespace fastnn
