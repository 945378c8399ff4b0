// Layer-normalised LSTM with zoneout (haste's LayerNormLSTM, torch's gate order): one layer in one
// direction over a time-major packed batch, forward and backward through time. Entry points of the CPU
// kernels and their registration. Semantics: fastnn/reference/rnn.py (layer_norm_lstm_layer).
//
// Inputs are validated and made contiguous by fastnn/ops/rnn_ln.py, all in one float dtype (float32 or
// float64; the op layer runs fp16 / bf16 in float32):
//   x (rows, I) packed; batch_sizes (T,) int64 on the CPU, non-increasing, summing to rows, [0] = B;
//   w_ih (4H, I), w_hh (4H, H), bias (4H,) or absent; ln_ih_weight / ln_ih_bias, ln_hh_weight / ln_hh_bias
//   (4H,), ln_cell_weight / ln_cell_bias (H,); h0, c0 (B, H); zoneout_mask (rows, H) (training: 1 keeps the
//   unit's previous h) or absent, then every unit keeps the fraction `zoneout` of its previous h (evaluation;
//   0 = no zoneout).
// layer_norm_lstm_forward -> [y (rows, H), h_n, c_n, gates, x_proj, h_proj, cells, stats]. With train = true
//   the last five are the backward's workspace, otherwise empty: gates (rows, 4H) activated i f g o;
//   x_proj, h_proj (rows, 4H) = x W_ih^T and h_prev W_hh^T before their layer norms; cells (rows, H) the
//   cell c' of each step; stats (rows, 6) the mean and 1 / sqrt(var + eps) of x_proj, h_proj and c'.
// layer_norm_lstm_backward -> [dx, dw_ih, dw_hh, dbias, d_ln_ih_weight, d_ln_ih_bias, d_ln_hh_weight,
//   d_ln_hh_bias, d_ln_cell_weight, d_ln_cell_bias, dh0, dc0], empty where not wanted or absent. Weight
//   gradients are one GEMM each after the recurrence; gain and bias gradients are column sums in a fixed
//   order (the same bits for any thread count).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {

namespace cpu {
std::vector<at::Tensor> layer_norm_lstm_forward(
    const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ln_ih_weight, const at::Tensor& ln_ih_bias,
    const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias, const at::Tensor& h0, const at::Tensor& c0,
    const c10::optional<at::Tensor>& zoneout_mask, double zoneout, bool reverse, bool train);
std::vector<at::Tensor> layer_norm_lstm_backward(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& x,
    const at::Tensor& batch_sizes, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& bias, const at::Tensor& ln_ih_weight, const at::Tensor& ln_ih_bias,
    const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias, const at::Tensor& h0, const at::Tensor& c0,
    const c10::optional<at::Tensor>& zoneout_mask, double zoneout, const at::Tensor& y, const at::Tensor& gates,
    const at::Tensor& x_proj, const at::Tensor& h_proj, const at::Tensor& cells, const at::Tensor& stats,
    bool reverse, bool want_dx, bool want_dweights);
}  // namespace cpu

inline void register_rnn_ln(pybind11::module& m) {
  namespace py = pybind11;
  m.def("layer_norm_lstm_forward_cpu", &cpu::layer_norm_lstm_forward,
        "One LayerNormLSTM layer and direction over a packed batch on CPU -> [y, h_n, c_n, gates, x_proj, "
        "h_proj, cells, stats]",
        py::arg("x"), py::arg("batch_sizes"), py::arg("w_ih"), py::arg("w_hh"), py::arg("bias"),
        py::arg("ln_ih_weight"), py::arg("ln_ih_bias"), py::arg("ln_hh_weight"), py::arg("ln_hh_bias"),
        py::arg("ln_cell_weight"), py::arg("ln_cell_bias"), py::arg("h0"), py::arg("c0"), py::arg("zoneout_mask"),
        py::arg("zoneout"), py::arg("reverse"), py::arg("train"));
  m.def("layer_norm_lstm_backward_cpu", &cpu::layer_norm_lstm_backward,
        "Backward through time of layer_norm_lstm_forward_cpu -> [dx, dw_ih, dw_hh, dbias, d_ln_ih_weight, "
        "d_ln_ih_bias, d_ln_hh_weight, d_ln_hh_bias, d_ln_cell_weight, d_ln_cell_bias, dh0, dc0]",
        py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("x"), py::arg("batch_sizes"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("bias"), py::arg("ln_ih_weight"), py::arg("ln_ih_bias"), py::arg("ln_hh_weight"),
        py::arg("ln_hh_bias"), py::arg("ln_cell_weight"), py::arg("ln_cell_bias"), py::arg("h0"), py::arg("c0"),
        py::arg("zoneout_mask"), py::arg("zoneout"), py::arg("y"), py::arg("gates"), py::arg("x_proj"),
        py::arg("h_proj"), py::arg("cells"), py::arg("stats"), py::arg("reverse"), py::arg("want_dx"),
        py::arg("want_dweights"));
}

}  // namespace fastnn
