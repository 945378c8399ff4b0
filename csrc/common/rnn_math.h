// LSTM / GRU gate math shared by the CPU and CUDA kernels: one formula, compiled for scalars on both and
// for lane vectors on the CPU. `M` supplies sigmoid, tanh and the constant 1 for the value type T.
// Semantics (torch.nn's gate order): fastnn/reference/rnn.py.
#pragma once

#include "hd.h"

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace fastnn {
namespace rnn {

// sigmoid / tanh / 1 for float and double scalars
struct ScalarMath {
  static FASTNN_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
  static FASTNN_HD double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  static FASTNN_HD float tanh(float x) { return tanhf(x); }
  static FASTNN_HD double tanh(double x) { return ::tanh(x); }
  template <typename T>
  static FASTNN_HD T one() {
    return T(1);
  }
};

// The LSTM's gates and cell for one unit from the pre-activations: activated i, f, g, o and the new cell
// c = f c_prev + i g. (The plain LSTM and the layer-normalised one differ only after this.)
template <typename M, typename T>
FASTNN_HD void lstm_gates_and_cell(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev, T& i, T& f, T& g, T& o, T& c) {
  i = M::sigmoid(pre_i);
  f = M::sigmoid(pre_f);
  g = M::tanh(pre_g);
  o = M::sigmoid(pre_o);
  c = f * c_prev + i * g;
}

// Its backward from dc_total (every gradient reaching c): gradients of the pre-activations i, f, g and of
// c_prev (the o gate's depends on what reads c, so the caller forms it).
template <typename M, typename T>
FASTNN_HD void lstm_cell_backward(T i, T f, T g, T c_prev, T dc_total, T& d_pre_i, T& d_pre_f, T& d_pre_g,
                                  T& dc_prev) {
  const T one = M::template one<T>();
  d_pre_i = dc_total * g * (i * (one - i));
  d_pre_f = dc_total * c_prev * (f * (one - f));
  d_pre_g = dc_total * i * (one - g * g);
  dc_prev = dc_total * f;
}

// LSTM step for one unit from the pre-activations (input part + recurrent part + biases):
// activated gates i, f, g, o, the new cell c = f c_prev + i g, and r = o tanh(c) (h, or the input of the
// projection when proj_size > 0).
template <typename M, typename T>
FASTNN_HD void lstm_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev, T& i, T& f, T& g, T& o, T& c, T& r) {
  lstm_gates_and_cell<M>(pre_i, pre_f, pre_g, pre_o, c_prev, i, f, g, o, c);
  r = o * M::tanh(c);
}

// Its backward: dr (the gradient reaching r) and dc (the gradient reaching c from the next step) ->
// gradients of the four pre-activations and of c_prev.
template <typename M, typename T>
FASTNN_HD void lstm_backward(T i, T f, T g, T o, T c_prev, T c, T dr, T dc, T& d_pre_i, T& d_pre_f, T& d_pre_g,
                             T& d_pre_o, T& dc_prev) {
  const T one = M::template one<T>();
  const T tc = M::tanh(c);
  const T dc_total = dc + dr * o * (one - tc * tc);
  d_pre_o = dr * tc * (o * (one - o));
  lstm_cell_backward<M>(i, f, g, c_prev, dc_total, d_pre_i, d_pre_f, d_pre_g, dc_prev);
}

// GRU step for one unit: x_* = input part (with b_ih), h_* = recurrent part (with b_hh) ->
// r, z, n and h = (1 - z) n + z h_prev (written n + z (h_prev - n)).
template <typename M, typename T>
FASTNN_HD void gru_forward(T x_r, T x_z, T x_n, T h_r, T h_z, T h_n, T h_prev, T& r, T& z, T& n, T& h) {
  r = M::sigmoid(x_r + h_r);
  z = M::sigmoid(x_z + h_z);
  n = M::tanh(x_n + r * h_n);
  h = n + z * (h_prev - n);
}

// Its backward: dh (the gradient reaching h) -> gradients of the pre-activations r, z, n (the input
// part's), of the recurrent n part h_n (the recurrent part's n gradient is d_hn = d_pre_n * r), and the
// direct path to h_prev (the recurrent GEMM adds the rest).
template <typename M, typename T>
FASTNN_HD void gru_backward(T r, T z, T n, T h_n, T h_prev, T dh, T& d_pre_r, T& d_pre_z, T& d_pre_n, T& d_hn,
                            T& dh_prev_direct) {
  const T one = M::template one<T>();
  d_pre_n = dh * (one - z) * (one - n * n);
  d_pre_z = dh * (h_prev - n) * (z * (one - z));
  d_pre_r = d_pre_n * h_n * (r * (one - r));
  d_hn = d_pre_n * r;
  dh_prev_direct = dh * z;
}

}  // namespace rnn
}  // namespace fastnn
