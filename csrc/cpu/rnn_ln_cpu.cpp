// Layer-normalised LSTM with zoneout on the CPU: forward and backward through time, semantics of
// fastnn/reference/rnn.py (layer_norm_lstm_layer). Contract: csrc/families/rnn_ln.h.
//
// Forward, per layer and direction: the input projection of every step is one GEMM, and its layer norm
// (+ bias) one row-parallel pass up front. Each step is then one GEMM of the live rows' h with W_hh and one
// fused pass per row: layer norm of the recurrent part, gates, cell, layer norm of the cell, h, zoneout.
// Rows are independent within a step, so the pass runs in parallel over them; each row's statistics are
// summed in one thread in a fixed order.
//
// Backward: the steps in reverse, each a fused pass per row (zoneout, the cell's layer norm backward, the
// gates, the recurrent layer norm's backward from the saved mean / rstd) and one GEMM for dh. After the
// recurrence: gain and bias gradients as column sums in a fixed row order, the input layer norm's backward
// for all rows at once, and the weight gradients as one GEMM each.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "common/alloc.h"
#include "common/rnn_math.h"
#include "cpu/rnn_steps.h"
#include "families/rnn_ln.h"

namespace fastnn {
namespace cpu {
namespace {

using at::Tensor;
using namespace rnn_steps;

constexpr double kEps = 1e-5;  // every layer norm's, as in torch.nn.LayerNorm

// Columns of the saved statistics: mean and 1 / sqrt(var + eps) of x_proj, h_proj and the cell, per row.
enum Stat : int64_t { kMeanX, kRstdX, kMeanH, kRstdH, kMeanC, kRstdC, kStats };

// The gains and biases of the three layer norms, as raw pointers.
template <typename T>
struct Norms {
  const T *ih_w, *ih_b, *hh_w, *hh_b, *cell_w, *cell_b;
};

// A sum over a row's lanes: 16 partial sums for the vector part and one for the scalar tail, combined in a
// fixed order, so the result depends on the row alone (not on threads).
template <typename T>
struct RowSum {
  VF vec = splat<VF>(0.0f);
  T tail = 0;
  void add(VF v) { vec += v; }
  void add(T v) { tail += v; }
  T total() const {
    T s = 0;
    for (int l = 0; l < 16; ++l) s += vec[l];
    return s + tail;
  }
};

// mean and 1 / sqrt(biased variance + eps) of v[0..n), the variance from the deviations (a second pass:
// no cancellation when the mean is large against the spread)
template <typename T>
inline void row_mean_rstd(const T* v, int64_t n, T& mean, T& rstd) {
  RowSum<T> sum;
  for_lanes<T>(n, [&](int64_t j, auto lanes) { sum.add(decltype(lanes)::load(v + j)); });
  mean = sum.total() / T(n);
  RowSum<T> squares;
  for_lanes<T>(n, [&](int64_t j, auto lanes) {
    using Ln = decltype(lanes);
    const auto d = Ln::load(v + j) - Ln::splat(mean);
    squares.add(d * d);
  });
  rstd = T(1) / std::sqrt(squares.total() / T(n) + T(kEps));
}

// The zoneout weight of the previous h for row `keep_row` (a mask row, or null: the constant `zoneout`).
template <typename Ln, typename T>
inline typename Ln::V keep_weight(const T* keep_row, int64_t j, T zoneout) {
  return keep_row ? Ln::load(keep_row + j) : Ln::splat(zoneout);
}

template <typename T>
std::vector<Tensor> forward_impl(const PackedSteps& S, int64_t H, const Tensor& x, const Tensor& w_ih,
                                 const Tensor& w_hh, const c10::optional<Tensor>& bias, const Norms<T>& ln,
                                 const Tensor& h0, const Tensor& c0, const c10::optional<Tensor>& zoneout_mask,
                                 T zoneout, bool train) {
  const auto opt = x.options();
  const int64_t G4 = 4 * H, rows = S.rows, B = S.B;
  const bool zoned = zoneout_mask.has_value() || zoneout != T(0);
  // Input part of every step: one GEMM, then its layer norm (+ bias) row by row into `gates`, which each
  // step's pass then overwrites with the activated gates.
  Tensor x_proj = at::mm(x, w_ih.t());
  Tensor gates = new_output({rows, G4}, opt);
  Tensor stats = new_output({rows, kStats}, opt);
  T* gates_p = ptr<T>(gates);
  T* stats_p = ptr<T>(stats);
  const T* x_proj_p = ptr<T>(x_proj);
  const T* bias_p = bias.has_value() ? ptr<T>(*bias) : nullptr;
  parallel_rows(rows, G4, [&](int64_t r) {
    const T* xp = x_proj_p + r * G4;
    T* g = gates_p + r * G4;
    T mean, rstd;
    row_mean_rstd(xp, G4, mean, rstd);
    stats_p[r * kStats + kMeanX] = mean;
    stats_p[r * kStats + kRstdX] = rstd;
    for_lanes<T>(G4, [&](int64_t j, auto lanes) {
      using Ln = decltype(lanes);
      auto v = (Ln::load(xp + j) - Ln::splat(mean)) * Ln::splat(rstd) * Ln::load(ln.ih_w + j) + Ln::load(ln.ih_b + j);
      if (bias_p) v = v + Ln::load(bias_p + j);
      Ln::store(g + j, v);
    });
  });

  const StepGemm recurrent(w_hh, B, S.T);
  Tensor y = new_output({rows, H}, opt);
  Tensor h = h0.clone(), c = c0.clone();
  // training keeps every step's recurrent projection and cell for the backward; inference one step's
  Tensor h_proj = train ? new_output({rows, G4}, opt) : at::empty({B, G4}, opt);
  Tensor cells = train ? new_output({rows, H}, opt) : Tensor();
  T* y_p = ptr<T>(y);
  T* h_p = ptr<T>(h);
  T* c_p = ptr<T>(c);
  T* cells_p = ptr<T>(cells);
  const T* h_proj_p = ptr<T>(h_proj);
  const T* mask_p = zoneout_mask.has_value() ? ptr<T>(*zoneout_mask) : nullptr;
  for (int64_t k = 0; k < S.T; ++k) {
    const int64_t t = S.step(k), bs = S.bs[t], off = S.off[t];
    Tensor h_proj_rows = h_proj.narrow(0, train ? off : 0, bs);
    recurrent.run_into(h.narrow(0, 0, bs), h_proj_rows);
    parallel_rows(bs, G4, [&](int64_t b) {
      const int64_t r = off + b;
      const T* hp = h_proj_p + (train ? r : b) * G4;
      T* g = gates_p + r * G4;
      T* st = stats_p + r * kStats;
      T* c_row = c_p + b * H;
      T* h_row = h_p + b * H;
      T mean_h, rstd_h;
      row_mean_rstd(hp, G4, mean_h, rstd_h);
      st[kMeanH] = mean_h;
      st[kRstdH] = rstd_h;
      // gates = input part + LN_hh(h_proj); activations; c' = f c + i g
      for_lanes<T>(H, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        using V = typename Ln::V;
        const auto pre = [&](int64_t q) {
          const int64_t u = q * H + j;
          return Ln::load(g + u) + (Ln::load(hp + u) - Ln::splat(mean_h)) * Ln::splat(rstd_h) * Ln::load(ln.hh_w + u) +
                 Ln::load(ln.hh_b + u);
        };
        V i, f, gg, o, cn;
        rnn::lstm_gates_and_cell<typename Ln::M>(pre(0), pre(1), pre(2), pre(3), Ln::load(c_row + j), i, f, gg, o, cn);
        Ln::store(g + j, i);
        Ln::store(g + H + j, f);
        Ln::store(g + 2 * H + j, gg);
        Ln::store(g + 3 * H + j, o);
        Ln::store(c_row + j, cn);
        if (train) Ln::store(cells_p + r * H + j, cn);
      });
      T mean_c, rstd_c;
      row_mean_rstd(c_row, H, mean_c, rstd_c);
      st[kMeanC] = mean_c;
      st[kRstdC] = rstd_c;
      // h_new = o tanh(LN_cell(c')), then zoneout against the previous h (this row's state before the write)
      const T* keep_row = mask_p ? mask_p + r * H : nullptr;
      T* y_row = y_p + r * H;
      for_lanes<T>(H, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        using M = typename Ln::M;
        const auto cell_norm = (Ln::load(c_row + j) - Ln::splat(mean_c)) * Ln::splat(rstd_c) * Ln::load(ln.cell_w + j) +
                               Ln::load(ln.cell_b + j);
        auto hv = Ln::load(g + 3 * H + j) * M::tanh(cell_norm);
        if (zoned) {
          const auto keep = keep_weight<Ln>(keep_row, j, zoneout);
          hv = keep * Ln::load(h_row + j) + (Ln::splat(T(1)) - keep) * hv;
        }
        Ln::store(h_row + j, hv);
        Ln::store(y_row + j, hv);
      });
    });
  }
  // a fresh empty tensor for each absent output: custom ops may not return aliases
  const auto none = [&] { return at::empty({0}, opt); };
  if (!train) return {y, h, c, none(), none(), none(), none(), none()};
  return {y, h, c, gates, x_proj, h_proj, cells, stats};
}

// d_gain[j] = sum_r d_out[r, j] xhat[r, j] and d_bias[j] = sum_r d_out[r, j] of one layer norm, with
// xhat = (v - mean) rstd recomputed as the forward formed it. Parallel over blocks of columns, rows in order
// within each and summed in double: the same bits for any thread count.
template <typename T>
void gain_bias_grads(int64_t rows, int64_t width, const T* d_out, const T* v, const T* stats, int64_t mean_col,
                     T* d_gain, T* d_bias) {
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (width + kBlock - 1) / kBlock, 1, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t j0 = blk * kBlock, n = std::min(kBlock, width - j0);
      double gain_sum[kBlock] = {}, bias_sum[kBlock] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const T* d = d_out + r * width + j0;
        const T* vr = v + r * width + j0;
        const T mean = stats[r * kStats + mean_col], rstd = stats[r * kStats + mean_col + 1];
        for (int64_t u = 0; u < n; ++u) {
          gain_sum[u] += double(d[u]) * double((vr[u] - mean) * rstd);
          bias_sum[u] += double(d[u]);
        }
      }
      for (int64_t u = 0; u < n; ++u) {
        d_gain[j0 + u] = T(gain_sum[u]);
        d_bias[j0 + u] = T(bias_sum[u]);
      }
    }
  });
}

template <typename T>
std::vector<Tensor> backward_impl(const PackedSteps& S, int64_t H, const Tensor& dy, const Tensor& dh_n,
                                  const Tensor& dc_n, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                                  bool has_bias, const Norms<T>& ln, const Tensor& h0, const Tensor& c0,
                                  const c10::optional<Tensor>& zoneout_mask, T zoneout, const Tensor& y,
                                  const Tensor& gates, const Tensor& x_proj, const Tensor& h_proj, const Tensor& cells,
                                  const Tensor& stats, bool want_dx, bool want_dweights) {
  const auto opt = x.options();
  const int64_t G4 = 4 * H, rows = S.rows, B = S.B;
  const bool zoned = zoneout_mask.has_value() || zoneout != T(0);
  // gradients of the gate pre-activations (= of LN_ih's and LN_hh's outputs and of bias), of h_prev W_hh^T
  // (through LN_hh), and of LN_cell's output
  Tensor d_pre = new_output({rows, G4}, opt);
  Tensor d_h_proj = new_output({rows, G4}, opt);
  Tensor d_cell_norm = new_output({rows, H}, opt);
  Tensor dh = dh_n.clone(), dc = dc_n.clone();  // the gradients reaching the state of the step being walked
  Tensor dh_rec = at::empty({B, H}, opt);
  // StepGemm computes a @ w^T: this gives d_h_proj @ W_hh
  const StepGemm recurrent(S.T > 1 ? w_hh.t().contiguous() : w_hh.t(), B, S.T);

  const T* dy_p = ptr<T>(dy);
  T* dh_p = ptr<T>(dh);
  T* dc_p = ptr<T>(dc);
  T* d_pre_p = ptr<T>(d_pre);
  T* d_h_proj_p = ptr<T>(d_h_proj);
  T* d_cell_norm_p = ptr<T>(d_cell_norm);
  const T* gates_p = ptr<T>(gates);
  const T* x_proj_p = ptr<T>(x_proj);
  const T* h_proj_p = ptr<T>(h_proj);
  const T* cells_p = ptr<T>(cells);
  const T* stats_p = ptr<T>(stats);
  const T* c0_p = ptr<T>(c0);
  const T* mask_p = zoneout_mask.has_value() ? ptr<T>(*zoneout_mask) : nullptr;
  for (int64_t k = S.T - 1; k >= 0; --k) {
    const int64_t t = S.step(k), bs = S.bs[t], off = S.off[t];
    const int64_t n_prev = S.rows_with_prev(t), off_prev = n_prev > 0 ? S.off[S.prev_step(t)] : 0;
    parallel_rows(bs, G4, [&](int64_t b) {
      const int64_t r = off + b;
      const T* gt = gates_p + r * G4;
      const T* hp = h_proj_p + r * G4;
      const T* cell = cells_p + r * H;
      const T* c_prev = b < n_prev ? cells_p + (off_prev + b) * H : c0_p + b * H;
      const T* st = stats_p + r * kStats;
      const T* dy_row = dy_p + r * H;
      const T* keep_row = mask_p ? mask_p + r * H : nullptr;
      T* dp = d_pre_p + r * G4;
      T* dhp = d_h_proj_p + r * G4;
      T* dcn = d_cell_norm_p + r * H;
      T* dh_row = dh_p + b * H;
      T* dc_row = dc_p + b * H;
      const T mean_h = st[kMeanH], rstd_h = st[kRstdH], mean_c = st[kMeanC], rstd_c = st[kRstdC];
      // sums over the row for the two layer norms' backward: of dxhat and of dxhat * xhat
      RowSum<T> cell_dxhat, cell_dxhat_xhat, hh_dxhat, hh_dxhat_xhat;
      const auto add_hh = [&](auto lanes, int64_t u, auto d_pre_u) {
        using Ln = decltype(lanes);
        const auto xhat = (Ln::load(hp + u) - Ln::splat(mean_h)) * Ln::splat(rstd_h);
        const auto dxhat = d_pre_u * Ln::load(ln.hh_w + u);
        hh_dxhat.add(dxhat);
        hh_dxhat_xhat.add(dxhat * xhat);
      };
      // 1. h' = keep h + (1 - keep) h_new: the previous h's direct share stays in dh; h_new = o tanh(LN_cell(c'))
      for_lanes<T>(H, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        using M = typename Ln::M;
        const auto one = Ln::splat(T(1));
        const auto dh_total = Ln::load(dh_row + j) + Ln::load(dy_row + j);
        auto dh_new = dh_total;
        if (zoned) {
          const auto keep = keep_weight<Ln>(keep_row, j, zoneout);
          dh_new = (one - keep) * dh_total;
          Ln::store(dh_row + j, keep * dh_total);
        }
        const auto xhat = (Ln::load(cell + j) - Ln::splat(mean_c)) * Ln::splat(rstd_c);
        const auto tc = M::tanh(xhat * Ln::load(ln.cell_w + j) + Ln::load(ln.cell_b + j));
        const auto o = Ln::load(gt + 3 * H + j);
        const auto d_pre_o = dh_new * tc * (o * (one - o));
        const auto d_norm = dh_new * o * (one - tc * tc);
        Ln::store(dp + 3 * H + j, d_pre_o);
        Ln::store(dcn + j, d_norm);
        const auto dxhat = d_norm * Ln::load(ln.cell_w + j);
        cell_dxhat.add(dxhat);
        cell_dxhat_xhat.add(dxhat * xhat);
        add_hh(lanes, 3 * H + j, d_pre_o);
      });
      const T cell_m1 = cell_dxhat.total() / T(H), cell_m2 = cell_dxhat_xhat.total() / T(H);
      // 2. through LN_cell into c' (plus what reaches c' from the next step), then c' = f c + i g
      for_lanes<T>(H, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        using V = typename Ln::V;
        const auto xhat = (Ln::load(cell + j) - Ln::splat(mean_c)) * Ln::splat(rstd_c);
        const auto dxhat = Ln::load(dcn + j) * Ln::load(ln.cell_w + j);
        const auto dc_total =
            Ln::load(dc_row + j) + Ln::splat(rstd_c) * (dxhat - Ln::splat(cell_m1) - xhat * Ln::splat(cell_m2));
        V d_i, d_f, d_g, dc_prev;
        rnn::lstm_cell_backward<typename Ln::M>(Ln::load(gt + j), Ln::load(gt + H + j), Ln::load(gt + 2 * H + j),
                                                Ln::load(c_prev + j), dc_total, d_i, d_f, d_g, dc_prev);
        Ln::store(dp + j, d_i);
        Ln::store(dp + H + j, d_f);
        Ln::store(dp + 2 * H + j, d_g);
        Ln::store(dc_row + j, dc_prev);
        add_hh(lanes, j, d_i);
        add_hh(lanes, H + j, d_f);
        add_hh(lanes, 2 * H + j, d_g);
      });
      // 3. LN_hh backward: the gradient of h_prev W_hh^T
      const T hh_m1 = hh_dxhat.total() / T(G4), hh_m2 = hh_dxhat_xhat.total() / T(G4);
      for_lanes<T>(G4, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        const auto xhat = (Ln::load(hp + j) - Ln::splat(mean_h)) * Ln::splat(rstd_h);
        const auto dxhat = Ln::load(dp + j) * Ln::load(ln.hh_w + j);
        Ln::store(dhp + j, Ln::splat(rstd_h) * (dxhat - Ln::splat(hh_m1) - xhat * Ln::splat(hh_m2)));
      });
    });
    // dh_prev = d_h_proj W_hh (+ the zoneout share already in dh)
    Tensor dh_rows = dh.narrow(0, 0, bs);
    Tensor rec_rows = dh_rec.narrow(0, 0, bs);
    const Tensor got = recurrent.run(d_h_proj.narrow(0, off, bs), rec_rows);
    if (zoned) {
      dh_rows.add_(got);
    } else {
      dh_rows.copy_(got);
    }
  }
  // dh, dc now hold the gradients of h0, c0.
  const auto none = [&] { return at::empty({0}, opt); };  // fresh for each: custom ops may not return aliases
  Tensor dx = none(), dw_ih = none(), dw_hh = none(), dbias = none();
  Tensor d_ih_w = none(), d_ih_b = none(), d_hh_w = none(), d_hh_b = none(), d_cell_w = none(), d_cell_b = none();
  if (want_dweights) {
    // the gain / bias sums read d_pre before the input layer norm's backward overwrites it below
    for (Tensor* g : {&d_ih_w, &d_ih_b, &d_hh_w, &d_hh_b}) *g = new_output({G4}, opt);
    for (Tensor* g : {&d_cell_w, &d_cell_b}) *g = new_output({H}, opt);
    gain_bias_grads<T>(rows, G4, d_pre_p, x_proj_p, stats_p, kMeanX, ptr<T>(d_ih_w), ptr<T>(d_ih_b));
    gain_bias_grads<T>(rows, G4, d_pre_p, h_proj_p, stats_p, kMeanH, ptr<T>(d_hh_w), ptr<T>(d_hh_b));
    gain_bias_grads<T>(rows, H, d_cell_norm_p, cells_p, stats_p, kMeanC, ptr<T>(d_cell_w), ptr<T>(d_cell_b));
    if (has_bias) dbias = d_ih_b.clone();  // bias, ln_ih_bias and ln_hh_bias all add to the pre-activations
  }
  if (want_dx || want_dweights) {
    // LN_ih backward for every row, in place: d_pre becomes the gradient of x W_ih^T
    parallel_rows(rows, G4, [&](int64_t r) {
      const T* xp = x_proj_p + r * G4;
      T* dp = d_pre_p + r * G4;
      const T mean = stats_p[r * kStats + kMeanX], rstd = stats_p[r * kStats + kRstdX];
      RowSum<T> dxhat_sum, dxhat_xhat_sum;
      for_lanes<T>(G4, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        const auto xhat = (Ln::load(xp + j) - Ln::splat(mean)) * Ln::splat(rstd);
        const auto dxhat = Ln::load(dp + j) * Ln::load(ln.ih_w + j);
        dxhat_sum.add(dxhat);
        dxhat_xhat_sum.add(dxhat * xhat);
      });
      const T m1 = dxhat_sum.total() / T(G4), m2 = dxhat_xhat_sum.total() / T(G4);
      for_lanes<T>(G4, [&](int64_t j, auto lanes) {
        using Ln = decltype(lanes);
        const auto xhat = (Ln::load(xp + j) - Ln::splat(mean)) * Ln::splat(rstd);
        const auto dxhat = Ln::load(dp + j) * Ln::load(ln.ih_w + j);
        Ln::store(dp + j, Ln::splat(rstd) * (dxhat - Ln::splat(m1) - xhat * Ln::splat(m2)));
      });
    });
    if (want_dx) dx = at::mm(d_pre, w_ih);
    if (want_dweights) {
      dw_ih = at::mm(d_pre.t(), x);
      dw_hh = at::mm(d_h_proj.t(), S.gather_h_prev(y, h0));
    }
  }
  return {dx, dw_ih, dw_hh, dbias, d_ih_w, d_ih_b, d_hh_w, d_hh_b, d_cell_w, d_cell_b, dh, dc};
}

// Checks the kernel's own assumptions (the op layer validates the user-facing ones; a direct call of the op
// may not) -> H.
int64_t check_layer(const char* who, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                    const c10::optional<Tensor>& bias, const Tensor& ln_ih_weight, const Tensor& ln_ih_bias,
                    const Tensor& ln_hh_weight, const Tensor& ln_hh_bias, const Tensor& ln_cell_weight,
                    const Tensor& ln_cell_bias, const Tensor& h0, const Tensor& c0,
                    const c10::optional<Tensor>& zoneout_mask) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "layer_norm_lstm (CPU kernel): float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, who, ": x must be (rows, input_size), got ", x.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 && w_hh.size(1) == w_hh.size(0) / 4,
              "layer_norm_lstm: w_hh must be (4H, H)");
  TORCH_CHECK(h0.dim() == 2, who, ": h0 must be (B, H), got ", h0.sizes());
  const int64_t H = w_hh.size(1), G4 = 4 * H, rows = x.size(0), I = x.size(1), B = h0.size(0);
  check_dense(who, {{"x", &x, {rows, I}},
                    {"w_ih", &w_ih, {G4, I}},
                    {"w_hh", &w_hh, {G4, H}},
                    {"bias", bias ? &*bias : nullptr, {G4}},
                    {"ln_ih_weight", &ln_ih_weight, {G4}},
                    {"ln_ih_bias", &ln_ih_bias, {G4}},
                    {"ln_hh_weight", &ln_hh_weight, {G4}},
                    {"ln_hh_bias", &ln_hh_bias, {G4}},
                    {"ln_cell_weight", &ln_cell_weight, {H}},
                    {"ln_cell_bias", &ln_cell_bias, {H}},
                    {"h0", &h0, {B, H}},
                    {"c0", &c0, {B, H}},
                    {"zoneout_mask", zoneout_mask ? &*zoneout_mask : nullptr, {rows, H}}});
  TORCH_CHECK(!zoneout_mask.has_value() || zoneout_mask->scalar_type() == x.scalar_type(),
              "layer_norm_lstm: zoneout_mask must be (rows, H) in x's dtype");
  return H;
}

template <typename T>
Norms<T> norms(const Tensor& ih_w, const Tensor& ih_b, const Tensor& hh_w, const Tensor& hh_b, const Tensor& cell_w,
               const Tensor& cell_b) {
  return {ptr<T>(ih_w), ptr<T>(ih_b), ptr<T>(hh_w), ptr<T>(hh_b), ptr<T>(cell_w), ptr<T>(cell_b)};
}

}  // namespace

std::vector<Tensor> layer_norm_lstm_forward(const Tensor& x, const Tensor& batch_sizes, const Tensor& w_ih,
                                            const Tensor& w_hh, const c10::optional<Tensor>& bias,
                                            const Tensor& ln_ih_weight, const Tensor& ln_ih_bias,
                                            const Tensor& ln_hh_weight, const Tensor& ln_hh_bias,
                                            const Tensor& ln_cell_weight, const Tensor& ln_cell_bias,
                                            const Tensor& h0, const Tensor& c0,
                                            const c10::optional<Tensor>& zoneout_mask, double zoneout, bool reverse,
                                            bool train) {
  const int64_t H = check_layer("layer_norm_lstm", x, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight,
                                ln_hh_bias, ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask);
  const PackedSteps S("layer_norm_lstm", batch_sizes, x.size(0), h0.size(0), reverse);
  if (x.scalar_type() == at::kFloat) {
    return forward_impl<float>(S, H, x, w_ih, w_hh, bias,
                               norms<float>(ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
                                            ln_cell_bias),
                               h0, c0, zoneout_mask, float(zoneout), train);
  }
  return forward_impl<double>(S, H, x, w_ih, w_hh, bias,
                              norms<double>(ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
                                            ln_cell_bias),
                              h0, c0, zoneout_mask, zoneout, train);
}

std::vector<Tensor> layer_norm_lstm_backward(
    const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& bias, const Tensor& ln_ih_weight,
    const Tensor& ln_ih_bias, const Tensor& ln_hh_weight, const Tensor& ln_hh_bias, const Tensor& ln_cell_weight,
    const Tensor& ln_cell_bias, const Tensor& h0, const Tensor& c0, const c10::optional<Tensor>& zoneout_mask,
    double zoneout, const Tensor& y, const Tensor& gates, const Tensor& x_proj, const Tensor& h_proj,
    const Tensor& cells, const Tensor& stats, bool reverse, bool want_dx, bool want_dweights) {
  const char* who = "layer_norm_lstm_backward";
  const int64_t H = check_layer(who, x, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                                ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask);
  const PackedSteps S(who, batch_sizes, x.size(0), h0.size(0), reverse);
  TORCH_CHECK(gates.numel() == S.rows * 4 * H && x_proj.numel() == S.rows * 4 * H &&
                  h_proj.numel() == S.rows * 4 * H && cells.numel() == S.rows * H && stats.numel() == S.rows * kStats,
              "layer_norm_lstm_backward: the workspace does not match (was the forward run with train=true?)");
  const int64_t rows = S.rows, B = S.B;
  check_dense(who, {{"dy", &dy, {rows, H}},
                    {"dh_n", &dh_n, {B, H}},
                    {"dc_n", &dc_n, {B, H}},
                    {"y", &y, {rows, H}},
                    {"gates", &gates, {rows, 4 * H}},
                    {"x_proj", &x_proj, {rows, 4 * H}},
                    {"h_proj", &h_proj, {rows, 4 * H}},
                    {"cells", &cells, {rows, H}},
                    {"stats", &stats, {rows, kStats}}});
  const bool has_bias = bias.has_value();
  if (x.scalar_type() == at::kFloat) {
    return backward_impl<float>(S, H, dy, dh_n, dc_n, x, w_ih, w_hh, has_bias,
                                norms<float>(ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
                                             ln_cell_bias),
                                h0, c0, zoneout_mask, float(zoneout), y, gates, x_proj, h_proj, cells, stats, want_dx,
                                want_dweights);
  }
  return backward_impl<double>(S, H, dy, dh_n, dc_n, x, w_ih, w_hh, has_bias,
                               norms<double>(ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
                                             ln_cell_bias),
                               h0, c0, zoneout_mask, zoneout, y, gates, x_proj, h_proj, cells, stats, want_dx,
                               want_dweights);
}

}  // namespace cpu
}  // namespace fastnn
