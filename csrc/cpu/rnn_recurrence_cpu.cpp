// Fused float32 recurrence of an LSTM / GRU layer (see rnn_recurrence_cpu.h).
//
// W_hh is packed once per call: for each block of 16 units, K x (G 16) floats, the G gates of the 16 units
// side by side, so one k step of a row is G vector loads of W and one broadcast of h. A thread owns a
// contiguous range of blocks and packs them itself. Per step and block, the live rows go through a
// register-blocked microkernel (R rows x G accumulators) and the gate math runs on the accumulators.
// K is walked in chunks of kKc so that a block's W chunk (32 KB for the LSTM) stays in L1 while all the
// row blocks of the step reuse it; each chunk's partial sums wait in a small per-thread buffer.
//
// Memory: at H = 512 a thread's share of W (2 MB on 2 threads) is its whole L2, so W comes largely from
// L3 every step. The first row blocks of each chunk prefetch the next chunk into L2, spread over their
// k loops (without it: ~12% slower at B = 32, a third slower in a microbenchmark streaming W from L3);
// every other step walks the blocks in reverse so that it starts on what is still in L2; the input part
// of the gates is prefetched a few chunks before the gate math reads it.
#include "cpu/rnn_recurrence_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include <c10/util/Exception.h>

#include "common/rnn_math.h"
#include "cpu/rnn_steps.h"

namespace fastnn {
namespace cpu {

#if defined(__AVX512F__)
namespace {

#define FASTNN_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int kU = 16;        // units per block: one zmm
constexpr int64_t kKc = 128;  // k per chunk (64..256 measured the same at H = 512)
// Below this many flops per step and thread the barrier costs more than the second thread saves
// (H = 20, B = 4, 26 kflop: 1.0 us a step on one thread, 1.4 on two; H = 64, B = 8, 262 kflop: 4.6, 3.8).
constexpr int64_t kMinFlopsPerThread = 100000;

// Rows per microkernel call: R G accumulators + G registers of W within the 32 zmm.
template <int G>
constexpr int max_rows() {
  return G == 4 ? 6 : 8;
}

struct Buffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> p;
  explicit Buffer(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64))) {
    TORCH_CHECK(p != nullptr, "rnn: out of memory");
  }
  float* get() const { return p.get(); }
};

// One step as seen by the row blocks.
struct Step {
  const RecurrenceForward* a;
  int64_t GH;
  const float* hp;  // h_{t-1} (B, H)
  float* hn;        // h_t (B, H)
  int64_t off;      // first row of the step
  float* gates;     // the input part of the gates of row off + b at (off - row0 + b) GH
  int64_t row0;
};

// acc[r][g] += sum_k h[r ldh + k] w[(k G + g) 16 ..] over k < kn; prefetches NPF lines of pf per k.
template <int G, int R, int NPF>
FASTNN_ALWAYS_INLINE void dot_rows(const float* __restrict w, const float* __restrict h, int64_t ldh, int64_t kn,
                                   const float* pf, __m512 (&acc)[R][G]) {
  const float* hr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) hr[r] = h + r * ldh;
  for (int64_t k = 0; k < kn; ++k) {
    __m512 wv[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) wv[g] = _mm512_loadu_ps(w + (k * G + g) * kU);
#pragma GCC unroll 4
    for (int q = 0; q < NPF; ++q) _mm_prefetch(reinterpret_cast<const char*>(pf + (k * NPF + q) * kU), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 hv = _mm512_set1_ps(hr[r][k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(hv, wv[g], acc[r][g]);
    }
  }
}

// Gate math of row b for units [u0, u0 + 16) (lanes masked by m), from its recurrent parts acc[g]; the
// same formulas as rnn_cpu.cpp's gate pass (rnn_math.h), the same sums.
template <int G>
FASTNN_ALWAYS_INLINE void gate_row(const Step& s, const __m512* acc, int64_t b, int64_t u0, __mmask16 m) {
  const RecurrenceForward& a = *s.a;
  const int64_t H = a.H, row = s.off + b;
  float* gx = s.gates + (row - s.row0) * s.GH + u0;
  auto load = [m](const float* p) { return (VF)_mm512_maskz_loadu_ps(m, p); };
  auto store = [m](float* p, VF v) { _mm512_mask_storeu_ps(p, m, (__m512)v); };
  if constexpr (G == 4) {
    float* c = a.c + b * H + u0;
    VF i, f, g, o, cn, r;
    rnn::lstm_forward<rnn_steps::VecMath>(load(gx) + (VF)acc[0], load(gx + H) + (VF)acc[1], load(gx + 2 * H) + (VF)acc[2],
                                   load(gx + 3 * H) + (VF)acc[3], load(c), i, f, g, o, cn, r);
    store(c, cn);
    store(a.y + row * H + u0, r);
    store(s.hn + b * H + u0, r);
    if (a.train) {
      store(gx, i);
      store(gx + H, f);
      store(gx + 2 * H, g);
      store(gx + 3 * H, o);
      store(a.aux + row * H + u0, cn);
    }
  } else {
    VF h_r = (VF)acc[0], h_z = (VF)acc[1], h_n = (VF)acc[2];
    if (a.b_hh) {
      h_r = h_r + load(a.b_hh + u0);
      h_z = h_z + load(a.b_hh + H + u0);
      h_n = h_n + load(a.b_hh + 2 * H + u0);
    }
    VF r, z, n, hv;
    rnn::gru_forward<rnn_steps::VecMath>(load(gx), load(gx + H), load(gx + 2 * H), h_r, h_z, h_n, load(s.hp + b * H + u0), r,
                                  z, n, hv);
    store(s.hn + b * H + u0, hv);
    store(a.y + row * H + u0, hv);
    if (a.train) {
      store(gx, r);
      store(gx + H, z);
      store(gx + 2 * H, n);
      store(a.aux + row * H + u0, h_n);
    }
  }
}

// Rows [b0, b0 + R) of one block over k in [k0, k1). Each chunk sums from zero and is added to the
// earlier chunks' sum in `part`: this two-level order keeps the rounding error of the dot products below
// that of a single running sum (which gave ~20% more than MKL's GEMM at K = 512, against fp64). After the
// last chunk, the gate math.
template <int G, int R, int NPF>
void row_block(const Step& s, const float* wblk, int64_t u0, __mmask16 m, int64_t b0, int64_t k0, int64_t k1,
               float* part, const float* pf) {
  const int64_t H = s.a->H;
  if (k0 == 0) {
    // The input part of these rows' gates (and c) is read once per step, far apart: into L2 now, a few
    // chunks before the gate math needs it.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* gx = s.gates + (s.off - s.row0 + b0 + r) * s.GH + u0;
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) _mm_prefetch(reinterpret_cast<const char*>(gx + g * H), _MM_HINT_T1);
      if constexpr (G == 4) _mm_prefetch(reinterpret_cast<const char*>(s.a->c + (b0 + r) * H + u0), _MM_HINT_T1);
    }
  }
  __m512 acc[R][G];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  }
  dot_rows<G, R, NPF>(wblk + k0 * G * kU, s.hp + b0 * H + k0, H, k1 - k0, pf, acc);
  if (k0 > 0) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        acc[r][g] = _mm512_add_ps(_mm512_loadu_ps(part + ((b0 + r) * G + g) * kU), acc[r][g]);
      }
    }
  }
  if (k1 < H) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(part + ((b0 + r) * G + g) * kU, acc[r][g]);
    }
    return;
  }
  for (int r = 0; r < R; ++r) gate_row<G>(s, acc[r], b0 + r, u0, m);
}

template <int G, int NPF>
void row_block_n(int n, const Step& s, const float* wblk, int64_t u0, __mmask16 m, int64_t b0, int64_t k0, int64_t k1,
                 float* part, const float* pf) {
  static_assert(max_rows<G>() <= 8, "row_block_n dispatches up to 8 rows");
  switch (n) {
    case 1: return row_block<G, 1, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
    case 2: return row_block<G, 2, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
    case 3: return row_block<G, 3, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
    case 4: return row_block<G, 4, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
    case 5: return row_block<G, 5, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
    case 6: return row_block<G, 6, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
    case 7:
      if constexpr (max_rows<G>() >= 7) return row_block<G, 7, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
      break;
    case 8:
      if constexpr (max_rows<G>() >= 8) return row_block<G, 8, NPF>(s, wblk, u0, m, b0, k0, k1, part, pf);
      break;
  }
}

// One step of blocks [blo, bhi) over rows [0, bs), split into near-equal microkernel row blocks; the
// blocks in descending order when `down`.
template <int G>
void step_blocks(const Step& s, const float* wp, int64_t blo, int64_t bhi, int64_t bs, float* part, bool down) {
  const int64_t H = s.a->H, K = H;
  const int64_t nrb = (bs + max_rows<G>() - 1) / max_rows<G>(), base = bs / nrb, extra = bs % nrb;
  // The chunk processed next (G kn lines) is prefetched by the first row blocks, npf lines per k each.
  const int npf = nrb >= G ? 1 : (2 * nrb >= G ? 2 : 4);
  for (int64_t j = 0; j < bhi - blo; ++j) {
    const int64_t blk = down ? bhi - 1 - j : blo + j;
    const int64_t u0 = blk * kU;
    const __mmask16 m = H - u0 >= kU ? __mmask16(0xFFFF) : __mmask16((1u << (H - u0)) - 1);
    const float* wblk = wp + blk * K * G * kU;
    const bool last_blk = j + 1 == bhi - blo;
    const float* next_blk = last_blk ? wblk : wp + (down ? blk - 1 : blk + 1) * K * G * kU;
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t k1 = std::min(K, k0 + kKc), kn = k1 - k0;
      const float* next = k1 < K ? wblk + k1 * G * kU : next_blk;
      int64_t b0 = 0;
      for (int64_t i = 0; i < nrb; ++i) {
        const int n = int(base + (i < extra));
        const float* pf = next + i * kn * npf * kU;
        if ((last_blk && k1 == K) || i * npf >= G) {  // nothing of ours follows, or prefetched already
          row_block_n<G, 0>(n, s, wblk, u0, m, b0, k0, k1, part, pf);
        } else if (npf == 1) {
          row_block_n<G, 1>(n, s, wblk, u0, m, b0, k0, k1, part, pf);
        } else if (npf == 2) {
          row_block_n<G, 2>(n, s, wblk, u0, m, b0, k0, k1, part, pf);
        } else {
          row_block_n<G, 4>(n, s, wblk, u0, m, b0, k0, k1, part, pf);
        }
        b0 += n;
      }
    }
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

template <int G>
void run(const RecurrenceForward& a, int threads) {
  const int64_t H = a.H, B = a.B, K = H, nblk = (H + kU - 1) / kU;
  const int64_t flops = 2 * a.bs[a.reverse ? a.T - 1 : 0] * K * G * H;  // the first step, the largest forward
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>({threads, nblk, flops / kMinFlopsPerThread})));
  Buffer wp(nblk * K * G * kU);
  Buffer h1(B * H);
  Buffer part(K > kKc ? int64_t(nt) * B * G * kU : 1);
  std::memcpy(h1.get(), a.h, sizeof(float) * B * H);
  float* hbuf[2] = {a.h, h1.get()};  // both start as h0: rows that join late (reverse) read it from either
  // walk steps [k0, k1) in one parallel region; the first also packs W (each thread its own blocks)
  auto steps = [&](int64_t k0, int64_t k1, int64_t row0) {
#pragma omp parallel num_threads(nt)
    {
      // partition by the team actually running (fewer threads when nested)
      const int team = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t blo = nblk * tid / team, bhi = nblk * (tid + 1) / team;
      float* my_part = part.get() + (K > kKc ? int64_t(tid) * B * G * kU : 0);
      if (k0 == 0) pack_blocks(a.w_hh, G, H, wp.get(), blo, bhi);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = a.reverse ? a.T - 1 - k : k;
        const Step s{&a, G * H, hbuf[k & 1], hbuf[(k + 1) & 1], a.off[t], a.gates, row0};
        // every other step walks the blocks backwards: it starts on the W its thread used last, which
        // is still in L2 (B = 1, H = 512: 78 -> 60 us a step; no change at B = 32)
        step_blocks<G>(s, wp.get(), blo, bhi, a.bs[t], my_part, k & 1);
        // h_t complete before anyone reads it, and h_{t-1} no longer read before anyone overwrites it
#pragma omp barrier
      }
    }
  };
  if (!a.input) {
    steps(0, a.T, 0);
  } else {
    for (int64_t k0 = 0; k0 < a.T; k0 += a.chunk_steps) {
      const int64_t k1 = std::min(a.T, k0 + a.chunk_steps);
      // the chunk's rows: contiguous, from its first step in time to its last
      const int64_t t_first = a.reverse ? a.T - k1 : k0, t_last = a.reverse ? a.T - 1 - k0 : k1 - 1;
      const int64_t r0 = a.off[t_first], r1 = a.off[t_last] + a.bs[t_last];
      a.input(k0, k1, r0, r1);
      steps(k0, k1, r0);
    }
  }
  // h_n of each sequence is its output at the last step it is live in: forward, the last step with more
  // than b rows; reverse, step 0 (walked last, all B rows).
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    if (!a.reverse) {
      while (t + 1 < a.T && a.bs[t + 1] > b) ++t;
    }
    std::memcpy(a.h + b * H, a.y + (a.off[t] + b) * H, sizeof(float) * H);
  }
}

}  // namespace

bool recurrence_forward_available() { return true; }

void recurrence_forward(const RecurrenceForward& a, int threads) {
  if (a.lstm) {
    run<4>(a, threads);
  } else {
    run<3>(a, threads);
  }
}

#else  // no AVX-512: rnn_cpu.cpp keeps its per-step GEMM path

bool recurrence_forward_available() { return false; }
void recurrence_forward(const RecurrenceForward&, int) { TORCH_CHECK(false, "rnn: the fused recurrence needs AVX-512"); }

#endif

}  // namespace cpu
}  // namespace fastnn
