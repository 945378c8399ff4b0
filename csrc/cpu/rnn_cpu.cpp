// LSTM / GRU layers on the CPU: forward and backward through time, semantics of fastnn/reference/rnn.py.
//
// Per layer and direction: the input projection of every step is one GEMM (x W_ih^T plus biases); then
// each step is one GEMM of the live rows' h with W_hh (ATen's BLAS, on its own threads) followed by one
// fused, vectorised pass of gate math over those rows (at::parallel_for over the rows, 16 units per AVX-512
// vector). A packed batch's step t holds its first batch_sizes[t] sequences, so finished sequences drop
// out of the GEMM's rows: no work on padding. In float32 without projection the steps instead run as one
// fused recurrence (rnn_recurrence_cpu.cpp: W_hh packed once, gate math on the GEMM's accumulators, one
// barrier per step).
//
// The backward walks the steps in reverse with one GEMM per step (gate gradients times W_hh) and the fused
// gate backward (in float32 without projection: one fused recurrence again); the weight gradients are one
// GEMM each over all steps at the end, never per step.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/alloc.h"
#include "common/rnn_math.h"
#include "cpu/brgemm.h"
#include "cpu/rnn_recurrence_cpu.h"
#include "cpu/rnn_steps.h"
#include "cpu/small_gemm.h"
#include "families/rnn.h"

namespace fastnn {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kTile = 64;  // gemm_rows' tiles: kTile x kTile of C

// B (K, N) of C = A B as gemm_rows wants it, from w (N, K): column panels of kTile, each K x kTile floats
// contiguous (zero past N). Rows of a plain B^T are N floats apart (8 KB at N = 2048), so a tile's k rows
// all fell in one L1 set; the panels made the LSTM forward at B = 32, H = 512, T = 256 ~6% faster.
Tensor column_panels(const Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kTile - 1) / kTile;
  return at::constant_pad_nd(w, {0, 0, 0, panels * kTile - N}).view({panels, kTile, K}).permute({0, 2, 1}).contiguous();
}

// column_panels for bf16: bf16_pack_panels' VNNI-2 panels (K even).
Tensor bf16_column_panels(const Tensor& w) {
  static_assert(kTile == 64, "bf16_pack_panels' panels are 64 columns wide");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kTile - 1) / kTile;
  Tensor out = at::empty({panels, K / 2, kTile, 2}, w.options());
  bf16_pack_panels(w.data_ptr<at::BFloat16>(), N, K, out.data_ptr<at::BFloat16>(), at::get_num_threads());
  return out;
}

// C[rows, N] = A[rows, K] B[K, N] (+ bias[N] on every row), A and C row-major and contiguous (rows K and N
// apart), C float32; A and B float32 (B as column_panels) or bf16 (B as bf16_column_panels, K even, float32
// sums), in kTile x kTile tiles through torch's brgemm (oneDNN's kernels). Threads take contiguous ranges of
// tiles in row-major order, so each maps mostly its own pages of a fresh C. Why not at::mm: on the AMD
// 2-core machine MKL's sgemm ran the input projection (1024 x 512 x 2048) at ~180 GFLOP/s and these tiles at
// ~210 (FMA peak ~230): the LSTM forward at B = 32, H = 512, T = 256 went from 187 to 175 ms (interleaved
// medians); the panels took another ~6% off (190 -> 180 ms, and 188 -> 176 in a repeat).
template <typename T>
void gemm_rows(const T* A, const T* B_panels, const float* bias, float* C, int64_t rows, int64_t K, int64_t N,
               int threads) {
  constexpr bool bf16 = std::is_same_v<T, at::BFloat16>;
  constexpr int64_t kT = kTile;
  const int64_t col_tiles = (N + kT - 1) / kT, tiles = (rows + kT - 1) / kT * col_tiles;
#pragma omp parallel num_threads(int(std::max<int64_t>(1, std::min<int64_t>(threads, tiles))))
  {
    const int team = omp_get_num_threads(), tid = omp_get_thread_num();
    for (int64_t i = tiles * tid / team; i < tiles * (tid + 1) / team; ++i) {
      const int64_t m0 = i / col_tiles * kT, mt = std::min(kT, rows - m0);
      const int64_t n0 = i % col_tiles * kT, nw = std::min(kT, N - n0);
      float* c = C + m0 * N + n0;
      if (bias) {
        for (int64_t r = 0; r < mt; ++r) std::copy(bias + n0, bias + n0 + nw, c + r * N);
      }
      if constexpr (bf16) {
#if FASTNN_HAVE_BRGEMM
        at::native::cpublas::brgemm(mt, nw, K, K, kT, N, bias != nullptr, A + m0 * K, B_panels + n0 * K, c,
                                    /*is_vnni=*/true);
#else
        TORCH_CHECK(false, "rnn: the bf16 input projection needs torch's brgemm");
#endif
      } else {
        gemm(mt, nw, K, A + m0 * K, K, B_panels + n0 * K, kT, c, N, /*add=*/bias != nullptr);
      }
    }
#if FASTNN_HAVE_BRGEMM
    if constexpr (bf16) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
  }
}
using namespace rnn_steps;

// Geometry of one layer and direction over a packed batch.
struct Layer : PackedSteps {
  bool lstm, proj;
  int64_t G, H, P;

  Layer(const std::string& mode, const Tensor& x, const Tensor& batch_sizes, const Tensor& w_hh,
        const c10::optional<Tensor>& w_hr, const Tensor& h0, bool reverse_)
      : PackedSteps("rnn_layer", batch_sizes, x.size(0), h0.size(0), reverse_),
        lstm(mode == "lstm"),
        proj(w_hr.has_value()) {
    TORCH_CHECK(mode == "lstm" || mode == "gru", "rnn_layer: mode must be 'lstm' or 'gru', got ", mode);
    G = lstm ? 4 : 3;
    H = w_hh.size(0) / G;
    P = w_hh.size(1);
  }
};

// The geometry fields a RecurrenceForward / RecurrenceBackward of layer L share.
template <class R>
R recurrence_args(const Layer& L) {
  R a;
  a.lstm = L.lstm;
  a.reverse = L.reverse;
  a.H = L.H;
  a.B = L.B;
  a.T = L.T;
  a.bs = L.bs.data();
  a.off = L.off.data();
  return a;
}

// Whether a float32 layer runs the fused recurrence (rnn_recurrence_cpu.cpp), forward and backward alike (they
// share the workspace's layout with the per-step path). One step (a cell) takes the per-step path with plain
// GEMMs: the fused recurrence packs W_hh for every call, which one step does not repay. Alternating processes
// on the 2-vCPU Xeon (noisy): at B 4, H 32 the forward 17-33 us either way and the backward 26-46 against
// 44-53 us; at B 8-64, H 256-1024 forward and backward alike within the noise (LSTM B 8 H 1024 forward
// 2.7-2.8 against 3.0-3.3 ms).
bool fused_recurrence(const Layer& L) {
  return !L.proj && L.T > 1 && L.H > 0 && recurrence_forward_available();
}

// Whether a float32 layer of input width I is one small step (a cell at B 4, H 64): its products then run
// through small_gemm in the calling thread instead of ATen's GEMMs, whose fixed cost is most of such a call.
bool small_step(const Layer& L, int64_t I) {
  return L.T == 1 && !L.proj && L.B * L.G * L.H * (I + L.P) <= small_gemm::kSmallFmas;
}

// The fused recurrence's forward (rnn_recurrence_cpu.cpp): a layer without projection in float32, or with
// bfloat16 x and weights (bf16_recurrence_available; x's width even): then the input projection and the
// recurrent products take bf16 operands with float32 sums, and everything else runs in float32 as before.
// bias_row: the input part's float32 bias (the LSTM's b_ih + b_hh, the GRU's b_ih) or undefined; b_hh: the
// GRU's float32 b_hh or undefined. h0, c0 float32; y, h_n, c_n and the workspace come out float32.
std::vector<Tensor> fused_forward(const Layer& L, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                                  const Tensor& bias_row, const Tensor& b_hh, const Tensor& h0,
                                  const c10::optional<Tensor>& c0, bool train) {
  const bool bf16 = x.scalar_type() == at::kBFloat16, bias = bias_row.defined();
  const auto opt = x.options().dtype(at::kFloat);
  const int64_t H = L.H, B = L.B, GH = L.G * L.H;
  Tensor y = new_output({L.rows, H}, opt);
  Tensor h = h0.clone();
  Tensor c = L.lstm ? c0->clone() : Tensor();
  Tensor aux = train ? new_output({L.rows, H}, opt) : Tensor();
  auto a = recurrence_args<RecurrenceForward>(L);
  a.train = train;
  a.w_hh = bf16 ? nullptr : ptr<float>(w_hh);
  a.w_hh_bf16 = bf16 ? ptr<at::BFloat16>(w_hh) : nullptr;
  a.b_hh = b_hh.defined() ? ptr<float>(b_hh) : nullptr;
  a.y = ptr<float>(y);
  a.h = ptr<float>(h);
  a.c = ptr<float>(c);
  a.aux = ptr<float>(aux);
  // brgemm tiles for the input projection from a few thousand rows (at 1024 rows no gain was measured,
  // and W_ih^T's copy per call weighs on small calls) while a 64-column tile of W_ih^T (I x 64 floats)
  // fits in L2. The backward's dx through the same tiles measured even at H = 512 and 0.7x at H = 1024.
  // bf16 always runs the tiles: ATen has no bf16 GEMM with float32 output on the CPU.
  const bool tiles = bf16 || (FASTNN_HAVE_BRGEMM && L.rows >= 2048 && x.size(1) <= 1024);
  const Tensor w_ih_panels = !tiles ? Tensor() : bf16 ? bf16_column_panels(w_ih) : column_panels(w_ih);
  // Without the tiles the bias is left to the gate math: ATen's addmm would first copy it into every
  // row of the output (4 MB a 1024-row chunk at H = 256). Inference, interleaved, new / old: LSTM B16
  // H256 T64 0.94 (I = 16: 0.96), B64 H256 0.99, B16 H1024 T16 0.97; GRU B16 H256 0.95.
  // bf16 leaves it to the gate math too: its tiles run twice as fast, so copying the bias into every row
  // first would weigh twice as much.
  const bool bias_in_gate_math = bias && (!tiles || bf16);
  if (bias_in_gate_math) a.b_in = ptr<float>(bias_row);
  auto project_rows = [&](int64_t r0, int64_t r1, Tensor out) {
    if (!tiles) {
      at::mm_out(out, x.narrow(0, r0, r1 - r0), w_ih.t());
      return;
    }
    const float* bias_p = bias && !bias_in_gate_math ? ptr<float>(bias_row) : nullptr;
    if (bf16) {
      gemm_rows(ptr<at::BFloat16>(x) + r0 * x.size(1), ptr<at::BFloat16>(w_ih_panels), bias_p, ptr<float>(out),
                r1 - r0, x.size(1), GH, at::get_num_threads());
    } else {
      gemm_rows(ptr<float>(x) + r0 * x.size(1), ptr<float>(w_ih_panels), bias_p, ptr<float>(out), r1 - r0,
                x.size(1), GH, at::get_num_threads());
    }
  };
  Tensor gates;
  if (train) {  // the backward reads every step's gates: one GEMM for all
    gates = at::empty({L.rows, GH}, opt);
    project_rows(0, L.rows, gates);
  } else {
    // Inference keeps only ~1024 rows of input projection at a time: a fresh buffer for all of them
    // (64 MB at T = 256, B = 32, H = 512) costs ~20 ms of page faults and zeroing per call, a quarter
    // of the recurrence (measured here); this one is reused within the call and, small enough, by the
    // allocator across calls. GEMMs of 1024 rows still run at the big GEMM's rate.
    a.chunk_rows = std::max<int64_t>(1024, B);
    gates = at::empty({std::min(L.rows, a.chunk_rows), GH}, opt);
    a.input = [&](int64_t, int64_t, int64_t r0, int64_t r1) { project_rows(r0, r1, gates.narrow(0, 0, r1 - r0)); };
  }
  a.gates = ptr<float>(gates);
  recurrence_forward(a, at::get_num_threads());
  const auto none = [&] { return at::empty({0}, opt); };
  return {y, h, L.lstm ? c : none(), train ? gates : none(), train ? aux : none(), none()};
}

template <typename T>
std::vector<Tensor> forward_impl(const Layer& L, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                                 const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
                                 const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                 const c10::optional<Tensor>& c0, bool train) {
  const auto opt = x.options();
  const int64_t H = L.H, P = L.P, B = L.B, GH = L.G * L.H;
  const bool bias = b_ih.has_value();
  const bool small = std::is_same_v<T, float> && small_step(L, x.size(1));
  // Input projection x W_ih^T + biases of rows [r0, r1) into out. The LSTM folds both biases in; the GRU
  // only b_ih, since its b_hn sits inside r * (h W_hn^T + b_hn). (A small step adds them in small_gemm::nt.)
  const Tensor bias_row = bias && !small ? (L.lstm ? (*b_ih + *b_hh) : *b_ih) : Tensor();
  auto project = [&](int64_t r0, int64_t r1, Tensor out) {
    const Tensor xr = x.narrow(0, r0, r1 - r0);
    if (bias) {
      at::addmm_out(out, bias_row.expand({r1 - r0, GH}), xr, w_ih.t());  // 2-D: ATen's CPU addmm wants a matrix
    } else {
      at::mm_out(out, xr, w_ih.t());
    }
  };
  // float32 without projection: the fused recurrence (rnn_recurrence_cpu.cpp) instead of a GEMM and a gate
  // pass per step
  if constexpr (std::is_same_v<T, float>) {
    if (fused_recurrence(L)) {
      return fused_forward(L, x, w_ih, w_hh, bias_row, (bias && !L.lstm) ? *b_hh : Tensor(), h0, c0, train);
    }
  }
  // Input projection of all steps, one GEMM.
  Tensor gates = at::empty({L.rows, GH}, opt);
  if constexpr (std::is_same_v<T, float>) {
    if (small) {
      const int64_t I = x.size(1);
      small_gemm::nt(L.rows, GH, I, ptr<float>(x), I, ptr<float>(w_ih), I, bias ? ptr<float>(*b_ih) : nullptr,
                     bias && L.lstm ? ptr<float>(*b_hh) : nullptr, ptr<float>(gates), GH);
    }
  }
  if (!small) project(0, L.rows, gates);
  const StepGemm recurrent(w_hh, B, L.T);
  const c10::optional<StepGemm> projection = L.proj ? c10::make_optional(StepGemm(*w_hr, B, L.T)) : c10::nullopt;
  Tensor y = new_output({L.rows, P}, opt);
  Tensor h = h0.clone();
  Tensor c = L.lstm ? c0->clone() : Tensor();
  Tensor rec = at::empty({B, GH}, opt);
  Tensor aux = train ? new_output({L.rows, H}, opt) : Tensor();
  Tensor rbuf = L.proj ? (train ? new_output({L.rows, H}, opt) : at::empty({B, H}, opt)) : Tensor();

  T* gates_p = ptr<T>(gates);
  const T* bhh_p = bias ? ptr<T>(*b_hh) : nullptr;
  T* y_p = ptr<T>(y);
  T* h_p = ptr<T>(h);
  T* c_p = ptr<T>(c);
  T* aux_p = ptr<T>(aux);
  T* r_p = ptr<T>(rbuf);
  for (int64_t k = 0; k < L.T; ++k) {
    const int64_t t = L.step(k), bs = L.bs[t], off = L.off[t];
    Tensor rec_rows = rec.narrow(0, 0, bs);
    Tensor rec_t = rec_rows;
    if constexpr (std::is_same_v<T, float>) {
      if (small) small_gemm::nt(bs, GH, P, h_p, P, ptr<float>(w_hh), P, nullptr, nullptr, ptr<float>(rec), GH);
    }
    if (!small) rec_t = recurrent.run(h.narrow(0, 0, bs), rec_rows);
    const T* rec_p = ptr<T>(rec_t);
    parallel_rows(bs, GH, [&](int64_t b) {
      T* gx = gates_p + (off + b) * GH;
      const T* rc = rec_p + b * GH;
      if (L.lstm) {
        T* c_row = c_p + b * H;
        T* c_step = train ? aux_p + (off + b) * H : nullptr;
        T* r_out = L.proj ? r_p + (train ? off + b : b) * H : y_p + (off + b) * P;
        T* h_out = L.proj ? nullptr : h_p + b * P;
        for_lanes<T>(H, [&](int64_t j, auto lanes) {
          using Ln = decltype(lanes);
          typename Ln::V i, f, g, o, cn, r;
          rnn::lstm_forward<typename Ln::M>(
              Ln::load(gx + j) + Ln::load(rc + j), Ln::load(gx + H + j) + Ln::load(rc + H + j),
              Ln::load(gx + 2 * H + j) + Ln::load(rc + 2 * H + j), Ln::load(gx + 3 * H + j) + Ln::load(rc + 3 * H + j),
              Ln::load(c_row + j), i, f, g, o, cn, r);
          Ln::store(c_row + j, cn);
          Ln::store(r_out + j, r);
          if (h_out) Ln::store(h_out + j, r);
          if (train) {
            Ln::store(gx + j, i);
            Ln::store(gx + H + j, f);
            Ln::store(gx + 2 * H + j, g);
            Ln::store(gx + 3 * H + j, o);
            Ln::store(c_step + j, cn);
          }
        });
      } else {
        T* h_row = h_p + b * H;
        T* y_row = y_p + (off + b) * H;
        T* hn_step = train ? aux_p + (off + b) * H : nullptr;
        for_lanes<T>(H, [&](int64_t j, auto lanes) {
          using Ln = decltype(lanes);
          using V = typename Ln::V;
          V h_r = Ln::load(rc + j), h_z = Ln::load(rc + H + j), h_n = Ln::load(rc + 2 * H + j);
          if (bhh_p) {
            h_r = h_r + Ln::load(bhh_p + j);
            h_z = h_z + Ln::load(bhh_p + H + j);
            h_n = h_n + Ln::load(bhh_p + 2 * H + j);
          }
          V r, z, n, hv;
          rnn::gru_forward<typename Ln::M>(Ln::load(gx + j), Ln::load(gx + H + j), Ln::load(gx + 2 * H + j), h_r, h_z,
                                           h_n, Ln::load(h_row + j), r, z, n, hv);
          Ln::store(h_row + j, hv);
          Ln::store(y_row + j, hv);
          if (train) {
            Ln::store(gx + j, r);
            Ln::store(gx + H + j, z);
            Ln::store(gx + 2 * H + j, n);
            Ln::store(hn_step + j, h_n);
          }
        });
      }
    });
    if (L.proj) {
      Tensor y_rows = y.narrow(0, off, bs);
      const Tensor h_new = projection->run(rbuf.narrow(0, train ? off : 0, bs), y_rows);
      if (!h_new.is_same(y_rows)) y_rows.copy_(h_new);
      h.narrow(0, 0, bs).copy_(y_rows);
    }
  }
  // a fresh empty tensor for each absent output: custom ops may not return aliases
  const auto none = [&] { return at::empty({0}, opt); };
  return {y, h, L.lstm ? c : none(), train ? gates : none(), train ? aux : none(), (L.proj && train) ? rbuf : none()};
}

template <typename T>
std::vector<Tensor> backward_impl(const Layer& L, const Tensor& dy, const Tensor& dh_n,
                                  const c10::optional<Tensor>& dc_n, const Tensor& x, const Tensor& w_ih,
                                  const Tensor& w_hh, bool bias, const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                  const c10::optional<Tensor>& c0, const Tensor& y, const Tensor& gates,
                                  const Tensor& aux, const Tensor& r, bool want_dx, bool want_dweights,
                                  bool want_dh0) {
  const auto opt = x.options();
  const int64_t H = L.H, P = L.P, GH = L.G * L.H;
  Tensor dh = dh_n.clone();
  Tensor dc = L.lstm ? dc_n->clone() : Tensor();
  // float32 without projection: the fused recurrence (rnn_recurrence_cpu.cpp) instead of a GEMM and a
  // gate pass per step. It hands over the gate gradients ~1024 rows at a time, and dx and the weight
  // gradients are accumulated from them chunk by chunk: the gate gradients of all steps would be a fresh
  // rows x G H buffer (64 MB at T = 256, B = 32, H = 512; two for the GRU) whose page faults cost as much as
  // a fifth of the recurrence (as in the forward's input projection).
  if constexpr (std::is_same_v<T, float>) {
    if (fused_recurrence(L)) {
      const int64_t chunk_rows = std::min(L.rows, std::max<int64_t>(1024, L.B));
      Tensor dgx_c = at::empty({chunk_rows, GH}, opt);
      Tensor dgh_c = L.lstm ? dgx_c : at::empty({chunk_rows, GH}, opt);
      Tensor h_prev_c = want_dweights ? at::empty({chunk_rows, H}, opt) : Tensor();
      const auto none = [&] { return at::empty({0}, opt); };
      Tensor dx = want_dx ? new_output({L.rows, w_ih.size(1)}, opt) : none();
      Tensor dw_ih = none(), dw_hh = none(), db_ih = none(), db_hh = none();
      if (want_dweights) {
        dw_ih = new_output(w_ih.sizes(), opt);
        dw_hh = new_output(w_hh.sizes(), opt);
        if (bias) {
          db_ih = new_output({GH}, opt);
          db_hh = L.lstm ? Tensor() : new_output({GH}, opt);
        }
      }
      bool first = true;
      // walk steps [k0, k1) done: their rows [r0, r1) are rows [0, r1 - r0) of the chunk buffers
      auto consume = [&](int64_t k0, int64_t k1, int64_t r0, int64_t r1) {
        const int64_t n = r1 - r0;
        const Tensor dgx_rows = dgx_c.narrow(0, 0, n), dgh_rows = dgh_c.narrow(0, 0, n);
        if (want_dx) {
          Tensor dx_rows = dx.narrow(0, r0, n);
          at::mm_out(dx_rows, dgx_rows, w_ih);
        }
        if (want_dweights) {
          Tensor h_prev = h_prev_c.narrow(0, 0, n);
          L.gather_h_prev_into(y, h0, L.step(k0), L.step(k1 - 1), h_prev, r0);
          const Tensor x_rows = x.narrow(0, r0, n);
          // the first chunk overwrites (beta 0 ignores the uninitialised outputs), the later ones add
          const double beta = first ? 0.0 : 1.0;
          dw_ih.addmm_(dgx_rows.t(), x_rows, beta);
          dw_hh.addmm_(dgh_rows.t(), h_prev, beta);
          auto add_column_sums = [&](Tensor& acc, const Tensor& rows) {
            if (first) {
              at::sum_out(acc, rows, 0);
            } else {
              acc.add_(rows.sum(0));
            }
          };
          if (bias) {
            add_column_sums(db_ih, dgx_rows);
            if (!L.lstm) add_column_sums(db_hh, dgh_rows);
          }
        }
        first = false;
      };
      auto a = recurrence_args<RecurrenceBackward>(L);
      a.w_hh = ptr<float>(w_hh);
      a.gates = ptr<float>(gates);
      a.aux = ptr<float>(aux);
      a.y = ptr<float>(y);
      a.h0 = ptr<float>(h0);
      a.c0 = L.lstm ? ptr<float>(*c0) : nullptr;
      a.dy = ptr<float>(dy);
      a.dgx = ptr<float>(dgx_c);
      a.dgh = ptr<float>(dgh_c);
      a.dh = ptr<float>(dh);
      a.dc = ptr<float>(dc);
      a.consume = consume;
      a.chunk_rows = chunk_rows;
      recurrence_backward(a, at::get_num_threads());
      if (want_dweights && bias && L.lstm) db_hh = db_ih.clone();
      return {dx, dw_ih, dw_hh, db_ih, db_hh, none(), dh, L.lstm ? dc : none()};
    }
  }
  // Gate gradients of every step. The LSTM's input and recurrent parts share them; the GRU's differ in
  // the n gate (the recurrent part's is scaled by r), so it keeps both.
  Tensor dgx = new_output({L.rows, GH}, opt);
  Tensor dgh = L.lstm ? dgx : new_output({L.rows, GH}, opt);
  Tensor dh_steps = L.proj ? new_output({L.rows, P}, opt) : Tensor();  // gradient reaching each step's h
  Tensor dr = L.proj ? at::empty({L.B, H}, opt) : Tensor();
  Tensor dh_rec = L.lstm ? Tensor() : at::empty({L.B, P}, opt);
  // dh_prev = dgates @ W_hh, dr = dh @ W_hr: StepGemm computes a @ w^T, so it gets the transposes
  // (one step: plain at::mm on the transposed views, see StepGemm)
  // a small step (small_step; x's rows read through a pointer) takes its five products from small_gemm
  const bool small = std::is_same_v<T, float> && small_step(L, x.size(1)) && x.is_contiguous();
  const StepGemm recurrent(L.T > 1 ? w_hh.t().contiguous() : w_hh.t(), L.B, L.T);
  const c10::optional<StepGemm> projection =
      L.proj ? c10::make_optional(StepGemm(L.T > 1 ? w_hr->t().contiguous() : w_hr->t(), L.B, L.T)) : c10::nullopt;

  const T* dy_p = ptr<T>(dy);
  T* dh_p = ptr<T>(dh);
  T* dc_p = ptr<T>(dc);
  T* dgx_p = ptr<T>(dgx);
  T* dgh_p = ptr<T>(dgh);
  const T* gates_p = ptr<T>(gates);
  const T* aux_p = ptr<T>(aux);
  const T* y_p = ptr<T>(y);
  const T* h0_p = ptr<T>(h0);
  const T* c0_p = L.lstm ? ptr<T>(*c0) : nullptr;
  for (int64_t k = L.T - 1; k >= 0; --k) {
    const int64_t t = L.step(k), bs = L.bs[t], off = L.off[t];
    const int64_t n_prev = L.rows_with_prev(t), off_prev = n_prev > 0 ? L.off[L.prev_step(t)] : 0;
    Tensor dr_step;
    if (L.proj) {
      Tensor dh_t = dh.narrow(0, 0, bs);
      dh_t.add_(dy.narrow(0, off, bs));
      dh_steps.narrow(0, off, bs).copy_(dh_t);
      Tensor dr_rows = dr.narrow(0, 0, bs);
      dr_step = projection->run(dh_t, dr_rows);
    }
    const T* dr_p = ptr<T>(dr_step);
    parallel_rows(bs, GH, [&](int64_t b) {
      const T* gt = gates_p + (off + b) * GH;
      T* dg = dgx_p + (off + b) * GH;
      const T* dy_row = dy_p + (off + b) * P;
      T* dh_row = dh_p + b * P;
      if (L.lstm) {
        const T* c_row = aux_p + (off + b) * H;
        const T* c_prev = b < n_prev ? aux_p + (off_prev + b) * H : c0_p + b * H;
        T* dc_row = dc_p + b * H;
        const T* dr_row = L.proj ? dr_p + b * H : nullptr;
        for_lanes<T>(H, [&](int64_t j, auto lanes) {
          using Ln = decltype(lanes);
          using V = typename Ln::V;
          const V drv = dr_row ? Ln::load(dr_row + j) : Ln::load(dh_row + j) + Ln::load(dy_row + j);
          V di, df, dgg, dgo, dcp;
          rnn::lstm_backward<typename Ln::M>(Ln::load(gt + j), Ln::load(gt + H + j), Ln::load(gt + 2 * H + j),
                                             Ln::load(gt + 3 * H + j), Ln::load(c_prev + j), Ln::load(c_row + j), drv,
                                             Ln::load(dc_row + j), di, df, dgg, dgo, dcp);
          Ln::store(dg + j, di);
          Ln::store(dg + H + j, df);
          Ln::store(dg + 2 * H + j, dgg);
          Ln::store(dg + 3 * H + j, dgo);
          Ln::store(dc_row + j, dcp);
        });
      } else {
        const T* hn_row = aux_p + (off + b) * H;
        const T* h_prev = b < n_prev ? y_p + (off_prev + b) * H : h0_p + b * H;
        T* dgr = dgh_p + (off + b) * GH;
        for_lanes<T>(H, [&](int64_t j, auto lanes) {
          using Ln = decltype(lanes);
          using V = typename Ln::V;
          V d_r, d_z, d_n, d_hn, dh_direct;
          rnn::gru_backward<typename Ln::M>(Ln::load(gt + j), Ln::load(gt + H + j), Ln::load(gt + 2 * H + j),
                                            Ln::load(hn_row + j), Ln::load(h_prev + j),
                                            Ln::load(dh_row + j) + Ln::load(dy_row + j), d_r, d_z, d_n, d_hn,
                                            dh_direct);
          Ln::store(dg + j, d_r);
          Ln::store(dg + H + j, d_z);
          Ln::store(dg + 2 * H + j, d_n);
          Ln::store(dgr + j, d_r);
          Ln::store(dgr + H + j, d_z);
          Ln::store(dgr + 2 * H + j, d_hn);
          Ln::store(dh_row + j, dh_direct);
        });
      }
    });
    // The last walked step's product feeds h0 alone (its rows' previous state): without want_dh0 it is not
    // needed (a cell's backward then runs one GEMM fewer of its five, as torch's skips it).
    if (k == 0 && !want_dh0) break;
    Tensor dh_rows = dh.narrow(0, 0, bs);
    if constexpr (std::is_same_v<T, float>) {
      if (small) {  // dh0 = dgates W_hh (the GRU's adds to its direct part z dh, already in dh)
        small_gemm::nn(bs, GH, P, (L.lstm ? dgx_p : dgh_p) + off * GH, GH, ptr<float>(w_hh), P, dh_p, P, !L.lstm);
        continue;
      }
    }
    if (L.lstm) {
      const Tensor got = recurrent.run(dgx.narrow(0, off, bs), dh_rows);
      if (!got.is_same(dh_rows)) dh_rows.copy_(got);
    } else {  // the GRU's h_prev also has the direct path z * dh, already in dh
      Tensor rec_rows = dh_rec.narrow(0, 0, bs);
      dh_rows.add_(recurrent.run(dgh.narrow(0, off, bs), rec_rows));
    }
  }
  // dh, dc now hold the gradients of h0, c0.
  const auto none = [&] { return at::empty({0}, opt); };  // fresh for each: custom ops may not return aliases
  if constexpr (std::is_same_v<T, float>) {
    if (small) {  // one step: every row's h_prev is h0's
      const int64_t I = x.size(1), n = L.rows;
      Tensor dx = want_dx ? new_output({n, I}, opt) : none();
      if (want_dx) small_gemm::nn(n, GH, I, dgx_p, GH, ptr<float>(w_ih), I, ptr<float>(dx), I, false);
      Tensor dw_ih = none(), dw_hh = none(), db_ih = none(), db_hh = none();
      if (want_dweights) {
        dw_ih = new_output(w_ih.sizes(), opt);
        dw_hh = new_output(w_hh.sizes(), opt);
        small_gemm::tn(n, GH, I, dgx_p, GH, ptr<float>(x), I, ptr<float>(dw_ih), I);
        small_gemm::tn(n, GH, P, dgh_p, GH, h0_p, P, ptr<float>(dw_hh), P);
        if (bias) {
          db_ih = new_output({GH}, opt);
          db_hh = new_output({GH}, opt);
          small_gemm::column_sums(n, GH, dgx_p, GH, ptr<float>(db_ih));
          small_gemm::column_sums(n, GH, dgh_p, GH, ptr<float>(db_hh));
        }
      }
      return {dx, dw_ih, dw_hh, db_ih, db_hh, none(), dh, L.lstm ? dc : none()};
    }
  }
  Tensor dx = want_dx ? at::mm(dgx, w_ih) : none();
  Tensor dw_ih = none(), dw_hh = none(), db_ih = none(), db_hh = none(), dw_hr = none();
  if (want_dweights) {
    dw_ih = at::mm(dgx.t(), x);
    dw_hh = at::mm(dgh.t(), L.gather_h_prev(y, h0));
    if (bias) {
      db_ih = dgx.sum(0);
      db_hh = L.lstm ? db_ih.clone() : dgh.sum(0);
    }
    if (L.proj) dw_hr = at::mm(dh_steps.t(), r);
  }
  return {dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh, L.lstm ? dc : none()};
}

// The kernels read these through raw pointers as dense row-major arrays (the Python wrappers pass them
// contiguous; a direct call of the op might not).
void check_contiguous(const char* who, std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(!t->defined() || t->is_contiguous(), who, ": ", name, " must be contiguous");
  }
}

// The shapes the kernels index by (the small products read raw pointers with these extents; ATen's GEMMs
// would catch some mismatches, those loops none). The Python wrappers validate first; a direct call of the op
// might not.
void check_shapes(const char* who, const Layer& L, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                  const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
                  const c10::optional<Tensor>& w_hr, const Tensor& h0, const c10::optional<Tensor>& c0) {
  const int64_t GH = L.G * L.H;
  TORCH_CHECK(x.dim() == 2, who, ": x must be (rows, input_size), got ", x.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % L.G == 0, who, ": w_hh must be (", L.G, " * hidden_size, P), got ",
              w_hh.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == GH && w_ih.size(1) == x.size(1), who, ": w_ih must be (", GH, ", ",
              x.size(1), "), got ", w_ih.sizes());
  for (const auto* b : {&b_ih, &b_hh}) {
    TORCH_CHECK(!b->has_value() || ((*b)->dim() == 1 && (*b)->size(0) == GH), who, ": the biases must be (", GH,
                ",), got ", (*b)->sizes());
  }
  TORCH_CHECK(!w_hr || (w_hr->dim() == 2 && w_hr->size(0) == L.P && w_hr->size(1) == L.H && L.P < L.H), who,
              ": w_hr must be (P, ", L.H, ") with P = w_hh's second size below ", L.H, ", got ", w_hr->sizes());
  TORCH_CHECK(w_hr || L.P == L.H, who, ": without w_hr, w_hh must be (", GH, ", ", L.H, "), got ", w_hh.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == L.P, who, ": h0 must be (batch, ", L.P, "), got ", h0.sizes());
  TORCH_CHECK(!c0 || (c0->dim() == 2 && c0->size(0) == L.B && c0->size(1) == L.H), who, ": c0 must be (", L.B, ", ",
              L.H, "), got ", c0->sizes());
}

void check_dtype(const Tensor& x, bool bf16_ok = false) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  (bf16_ok && x.scalar_type() == at::kBFloat16),
              "rnn_layer (CPU kernel): float32 or float64", bf16_ok ? " (or bfloat16, see rnn_bf16_native)" : "",
              " expected, got ", x.scalar_type());
}

// bfloat16 x and weights: the fused recurrence with bf16 operands (fused_forward), for layers it runs
// (rnn_bf16_native); biases, h0 and c0 come in float32, the outputs go out float32.
std::vector<Tensor> forward_bf16(const Layer& L, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                                 const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
                                 const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                 const c10::optional<Tensor>& c0, bool train) {
  TORCH_CHECK(rnn_bf16_native(x.size(1), w_hr.has_value()),
              "rnn_layer (CPU kernel): bfloat16 runs only where rnn_bf16_native(input_size, has_projection) holds "
              "(AVX512-BF16, no projection, an even input_size); got input_size ", x.size(1),
              w_hr ? " with a projection" : "", ": pass float32");
  TORCH_CHECK(w_ih.scalar_type() == at::kBFloat16 && w_hh.scalar_type() == at::kBFloat16,
              "rnn_layer (CPU kernel): bfloat16 x needs bfloat16 w_ih and w_hh, got ", w_ih.scalar_type(), " and ",
              w_hh.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"h0", &h0}, {"c0", c0 ? &*c0 : nullptr},
                                {"b_ih", b_ih ? &*b_ih : nullptr}, {"b_hh", b_hh ? &*b_hh : nullptr}}) {
    TORCH_CHECK(!t || t->scalar_type() == at::kFloat, "rnn_layer (CPU kernel): with bfloat16 x, ", name,
                " must be float32, got ", t->scalar_type());
  }
  if (L.T == 0 || L.H == 0) {  // nothing for the fused recurrence to do: the float32 path's shapes
    return forward_impl<float>(L, x.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat), b_ih, b_hh, w_hr, h0,
                               c0, train);
  }
  const bool bias = b_ih.has_value();
  const Tensor bias_row = bias ? (L.lstm ? (*b_ih + *b_hh) : *b_ih) : Tensor();
  return fused_forward(L, x, w_ih, w_hh, bias_row, (bias && !L.lstm) ? *b_hh : Tensor(), h0, c0, train);
}

// The bf16 layer's backward (forward_bf16's): the fused recurrence with bf16 operands (RecurrenceBackward's
// w_hh_bf16) writes every row's gate gradients in bf16; dx and the weight gradients are then one bf16 GEMM
// each (ATen's, float32 sums) over all rows; the bias gradients are float32 sums taken by the recurrence.
// x, w_ih, w_hh and y in bf16, the rest float32; dx and the weight gradients come out bf16, the rest float32
// (without steps: the float32 path's results).
std::vector<Tensor> backward_bf16(const Layer& L, const Tensor& dy, const Tensor& dh_n,
                                  const c10::optional<Tensor>& dc_n, const Tensor& x, const Tensor& w_ih,
                                  const Tensor& w_hh, bool bias, const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                  const c10::optional<Tensor>& c0, const Tensor& y, const Tensor& gates,
                                  const Tensor& aux, bool want_dx, bool want_dweights) {
  TORCH_CHECK(rnn_bf16_native(x.size(1), w_hr.has_value()),
              "rnn_layer_backward (CPU kernel): bfloat16 runs only where rnn_bf16_native(input_size, "
              "has_projection) holds; got input_size ", x.size(1), w_hr ? " with a projection" : "", ": pass float32");
  TORCH_CHECK(w_ih.scalar_type() == at::kBFloat16 && w_hh.scalar_type() == at::kBFloat16 &&
                  y.scalar_type() == at::kBFloat16,
              "rnn_layer_backward (CPU kernel): bfloat16 x needs bfloat16 w_ih, w_hh and y, got ", w_ih.scalar_type(),
              ", ", w_hh.scalar_type(), " and ", y.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"dy", &dy}, {"dh_n", &dh_n},
                                {"dc_n", dc_n ? &*dc_n : nullptr}, {"h0", &h0}, {"c0", c0 ? &*c0 : nullptr},
                                {"gates", &gates}, {"aux", &aux}}) {
    TORCH_CHECK(!t || t->scalar_type() == at::kFloat, "rnn_layer_backward (CPU kernel): with bfloat16 x, ", name,
                " must be float32, got ", t->scalar_type());
  }
  const int64_t H = L.H, GH = L.G * H, GHp = (GH + 1) / 2 * 2;
  const auto f32 = x.options().dtype(at::kFloat), b16 = x.options().dtype(at::kBFloat16);
  const auto none = [&] { return at::empty({0}, f32); };
  if (L.T == 0 || H == 0) {  // nothing to run: the float32 path's shapes and zeros
    return backward_impl<float>(L, dy, dh_n, dc_n, x.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat), bias,
                                w_hr, h0, c0, y.to(at::kFloat), gates, aux, none(), want_dx, want_dweights, true);
  }
  Tensor dh = dh_n.clone();
  Tensor dc = L.lstm ? dc_n->clone() : Tensor();
  Tensor dgx16 = new_output({L.rows, GHp}, b16);
  Tensor dgh16 = L.lstm ? dgx16 : new_output({L.rows, GHp}, b16);
  if (GHp != GH) {  // the pad column enters the recurrent products' sums (against zero weights): keep it finite
    dgx16.narrow(1, GH, 1).zero_();
    if (!L.lstm) dgh16.narrow(1, GH, 1).zero_();
  }
  const Tensor y32 = L.lstm ? Tensor() : y.to(at::kFloat);  // the GRU's cell backward reads h_{t-1} in float32
  auto a = recurrence_args<RecurrenceBackward>(L);
  a.w_hh_bf16 = ptr<at::BFloat16>(w_hh);
  a.gates = ptr<float>(gates);
  a.aux = ptr<float>(aux);
  a.y = L.lstm ? nullptr : ptr<float>(y32);
  a.h0 = ptr<float>(h0);
  a.c0 = L.lstm ? ptr<float>(*c0) : nullptr;
  a.dy = ptr<float>(dy);
  a.dh = ptr<float>(dh);
  a.dc = L.lstm ? ptr<float>(dc) : nullptr;
  a.dgx16 = ptr<at::BFloat16>(dgx16);
  a.dgh16 = ptr<at::BFloat16>(dgh16);
  a.ld16 = GHp;
  Tensor db_x = want_dweights && bias ? at::zeros({GH}, f32) : Tensor();
  Tensor db_h = want_dweights && bias && !L.lstm ? at::zeros({GH}, f32) : Tensor();
  a.db_x = db_x.defined() ? ptr<float>(db_x) : nullptr;
  a.db_h = db_h.defined() ? ptr<float>(db_h) : nullptr;
  recurrence_backward(a, at::get_num_threads());
  const Tensor dgx = dgx16.narrow(1, 0, GH), dgh = dgh16.narrow(1, 0, GH);
  Tensor dx = want_dx ? at::mm(dgx, w_ih) : none();
  Tensor dw_ih = none(), dw_hh = none(), db_ih = none(), db_hh = none();
  if (want_dweights) {
    dw_ih = at::mm(dgx.t(), x);
    dw_hh = at::mm(dgh.t(), L.gather_h_prev(y, h0));  // h_{t-1} in bf16: y's rows, h0 rounded
    if (bias) {  // summed by the recurrence, before the gate gradients' rounding to bf16
      db_ih = db_x;
      db_hh = L.lstm ? db_x.clone() : db_h;
    }
  }
  return {dx, dw_ih, dw_hh, db_ih, db_hh, none(), dh, L.lstm ? dc : none()};
}

}  // namespace

bool rnn_bf16_native(int64_t input_size, bool has_projection) {
  return !has_projection && input_size % 2 == 0 && recurrence_forward_available() && bf16_recurrence_available();
}

std::vector<Tensor> rnn_layer_forward(const std::string& mode, const Tensor& x, const Tensor& batch_sizes,
                                      const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                      const c10::optional<Tensor>& b_hh, const c10::optional<Tensor>& w_hr,
                                      const Tensor& h0, const c10::optional<Tensor>& c0, bool reverse, bool train) {
  check_dtype(x, /*bf16_ok=*/true);
  // x, w_ih and b_ih too: the brgemm input projection reads them through raw pointers
  check_contiguous("rnn_layer", {{"x", &x}, {"w_ih", &w_ih}, {"w_hh", &w_hh}});
  if (b_ih) check_contiguous("rnn_layer", {{"b_ih", &*b_ih}});
  if (b_hh) check_contiguous("rnn_layer", {{"b_hh", &*b_hh}});
  // h0 and c0 too: the state is cloned (strides and all) and read through raw pointers
  check_contiguous("rnn_layer", {{"h0", &h0}});
  if (c0) check_contiguous("rnn_layer", {{"c0", &*c0}});
  const Layer L(mode, x, batch_sizes, w_hh, w_hr, h0, reverse);
  check_shapes("rnn_layer", L, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "rnn_layer: b_ih and b_hh must be both given or both absent");
  TORCH_CHECK(!L.lstm || c0.has_value(), "rnn_layer: the LSTM needs c0");
  if (x.scalar_type() == at::kBFloat16) return forward_bf16(L, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, train);
  if (x.scalar_type() == at::kFloat) return forward_impl<float>(L, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, train);
  return forward_impl<double>(L, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, train);
}

std::vector<Tensor> rnn_layer_backward(const std::string& mode, const Tensor& dy, const Tensor& dh_n,
                                       const c10::optional<Tensor>& dc_n, const Tensor& x, const Tensor& batch_sizes,
                                       const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                       const c10::optional<Tensor>& b_hh, const c10::optional<Tensor>& w_hr,
                                       const Tensor& h0, const c10::optional<Tensor>& c0, const Tensor& y,
                                       const Tensor& gates, const Tensor& aux, const Tensor& r, bool reverse,
                                       bool want_dx, bool want_dweights, bool want_dh0) {
  check_dtype(x, /*bf16_ok=*/true);
  check_contiguous("rnn_layer_backward",
                   {{"dy", &dy}, {"w_hh", &w_hh}, {"y", &y}, {"gates", &gates}, {"aux", &aux}, {"h0", &h0}});
  if (c0) check_contiguous("rnn_layer_backward", {{"c0", &*c0}});
  // x and w_ih too: the small products read them through raw pointers
  check_contiguous("rnn_layer_backward", {{"x", &x}, {"w_ih", &w_ih}});
  const Layer L(mode, x, batch_sizes, w_hh, w_hr, h0, reverse);
  check_shapes("rnn_layer_backward", L, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0);
  check_dense("rnn_layer_backward", {{"dy", &dy, {L.rows, L.P}},
                                     {"y", &y, {L.rows, L.P}},
                                     {"dh_n", &dh_n, {L.B, L.P}},
                                     {"dc_n", dc_n ? &*dc_n : nullptr, {L.B, L.H}}});
  TORCH_CHECK(!L.lstm || (c0.has_value() && dc_n.has_value()), "rnn_layer_backward: the LSTM needs c0 and dc_n");
  TORCH_CHECK(gates.numel() == L.rows * L.G * L.H && aux.numel() == L.rows * L.H,
              "rnn_layer_backward: the workspace does not match (was the forward run with train=true?)");
  const bool bias = b_ih.has_value();
  std::vector<Tensor> grads;
  if (x.scalar_type() == at::kBFloat16) {
    grads = backward_bf16(L, dy, dh_n, dc_n, x, w_ih, w_hh, bias, w_hr, h0, c0, y, gates, aux, want_dx, want_dweights);
  } else if (x.scalar_type() == at::kFloat) {
    grads = backward_impl<float>(L, dy, dh_n, dc_n, x, w_ih, w_hh, bias, w_hr, h0, c0, y, gates, aux, r, want_dx,
                                 want_dweights, want_dh0);
  } else {
    grads = backward_impl<double>(L, dy, dh_n, dc_n, x, w_ih, w_hh, bias, w_hr, h0, c0, y, gates, aux, r, want_dx,
                                  want_dweights, want_dh0);
  }
  if (!want_dh0) grads[6] = at::empty({0}, x.options());
  return grads;
}

}  // namespace cpu
}  // namespace fastnn
