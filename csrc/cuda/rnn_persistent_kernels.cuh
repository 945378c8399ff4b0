// Persistent LSTM / GRU forward: one cooperative launch walks every step of one layer and direction, with
// W_hh held in registers for the whole sequence. Torch-free: the launcher (rnn_persistent_cuda.cu) and the
// CPU emulation used by the tests (csrc/cpu/rnn_persistent_emulated.cpp) both run the per-thread bodies
// below, so the emulation checks this file's index and cell math on machines without a GPU.
//
// Layout. Block j owns hidden units [j U, (j + 1) U) and so the R = G U rows of W_hh that produce their
// gates (row g U + uu is W_hh's row g H + j U + uu). Its 256 threads are R rows x S k-slices (thread
// tid = s R + r, S = 256 / R): thread (s, r) keeps W_hh[row r][s KPT, (s + 1) KPT) in KPT float registers
// (zeros past H), loaded once. Per step, for a pass of up to PB live batch rows:
//   1. the block stages h_prev of those rows into shared memory as float, split by k-slice (slice s of
//      row b at hs[b][s SST ..], SST = KPT + 4: slices that share a warp fall in different banks);
//   2. thread (s, r) dots its KPT weights with slice s of each row (4 partial sums in a fixed order) and
//      writes the partial to red[s][b][r];
//   3. each (row b, unit uu) sums its G gates' S partials in slice order, adds the input projection and
//      the biases, and runs the cell (rnn_math.h), writing y, h for the next step, the cell state and, when
//      training, the backward's workspace (activated gates over gx, aux);
// then a grid-wide barrier before the next step reads h. Within a warp all lanes read the same h address
// (a broadcast), so the dot is bound by the FMA rate, not shared memory.
//
// Numerics (kept equal to the Triton cells of kernels/rnn.py, the fallback): fp32 arithmetic; the
// carried state fp32 (LSTM c, GRU h); h for the next step's dot in x's dtype (as the GEMM operand there);
// biases added in fp32; gates and y stored in x's dtype, aux in fp32. One difference: the recurrent part
// h W_hh^T is not rounded to x's dtype before the cell (cuBLAS's output is, in the fallback).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../common/hd.h"
#include "../common/rnn_math.h"

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTNN_UNROLL _Pragma("unroll")
#else  // the emulation: g++ unrolls at -O3 where it pays
#define FASTNN_UNROLL
#endif

namespace fastnn::rnn_persistent {

constexpr int kThreads = 256;
constexpr int kMaxKpt = 128;          // W registers per thread
constexpr int kMaxPassRows = 64;      // batch rows per pass
constexpr size_t kSmemBudget = 200 * 1024;

struct Plan {
  int G, H, B;
  int units;    // U: hidden units per block
  int blocks;   // ceil(H / U)
  int rows;     // R = G U
  int slices;   // S = 256 / R
  int kpt;      // weights per thread: a power of two in [8, kMaxKpt], >= ceil(H / S)
  int sst;      // shared stride of one k-slice of a staged row (floats)
  int ldh;      // shared stride of one staged row: S SST
  int pass_rows;  // PB
  size_t smem;  // dynamic shared memory: PB (ldh + S R) floats
  bool fits;
};

// The plan for G gates, H units, B batch rows on a device with `sms` multiprocessors. fits = false: the
// weights do not fit the registers (H above ~1024 for the LSTM) or the shared memory; use the fallback.
inline Plan make_plan(int G, int H, int B, int sms) {
  Plan p{};
  p.G = G, p.H = H, p.B = B;
  p.fits = false;
  if (G <= 0 || H <= 0 || B <= 0 || sms <= 0) return p;
  p.units = (H + sms - 1) / sms;
  p.blocks = (H + p.units - 1) / p.units;
  p.rows = G * p.units;
  if (p.rows > kThreads) return p;
  p.slices = kThreads / p.rows;
  const int need = (H + p.slices - 1) / p.slices;
  p.kpt = 8;
  while (p.kpt < need) p.kpt *= 2;
  if (p.kpt > kMaxKpt) return p;
  p.sst = p.kpt + 4;
  p.ldh = p.slices * p.sst;
  const size_t per_row = static_cast<size_t>(p.ldh + p.slices * p.rows) * sizeof(float);
  const size_t rows_fit = kSmemBudget / per_row;
  if (rows_fit < 1) return p;
  p.pass_rows = static_cast<int>(rows_fit < size_t(kMaxPassRows) ? rows_fit : size_t(kMaxPassRows));
  if (p.pass_rows > B) p.pass_rows = B;
  p.smem = per_row * p.pass_rows;
  p.fits = true;
  return p;
}

template <typename T>
struct Params {
  int T_steps;
  bool reverse, train, has_bias, lstm;
  const int64_t* batch_sizes;  // (T,) on the device
  const int64_t* offsets;      // (T,) first packed row of each step
  T* gx;                       // (rows, G H) x W_ih^T; training: overwritten with the activated gates
  const T* w_hh;               // (G H, H)
  const T* b_ih;               // (G H,) or null
  const T* b_hh;
  T* hbuf[2];                  // (B, H) h in x's dtype, double-buffered; both start as h0
  float* state;                // (B, H) LSTM c / GRU h in fp32, starts as c0 / h0
  T* y;                        // (rows, H)
  float* aux;                  // (rows, H) training: LSTM c, GRU h W_hn^T + b_hn
};

template <typename T>
FASTNN_HD float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
FASTNN_HD T from_f(float v) {
  return static_cast<T>(v);
}

#if defined(__CUDACC__)  // torch builds with the implicit half / bfloat16 conversions switched off
FASTNN_HD float to_f(__half v) { return __half2float(v); }
FASTNN_HD float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
FASTNN_HD __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
FASTNN_HD __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// h of the previous step: on the device straight from L2 (written by other blocks before the barrier;
// L1 is not coherent across SMs)
template <typename T>
FASTNN_HD T load_h(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// Thread (block, tid)'s KPT weights, zeros where its row or k is past W_hh.
template <typename T, int KPT>
FASTNN_HD void load_weights(const Params<T>& a, const Plan& pl, int block, int tid, float (&w)[KPT]) {
  const int r = tid % pl.rows, s = tid / pl.rows;
  const int g = r / pl.units, u = block * pl.units + r % pl.units;
  const bool live = s < pl.slices && u < pl.H;
  const T* src = a.w_hh + (static_cast<int64_t>(g) * pl.H + u) * pl.H;
FASTNN_UNROLL
  for (int q = 0; q < KPT; ++q) {
    const int k = s * KPT + q;
    w[q] = live && k < pl.H ? to_f(src[k]) : 0.0f;
  }
}

// Staging of element q of row b of a pass from b0: hs[b][slice SST + kk] = h_prev[b0 + b][q] with
// q = slice KPT + kk (the slices are contiguous in k), 0 past H (the weights there are 0, and 0 * garbage
// could be NaN). The callers walk q fastest across threads: coalesced reads, and KPT a compile-time shift.
template <typename T, int KPT>
FASTNN_HD void stage_h(const Plan& pl, const T* h_prev, int b0, int b, int q, float* hs) {
  hs[b * pl.ldh + (q / KPT) * pl.sst + q % KPT] =
      q < pl.H ? to_f(load_h(h_prev + static_cast<int64_t>(b0 + b) * pl.H + q)) : 0.0f;
}

// Thread tid's partial dot products with the nb staged rows, into red[s][b][r].
template <int KPT>
FASTNN_HD void dot_partials(const Plan& pl, int tid, const float (&w)[KPT], const float* hs, int nb, float* red) {
  const int r = tid % pl.rows, s = tid / pl.rows;
  if (s >= pl.slices) return;
  for (int b = 0; b < nb; ++b) {
    const float* h = hs + b * pl.ldh + s * pl.sst;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
FASTNN_UNROLL
    for (int q = 0; q < KPT; q += 4) {
#if defined(__CUDA_ARCH__)
      const float4 hv = *reinterpret_cast<const float4*>(h + q);
      a0 = fmaf(w[q], hv.x, a0);
      a1 = fmaf(w[q + 1], hv.y, a1);
      a2 = fmaf(w[q + 2], hv.z, a2);
      a3 = fmaf(w[q + 3], hv.w, a3);
#else
      a0 = fmaf(w[q], h[q], a0);
      a1 = fmaf(w[q + 1], h[q + 1], a1);
      a2 = fmaf(w[q + 2], h[q + 2], a2);
      a3 = fmaf(w[q + 3], h[q + 3], a3);
#endif
    }
    red[(s * pl.pass_rows + b) * pl.rows + r] = (a0 + a1) + (a2 + a3);
  }
}

// Cell item i of a pass (row b0 + i / U, unit i % U of the block) at step t: gates from the partials,
// then the LSTM or GRU cell.
template <typename T, int G>
FASTNN_HD void cell(const Params<T>& a, const Plan& pl, int block, int t, int b0, int i, const float* red,
                    T* h_next) {
  const int bl = i / pl.units, uu = i % pl.units;
  const int u = block * pl.units + uu;
  if (u >= pl.H) return;
  const int H = pl.H;
  const int64_t b = b0 + bl;
  const int64_t row = a.offsets[t] + b;
  float rec[G];
FASTNN_UNROLL
  for (int g = 0; g < G; ++g) {
    float sum = 0.0f;
    for (int s = 0; s < pl.slices; ++s) sum += red[(s * pl.pass_rows + bl) * pl.rows + g * pl.units + uu];
    rec[g] = sum;
  }
  T* gx = a.gx + row * (G * H) + u;
  float* st = a.state + b * H + u;
  float out;
  if constexpr (G == 4) {
    float pre[4];
FASTNN_UNROLL
    for (int g = 0; g < 4; ++g) {
      pre[g] = to_f(gx[g * H]) + rec[g];
      if (a.has_bias) pre[g] += to_f(a.b_ih[g * H + u]) + to_f(a.b_hh[g * H + u]);
    }
    float ig, fg, gg, og, c, r;
    rnn::lstm_forward<rnn::ScalarMath>(pre[0], pre[1], pre[2], pre[3], *st, ig, fg, gg, og, c, r);
    *st = c;
    out = r;
    if (a.train) {
      gx[0] = from_f<T>(ig);
      gx[H] = from_f<T>(fg);
      gx[2 * H] = from_f<T>(gg);
      gx[3 * H] = from_f<T>(og);
      a.aux[row * H + u] = c;
    }
  } else {
    float xr = to_f(gx[0]), xz = to_f(gx[H]), xn = to_f(gx[2 * H]);
    float hr = rec[0], hz = rec[1], hn = rec[2];
    if (a.has_bias) {
      xr += to_f(a.b_ih[u]);
      xz += to_f(a.b_ih[H + u]);
      xn += to_f(a.b_ih[2 * H + u]);
      hr += to_f(a.b_hh[u]);
      hz += to_f(a.b_hh[H + u]);
      hn += to_f(a.b_hh[2 * H + u]);
    }
    float rg, zg, ng, h;
    rnn::gru_forward<rnn::ScalarMath>(xr, xz, xn, hr, hz, hn, *st, rg, zg, ng, h);
    *st = h;
    out = h;
    if (a.train) {
      gx[0] = from_f<T>(rg);
      gx[H] = from_f<T>(zg);
      gx[2 * H] = from_f<T>(ng);
      a.aux[row * H + u] = hn;
    }
  }
  a.y[row * H + u] = from_f<T>(out);
  h_next[b * H + u] = from_f<T>(out);
}

// The step walked k-th, its live rows, and the h buffers it reads and writes.
template <typename T>
struct StepView {
  int t, bs;
  const T* h_prev;
  T* h_next;
};

template <typename T>
FASTNN_HD StepView<T> step_view(const Params<T>& a, int k) {
  StepView<T> v;
  v.t = a.reverse ? a.T_steps - 1 - k : k;
  v.bs = static_cast<int>(a.batch_sizes[v.t]);
  // selects, not a[k & 1]: a dynamic index would copy the parameters to local memory
  v.h_prev = (k & 1) ? a.hbuf[1] : a.hbuf[0];
  v.h_next = (k & 1) ? a.hbuf[0] : a.hbuf[1];
  return v;
}

#if defined(__CUDACC__)
template <typename T, int G, int KPT>
__global__ void __launch_bounds__(kThreads, 1) persistent_forward_kernel(Params<T> a, Plan pl) {
  extern __shared__ float4 smem_f4[];
  float* hs = reinterpret_cast<float*>(smem_f4);
  float* red = hs + pl.pass_rows * pl.ldh;
  const int block = blockIdx.x, tid = threadIdx.x;
  float w[KPT];
  load_weights<T, KPT>(a, pl, block, tid, w);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int k = 0; k < a.T_steps; ++k) {
    const StepView<T> v = step_view(a, k);
    for (int b0 = 0; b0 < v.bs; b0 += pl.pass_rows) {
      const int nb = min(pl.pass_rows, v.bs - b0);
      const int span = pl.slices * KPT;
      for (int b = 0; b < nb; ++b)
        for (int q = tid; q < span; q += kThreads) stage_h<T, KPT>(pl, v.h_prev, b0, b, q, hs);
      __syncthreads();
      dot_partials<KPT>(pl, tid, w, hs, nb, red);
      __syncthreads();
      for (int i = tid; i < nb * pl.units; i += kThreads) cell<T, G>(a, pl, block, v.t, b0, i, red, v.h_next);
      __syncthreads();  // hs and red are reused by the next pass
    }
    grid.sync();  // h_next complete everywhere before the next step reads it (and h_prev read before reuse)
  }
}
#endif

}  // namespace fastnn::rnn_persistent

#undef FASTNN_UNROLL
