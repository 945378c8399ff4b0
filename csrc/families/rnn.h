// Recurrent family: one LSTM / GRU layer in one direction over a time-major packed batch, forward and
// backward through time. Entry points of the CPU kernels and their registration.
// Semantics: fastnn/reference/rnn.py (rnn_layer).
//
// Inputs are validated and made contiguous by fastnn/ops/rnn.py, all in one float dtype (float32 or
// float64; the op layer runs fp16 / bf16 in float32, except bf16 layers that rnn_bf16_native accepts: they
// pass x, w_ih and w_hh in bf16, the rest in float32, and get float32 outputs and workspace):
//   mode "lstm" (G = 4 gates) or "gru" (G = 3); x (rows, I) packed; batch_sizes (T,) int64 on the CPU,
//   non-increasing, summing to rows, batch_sizes[0] = B; w_ih (G H, I), w_hh (G H, P), b_ih / b_hh (G H,)
//   or both absent; w_hr (P, H) for an LSTM with projection (else P = H); h0 (B, P); c0 (B, H) (LSTM).
// rnn_layer_forward -> [y (rows, P), h_n (B, P), c_n (B, H) or empty, gates, aux, r]. With train = true
//   the last three are the backward's workspace: gates (rows, G H) activated (LSTM i f g o; GRU r z n),
//   aux (rows, H) the cell c of each step (LSTM) or h W_hn^T + b_hn (GRU), r (rows, H) = o tanh(c) when
//   projecting; otherwise empty.
// rnn_layer_backward -> [dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0], empty where not wanted (want_dx,
// want_dweights, want_dh0) or absent.
//   Weight gradients are one GEMM each over all steps, after the recurrence.
#pragma once
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastnn {

namespace cpu {
// Whether the CPU forward takes bf16 x / w_ih / w_hh for such a layer: AVX512-BF16 with torch's bf16 brgemm,
// no projection, an even input size (pairs of k per VNNI-2 element).
bool rnn_bf16_native(int64_t input_size, bool has_projection);
std::vector<at::Tensor> rnn_layer_forward(const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& b_ih,
                                          const c10::optional<at::Tensor>& b_hh,
                                          const c10::optional<at::Tensor>& w_hr, const at::Tensor& h0,
                                          const c10::optional<at::Tensor>& c0, bool reverse, bool train);
std::vector<at::Tensor> rnn_layer_backward(const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n,
                                           const c10::optional<at::Tensor>& dc_n, const at::Tensor& x,
                                           const at::Tensor& batch_sizes, const at::Tensor& w_ih,
                                           const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                           const c10::optional<at::Tensor>& b_hh,
                                           const c10::optional<at::Tensor>& w_hr, const at::Tensor& h0,
                                           const c10::optional<at::Tensor>& c0, const at::Tensor& y,
                                           const at::Tensor& gates, const at::Tensor& aux, const at::Tensor& r,
                                           bool reverse, bool want_dx, bool want_dweights,
                                           bool want_dh0 = true);
// Persistent forward (csrc/cuda/rnn_persistent_*): its plan, and its CPU emulation for the tests.
std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> rnn_persistent_plan(const std::string& mode,
                                                                                           int64_t hidden_size,
                                                                                           int64_t batch,
                                                                                           int64_t sms,
                                                                                           bool backward);
std::vector<at::Tensor> rnn_layer_forward_persistent_emulated(
    const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& h0, const c10::optional<at::Tensor>& c0, bool reverse, bool train, int64_t sms);
std::vector<at::Tensor> rnn_layer_backward_persistent_emulated(
    const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& batch_sizes, const at::Tensor& w_hh, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const at::Tensor& y, const at::Tensor& gates, const at::Tensor& aux, bool reverse, int64_t sms);
}  // namespace cpu

#ifdef FASTNN_WITH_CUDA
namespace cuda {
bool rnn_persistent_fits(const std::string& mode, int64_t hidden_size, int64_t batch, const at::Device& device);
std::vector<at::Tensor> rnn_layer_forward_persistent(const std::string& mode, const at::Tensor& x,
                                                     const at::Tensor& batch_sizes, const at::Tensor& w_ih,
                                                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                     const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                     const c10::optional<at::Tensor>& c0, bool reverse, bool train);
std::vector<at::Tensor> rnn_layer_backward_persistent(const std::string& mode, const at::Tensor& dy,
                                                      const at::Tensor& dh_n, const c10::optional<at::Tensor>& dc_n,
                                                      const at::Tensor& batch_sizes, const at::Tensor& w_hh,
                                                      const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                                      const at::Tensor& y, const at::Tensor& gates,
                                                      const at::Tensor& aux, bool reverse);
}  // namespace cuda
#endif

inline void register_rnn(pybind11::module& m) {
  namespace py = pybind11;
  m.def("rnn_layer_forward_cpu", &cpu::rnn_layer_forward,
        "One LSTM / GRU layer and direction over a packed batch on CPU -> [y, h_n, c_n, gates, aux, r]",
        py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
        py::arg("b_hh"), py::arg("w_hr"), py::arg("h0"), py::arg("c0"), py::arg("reverse"), py::arg("train"));
  m.def("rnn_bf16_native", &cpu::rnn_bf16_native,
        "Whether rnn_layer_forward_cpu runs a bf16 layer with bf16 operands (else it wants float32)",
        py::arg("input_size"), py::arg("has_projection"));
  m.def("rnn_layer_backward_cpu", &cpu::rnn_layer_backward,
        "Backward through time of rnn_layer_forward_cpu -> [dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0]",
        py::arg("mode"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("x"), py::arg("batch_sizes"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"), py::arg("h0"),
        py::arg("c0"), py::arg("y"), py::arg("gates"), py::arg("aux"), py::arg("r"), py::arg("reverse"),
        py::arg("want_dx"), py::arg("want_dweights"), py::arg("want_dh0") = true);
  m.def("rnn_persistent_plan", &cpu::rnn_persistent_plan,
        "The persistent forward's (or backward's) plan -> (fits, units per block, blocks, k-slices, weights per "
        "thread, rows per pass, shared bytes)",
        py::arg("mode"), py::arg("hidden_size"), py::arg("batch"), py::arg("sms"), py::arg("backward") = false);
  m.def("rnn_layer_forward_persistent_emulated", &cpu::rnn_layer_forward_persistent_emulated,
        "The persistent CUDA forward's per-thread code run on the CPU (tests) -> [y, h_n, c_n, gates, aux, r]",
        py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
        py::arg("b_hh"), py::arg("h0"), py::arg("c0"), py::arg("reverse"), py::arg("train"), py::arg("sms"));
  m.def("rnn_layer_backward_persistent_emulated", &cpu::rnn_layer_backward_persistent_emulated,
        "The persistent CUDA backward's per-thread code run on the CPU (tests) -> [dgx, dgh, dh0, dc0]",
        py::arg("mode"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("batch_sizes"), py::arg("w_hh"),
        py::arg("h0"), py::arg("c0"), py::arg("y"), py::arg("gates"), py::arg("aux"), py::arg("reverse"),
        py::arg("sms"));
#ifdef FASTNN_WITH_CUDA
  m.def(
      "rnn_persistent_fits",
      [](const std::string& mode, int64_t hidden_size, int64_t batch, int64_t device_index) {
        return cuda::rnn_persistent_fits(mode, hidden_size, batch, at::Device(at::kCUDA, device_index));
      },
      "Whether the persistent forward takes this layer on CUDA device `device_index`", py::arg("mode"),
      py::arg("hidden_size"), py::arg("batch"), py::arg("device_index"));
  m.def("rnn_layer_forward_persistent_cuda", &cuda::rnn_layer_forward_persistent,
        "One LSTM / GRU layer (no projection) in one persistent CUDA launch -> [y, h_n, c_n, gates, aux, r]",
        py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
        py::arg("b_hh"), py::arg("h0"), py::arg("c0"), py::arg("reverse"), py::arg("train"));
  m.def("rnn_layer_backward_persistent_cuda", &cuda::rnn_layer_backward_persistent,
        "Backward through time of one LSTM / GRU layer (no projection) in one persistent CUDA launch: the gate "
        "gradients and dh0 / dc0 -> [dgx, dgh (GRU; else empty), dh0, dc0 (LSTM; else empty)]",
        py::arg("mode"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("batch_sizes"), py::arg("w_hh"),
        py::arg("h0"), py::arg("c0"), py::arg("y"), py::arg("gates"), py::arg("aux"), py::arg("reverse"));
#endif
}

}  // namespace fastnn
