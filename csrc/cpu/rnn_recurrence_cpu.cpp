// Fused float32 recurrence of an LSTM / GRU layer (see rnn_recurrence_cpu.h).
//
// W_hh is packed once per call: for each block of 16 units, K x (G 16) floats, the G gates of the 16 units
// side by side, so one k step of a row is G vector loads of W and one broadcast of h. A thread owns a
// contiguous range of blocks and packs them itself. Per step and block, the live rows go through a
// register-blocked microkernel (R rows x G accumulators) and the gate math runs on the accumulators.
// The forward walks all of K at once when a block's W (K G 16 floats) is at most a quarter of L2: the row
// blocks of the step then read it from L2 (on the AMD EPYC, 4-10% faster than chunks of 128 k kept in L1,
// which W and h together overflow, plus their partial sums). Larger blocks, and the backward, walk K in
// chunks; each chunk's partial sums wait in a small per-thread buffer.
//
// Memory: at H = 512 a thread's share of W (2 MB on 2 threads) is its whole L2, so W comes largely from
// L3 every step. The first row blocks of each chunk prefetch the next chunk into L2, spread over their
// k loops (without it: ~12% slower at B = 32, a third slower in a microbenchmark streaming W from L3);
// every other step walks the blocks in reverse so that it starts on what is still in L2; the input part
// of the gates is prefetched a few chunks before the gate math reads it.
//
// The backward's recurrence runs on the same machinery with another epilogue (BackwardStep): blocks are
// groups of NB x 16 columns of W_hh, the dot products run over the G H gate gradients of the later step,
// and the cell backward runs on the accumulators. Iterations with enough rows (kMinRowsPerThread) split the
// batch rows between the threads instead of the groups, and run without a barrier between them.
#include "cpu/rnn_recurrence_cpu.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <c10/util/Exception.h>

#include "common/rnn_math.h"
#include "cpu/brgemm.h"
#include "cpu/rnn_steps.h"

namespace fastnn {
namespace cpu {

using bf16 = c10::BFloat16;

#if defined(__AVX512F__)
namespace {

#define FASTNN_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int kU = 16;        // units per block: one zmm
constexpr int64_t kKc = 128;  // k per chunk of the backward (64..256 measured the same at H = 512)
// The forward's whole-K limit: a block's W up to this many bytes is walked in one piece, larger ones in
// chunks of kForwardKc (LSTM H = 2048, interleaved: 512 k 177 ms, 1024 k 182, 2048 k 191, 128 k 189).
constexpr int64_t kForwardWholeKBytes = 256 * 1024;
constexpr int64_t kForwardKc = 512;
// Below this many flops per step and thread the barrier costs more than the second thread saves
// (H = 20, B = 4, 26 kflop: 1.0 us a step on one thread, 1.4 on two; H = 64, B = 8, 262 kflop: 4.6, 3.8).
constexpr int64_t kMinFlopsPerThread = 100000;

template <typename T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p;
  explicit AlignedBuffer(int64_t n)
      : p(static_cast<T*>(std::aligned_alloc(64, ((n * int64_t(sizeof(T)) + 63) / 64) * 64))) {
    TORCH_CHECK(p != nullptr, "rnn: out of memory");
  }
  T* get() const { return p.get(); }
};
using Buffer = AlignedBuffer<float>;

// Rows per microkernel call: R W accumulators + W registers of weights within the 32 zmm.
template <int W>
constexpr int max_rows() {
  return W == 4 ? 6 : 8;
}

// acc[r][g] += sum_k h[r ldh + k] w[(k W + g) 16 ..] over k < kn; prefetches NPF lines of pf per k.
template <int W, int R, int NPF>
FASTNN_ALWAYS_INLINE void dot_rows(const float* __restrict w, const float* __restrict h, int64_t ldh, int64_t kn,
                                   const float* pf, __m512 (&acc)[R][W]) {
  const float* hr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) hr[r] = h + r * ldh;
  for (int64_t k = 0; k < kn; ++k) {
    __m512 wv[W];
#pragma GCC unroll 4
    for (int g = 0; g < W; ++g) wv[g] = _mm512_loadu_ps(w + (k * W + g) * kU);
#pragma GCC unroll 4
    for (int q = 0; q < NPF; ++q) _mm_prefetch(reinterpret_cast<const char*>(pf + (k * NPF + q) * kU), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 hv = _mm512_set1_ps(hr[r][k]);
#pragma GCC unroll 4
      for (int g = 0; g < W; ++g) acc[r][g] = _mm512_fmadd_ps(hv, wv[g], acc[r][g]);
    }
  }
}

inline __mmask16 lanes_below(int64_t H, int64_t u) {
  return H - u >= kU ? __mmask16(0xFFFF) : __mmask16((1u << (H - u)) - 1);
}

// 16 floats rounded to bf16 (to nearest even, as c10::BFloat16; NaN stays a quiet NaN), in plain AVX-512F
// so that machines without AVX512-BF16 still build the file.
FASTNN_ALWAYS_INLINE __m256i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// The steps are walked by step_blocks below with an epilogue E describing one step:
//   E::kWidth          weight vectors per k of a packed block (the microkernel's W)
//   E::kUnits          hidden units per packed block
//   K(), lhs(b, k0), ld()  the dot products' length; their left operand's chunk at k0 (row b at lhs(b, k0),
//                      k contiguous, rows ld() apart)
//   prefetch(b, u0)    the epilogue's inputs of row b, block u0, into L2 (called a few chunks ahead)
//   finish(b, u0, acc) the epilogue of row b, block u0, from its sums acc[kWidth] (null: no dot product)
//   rows()             how many rows the step's epilogue covers; rows [n_dot, rows()) get finish(.., null)
//   prefetch_lhs(b0, n, k1)  rows [b0, b0 + n) of the left operand's chunk at k1, while this chunk runs

// Forward step: acc[g] = h_{t-1}[b] . W_hh[g H + u0 ..] for the G gates of 16 units; the gate math.
template <int G>
struct ForwardStep {
  static constexpr int kWidth = G;
  static constexpr int64_t kUnits = kU;
  const RecurrenceForward* a;
  const float* hp;  // h_{t-1} (B, H)
  float* hn;        // h_t (B, H)
  int64_t off;      // first row of the step
  float* gates;     // the input part of the gates of row off + b at (off - row0 + b) G H
  int64_t row0;
  int64_t bs;       // rows of the step
  int64_t kc;       // k per chunk (forward_chunk)
  bf16* h16 = nullptr;  // the bf16 forward: h_t rounded to bf16 too, row b at b ld16
  int64_t ld16 = 0;

  int64_t K() const { return a->H; }
  int64_t chunk() const { return kc; }
  int64_t ld() const { return a->H; }
  const float* lhs(int64_t b, int64_t k0) const { return hp + b * a->H + k0; }
  int64_t rows() const { return bs; }
  void prefetch_lhs(int64_t, int, int64_t) const {}  // h_{t-1} is small and was just written by the team

  FASTNN_ALWAYS_INLINE void prefetch(int64_t b, int64_t u0) const {
    const int64_t H = a->H;
    const float* gx = gates + (off - row0 + b) * G * H + u0;
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) _mm_prefetch(reinterpret_cast<const char*>(gx + g * H), _MM_HINT_T1);
    if constexpr (G == 4) _mm_prefetch(reinterpret_cast<const char*>(a->c + b * H + u0), _MM_HINT_T1);
  }

  // The same formulas as rnn_cpu.cpp's gate pass (rnn_math.h), the same sums.
  FASTNN_ALWAYS_INLINE void finish(int64_t b, int64_t u0, const __m512* acc) const {
    const RecurrenceForward& A = *a;
    const int64_t H = A.H, row = off + b;
    const __mmask16 m = lanes_below(H, u0);
    float* gx = gates + (row - row0) * G * H + u0;
    auto load = [m](const float* p) { return (VF)_mm512_maskz_loadu_ps(m, p); };
    auto store = [m](float* p, VF v) { _mm512_mask_storeu_ps(p, m, (__m512)v); };
    // the input part, with its bias when the projection left it out
    auto input = [&](int q) { return A.b_in ? load(gx + q * H) + load(A.b_in + q * H + u0) : load(gx + q * H); };
    if constexpr (G == 4) {
      float* c = A.c + b * H + u0;
      VF i, f, g, o, cn, r;
      rnn::lstm_forward<rnn_steps::VecMath>(input(0) + (VF)acc[0], input(1) + (VF)acc[1], input(2) + (VF)acc[2],
                                            input(3) + (VF)acc[3], load(c), i, f, g, o, cn, r);
      store(c, cn);
      store(A.y + row * H + u0, r);
      store(hn + b * H + u0, r);
      // from the register: reloading the masked store just made stalled on its forwarding (a third of
      // the gate math's time in perf)
      if (h16) _mm256_mask_storeu_epi16(h16 + b * ld16 + u0, m, round_to_bf16((__m512)r));
      if (A.train) {
        store(gx, i);
        store(gx + H, f);
        store(gx + 2 * H, g);
        store(gx + 3 * H, o);
        store(A.aux + row * H + u0, cn);
      }
    } else {
      VF h_r = (VF)acc[0], h_z = (VF)acc[1], h_n = (VF)acc[2];
      if (A.b_hh) {
        h_r = h_r + load(A.b_hh + u0);
        h_z = h_z + load(A.b_hh + H + u0);
        h_n = h_n + load(A.b_hh + 2 * H + u0);
      }
      VF r, z, n, hv;
      rnn::gru_forward<rnn_steps::VecMath>(input(0), input(1), input(2), h_r, h_z, h_n,
                                           load(hp + b * H + u0), r, z, n, hv);
      store(hn + b * H + u0, hv);
      store(A.y + row * H + u0, hv);
      if (h16) _mm256_mask_storeu_epi16(h16 + b * ld16 + u0, m, round_to_bf16((__m512)hv));
      if (A.train) {
        store(gx, r);
        store(gx + H, z);
        store(gx + 2 * H, n);
        store(A.aux + row * H + u0, h_n);
      }
    }
  }
};

// Backward iteration: acc[j] = dg_next[b] . W_hh[:, u0 + 16 j ..], the gradient reaching h_t of the NB x 16
// units from the step walked just after t (its recurrent gate gradients dg_next); then the cell backward
// of step t for those units, or, for a row whose first step was that later one, its dh0.
//
// The dot products read the gate gradients from a chunk-major copy (kKc k of every row together, k padded
// per gate to Hp = H rounded up to 16): rows of dgx are G H floats apart, 8 KB at H = 512, so the same k
// of every row falls in the same L1 set and a step's rows evicted each other (and W) from L1.
template <int G, int NB>
struct BackwardStep {
  static constexpr int kWidth = NB;
  static constexpr int64_t kUnits = NB * kU;
  const RecurrenceBackward* a;
  int64_t Hp = 0;                    // H rounded up to 16
  const float* dg_next = nullptr;    // chunk-major recurrent gate gradients of the later step, or null
  float* dg_out = nullptr;           // the same of step t, written here
  int64_t bs = 0, off = 0;           // step t: rows and first row (bs = 0 after the last step)
  int64_t n_prev = 0, off_prev = 0;  // rows of t that continue from an earlier step, and its first row
  int64_t row0 = 0;                  // row r's gate gradients are row r - row0 of dgx / dgh

  // step t of iteration k (walk step T - 1 - k; none in the last iteration): bs, off, n_prev, off_prev
  void at_iteration(int64_t k) {
    const RecurrenceBackward& A = *a;
    auto step = [&](int64_t i) { return A.reverse ? A.T - 1 - i : i; };  // the i-th step of the forward walk
    if (k >= A.T) return;
    const int64_t t = step(A.T - 1 - k);
    bs = A.bs[t];
    off = A.off[t];
    if (A.T - 1 - k > 0) {
      const int64_t tp = step(A.T - 2 - k);
      n_prev = std::min(A.bs[t], A.bs[tp]);
      off_prev = A.off[tp];
    }
  }

  int64_t K() const { return G * Hp; }
  int64_t chunk() const { return kKc; }  // the chunk-major copy of dg is laid out by it
  int64_t ld() const { return kKc; }
  const float* lhs(int64_t b, int64_t k0) const { return dg_next + k0 * a->B + b * kKc; }
  int64_t rows() const { return bs; }
  // where (b, k) of the chunk-major copy is (k0 a multiple of kKc: chunks of kKc k, each B rows of kKc)
  float* chunked(float* base, int64_t b, int64_t k) const { return base + (k / kKc) * kKc * a->B + b * kKc + k % kKc; }
  // rows [b0, b0 + n)'s chunk at k1 into L1 while this chunk runs: half of it was written by the other
  // threads and would otherwise arrive line by line at cross-core latency
  FASTNN_ALWAYS_INLINE void prefetch_lhs(int64_t b0, int n, int64_t k1) const {
    const char* p = reinterpret_cast<const char*>(lhs(b0, k1));
    for (int64_t i = 0; i < int64_t(n) * kKc * 4; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
  }

  FASTNN_ALWAYS_INLINE void prefetch(int64_t b, int64_t u0) const {
    if (b >= bs) return;
    const RecurrenceBackward& A = *a;
    const int64_t H = A.H, row = off + b;
    auto pf = [](const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); };
    for (int64_t u = u0; u < std::min(H, u0 + kUnits); u += kU) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) pf(A.gates + row * G * H + g * H + u);
      pf(A.aux + row * H + u);
      pf(A.dy + row * H + u);
    }
  }

  FASTNN_ALWAYS_INLINE void finish(int64_t b, int64_t u0, const __m512* acc) const {
    const RecurrenceBackward& A = *a;
    const int64_t H = A.H, GH = G * H, row = off + b;
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const int64_t u = u0 + j * kU;
      if (u >= H) break;
      const __mmask16 m = lanes_below(H, u);
      auto load = [m](const float* p) { return (VF)_mm512_maskz_loadu_ps(m, p); };
      auto store = [m](float* p, VF v) { _mm512_mask_storeu_ps(p, m, (__m512)v); };
      auto store16 = [m](bf16* p, VF v) { _mm256_mask_storeu_epi16(p, m, round_to_bf16((__m512)v)); };
      // p[q H] += v_q: a unit's bias-gradient sums; one thread a group and step, rows in order
      auto add_to = [&](float* p, int64_t H_, auto... v) {
        int q = 0;
        ((store(p + q * H_, load(p + q * H_) + v), ++q), ...);
      };
      float* dh = A.dh + b * H + u;
      if constexpr (G == 4) {
        const VF dh_in = acc ? (VF)acc[j] : load(dh);
        if (b >= bs) {  // no step t for this row: dh_in is its dh0
          store(dh, dh_in);
          continue;
        }
        const float* gt = A.gates + row * GH + u;
        const float* c_prev = b < n_prev ? A.aux + (off_prev + b) * H + u : A.c0 + b * H + u;
        float* dc = A.dc + b * H + u;
        float* dg = A.dgx + (row - row0) * GH + u;
        VF di, df, dgg, dgo, dcp;
        rnn::lstm_backward<rnn_steps::VecMath>(load(gt), load(gt + H), load(gt + 2 * H), load(gt + 3 * H),
                                               load(c_prev), load(A.aux + row * H + u), dh_in + load(A.dy + row * H + u),
                                               load(dc), di, df, dgg, dgo, dcp);
        store(dc, dcp);
        if (A.dgx16) {  // bf16: every row's gate gradients, the recurrent products' operand
          bf16* d16 = A.dgx16 + row * A.ld16 + u;
          store16(d16, di);
          store16(d16 + H, df);
          store16(d16 + 2 * H, dgg);
          store16(d16 + 3 * H, dgo);
          if (A.db_x) add_to(A.db_x + u, H, di, df, dgg, dgo);
          continue;
        }
        store(dg, di);
        store(dg + H, df);
        store(dg + 2 * H, dgg);
        store(dg + 3 * H, dgo);
        store(chunked(dg_out, b, u), di);
        store(chunked(dg_out, b, Hp + u), df);
        store(chunked(dg_out, b, 2 * Hp + u), dgg);
        store(chunked(dg_out, b, 3 * Hp + u), dgo);
      } else {
        // dh holds the direct path z dh of the later step (or dh_n): the recurrent part adds to it
        const VF dh_in = acc ? load(dh) + (VF)acc[j] : load(dh);
        if (b >= bs) {
          store(dh, dh_in);
          continue;
        }
        const float* gt = A.gates + row * GH + u;
        const float* h_prev = b < n_prev ? A.y + (off_prev + b) * H + u : A.h0 + b * H + u;
        VF d_r, d_z, d_n, d_hn, dh_direct;
        rnn::gru_backward<rnn_steps::VecMath>(load(gt), load(gt + H), load(gt + 2 * H), load(A.aux + row * H + u),
                                              load(h_prev), dh_in + load(A.dy + row * H + u), d_r, d_z, d_n, d_hn,
                                              dh_direct);
        store(dh, dh_direct);
        if (A.dgx16) {
          bf16* x16 = A.dgx16 + row * A.ld16 + u;
          bf16* h16 = A.dgh16 + row * A.ld16 + u;
          store16(x16, d_r);
          store16(x16 + H, d_z);
          store16(x16 + 2 * H, d_n);
          store16(h16, d_r);
          store16(h16 + H, d_z);
          store16(h16 + 2 * H, d_hn);
          if (A.db_x) add_to(A.db_x + u, H, d_r, d_z, d_n);
          if (A.db_h) add_to(A.db_h + u, H, d_r, d_z, d_hn);
          continue;
        }
        float* dgx = A.dgx + (row - row0) * GH + u;
        float* dgh = A.dgh + (row - row0) * GH + u;
        store(dgx, d_r);
        store(dgx + H, d_z);
        store(dgx + 2 * H, d_n);
        store(dgh, d_r);
        store(dgh + H, d_z);
        store(dgh + 2 * H, d_hn);
        store(chunked(dg_out, b, u), d_r);
        store(chunked(dg_out, b, Hp + u), d_z);
        store(chunked(dg_out, b, 2 * Hp + u), d_hn);
      }
    }
  }
};

// Rows [b0, b0 + R) of one block over k in [k0, k1). Each chunk sums from zero and is added to the
// earlier chunks' sum in `part`: this two-level order keeps the rounding error of the dot products below
// that of a single running sum (the forward's whole-K walk; at K = 512 its rms error against fp64 is
// 1.37e-7, MKL's GEMM 1.16e-7, chunks of 128 1.01e-7). After the last chunk, the epilogue.
template <class E, int R, int NPF>
void row_block(const E& e, const float* wblk, int64_t u0, int64_t b0, int64_t k0, int64_t k1, float* part,
               const float* pf) {
  constexpr int W = E::kWidth;
  if (k0 == 0) {
    // The epilogue's inputs are read once per step, far apart: into L2 now, a few chunks before it runs.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) e.prefetch(b0 + r, u0);
  }
  __m512 acc[R][W];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < W; ++g) acc[r][g] = _mm512_setzero_ps();
  }
  if (k1 < e.K()) e.prefetch_lhs(b0, R, k1);
  dot_rows<W, R, NPF>(wblk + k0 * W * kU, e.lhs(b0, k0), e.ld(), k1 - k0, pf, acc);
  if (k0 > 0) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < W; ++g) {
        acc[r][g] = _mm512_add_ps(_mm512_loadu_ps(part + ((b0 + r) * W + g) * kU), acc[r][g]);
      }
    }
  }
  if (k1 < e.K()) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < W; ++g) _mm512_storeu_ps(part + ((b0 + r) * W + g) * kU, acc[r][g]);
    }
    return;
  }
  for (int r = 0; r < R; ++r) e.finish(b0 + r, u0, acc[r]);
}

template <class E, int NPF>
void row_block_n(int n, const E& e, const float* wblk, int64_t u0, int64_t b0, int64_t k0, int64_t k1, float* part,
                 const float* pf) {
  constexpr int W = E::kWidth;
  static_assert(max_rows<W>() <= 8, "row_block_n dispatches up to 8 rows");
  switch (n) {
    case 1: return row_block<E, 1, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
    case 2: return row_block<E, 2, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
    case 3: return row_block<E, 3, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
    case 4: return row_block<E, 4, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
    case 5: return row_block<E, 5, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
    case 6: return row_block<E, 6, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
    case 7:
      if constexpr (max_rows<W>() >= 7) return row_block<E, 7, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
      break;
    case 8:
      if constexpr (max_rows<W>() >= 8) return row_block<E, 8, NPF>(e, wblk, u0, b0, k0, k1, part, pf);
      break;
  }
}

// One step of blocks [blo, bhi) for the rows in [r_lo, r_hi) (all by default): the dot products of those
// below n_dot, split into near-equal microkernel row blocks, then the epilogue of those in [n_dot, e.rows())
// (none in the forward); the blocks in descending order when `down`.
template <class E>
void step_blocks(const E& e, const float* wp, int64_t blo, int64_t bhi, int64_t n_dot, float* part, bool down,
                 int64_t r_lo = 0, int64_t r_hi = INT64_MAX) {
  constexpr int W = E::kWidth;
  const int64_t K = e.K(), blk_floats = K * W * kU;
  const int64_t d_hi = std::min(n_dot, r_hi), nd = std::max<int64_t>(0, d_hi - r_lo);
  const int64_t nrb = (nd + max_rows<W>() - 1) / max_rows<W>();
  const int64_t base = nrb ? nd / nrb : 0, extra = nrb ? nd % nrb : 0;
  // The chunk processed next (W kn lines) is prefetched by the first row blocks, npf lines per k each.
  const int npf = nrb >= W ? 1 : (2 * nrb >= W ? 2 : 4);
  for (int64_t j = 0; j < bhi - blo; ++j) {
    const int64_t blk = down ? bhi - 1 - j : blo + j;
    const int64_t u0 = blk * E::kUnits;
    const float* wblk = wp + blk * blk_floats;
    const bool last_blk = j + 1 == bhi - blo;
    const float* next_blk = last_blk ? wblk : wp + (down ? blk - 1 : blk + 1) * blk_floats;
    for (int64_t k0 = 0; k0 < K && nrb > 0; k0 += e.chunk()) {
      const int64_t k1 = std::min(K, k0 + e.chunk()), kn = k1 - k0;
      const float* next = k1 < K ? wblk + k1 * W * kU : next_blk;
      int64_t b0 = r_lo;
      for (int64_t i = 0; i < nrb; ++i) {
        const int n = int(base + (i < extra));
        const float* pf = next + i * kn * npf * kU;
        if ((last_blk && k1 == K) || i * npf >= W) {  // nothing of ours follows, or prefetched already
          row_block_n<E, 0>(n, e, wblk, u0, b0, k0, k1, part, pf);
        } else if (npf == 1) {
          row_block_n<E, 1>(n, e, wblk, u0, b0, k0, k1, part, pf);
        } else if (npf == 2) {
          row_block_n<E, 2>(n, e, wblk, u0, b0, k0, k1, part, pf);
        } else {
          row_block_n<E, 4>(n, e, wblk, u0, b0, k0, k1, part, pf);
        }
        b0 += n;
      }
    }
    for (int64_t b = std::max(n_dot, r_lo); b < std::min(e.rows(), r_hi); ++b) e.finish(b, u0, nullptr);
  }
}

// Packs blocks [blo, bhi) of w_hh (G H, K) into wp: block blk, row k holds W[g H + blk 16 + l][k] at
// g 16 + l (0 past H). 16 x 16 tiles transposed in registers: the plain strided copy took ~1.3 ms a call
// at H = 512.
void pack_blocks(const float* w, int64_t G, int64_t H, float* wp, int64_t blo, int64_t bhi) {
  const int64_t K = H;
  for (int64_t blk = blo; blk < bhi; ++blk) {
    float* dst = wp + blk * K * G * kU;
    const int64_t nl = std::min<int64_t>(kU, H - blk * kU);
    for (int64_t g = 0; g < G; ++g) {
      const float* src = w + (g * H + blk * kU) * K;
      for (int64_t k0 = 0; k0 < K; k0 += kU) {
        const int64_t nk = std::min<int64_t>(kU, K - k0);
        const __mmask16 km = nk == kU ? __mmask16(0xFFFF) : __mmask16((1u << nk) - 1);
        __m512 r[16];
        for (int64_t l = 0; l < kU; ++l) {
          r[l] = l < nl ? _mm512_maskz_loadu_ps(km, src + l * K + k0) : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int64_t kk = 0; kk < nk; ++kk) _mm512_storeu_ps(dst + ((k0 + kk) * G + g) * kU, r[kk]);
      }
    }
  }
}

// Threads that pay for themselves on a step of `flops` over `blocks` blocks of work.
int useful_threads(int threads, int64_t blocks, int64_t flops) {
  return int(std::max<int64_t>(1, std::min<int64_t>({threads, blocks, flops / kMinFlopsPerThread})));
}

// Chunks of whole walk steps with up to `rows` rows (at least one step): the end of the one starting at
// walk step k0, and the start of the one ending at k1 (walk step k is time step k, or T - 1 - k reversed).
// Chunks by rows, not steps: a packed batch's tail steps would make small, slow GEMMs of their chunks.
int64_t chunk_end(const int64_t* bs, int64_t T, bool reverse, int64_t k0, int64_t rows) {
  auto step_rows = [&](int64_t k) { return bs[reverse ? T - 1 - k : k]; };
  int64_t k1 = k0, n = 0;
  while (k1 < T && (k1 == k0 || n + step_rows(k1) <= rows)) n += step_rows(k1++);
  return k1;
}
int64_t chunk_start(const int64_t* bs, int64_t T, bool reverse, int64_t k1, int64_t rows) {
  auto step_rows = [&](int64_t k) { return bs[reverse ? T - 1 - k : k]; };
  int64_t k0 = k1, n = 0;
  while (k0 > 0 && (k0 == k1 || n + step_rows(k0 - 1) <= rows)) n += step_rows(--k0);
  return k0;
}

// The forward's k per chunk for dot products of length K over blocks of G vectors (see kForwardWholeKBytes).
int64_t forward_chunk(int64_t K, int G) {
  return K * G * kU * int64_t(sizeof(float)) <= kForwardWholeKBytes ? K : kForwardKc;
}

// Runs the forward's walk steps through steps(k0, k1, row0) (walk steps [k0, k1), the input part of row r
// at row r - row0 of a.gates): all at once, or chunk by chunk after a.input; then h_n.
template <class Steps>
void drive_forward(const RecurrenceForward& a, const Steps& steps) {
  if (!a.input) {
    steps(0, a.T, 0);
  } else {
    for (int64_t k0 = 0, k1; k0 < a.T; k0 = k1) {
      k1 = chunk_end(a.bs, a.T, a.reverse, k0, a.chunk_rows);
      // the chunk's rows: contiguous, from its first step in time to its last
      const int64_t t_first = a.reverse ? a.T - k1 : k0, t_last = a.reverse ? a.T - 1 - k0 : k1 - 1;
      const int64_t r0 = a.off[t_first], r1 = a.off[t_last] + a.bs[t_last];
      a.input(k0, k1, r0, r1);
      steps(k0, k1, r0);
    }
  }
  // h_n of each sequence is its output at the last step it is live in: forward, the last step with more
  // than b rows; reverse, step 0 (walked last, all B rows).
  for (int64_t b = 0; b < a.B; ++b) {
    int64_t t = 0;
    if (!a.reverse) {
      while (t + 1 < a.T && a.bs[t + 1] > b) ++t;
    }
    std::memcpy(a.h + b * a.H, a.y + (a.off[t] + b) * a.H, sizeof(float) * a.H);
  }
}

template <int G>
void run(const RecurrenceForward& a, int threads) {
  const int64_t H = a.H, B = a.B, K = H, nblk = (H + kU - 1) / kU;
  const int64_t flops = 2 * a.bs[a.reverse ? a.T - 1 : 0] * K * G * H;  // the first step, the largest forward
  const int nt = useful_threads(threads, nblk, flops);
  const int64_t kc = forward_chunk(K, G);
  Buffer wp(nblk * K * G * kU);
  Buffer h1(B * H);
  Buffer part(K > kc ? int64_t(nt) * B * G * kU : 1);
  std::memcpy(h1.get(), a.h, sizeof(float) * B * H);
  float* hbuf[2] = {a.h, h1.get()};  // both start as h0: rows that join late (reverse) read it from either
  // walk steps [k0, k1) in one parallel region; the first also packs W (each thread its own blocks)
  auto steps = [&](int64_t k0, int64_t k1, int64_t row0) {
#pragma omp parallel num_threads(nt)
    {
      // partition by the team actually running (fewer threads when nested)
      const int team = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t blo = nblk * tid / team, bhi = nblk * (tid + 1) / team;
      float* my_part = part.get() + (K > kc ? int64_t(tid) * B * G * kU : 0);
      if (k0 == 0) pack_blocks(a.w_hh, G, H, wp.get(), blo, bhi);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = a.reverse ? a.T - 1 - k : k;
        const ForwardStep<G> s{&a, hbuf[k & 1], hbuf[(k + 1) & 1], a.off[t], a.gates, row0, a.bs[t], kc};
        // every other step walks the blocks backwards: it starts on the W its thread used last, which
        // is still in L2 (B = 1, H = 512: 78 -> 60 us a step; no change at B = 32)
        step_blocks(s, wp.get(), blo, bhi, a.bs[t], my_part, k & 1);
        // h_t complete before anyone reads it, and h_{t-1} no longer read before anyone overwrites it
#pragma omp barrier
      }
    }
  };
  drive_forward(a, steps);
}

// ---------------------------------------------------------------- bfloat16 forward

// Rows of h_{t-1} per brgemm call of the bf16 recurrence (its float32 sums stay in L1).
constexpr int64_t kBf16Rows = 32;
// One brgemm call per 16-unit block (2 or 4 blocks a call measured the same: bench/NOTES.md).

// Packs blocks [blo, bhi) of the bf16 W_hh (G H, H) as brgemm's VNNI-2 B: block blk is Kp / 2 rows of
// N = G 16 column pairs, (k2, g 16 + l, e) holding W[g H + blk 16 + l][2 k2 + e] (0 past H, in units and k).
void pack_blocks_bf16(const bf16* w, int64_t G, int64_t H, int64_t Kp, bf16* wp, int64_t blo, int64_t bhi) {
  const int64_t N = G * kU;
  // A gate's 16 unit rows, read as 32-bit words (k pairs), transposed 16 x 16 words at a time: word k2 of
  // the 16 rows is then one vector of the panel's row k2. The k left over (H / 2 not a multiple of 16, or H
  // odd) go one by one.
  const int64_t tiled = H / 2 / kU * kU;  // words in whole 16-word tiles
  for (int64_t blk = blo; blk < bhi; ++blk) {
    bf16* dst = wp + blk * Kp * N;
    std::memset(static_cast<void*>(dst), 0, sizeof(bf16) * Kp * N);
    const int64_t u0 = blk * kU, nl = std::min<int64_t>(kU, H - u0);
    for (int64_t g = 0; g < G; ++g) {
      const bf16* rows = w + (g * H + u0) * H;
      for (int64_t k2 = 0; k2 < tiled; k2 += kU) {
        __m512 r[16];
        for (int64_t l = 0; l < kU; ++l) {
          r[l] = l < nl ? _mm512_loadu_ps(rows + l * H + 2 * k2) : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int64_t kk = 0; kk < kU; ++kk) _mm512_storeu_ps(dst + ((k2 + kk) * N + g * kU) * 2, r[kk]);
      }
      for (int64_t l = 0; l < nl; ++l) {
        for (int64_t k = 2 * tiled; k < H; ++k) dst[((k >> 1) * N + g * kU + l) * 2 + (k & 1)] = rows[l * H + k];
      }
    }
  }
}

// The 16-unit blocks of each step, split between the threads, each run once by whichever thread claims it
// first: a thread walks its own blocks (every other step backwards, as run<G>: it starts on what is still in
// its L2), then takes the others' not yet started, from the far end of their walk. A thread slowed down by
// the VM or by L3 then no longer holds the other up at the step's barrier (bf16 LSTM B32 H512: the barrier's
// spinning went from 12% to 6% of the time). Results do not depend on which thread computes a block.
class BlockClaims {
 public:
  explicit BlockClaims(int64_t n) : n_(n), last_(new std::atomic<int64_t>[n]) {
    for (int64_t g = 0; g < n; ++g) last_[g].store(-1, std::memory_order_relaxed);
  }
  // fn(blk) for the blocks of step k (k >= 0, increasing) that thread tid of team claims
  template <class Fn>
  void run(int64_t k, int tid, int team, const Fn& fn) {
    auto walk = [&](int who, int64_t i) {  // the i-th block of thread who's walk in step k
      const int64_t lo = n_ * who / team, hi = n_ * (who + 1) / team;
      return (k & 1) ? hi - 1 - i : lo + i;
    };
    auto count = [&](int who) { return n_ * (who + 1) / team - n_ * who / team; };
    for (int64_t i = 0; i < count(tid); ++i) {
      const int64_t blk = walk(tid, i);
      if (claim(blk, k)) fn(blk);
    }
    for (int d = 1; d < team; ++d) {
      const int who = (tid + d) % team;
      for (int64_t i = count(who) - 1; i >= 0; --i) {
        const int64_t blk = walk(who, i);
        if (!claim(blk, k)) break;  // its owner got there: the blocks before it are taken too
        fn(blk);
      }
    }
  }

 private:
  bool claim(int64_t blk, int64_t k) {
    int64_t last = last_[blk].load(std::memory_order_relaxed);
    return last < k && last_[blk].compare_exchange_strong(last, k, std::memory_order_acq_rel);
  }
  int64_t n_;
  std::unique_ptr<std::atomic<int64_t>[]> last_;
};

// The bf16 forward: per step and 16-unit block, one brgemm of the live rows' bf16 h_{t-1} (up to
// kBf16Rows at a time) with the block's packed W_hh (float32 sums), then ForwardStep's gate math on the
// sums, which also writes h_t in bf16 for the next step. Blocks split between the threads with BlockClaims.
template <int G>
void run_bf16(const RecurrenceForward& a, int threads) {
  const int64_t H = a.H, B = a.B, Kp = (H + 1) / 2 * 2, N = G * kU, nblk = (H + kU - 1) / kU;
  const int64_t flops = 2 * a.bs[a.reverse ? a.T - 1 : 0] * H * G * H;
  const int nt = useful_threads(threads, nblk, flops);
  AlignedBuffer<bf16> wp(nblk * Kp * N), hb(2 * B * Kp);
  Buffer h1(B * H), sums(int64_t(nt) * kBf16Rows * N);
  BlockClaims claims(nblk);
  std::memcpy(h1.get(), a.h, sizeof(float) * B * H);
  float* hbuf[2] = {a.h, h1.get()};
  bf16* hb16[2] = {hb.get(), hb.get() + B * Kp};
  for (int64_t b = 0; b < B; ++b) {  // both bf16 copies start as h0 rounded, 0 in the pad of an odd H
    for (int64_t k = 0; k < Kp; ++k) {
      hb16[0][b * Kp + k] = hb16[1][b * Kp + k] = k < H ? bf16(a.h[b * H + k]) : bf16(0.f);
    }
  }
  auto steps = [&](int64_t k0, int64_t k1, int64_t row0) {
#pragma omp parallel num_threads(nt)
    {
      const int team = omp_get_num_threads(), tid = omp_get_thread_num();
      float* my_sums = sums.get() + int64_t(tid) * kBf16Rows * N;
      if (k0 == 0) {  // each thread its own blocks; any thread may run any block (BlockClaims)
        pack_blocks_bf16(a.w_hh_bf16, G, H, Kp, wp.get(), nblk * tid / team, nblk * (tid + 1) / team);
#pragma omp barrier
      }
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = a.reverse ? a.T - 1 - k : k;
        const bf16* h_in = hb16[k & 1];
        const ForwardStep<G> s{&a, hbuf[k & 1], hbuf[(k + 1) & 1], a.off[t], a.gates, row0, a.bs[t], Kp,
                               hb16[(k + 1) & 1], Kp};
        auto block = [&](int64_t blk) {
          for (int64_t b0 = 0; b0 < s.bs; b0 += kBf16Rows) {
            const int64_t n = std::min(kBf16Rows, s.bs - b0);
            at::native::cpublas::brgemm(n, N, Kp, Kp, N, N, false, h_in + b0 * Kp, wp.get() + blk * Kp * N, my_sums,
                                        /*is_vnni=*/true);
            for (int64_t r = 0; r < n; ++r) {
              __m512 v[G];
#pragma GCC unroll 4
              for (int g = 0; g < G; ++g) v[g] = _mm512_loadu_ps(my_sums + r * N + g * kU);
              s.finish(b0 + r, blk * kU, v);  // also h_t in bf16 for the next step
            }
          }
        };
        claims.run(k, tid, team, block);
        // h_t complete before anyone reads it, and h_{t-1} no longer read before anyone overwrites it
#pragma omp barrier
      }
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);
    }
  };
  drive_forward(a, steps);
}

// Packs blocks [blo, bhi) of 16 columns of the bf16 W_hh (G H, H) as brgemm's VNNI-2 B of the backward's
// products dg W_hh: block blk is Kp / 2 rows of 16 column pairs, (k2, n, e) holding W[2 k2 + e][blk 16 + n]
// (0 past G H and past H).
void pack_columns_bf16(const bf16* w, int64_t G, int64_t H, int64_t Kp, bf16* wp, int64_t blo, int64_t bhi) {
  const int64_t GH = G * H;
  for (int64_t blk = blo; blk < bhi; ++blk) {
    bf16* dst = wp + blk * Kp * kU;
    const int64_t u = blk * kU;
    const __mmask16 m = lanes_below(H, u);
    for (int64_t k2 = 0; k2 < Kp / 2; ++k2) {
      // rows 2 k2 and 2 k2 + 1, 16 columns each, interleaved into 16 pairs (0 past H, and past G H)
      const __m256i lo = _mm256_maskz_loadu_epi16(m, w + 2 * k2 * H + u);
      const __m256i hi =
          2 * k2 + 1 < GH ? _mm256_maskz_loadu_epi16(m, w + (2 * k2 + 1) * H + u) : _mm256_setzero_si256();
      const __m512i pairs =
          _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm512_storeu_si512(dst + k2 * kU * 2, pairs);
    }
  }
}

// The bf16 backward's recurrence: iteration k of T + 1 as run_backward's, the dot products of the later
// step's bf16 gate gradients (rows of a.dgh16 / dgx16) with 16 columns of W_hh through one brgemm (up to
// kBf16Rows rows at a time, float32 sums), then BackwardStep's cell backward on the sums, which writes step
// t's gate gradients in bf16. Blocks split between the threads with BlockClaims, a barrier after each
// iteration.
template <int G>
void run_backward_bf16(const RecurrenceBackward& a, int threads) {
  const int64_t H = a.H, T = a.T, Kp = a.ld16, nblk = (H + kU - 1) / kU;
  int64_t max_bs = 0;
  for (int64_t t = 0; t < T; ++t) max_bs = std::max(max_bs, a.bs[t]);
  const int nt = useful_threads(threads, nblk, 2 * max_bs * G * H * H);
  auto step = [&](int64_t k) { return a.reverse ? T - 1 - k : k; };  // the k-th step of the forward walk
  AlignedBuffer<bf16> wp(nblk * Kp * kU);
  Buffer sums(int64_t(nt) * kBf16Rows * kU);
  BlockClaims claims(nblk);
  const bf16* dg_rec = a.lstm ? a.dgx16 : a.dgh16;
#pragma omp parallel num_threads(nt)
  {
    const int team = omp_get_num_threads(), tid = omp_get_thread_num();
    float* my_sums = sums.get() + int64_t(tid) * kBf16Rows * kU;
    pack_columns_bf16(a.w_hh_bf16, G, H, Kp, wp.get(), nblk * tid / team, nblk * (tid + 1) / team);
#pragma omp barrier
    for (int64_t k = 0; k <= T; ++k) {
      BackwardStep<G, 1> s{&a, (H + kU - 1) / kU * kU};
      int64_t n_dot = 0, off_next = 0;
      if (k > 0) {  // the later step's rows and their gate gradients
        n_dot = a.bs[step(T - k)];
        off_next = a.off[step(T - k)];
      }
      s.at_iteration(k);
      auto block = [&](int64_t blk) {
        for (int64_t b0 = 0; b0 < n_dot; b0 += kBf16Rows) {
          const int64_t n = std::min(kBf16Rows, n_dot - b0);
          at::native::cpublas::brgemm(n, kU, Kp, Kp, kU, kU, false, dg_rec + (off_next + b0) * Kp,
                                      wp.get() + blk * Kp * kU, my_sums, /*is_vnni=*/true);
          for (int64_t r = 0; r < n; ++r) {
            const __m512 acc[1] = {_mm512_loadu_ps(my_sums + r * kU)};
            s.finish(b0 + r, blk * kU, acc);
          }
        }
        for (int64_t b = n_dot; b < s.bs; ++b) s.finish(b, blk * kU, nullptr);
      };
      claims.run(k, tid, team, block);
      // step t's gate gradients, dh and dc complete before the next iteration reads them
#pragma omp barrier
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  }
}

// Packs groups [glo, ghi) of NB blocks of 16 columns of w_hh (G H rows, H columns) into wp: group grp, row
// g Hp + u holds W[g H + u][grp NB 16 + j] at j (0 past H, and in the rows u >= H that pad each gate to Hp);
// rows of W are already unit-contiguous, so a plain copy.
void pack_columns(const float* w, int64_t G, int64_t H, int64_t Hp, int64_t width, float* wp, int64_t glo,
                  int64_t ghi) {
  const int64_t K = G * Hp;
  for (int64_t grp = glo; grp < ghi; ++grp) {
    const int64_t u0 = grp * width, n = std::min(width, H - u0);
    float* dst = wp + grp * K * width;
    std::memset(dst, 0, sizeof(float) * K * width);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t u = 0; u < H; ++u) std::memcpy(dst + (g * Hp + u) * width, w + (g * H + u) * H + u0, sizeof(float) * n);
    }
  }
}

// An iteration of the backward with at least this many rows a thread splits the batch rows between the
// threads: each runs its rows over every column group of W_hh, and consecutive such iterations run without
// a barrier between them. Fewer rows: the threads split the column groups (all rows each, a barrier after
// every iteration). By rows, each thread streams all of W_hh every step rather than its share, but no step
// waits for the other thread and no gate gradient crosses cores (a step's dg is G H floats a row, 256 KB at
// B = 32, H = 512). Backward alone, interleaved, rows / columns on the AMD EPYC: LSTM B32 H512 0.95,
// B24 H512 0.94, B64 H512 0.93, B256 H256 0.95, B64 H1024 0.96, B32 H256 0.97, B128 H512 1.00, GRU B32 H512
// 0.94; with 8 rows a thread, B16 H512 1.09, B16 H1024 1.05.
constexpr int64_t kMinRowsPerThread = 12;

// The threads' shares of rows over a run of iterations with rows[i] live rows each: first[j] is thread j's
// first row (first[nt] = the widest), in equal shares of the row-iterations (row b is live in the
// iterations with more than b rows), so a packed batch's long rows do not all land on one thread.
void balanced_row_split(const int64_t* rows, int64_t n, int nt, int64_t* first) {
  int64_t B = 0;
  for (int64_t i = 0; i < n; ++i) B = std::max(B, rows[i]);
  std::vector<int64_t> iters_of_row(B + 1, 0);  // how many iterations row b is live in
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] > 0) iters_of_row[rows[i] - 1] += 1;
  }
  for (int64_t b = B - 2; b >= 0; --b) iters_of_row[b] += iters_of_row[b + 1];
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += iters_of_row[b];
  first[0] = 0;
  int64_t done = 0, b = 0;
  for (int j = 1; j < nt; ++j) {
    while (b < B && (done + iters_of_row[b]) * nt <= total * j) done += iters_of_row[b++];
    first[j] = b;
  }
  first[nt] = B;
}

// Iteration k of T + 1: the dot products of walk step T - k's rows (the step after t, done in the previous
// iteration) with W_hh, then the cell backward of walk step T - 1 - k (none in the last iteration). With
// a.consume, in chunks of up to a.chunk_rows rows of whole walk steps from the last, one parallel region each.
// The threads split the rows of iterations with enough of them (kMinRowsPerThread), else the column groups.
template <int G, int NB>
void run_backward(const RecurrenceBackward& a, int nt) {
  const int64_t H = a.H, B = a.B, T = a.T, Hp = (H + kU - 1) / kU * kU, K = G * Hp;
  const int64_t width = NB * kU, ngrp = (H + width - 1) / width;
  auto step = [&](int64_t k) { return a.reverse ? T - 1 - k : k; };  // the k-th step of the forward walk
  // per iteration: the rows it touches (those of the later step's dot products and of step t's cell), and
  // whether it splits them; each run of splitting iterations shares one split (a row stays with its thread)
  std::vector<int64_t> iter_rows(T + 1);
  std::vector<char> by_rows(T + 1);
  std::vector<int64_t> row_first((T + 1) * (nt + 1));
  for (int64_t k = 0; k <= T; ++k) {
    iter_rows[k] = std::max(k > 0 ? a.bs[step(T - k)] : 0, k < T ? a.bs[step(T - 1 - k)] : 0);
    by_rows[k] = nt > 1 && iter_rows[k] >= kMinRowsPerThread * nt;
  }
  for (int64_t k0 = 0, k1; k0 <= T; k0 = k1) {
    for (k1 = k0 + 1; k1 <= T && by_rows[k1] == by_rows[k0];) ++k1;
    if (!by_rows[k0]) continue;
    balanced_row_split(iter_rows.data() + k0, k1 - k0, nt, row_first.data() + k0 * (nt + 1));
    for (int64_t k = k0 + 1; k < k1; ++k) {
      std::copy_n(row_first.data() + k0 * (nt + 1), nt + 1, row_first.data() + k * (nt + 1));
    }
  }
  Buffer wp(ngrp * K * width);
  Buffer part(K > kKc ? int64_t(nt) * B * width : 1);
  // two chunk-major copies of a step's recurrent gate gradients (written by step t, read by the step
  // before); zero in the padding, which no store touches
  const int64_t dg_floats = (K + kKc - 1) / kKc * kKc * B;
  Buffer dg_steps(2 * dg_floats);
  // iterations [i0, i1), the gate gradients of row r at r - row0 of dgx / dgh
  auto iterations = [&](int64_t i0, int64_t i1, int64_t row0) {
#pragma omp parallel num_threads(nt)
    {
      const int team = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t glo = ngrp * tid / team, ghi = ngrp * (tid + 1) / team;
      float* my_part = part.get() + (K > kKc ? int64_t(tid) * B * width : 0);
      if (i0 == 0) {
        pack_columns(a.w_hh, G, H, Hp, width, wp.get(), glo, ghi);
        if (Hp != H) {
#pragma omp for
          for (int64_t i = 0; i < 2 * dg_floats; ++i) dg_steps.get()[i] = 0.0f;
        }
#pragma omp barrier
      }
      for (int64_t k = i0; k < i1; ++k) {
        BackwardStep<G, NB> s{&a, Hp};
        s.row0 = row0;
        s.dg_out = dg_steps.get() + (k & 1) * dg_floats;
        int64_t n_dot = 0;
        if (k > 0) {  // the later step's recurrent gate gradients
          s.dg_next = dg_steps.get() + ((k + 1) & 1) * dg_floats;
          n_dot = a.bs[step(T - k)];
        }
        s.at_iteration(k);
        if (by_rows[k]) {
          if (team == nt) {
            const int64_t* first = row_first.data() + k * (nt + 1);
            step_blocks(s, wp.get(), 0, ngrp, n_dot, my_part, k & 1, first[tid], first[tid + 1]);
          } else if (tid == 0) {  // a nested call runs fewer threads than planned: the first takes every row
            step_blocks(s, wp.get(), 0, ngrp, n_dot, my_part, k & 1);
          }
        } else {
          step_blocks(s, wp.get(), glo, ghi, n_dot, my_part, k & 1);
        }
        // dg of step t complete before anyone reads it, and dg of the later step read by all before the
        // next iteration overwrites its buffer; not needed between two iterations that split the rows
        if (!(by_rows[k] && k + 1 < i1 && by_rows[k + 1])) {
#pragma omp barrier
        }
      }
    }
  };
  if (!a.consume) {
    iterations(0, T + 1, 0);
    return;
  }
  for (int64_t k1 = T, k0; k1 > 0; k1 = k0) {
    k0 = chunk_start(a.bs, T, a.reverse, k1, a.chunk_rows);
    // walk steps [k0, k1): rows contiguous, from the chunk's first step in time to its last
    const int64_t t_first = a.reverse ? T - k1 : k0, t_last = a.reverse ? T - 1 - k0 : k1 - 1;
    const int64_t r0 = a.off[t_first], r1 = a.off[t_last] + a.bs[t_last];
    iterations(T - k1, T - k0 + (k0 == 0), r0);  // the last chunk also runs the dh0-only iteration
    a.consume(k0, k1, r0, r1);
  }
}

// The group width (NB blocks of 16 units) that keeps the busiest thread's share of blocks smallest: the
// widest such, since wider groups reuse each broadcast of dg over more units.
template <int G>
void backward_dispatch(const RecurrenceBackward& a, int threads) {
  const int64_t H = a.H, nblk = (H + kU - 1) / kU;
  int64_t max_bs = 0;
  for (int64_t t = 0; t < a.T; ++t) max_bs = std::max(max_bs, a.bs[t]);
  const int nt0 = useful_threads(threads, nblk, 2 * max_bs * G * H * H);
  int best_nb = 1;
  int64_t best = -1;
  for (int nb : {1, 2, 4}) {
    const int64_t ngrp = (nblk + nb - 1) / nb, busiest = (ngrp + nt0 - 1) / nt0 * nb;
    if (best < 0 || busiest <= best) best = busiest, best_nb = nb;
  }
  const int64_t ngrp = (nblk + best_nb - 1) / best_nb;
  const int nt = int(std::min<int64_t>(nt0, ngrp));
  if (best_nb == 4) return run_backward<G, 4>(a, nt);
  if (best_nb == 2) return run_backward<G, 2>(a, nt);
  return run_backward<G, 1>(a, nt);
}

}  // namespace

bool recurrence_forward_available() { return true; }

void bf16_pack_panels(const bf16* w, int64_t N, int64_t K, bf16* dst, int threads) {
  constexpr int64_t kP = 64;  // panel width
  const int64_t panels = (N + kP - 1) / kP, K2 = K / 2, tiled = K2 / kU * kU;
  // 16 rows of w read as 32-bit words (k pairs) and transposed 16 x 16 words at a time: word k2 of the 16
  // rows is then 16 column pairs of the panel's row k2. torch's permute + contiguous took ~2 ms at 2048 x 512.
#pragma omp parallel for num_threads(int(std::max<int64_t>(1, std::min<int64_t>(threads, panels))))
  for (int64_t p = 0; p < panels; ++p) {
    bf16* out = dst + p * kP * K;
    for (int64_t rb = 0; rb < kP; rb += kU) {
      const int64_t n0 = p * kP + rb, nl = std::max<int64_t>(0, std::min<int64_t>(kU, N - n0));
      for (int64_t k2 = 0; k2 < tiled; k2 += kU) {
        __m512 r[16];
        for (int64_t l = 0; l < kU; ++l) {
          r[l] = l < nl ? _mm512_loadu_ps(w + (n0 + l) * K + 2 * k2) : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int64_t kk = 0; kk < kU; ++kk) _mm512_storeu_ps(out + ((k2 + kk) * kP + rb) * 2, r[kk]);
      }
      for (int64_t k2 = tiled; k2 < K2; ++k2) {
        for (int64_t l = 0; l < kU; ++l) {
          for (int64_t e = 0; e < 2; ++e) {
            out[(k2 * kP + rb + l) * 2 + e] = l < nl ? w[(n0 + l) * K + 2 * k2 + e] : bf16(0.f);
          }
        }
      }
    }
  }
}

void recurrence_forward(const RecurrenceForward& a, int threads) {
  if (a.w_hh_bf16) {
    TORCH_CHECK(bf16_recurrence_available(), "rnn: the bf16 recurrence needs AVX512-BF16 and torch's bf16 brgemm");
    if (a.lstm) {
      run_bf16<4>(a, threads);
    } else {
      run_bf16<3>(a, threads);
    }
    return;
  }
  if (a.lstm) {
    run<4>(a, threads);
  } else {
    run<3>(a, threads);
  }
}

void recurrence_backward(const RecurrenceBackward& a, int threads) {
  if (a.w_hh_bf16) {
    TORCH_CHECK(bf16_recurrence_available(), "rnn: the bf16 recurrence needs AVX512-BF16 and torch's bf16 brgemm");
    if (a.lstm) {
      run_backward_bf16<4>(a, threads);
    } else {
      run_backward_bf16<3>(a, threads);
    }
    return;
  }
  if (a.lstm) {
    backward_dispatch<4>(a, threads);
  } else {
    backward_dispatch<3>(a, threads);
  }
}

#else  // no AVX-512: rnn_cpu.cpp keeps its per-step GEMM path

bool recurrence_forward_available() { return false; }
void bf16_pack_panels(const bf16*, int64_t, int64_t, bf16*, int) {
  TORCH_CHECK(false, "rnn: the bf16 kernels need AVX-512");
}
void recurrence_forward(const RecurrenceForward&, int) { TORCH_CHECK(false, "rnn: the fused recurrence needs AVX-512"); }
void recurrence_backward(const RecurrenceBackward&, int) {
  TORCH_CHECK(false, "rnn: the fused recurrence needs AVX-512");
}

#endif

bool bf16_recurrence_available() {
#if defined(__AVX512F__) && FASTNN_HAVE_BRGEMM
  static const bool ok = [] {
    if (!__builtin_cpu_supports("avx512bf16")) return false;  // oneDNN would emulate: slower than float32
    try {
      // a 3 x 20 x 6 product through the call and VNNI-2 layout the kernels use, small integers: exact
      const int64_t M = 3, N = 20, K = 6;
      std::vector<bf16> a(M * K), b(K * N);
      std::vector<float> c(M * N, -1.f);
      for (int64_t i = 0; i < M * K; ++i) a[i] = bf16(float(i % 7 - 3));
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t n = 0; n < N; ++n) b[((k >> 1) * N + n) * 2 + (k & 1)] = bf16(float((k * N + n) % 5 - 2));
      }
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data(), /*is_vnni=*/true);
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t n = 0; n < N; ++n) {
          float want = 0.f;
          for (int64_t k = 0; k < K; ++k) want += float(a[i * K + k]) * float((k * N + n) % 5 - 2);
          if (c[i * N + n] != want) return false;
        }
      }
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastnn
