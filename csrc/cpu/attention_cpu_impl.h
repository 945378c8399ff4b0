// Internal to the CPU attention kernels (attention_fwd_cpu.cpp, attention_bwd_cpu.cpp): problem
// description, GEMM wrappers, operand packing and the vectorised row kernels of the online softmax.
//
// Compute types. Every GEMM reads its A operand row-major and its B operand from a packed block:
//   ct = float          fp32 inputs, and fp16 / bf16 inputs when AMX is unavailable (converted);
//                       B row-major; GEMM = at::native::cpublas::brgemm (oneDNN ukernel or MKL).
//   ct = at::BFloat16   bf16 inputs on CPUs whose oneDNN brgemm packs bf16 (AMX), when D and Dv are
//                       multiples of 16; B in VNNI-2 slabs of 64 columns (the layout cpublas::pack
//                       writes, checked once at run time); bf16 x bf16 -> fp32 accumulation.
//   ct = double         fp64 inputs (gradcheck); B row-major; plain loops.
// Softmax statistics, accumulators and S / dP tiles are fp32 (fp64 for fp64).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/alloc.h"
#include "../common/attention_math.h"
#include "brgemm.h"
#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FASTNN_ATTN_AVX512 1
#endif

namespace fastnn {
namespace cpu {
namespace attn_detail {

using bf16 = at::BFloat16;

// ---------------------------------------------------------------------------------------------------
// Problem description (host side, shared by forward and backward)

struct Span {       // one sequence
  int64_t bi;       // batch index into the 4-D views
  int64_t qs, lq;   // query rows [qs, qs + lq) along dim 1
  int64_t ks, lk;   // keys [ks, ks + lk) along dim 1 (lk = seqused_k when given)
  int64_t kspan;    // key rows owned by this sequence (>= lk; rows past lk get zero gradients)
  int64_t tq;       // global index of the first query (dropout row counter)
};

enum BiasKind { kNoBias = 0, kBiasF32, kBiasF64, kBiasHalf, kBiasBF16, kBiasBool };

struct Problem {
  int64_t B = 0, Lq = 0, H = 0, D = 0, Lk = 0, Hkv = 0, Dv = 0, group = 1;
  int64_t qs0 = 0, qs1 = 0, qs2 = 0;  // q strides (B, L, H)
  int64_t ks0 = 0, ks1 = 0, ks2 = 0;
  int64_t vs0 = 0, vs1 = 0, vs2 = 0;
  bool varlen = false;
  std::vector<Span> spans;
  int64_t total_q = 0;
  BiasKind bias_kind = kNoBias;
  const void* bias = nullptr;
  int64_t bs0 = 0, bs1 = 0, bs2 = 0, bs3 = 0;
  double scale = 1.0, softcap = 0.0;
  int64_t wl = -1, wr = -1;
  bool bottom_right = true;
  double dropout_p = 0.0;
  uint32_t seed_lo = 0, seed_hi = 0, threshold = 0;
  bool dropout() const { return dropout_p > 0.0; }
  int64_t off(const Span& s) const { return bottom_right ? s.lk - s.lq : 0; }
  // Visible key range of local query row i, clipped to [0, lk).
  void range(const Span& s, int64_t i, int64_t* lo, int64_t* hi) const {
    fastnn::attn::visible_range(i, s.lk, off(s), wl, wr, lo, hi);
  }
};

// Builds the Problem from the 4-D views and the optional arguments; checks the basics.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
                     const c10::optional<at::Tensor>& seqused_k, const c10::optional<at::Tensor>& bias, double scale,
                     double softcap, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                     int64_t seed);

// Zero the rows of a (B, L, H, W) contiguous output that no sequence covers (varlen gaps).
void zero_uncovered_rows(at::Tensor& t, const std::vector<std::pair<int64_t, int64_t>>& covered);

// Whether the bf16 AMX path is usable (oneDNN packs bf16 and its packed layout is the VNNI-2 we write).
bool bf16_amx_available();
// Whether brgemm takes a VNNI-2 B wider than one 64-column slab (ldb > N, a column offset), checked once
// on a small product: oneDNN's own packing stops at 64 columns, its kernels need not.
bool bf16_flat_panels_ok();

// ---------------------------------------------------------------------------------------------------
// Types

template <typename ct> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename ct> using acc_of = typename AccOf<ct>::type;
template <typename ct> constexpr bool is_vnni() { return std::is_same<ct, bf16>::value; }

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// Element -> accumulation type (fp64 stays fp64, the rest go through float).
template <typename A, typename T> inline A to_acc(T x) {
  using mid = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  return static_cast<A>(static_cast<mid>(x));
}
template <typename To, typename From> inline To cvt(From x) { return static_cast<To>(x); }

// ---------------------------------------------------------------------------------------------------
// GEMM: C[M x N] (+)= A[M x K] (row-major, lda) * B[K x N] (a packed block, see pack_b)
//
// The fp32 GEMM (brgemm, or loops without it) and gemm_loops are brgemm.h's.
using fastnn::cpu::gemm;
using fastnn::cpu::gemm_loops;

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                 double* C, int64_t ldc, bool add, int64_t koff = 0) {
  gemm_loops(M, N, K, A, lda, B + koff * ldb, ldb, C, ldc, add);
}

// B in VNNI-2 slabs: columns [64 s, 64 s + w) form slab s at offset 64 s ldb (ldb = the packed block's row
// count), element (k, n) of the slab at ((k / 2) w + n) 2 + k % 2. The product uses rows [koff, koff + K)
// of the packed block (koff, K even); every w a multiple of 16.
inline void gemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t ldb,
                 float* C, int64_t ldc, bool add, int64_t koff = 0) {
  if (M <= 0 || N <= 0) return;
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t w = std::min<int64_t>(64, N - n0);
#if FASTNN_HAVE_BRGEMM
    at::native::cpublas::brgemm(M, w, K, lda, w, ldc, add, A, B + n0 * ldb + koff * w, C + n0, /*is_vnni=*/true);
#else
    TORCH_CHECK(false, "attention_cpu: the bf16 VNNI path needs torch's brgemm");
#endif
  }
}

// B one flat VNNI-2 panel of ldb columns, element (k, n) at ((k / 2) ldb + n) 2 + k % 2 (pack_b with
// panel = ldb); the product uses its columns [0, N) from B on (offset B by 2 n0 for column n0): one brgemm
// call where the 64-column slabs take N / 64. Usable when bf16_flat_panels_ok().
inline void gemm_flat(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t ldb,
                      float* C, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
#if FASTNN_HAVE_BRGEMM
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "attention_cpu: the bf16 VNNI path needs torch's brgemm");
#endif
}

template <typename ct> inline void gemm_release() {
#if FASTNN_HAVE_BRGEMM
  if (is_vnni<ct>()) at::native::cpublas::brgemm_release(true);
#endif
}

// Pack B[k][n] = get(k, n) (rows k < K, columns n < N) into dst (K * N elements). VNNI: in panels of
// `panel` columns (64: the slabs gemm() takes; N: one flat panel for gemm_flat()).
template <typename ct, typename Get> inline void pack_b(int64_t K, int64_t N, ct* dst, Get get, int64_t panel = 64) {
  if (is_vnni<ct>()) {
    for (int64_t n0 = 0; n0 < N; n0 += panel) {
      const int64_t w = std::min<int64_t>(panel, N - n0);
      ct* d = dst + n0 * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < w; ++n) d[((k >> 1) * w + n) * 2 + (k & 1)] = cvt<ct>(get(k, n0 + n));
    }
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) dst[k * N + n] = cvt<ct>(get(k, n));
  }
}

// Row-major bf16 rows (nv valid rows of N, row stride ld; rows nv..K-1 read as zero) -> VNNI-2 slabs (K even).
void rows_to_vnni(const bf16* src, int64_t ld, int64_t nv, int64_t K, int64_t N, bf16* dst);
inline void rowmajor_to_vnni(const bf16* src, int64_t K, int64_t N, bf16* dst) { rows_to_vnni(src, N, K, K, N, dst); }

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols (16 x 16 tiles; whole tiles of 4-byte
// elements go through registers).
template <typename T>
inline void transpose_tiled(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst, int64_t dst_ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t r1 = std::min(rows, r0 + 16);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t c1 = std::min(cols, c0 + 16);
#ifdef FASTNN_ATTN_AVX512
      if constexpr (sizeof(T) == 4) {
        if (r1 - r0 == 16 && c1 - c0 == 16) {
          __m512 t[16];
          for (int64_t i = 0; i < 16; ++i) t[i] = _mm512_loadu_ps(reinterpret_cast<const float*>(src + (r0 + i) * src_ld + c0));
          fastnn::cpu::transpose16(t);
          for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (c0 + i) * dst_ld + r0), t[i]);
          continue;
        }
      }
#endif
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
    }
  }
}

template <typename T> inline bool aligned_pairs(const T* p, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(p) % 4 == 0) && ld % 2 == 0;
}

// B block = X^T (C x N), X = rows [0, nv) of a strided (rows x C) matrix, columns nv..N-1 zero.
// N is a multiple of 64 and of `panel` (see pack_b) on the VNNI path.
template <typename ct, typename scalar_t>
inline void pack_transposed(const scalar_t* src, int64_t ld, int64_t nv, int64_t C, int64_t N, ct* dst,
                            int64_t panel = 64) {
  using acc_t = acc_of<ct>;
  if (std::is_same<ct, scalar_t>::value && !is_vnni<ct>()) {
    const ct* s = reinterpret_cast<const ct*>(src);
    transpose_tiled(s, ld, nv, C, dst, N);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = nv; j < N; ++j) dst[c * N + j] = ct(0);
    return;
  }
  if (is_vnni<ct>() && std::is_same<scalar_t, bf16>::value && C % 2 == 0 && aligned_pairs(src, ld)) {
    // (d, j) pairs of a key's consecutive dims are one 32-bit word: a 32-bit transpose per 64-key slab.
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    const int64_t C2 = C / 2, ld2 = ld / 2;
    for (int64_t j0 = 0; j0 < N; j0 += 64) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(64, nv - j0));
      // keys [j0, j0 + 64): columns j0 % panel.. of panel j0 / panel, rows `panel` words apart
      uint32_t* ds = d + (j0 / panel) * panel * C2 + j0 % panel;
      transpose_tiled(s + j0 * ld2, ld2, n, C2, ds, panel);
      for (int64_t c = 0; c < C2; ++c)
        for (int64_t j = n; j < 64; ++j) ds[c * panel + j] = 0u;
    }
    return;
  }
  pack_b<ct>(C, N, dst, [&](int64_t c, int64_t j) { return j < nv ? to_acc<acc_t>(src[j * ld + c]) : acc_t(0); },
             panel);
}

// B block = X (K x C), X = rows [0, nv) of a strided (rows x C) matrix, rows nv..K-1 zero.
template <typename ct, typename scalar_t>
inline void pack_rows(const scalar_t* src, int64_t ld, int64_t nv, int64_t K, int64_t C, ct* dst) {
  using acc_t = acc_of<ct>;
  if (is_vnni<ct>() && std::is_same<scalar_t, bf16>::value) {
    rows_to_vnni(reinterpret_cast<const bf16*>(src), ld, nv, K, C, reinterpret_cast<bf16*>(dst));
    return;
  }
  if (std::is_same<ct, scalar_t>::value && !is_vnni<ct>()) {
    const ct* s = reinterpret_cast<const ct*>(src);
    for (int64_t j = 0; j < K; ++j) {
      if (j < nv) std::memcpy(static_cast<void*>(dst + j * C), s + j * ld, sizeof(ct) * C);
      else std::memset(static_cast<void*>(dst + j * C), 0, sizeof(ct) * C);
    }
    return;
  }
  pack_b<ct>(K, C, dst, [&](int64_t j, int64_t c) { return j < nv ? to_acc<acc_t>(src[j * ld + c]) : acc_t(0); });
}

// Uninitialised buffer (every element written before it is read).
template <typename T> inline std::unique_ptr<T[]> raw_buffer(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// ---------------------------------------------------------------------------------------------------
// Vector row kernels (fp32 with AVX-512 when available; scalar otherwise and for fp64)

// |row max| past which the forward forms the exp's argument as (s * sc - m) * log2e, not one FMA: below it
// the fused form's error in the exponent is under 2^-15 (m * log2e rounded, and sc * log2e)
constexpr float kExactExpLimit = 256.0f;

#ifdef FASTNN_ATTN_AVX512
// 2^t for t <= 127: f = t - floor(t) in [0, 1) by one vreduceps, 2^f by a polynomial fitted for relative
// error on [0, 1), and scalef(p, t) multiplies by 2^floor(t) itself, so no integer part is formed.
// exp(x) = 2^(x log2 e): callers fold log2 e into their fma. Finite t of any size is exact to the
// polynomial's error (very negative t gives 0); CLAMP first raises t to -150 (where the result is exactly
// 0) so that 2^-inf = 0, for rows that hold masked (-inf) scores.
// Degree 5: 1.7e-7 relative error in fp32 (fp32 paths). Degree 3: 7.5e-5, used where P is rounded to
// bf16 (relative step 3.9e-3) right after.
template <int DEG = 5, bool CLAMP = true> inline __m512 exp2_512(__m512 t) {
  if (CLAMP) t = _mm512_max_ps(t, _mm512_set1_ps(-150.0f));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // t - floor(t)
  __m512 p;
  if (DEG == 3) {
    p = _mm512_set1_ps(0.07802405953407288f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2260667383670807f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958342790603638f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999250769615173f));
  } else {
    p = _mm512_set1_ps(0.0018775730859488249f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.008989337831735611f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0558263324201107f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24015361070632935f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931530833244324f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999403953552f));
  }
  return _mm512_scalef_ps(p, t);
}
constexpr float kLog2e = 1.44269504088896341f;

inline __m512i fmix32_512(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// fp32 -> bf16, round to nearest even (finite inputs), as c10::BFloat16.
inline __m256i cvt_bf16_512(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
#endif
}

template <typename ct> inline void store16(ct* dst, __m512 x, __mmask16 m);
template <> inline void store16<float>(float* dst, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(dst, m, x); }
template <> inline void store16<bf16>(bf16* dst, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(dst, m, cvt_bf16_512(x));
}
template <typename ct> inline void store16(ct* dst, __m512 x);
template <> inline void store16<float>(float* dst, __m512 x) { _mm512_storeu_ps(dst, x); }
template <> inline void store16<bf16>(bf16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), cvt_bf16_512(x));
}
// dst[0, 32) = (lo, hi); bf16 converts both halves with one instruction when the ISA has it.
template <typename ct> inline void store32(ct* dst, __m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<ct, bf16>::value) {
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    return;
  }
#endif
  store16<ct>(dst, lo);
  store16<ct>(dst + 16, hi);
}
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
#endif

// max over x[0, n) (-inf when n == 0)
template <typename T> inline T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
#ifdef FASTNN_ATTN_AVX512
  if constexpr (std::is_same<T, float>::value) {
    const float* xf = reinterpret_cast<const float*>(x);
    __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    if (n >= 64) {
      __m512 v1 = vm, v2 = vm, v3 = vm;  // four chains: max latency, not throughput, bounds one chain
      for (; j + 64 <= n; j += 64) {
        vm = _mm512_max_ps(vm, _mm512_loadu_ps(xf + j));
        v1 = _mm512_max_ps(v1, _mm512_loadu_ps(xf + j + 16));
        v2 = _mm512_max_ps(v2, _mm512_loadu_ps(xf + j + 32));
        v3 = _mm512_max_ps(v3, _mm512_loadu_ps(xf + j + 48));
      }
      vm = _mm512_max_ps(_mm512_max_ps(vm, v1), _mm512_max_ps(v2, v3));
    }
    for (; j + 16 <= n; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(xf + j));
    if (j < n) vm = _mm512_mask_max_ps(vm, tail_mask(n - j), vm, _mm512_maskz_loadu_ps(tail_mask(n - j), xf + j));
    m = static_cast<T>(_mm512_reduce_max_ps(vm));
    j = n;
  }
#endif
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

struct DropRow {  // dropout state for one row of a tile
  bool on = false;
  uint32_t row_hash = 0, threshold = 0;
  const uint32_t* col_hash = nullptr;  // per column of the segment
  double scale = 1.0;                   // 1 / (1 - p)
};

// Forward: dst[j] = e_j (or e_j * keep_j / (1 - p)) with e_j = exp(x[j] * sc + sh); returns sum_j e_j
// (undropped; fp32 sum for fp32, fp64 for fp64). FINITE: every x[j] is finite (no masked -inf scores), so
// the exp needs no clamp.
template <typename T, typename ct, bool FINITE = false>
inline T exp_row(const T* x, int64_t n, T sc, T sh, ct* dst, const DropRow& dr) {
  int64_t j = 0;
  T sum = 0;
#ifdef FASTNN_ATTN_AVX512
  constexpr int kDeg = is_vnni<ct>() ? 3 : 5;
  if constexpr (std::is_same<T, float>::value) {
    const float* xf = reinterpret_cast<const float*>(x);
    const __m512 vsc = _mm512_set1_ps(float(sc) * kLog2e), vsh = _mm512_set1_ps(float(sh) * kLog2e);
    __m512 acc = _mm512_setzero_ps();
    const __m512i rh = _mm512_set1_epi32(static_cast<int>(dr.row_hash));
    const __m512i thr = _mm512_set1_epi32(static_cast<int>(dr.threshold));
    const __m512 dsc = _mm512_set1_ps(static_cast<float>(dr.scale));
    if (!dr.on) {  // main loop: two independent vectors per step, unmasked
      __m512 acc1 = _mm512_setzero_ps();
      for (; j + 32 <= n; j += 32) {
        const __m512 e0 = exp2_512<kDeg, !FINITE>(_mm512_fmadd_ps(_mm512_loadu_ps(xf + j), vsc, vsh));
        const __m512 e1 = exp2_512<kDeg, !FINITE>(_mm512_fmadd_ps(_mm512_loadu_ps(xf + j + 16), vsc, vsh));
        acc = _mm512_add_ps(acc, e0);
        acc1 = _mm512_add_ps(acc1, e1);
        store32<ct>(dst + j, e0, e1);
      }
      acc = _mm512_add_ps(acc, acc1);
    }
    for (; j < n; j += 16) {
      const __mmask16 tm = tail_mask(n - j);
      __m512 e = exp2_512<kDeg, !FINITE>(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tm, xf + j), vsc, vsh));
      e = _mm512_maskz_mov_ps(tm, e);
      acc = _mm512_add_ps(acc, e);
      if (dr.on) {
        __m512i h = fmix32_512(_mm512_add_epi32(rh, _mm512_maskz_loadu_epi32(tm, dr.col_hash + j)));
        __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(h, 8), thr);
        e = _mm512_maskz_mul_ps(keep, e, dsc);
      }
      store16<ct>(dst + j, e, tm);
    }
    return static_cast<T>(_mm512_reduce_add_ps(acc));
  }
#endif
  for (; j < n; ++j) {
    T e = std::exp(x[j] * sc + sh);
    sum += e;
    if (dr.on) e = fastnn::attn::dropout_keep_hashed(dr.row_hash, dr.col_hash[j], dr.threshold) ? e * T(dr.scale) : T(0);
    dst[j] = cvt<ct>(e);
  }
  return sum;
}

// Backward, one row segment: p = exp(s * sc + sh) (sh = -lse), z = keep / (1 - p) (1 without dropout),
// pd = p z, dsp = p (dp z - delta) (the gradient of the biased score; dbias), ds = dsp * dsoft * ds_scale.
template <typename T, typename ct>
inline void bwd_row(const T* s, const T* dp, const T* dsoft, int64_t n, T sc, T sh, T delta, T ds_scale, ct* pd,
                    ct* ds, T* dbias, const DropRow& dr) {
  int64_t j = 0;
#ifdef FASTNN_ATTN_AVX512
  constexpr int kDeg = is_vnni<ct>() ? 3 : 5;
  if constexpr (std::is_same<T, float>::value) {
    const float* sf = reinterpret_cast<const float*>(s);
    const float* dpf = reinterpret_cast<const float*>(dp);
    const float* dsf = reinterpret_cast<const float*>(dsoft);
    float* dbf = reinterpret_cast<float*>(dbias);
    const __m512 vsc = _mm512_set1_ps(float(sc) * kLog2e), vsh = _mm512_set1_ps(float(sh) * kLog2e);
    const __m512 vdelta = _mm512_set1_ps(float(delta)), vdss = _mm512_set1_ps(float(ds_scale));
    const __m512i rh = _mm512_set1_epi32(static_cast<int>(dr.row_hash));
    const __m512i thr = _mm512_set1_epi32(static_cast<int>(dr.threshold));
    const __m512 dsc = _mm512_set1_ps(static_cast<float>(dr.scale));
    for (; j < n; j += 16) {
      const __mmask16 tm = tail_mask(n - j);
      const __m512 p = _mm512_maskz_mov_ps(tm, exp2_512<kDeg>(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tm, sf + j), vsc, vsh)));
      __m512 g = _mm512_maskz_loadu_ps(tm, dpf + j);
      __m512 pdv = p;
      if (dr.on) {
        __m512i h = fmix32_512(_mm512_add_epi32(rh, _mm512_maskz_loadu_epi32(tm, dr.col_hash + j)));
        __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(h, 8), thr);
        pdv = _mm512_maskz_mul_ps(keep, p, dsc);
        g = _mm512_maskz_mul_ps(keep, g, dsc);
      }
      __m512 dsp = _mm512_mul_ps(p, _mm512_sub_ps(g, vdelta));
      if (dbf) _mm512_mask_storeu_ps(dbf + j, tm, dsp);
      if (dsf) dsp = _mm512_mul_ps(dsp, _mm512_maskz_loadu_ps(tm, dsf + j));
      store16<ct>(pd + j, pdv, tm);
      store16<ct>(ds + j, _mm512_mul_ps(dsp, vdss), tm);
    }
    return;
  }
#endif
  for (; j < n; ++j) {
    const T p = std::exp(s[j] * sc + sh);
    T z = 1;
    if (dr.on) z = fastnn::attn::dropout_keep_hashed(dr.row_hash, dr.col_hash[j], dr.threshold) ? T(dr.scale) : T(0);
    T dsp = p * (dp[j] * z - delta);
    if (dbias) dbias[j] = dsp;
    if (dsoft) dsp = dsp * dsoft[j];
    pd[j] = cvt<ct>(p * z);
    ds[j] = cvt<ct>(dsp * ds_scale);
  }
}

template <typename T> inline void scale_row(T* x, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

template <typename ct> inline void zero_row(ct* x, int64_t n) {
  if (n > 0) std::memset(static_cast<void*>(x), 0, sizeof(ct) * n);
}

#ifdef FASTNN_ATTN_AVX512
// One vector holding, in lane r, the horizontal max (ADD = false) or sum (ADD = true) of v[r], r < 16.
// A four-level tree: each level pairs two vectors, gathers their lower and upper partial halves with two
// permutes and combines them, halving the partials per row and doubling the rows per vector (45 vector
// ops for 16 rows, against ~8 dependent shuffles and ops per row reduced one at a time).
template <bool ADD> inline __m512 reduce_rows16(const __m512* v) {
  struct Idx {
    alignas(64) int32_t lo[4][16];
    alignas(64) int32_t hi[4][16];
    Idx() {
      for (int lvl = 0; lvl < 4; ++lvl) {
        const int w_in = 16 >> lvl, w_out = w_in / 2;  // partials per row before / after this level
        for (int o = 0; o < 16; ++o) {
          const int src = o < 8 ? 0 : 16, j = o % 8, row = j / w_out, e = j % w_out;
          lo[lvl][o] = src + row * w_in + e;
          hi[lvl][o] = src + row * w_in + w_out + e;
        }
      }
    }
  };
  static const Idx idx;
  __m512 cur[16];
  for (int r = 0; r < 16; ++r) cur[r] = v[r];
  for (int lvl = 0, n = 16; lvl < 4; ++lvl, n /= 2) {
    const __m512i lo = _mm512_load_si512(idx.lo[lvl]), hi = _mm512_load_si512(idx.hi[lvl]);
    for (int k = 0; k < n / 2; ++k) {
      const __m512 a = _mm512_permutex2var_ps(cur[2 * k], lo, cur[2 * k + 1]);
      const __m512 b = _mm512_permutex2var_ps(cur[2 * k], hi, cur[2 * k + 1]);
      cur[k] = ADD ? _mm512_add_ps(a, b) : _mm512_max_ps(a, b);
    }
  }
  return cur[0];
}

// Online-softmax step for up to 16 rows of one key block (float scores, no transform, no dropout): row r
// (< R) sees columns [c0[r], c1[r]) of S (empty when c0 >= c1); P gets exp(S sc - m_new) there and zeros
// over the rest of [cl, ch). m and l (R entries) are updated; alpha[r] receives the factor by which the
// row's accumulator must be scaled (exactly 1 when its max did not change). The row maxima, the rescale
// factors and the row sums are formed for the 16 rows at once, so no row pays a horizontal reduction or a
// scalar exp of its own.
template <typename ct>
inline void softmax_rows16(int64_t R, const float* S, int64_t lds, const int64_t* c0, const int64_t* c1,
                           int64_t cl, int64_t ch, float sc, float* m, float* l, ct* P, int64_t ldp, float* alpha) {
  constexpr int kDeg = is_vnni<ct>() ? 3 : 5;
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512 vr[16];
  for (int64_t r = 0; r < 16; ++r) {
    __m512 vm = _mm512_set1_ps(ninf);
    if (r < R) {
      const float* x = S + r * lds;
      int64_t j = c0[r];
      if (j + 64 <= c1[r]) {  // four chains: the max's latency, not its throughput, bounds one chain
        __m512 v1 = vm, v2 = vm, v3 = vm;
        for (; j + 64 <= c1[r]; j += 64) {
          vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + j));
          v1 = _mm512_max_ps(v1, _mm512_loadu_ps(x + j + 16));
          v2 = _mm512_max_ps(v2, _mm512_loadu_ps(x + j + 32));
          v3 = _mm512_max_ps(v3, _mm512_loadu_ps(x + j + 48));
        }
        vm = _mm512_max_ps(_mm512_max_ps(vm, v1), _mm512_max_ps(v2, v3));
      }
      for (; j + 16 <= c1[r]; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + j));
      if (j < c1[r]) vm = _mm512_mask_max_ps(vm, tail_mask(c1[r] - j), vm, _mm512_maskz_loadu_ps(tail_mask(c1[r] - j), x + j));
    }
    vr[r] = vm;
  }
  const __mmask16 rows = tail_mask(R);
  const __m512 m_old = _mm512_mask_loadu_ps(_mm512_set1_ps(ninf), rows, m);
  // The running max moves only when a block's max exceeds it by more than kStaleMax, so most blocks
  // after the first rescale nothing; P is then at most e^kStaleMax (~256), harmless in fp32 and bf16.
  constexpr float kStaleMax = 5.545177444479562f;  // 8 ln 2
  const __m512 m_blk = _mm512_max_ps(m_old, _mm512_mul_ps(reduce_rows16<false>(vr), _mm512_set1_ps(sc)));
  const __m512 m_new = _mm512_mask_mov_ps(
      m_old, _mm512_cmp_ps_mask(m_blk, _mm512_add_ps(m_old, _mm512_set1_ps(kStaleMax)), _CMP_GT_OQ), m_blk);
  // alpha = exp(m_old - m_new): 0 when m_old = -inf, exactly 1 when the max is unchanged (also for rows
  // that see nothing, where m_new = m_old).
  const __mmask16 same = _mm512_cmp_ps_mask(m_old, m_new, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(m_new, m_new, _CMP_UNORD_Q);
  __m512 a = exp2_512<5>(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), _mm512_set1_ps(kLog2e)));
  a = _mm512_mask_mov_ps(a, same | _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(ninf), _CMP_EQ_OQ), _mm512_set1_ps(1.0f));
  alignas(64) float mn[16];
  _mm512_store_ps(mn, m_new);
  const __m512 vsc = _mm512_set1_ps(sc * kLog2e);
  for (int64_t r = 0; r < 16; ++r) {
    __m512 acc = _mm512_setzero_ps();
    if (r < R) {
      ct* prow = P + r * ldp;
      if (c0[r] >= c1[r] || mn[r] == ninf) {
        zero_row(prow + cl, ch - cl);
      } else if (std::abs(mn[r]) > kExactExpLimit) {
        // a huge max (an absurd scale or inputs): m * log2e's rounding alone would pass exp's range, so
        // s * sc - m first, rounded like m (exp_row's exact segments likewise), then a clamped exp
        const float* x = S + r * lds;
        const __m512 vs = _mm512_set1_ps(sc), vm = _mm512_set1_ps(mn[r]), vl = _mm512_set1_ps(kLog2e);
        for (int64_t j = c0[r]; j < c1[r]; j += 16) {
          const __mmask16 tm = tail_mask(c1[r] - j);
          const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(tm, x + j), vs), vm), vl);
          const __m512 e = _mm512_maskz_mov_ps(tm, exp2_512<kDeg, true>(t));
          acc = _mm512_add_ps(acc, e);
          store16<ct>(prow + j, e, tm);
        }
        zero_row(prow + cl, c0[r] - cl);
        zero_row(prow + c1[r], ch - c1[r]);
      } else {
        const float* x = S + r * lds;
        const __m512 vsh = _mm512_set1_ps(-mn[r] * kLog2e);
        __m512 acc1 = _mm512_setzero_ps();
        int64_t j = c0[r];
        for (; j + 32 <= c1[r]; j += 32) {
          const __m512 e0 = exp2_512<kDeg, false>(_mm512_fmadd_ps(_mm512_loadu_ps(x + j), vsc, vsh));
          const __m512 e1 = exp2_512<kDeg, false>(_mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), vsc, vsh));
          acc = _mm512_add_ps(acc, e0);
          acc1 = _mm512_add_ps(acc1, e1);
          store32<ct>(prow + j, e0, e1);
        }
        for (; j < c1[r]; j += 16) {
          const __mmask16 tm = tail_mask(c1[r] - j);
          const __m512 e = _mm512_maskz_mov_ps(
              tm, exp2_512<kDeg, false>(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tm, x + j), vsc, vsh)));
          acc = _mm512_add_ps(acc, e);
          store16<ct>(prow + j, e, tm);
        }
        acc = _mm512_add_ps(acc, acc1);
        zero_row(prow + cl, c0[r] - cl);
        zero_row(prow + c1[r], ch - c1[r]);
      }
    }
    vr[r] = acc;
  }
  const __m512 l_new = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rows, l), a, reduce_rows16<true>(vr));
  _mm512_mask_storeu_ps(l, rows, l_new);
  _mm512_mask_storeu_ps(m, rows, m_new);
  _mm512_mask_storeu_ps(alpha, rows, a);
}
#endif

// Score transform for the general case, in place on s[c0, c1) of a row (absolute key index of s[0] is
// k0 within the sequence): s = scale * s; softcap; + float bias; bool mask -> -inf. dsoft (optional)
// receives the softcap derivative 1 - tanh^2.
template <typename T>
inline void transform_row(const Problem& P, const Span& sp, int64_t h, int64_t i, int64_t k0, T* s, int64_t c0,
                          int64_t c1, T* dsoft) {
  const T sc = static_cast<T>(P.scale);
  const T cap = static_cast<T>(P.softcap);
  for (int64_t c = c0; c < c1; ++c) s[c] *= sc;
  if (P.softcap > 0) {
    const T inv = T(1) / cap;
    for (int64_t c = c0; c < c1; ++c) {
      const T t = std::tanh(s[c] * inv);
      s[c] = cap * t;
      if (dsoft) dsoft[c] = T(1) - t * t;
    }
  }
  if (P.bias_kind != kNoBias) {
    const int64_t base = sp.bi * P.bs0 + h * P.bs1 + (sp.qs + i) * P.bs2 + (sp.ks + k0) * P.bs3;
    const int64_t st = P.bs3;
    switch (P.bias_kind) {
      case kBiasF32: {
        const float* b = static_cast<const float*>(P.bias) + base;
        for (int64_t c = c0; c < c1; ++c) s[c] += static_cast<T>(b[c * st]);
        break;
      }
      case kBiasF64: {
        const double* b = static_cast<const double*>(P.bias) + base;
        for (int64_t c = c0; c < c1; ++c) s[c] += static_cast<T>(b[c * st]);
        break;
      }
      case kBiasHalf: {
        const at::Half* b = static_cast<const at::Half*>(P.bias) + base;
        for (int64_t c = c0; c < c1; ++c) s[c] += static_cast<T>(static_cast<float>(b[c * st]));
        break;
      }
      case kBiasBF16: {
        const bf16* b = static_cast<const bf16*>(P.bias) + base;
        for (int64_t c = c0; c < c1; ++c) s[c] += static_cast<T>(static_cast<float>(b[c * st]));
        break;
      }
      case kBiasBool: {
        const bool* b = static_cast<const bool*>(P.bias) + base;
        for (int64_t c = c0; c < c1; ++c)
          if (!b[c * st]) s[c] = -std::numeric_limits<T>::infinity();
        break;
      }
      default:
        break;
    }
  }
}

inline bool needs_transform(const Problem& P) { return P.softcap > 0 || P.bias_kind != kNoBias || !(P.scale > 0); }

// Key-block range [*jb0, *jb1) (blocks of BK) that query rows [r0, r1) of a sequence can see.
inline void key_block_range(const Problem& P, const Span& sp, int64_t r0, int64_t r1, int64_t BK, int64_t* jb0,
                            int64_t* jb1) {
  int64_t lo0, hi0, lo1, hi1;
  P.range(sp, r0, &lo0, &hi0);
  P.range(sp, r1 - 1, &lo1, &hi1);
  const int64_t lo = lo0, hi = hi1;
  if (r1 <= r0 || hi <= lo) {
    *jb0 = *jb1 = 0;
    return;
  }
  *jb0 = lo / BK;
  *jb1 = div_up(hi, BK);
}

}  // namespace attn_detail
}  // namespace cpu
}  // namespace fastnn
