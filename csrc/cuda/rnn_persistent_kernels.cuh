// Persistent LSTM / GRU forward and backward recurrence: one cooperative launch walks every step of one
// layer and direction, with W_hh held in registers for the whole sequence. Torch-free: the launcher
// (rnn_persistent_cuda.cu) and the CPU emulation used by the tests (csrc/cpu/rnn_persistent_emulated.cpp)
// both run the per-thread bodies below, so the emulation checks this file's index and cell math on
// machines without a GPU.
//
// Forward layout (the backward's: see its section below). Block j owns hidden units [j U, (j + 1) U) and
// so the R = G U rows of W_hh that produce their gates (row g U + uu is W_hh's row g H + j U + uu). Its
// 256 threads are R rows x S k-slices (thread tid = s R + r, S = 256 / R): thread (s, r) keeps
// W_hh[row r][s KPT, (s + 1) KPT) in KPT float registers (zeros past H), loaded once. Per step, for a pass
// of up to PB live batch rows:
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
  bool backward;
  int len;      // length of the dot products: H (forward, h W_hh^T), G H (backward, dgates W_hh)
  int units;    // U: hidden units per block
  int blocks;   // ceil(H / U)
  int rows;     // dot products per batch row and block: R = G U (forward), U (backward)
  int slices;   // S = 256 / R
  int kpt;      // weights per thread: a power of two in [8, kMaxKpt], >= ceil(len / S)
  int sst;      // shared stride of one k-slice of a staged row (floats)
  int ldh;      // shared stride of one staged row: S SST
  int pass_rows;  // PB
  size_t smem;  // dynamic shared memory: PB (ldh + S R) floats
  bool fits;
};

// The plan for G gates, H units, B batch rows on a device with `sms` multiprocessors, forward or backward.
// fits = false: the weights do not fit the registers (H above ~1024 for the LSTM) or the shared memory;
// use the fallback. Both directions hold G U H weights per block, so they fit alike.
inline Plan make_plan(int G, int H, int B, int sms, bool backward = false) {
  Plan p{};
  p.G = G, p.H = H, p.B = B;
  p.backward = backward;
  p.fits = false;
  if (G <= 0 || H <= 0 || B <= 0 || sms <= 0) return p;
  p.len = backward ? G * H : H;
  p.units = (H + sms - 1) / sms;
  p.blocks = (H + p.units - 1) / p.units;
  p.rows = backward ? p.units : G * p.units;
  if (p.rows > kThreads) return p;
  p.slices = kThreads / p.rows;
  const int need = (p.len + p.slices - 1) / p.slices;
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

// Staging of element q of row b of a pass: hs[b][slice SST + kk] = src[b][q] (rows len apart) with
// q = slice KPT + kk (the slices are contiguous), 0 past len (the weights there are 0, and 0 * garbage
// could be NaN). src is the pass's first row: of h_prev (forward) or of the later step's recurrent gate
// gradients (backward). The callers walk q fastest across threads: coalesced reads, and KPT a
// compile-time shift.
template <typename T, int KPT>
FASTNN_HD void stage_row(const Plan& pl, const T* src, int b, int q, float* hs) {
  hs[b * pl.ldh + (q / KPT) * pl.sst + q % KPT] =
      q < pl.len ? to_f(load_h(src + static_cast<int64_t>(b) * pl.len + q)) : 0.0f;
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

// ---------------------------------------------------------------- backward

// The backward walks the steps in reverse. Block j owns the same units; the dot products are now
// dh_prev[b][u] = sum over the G H rows r of dgh[b][r] W_hh[r][u] for its U units, so thread (s, c) keeps
// column u = j U + c of W_hh over rows [s KPT, (s + 1) KPT) (G U H weights a block, as forward). Iteration kb
// runs, per pass of rows: the dot products over the gate gradients of the step done in iteration kb - 1,
// then the cells of step kb: a row continuing to an earlier step takes the dot as the gradient reaching its
// h from later steps; a row whose first forward step was the step just done writes it to dh0 instead. One
// iteration more than steps gives the last step's rows their dh0.
template <typename T>
struct BwdParams {
  int T_steps;
  bool reverse;
  const int64_t* batch_sizes;  // (T,) on the device
  const int64_t* offsets;      // (T,)
  const T* w_hh;               // (G H, H)
  const T* gates;              // (rows, G H) the forward's activated gates
  const float* aux;            // (rows, H) the forward's LSTM c / GRU h W_hn^T + b_hn
  const T* y;                  // (rows, H) GRU: h_prev of the rows that continue
  const T* h0;                 // (B, H) GRU: h_prev of the rows that start
  const T* c0;                 // (B, H) LSTM: c_prev of the rows that start
  const T* dy;                 // (rows, H)
  const T* dh_n;               // (B, H) LSTM: the gradient reaching h at a row's last step
  float* dstate;               // (B, H) fp32 carried: LSTM dc (starts as dc_n), GRU dh z (starts as dh_n)
  T* dgx;                      // (rows, G H) out: gradients of the input part's pre-activations
  T* dgh;                      // (rows, G H) out: of the recurrent part's (the LSTM's: dgx itself)
  T* dh0;                      // (B, H) out
};

// Thread (block, tid)'s KPT weights of the backward: column block U + tid % U of W_hh, rows
// [(tid / U) KPT, + KPT), zeros past W_hh.
template <typename T, int KPT>
FASTNN_HD void load_weights_backward(const BwdParams<T>& a, const Plan& pl, int block, int tid, float (&w)[KPT]) {
  const int c = tid % pl.rows, s = tid / pl.rows;
  const int u = block * pl.units + c;
  const bool live = s < pl.slices && u < pl.H;
  FASTNN_UNROLL
  for (int q = 0; q < KPT; ++q) {
    const int r = s * KPT + q;
    w[q] = live && r < pl.len ? to_f(a.w_hh[static_cast<int64_t>(r) * pl.H + u]) : 0.0f;
  }
}

// Iteration kb of the backward: the step whose cells run (t, -1 after the last), the step walked before
// it in the forward (its c / h are t's c_prev / h_prev for the first n_prev rows), and the step done in
// the previous iteration (whose recurrent gate gradients the dot products read).
struct BwdStepView {
  int t, n_cur, t_prev, n_prev, n_done;
  int64_t off_done;
};

template <typename T>
FASTNN_HD BwdStepView bwd_step_view(const BwdParams<T>& a, int kb) {
  const int n = a.T_steps, k = n - 1 - kb;  // k: the forward walk's index of this iteration's step
  const int flip = a.reverse ? n - 1 : 0, sign = a.reverse ? -1 : 1;  // the step walked k-th: flip + sign k
  BwdStepView v;
  v.t = kb < n ? flip + sign * k : -1;
  v.n_cur = v.t >= 0 ? static_cast<int>(a.batch_sizes[v.t]) : 0;
  v.t_prev = v.t >= 0 && k >= 1 ? flip + sign * (k - 1) : -1;
  const int bs_prev = v.t_prev >= 0 ? static_cast<int>(a.batch_sizes[v.t_prev]) : 0;
  v.n_prev = bs_prev < v.n_cur ? bs_prev : v.n_cur;
  const int t_done = kb >= 1 ? flip + sign * (k + 1) : -1;
  v.n_done = t_done >= 0 ? static_cast<int>(a.batch_sizes[t_done]) : 0;
  v.off_done = t_done >= 0 ? a.offsets[t_done] : 0;
  return v;
}

// Cell item i of a pass from b0 (row b0 + i / U, unit i % U): nd of the pass's rows have dot products in red.
template <typename T, int G>
FASTNN_HD void cell_backward(const BwdParams<T>& a, const Plan& pl, int block, const BwdStepView& v, int b0, int nd,
                             int i, const float* red) {
  const int bl = i / pl.units, uu = i % pl.units;
  const int u = block * pl.units + uu;
  if (u >= pl.H) return;
  const int H = pl.H;
  const int64_t b = b0 + bl;
  float* ds = a.dstate + b * H + u;
  float rec = 0.0f;  // the gradient reaching h through the later step's gates
  if (bl < nd) {
    for (int s = 0; s < pl.slices; ++s) rec += red[(s * pl.pass_rows + bl) * pl.rows + uu];
  } else if (G == 4) {
    rec = to_f(a.dh_n[b * H + u]);  // the row's last step: h_n's gradient (the GRU's starts in dstate)
  }
  if (b >= v.n_cur) {  // the step just done was the row's first: rec is dh0's (plus the GRU's direct part)
    a.dh0[b * H + u] = from_f<T>(G == 4 ? rec : *ds + rec);
    return;
  }
  const int64_t row = a.offsets[v.t] + b;
  const bool cont = b < v.n_prev;
  const int64_t prev_row = cont ? a.offsets[v.t_prev] + b : 0;
  const T* gt = a.gates + row * (G * H) + u;
  T* dgx = a.dgx + row * (G * H) + u;
  const float dy = to_f(a.dy[row * H + u]);
  if constexpr (G == 4) {
    const float c_prev = cont ? a.aux[prev_row * H + u] : to_f(a.c0[b * H + u]);
    float di, df, dg, dop, dc_prev;
    rnn::lstm_backward<rnn::ScalarMath>(to_f(gt[0]), to_f(gt[H]), to_f(gt[2 * H]), to_f(gt[3 * H]), c_prev,
                                        a.aux[row * H + u], rec + dy, *ds, di, df, dg, dop, dc_prev);
    *ds = dc_prev;
    dgx[0] = from_f<T>(di);
    dgx[H] = from_f<T>(df);
    dgx[2 * H] = from_f<T>(dg);
    dgx[3 * H] = from_f<T>(dop);
  } else {
    const float h_prev = to_f(cont ? a.y[prev_row * H + u] : a.h0[b * H + u]);
    const float dh = (*ds + rec) + dy;
    float dr, dz, dn, dhn, direct;
    rnn::gru_backward<rnn::ScalarMath>(to_f(gt[0]), to_f(gt[H]), to_f(gt[2 * H]), a.aux[row * H + u], h_prev, dh, dr,
                                       dz, dn, dhn, direct);
    *ds = direct;
    T* dgh = a.dgh + row * (G * H) + u;
    dgx[0] = from_f<T>(dr);
    dgx[H] = from_f<T>(dz);
    dgx[2 * H] = from_f<T>(dn);
    dgh[0] = from_f<T>(dr);
    dgh[H] = from_f<T>(dz);
    dgh[2 * H] = from_f<T>(dhn);
  }
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
      const T* src = v.h_prev + static_cast<int64_t>(b0) * pl.H;
      for (int b = 0; b < nb; ++b)
        for (int q = tid; q < span; q += kThreads) stage_row<T, KPT>(pl, src, b, q, hs);
      __syncthreads();
      dot_partials<KPT>(pl, tid, w, hs, nb, red);
      __syncthreads();
      for (int i = tid; i < nb * pl.units; i += kThreads) cell<T, G>(a, pl, block, v.t, b0, i, red, v.h_next);
      __syncthreads();  // hs and red are reused by the next pass
    }
    grid.sync();  // h_next complete everywhere before the next step reads it (and h_prev read before reuse)
  }
}

template <typename T, int G, int KPT>
__global__ void __launch_bounds__(kThreads, 1) persistent_backward_kernel(BwdParams<T> a, Plan pl) {
  extern __shared__ float4 smem_f4[];
  float* hs = reinterpret_cast<float*>(smem_f4);
  float* red = hs + pl.pass_rows * pl.ldh;
  const int block = blockIdx.x, tid = threadIdx.x;
  float w[KPT];
  load_weights_backward<T, KPT>(a, pl, block, tid, w);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int kb = 0; kb <= a.T_steps; ++kb) {
    const BwdStepView v = bwd_step_view(a, kb);
    const int rows = max(v.n_cur, v.n_done);
    for (int b0 = 0; b0 < rows; b0 += pl.pass_rows) {
      const int nb = min(pl.pass_rows, rows - b0);
      const int nd = max(0, min(nb, v.n_done - b0));  // the same in every thread: the barriers below are safe
      if (nd > 0) {
        const int span = pl.slices * KPT;
        const T* src = a.dgh + (v.off_done + b0) * int64_t(pl.len);
        for (int b = 0; b < nd; ++b)
          for (int q = tid; q < span; q += kThreads) stage_row<T, KPT>(pl, src, b, q, hs);
        __syncthreads();
        dot_partials<KPT>(pl, tid, w, hs, nd, red);
        __syncthreads();
      }
      for (int i = tid; i < nb * pl.units; i += kThreads) cell_backward<T, G>(a, pl, block, v, b0, nd, i, red);
      __syncthreads();
    }
    grid.sync();  // this step's gate gradients complete before the next iteration's dot products read them
  }
}
#endif

}  // namespace fastnn::rnn_persistent

#undef FASTNN_UNROLL
