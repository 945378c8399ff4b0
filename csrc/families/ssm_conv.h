// State-space family, convolution and decode steps: depthwise causal conv1d (forward, backward),
// causal_conv1d_update and selective_state_update. Entry points of the CPU kernels and their registration.
// Semantics: fastnn/reference/ssm.py (causal_conv1d, causal_conv1d_update, selective_state_update).
//
// Inputs are validated and made contiguous by fastnn/ops/ssm_conv.py:
//   x, dout (B, D, L) in one float dtype; weight (D, W), W in 2..4, and bias (D,) in the compute dtype
//   (float32; float64 for float64 x); seq_idx (B, L) int32; initial_states, dfinal_states (B, D, W - 1) in
//   x's dtype; L >= 1 for the conv (the op layer answers empty inputs itself).
// causal_conv1d_forward -> [out (B, D, L), final_states (B, D, W - 1) or an empty tensor]
// causal_conv1d_backward -> [dx, dweight (D, W), dbias (D,), dinitial_states or an empty tensor]; dweight /
//   dbias in the compute dtype, reduced in a fixed order (deterministic)
// causal_conv1d_update: x (B, D, T), conv_state (B_cache, D, S >= W - 1) in x's dtype, updated in place;
//   conv_state_indices (B,) int32 in range; cache_seqlens (B,) int32 >= 0: the state is a circular buffer
//   (reference.causal_conv1d_update) -> out (B, D, T)
// selective_state_update (head form): state (B_cache, H, P, N) in x's dtype or float32 (float64 with
//   float64 x), updated in place; x, dt, z (B, H, P), B, C (B, G, N) in x's dtype; A (H, P, N), D, dt_bias
//   (H, P) in the compute dtype (float32; float64 for a float64 state) -> out (B, H, P)
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {

namespace cpu {
std::vector<at::Tensor> causal_conv1d_forward(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& seq_idx,
                                              const c10::optional<at::Tensor>& initial_states,
                                              bool return_final_states, bool silu);
std::vector<at::Tensor> causal_conv1d_backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states,
                                               const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias,
                                               const c10::optional<at::Tensor>& seq_idx,
                                               const c10::optional<at::Tensor>& initial_states, bool silu,
                                               bool want_dinitial_states);
at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, bool silu,
                                const c10::optional<at::Tensor>& conv_state_indices,
                                const c10::optional<at::Tensor>& cache_seqlens);
at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                  const c10::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const c10::optional<at::Tensor>& state_batch_indices);
}  // namespace cpu

inline void register_ssm_conv(pybind11::module& m) {
  namespace py = pybind11;
  m.def("causal_conv1d_forward_cpu", &cpu::causal_conv1d_forward,
        "Depthwise causal conv1d forward on CPU -> [out, final_states]", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("seq_idx"), py::arg("initial_states"), py::arg("return_final_states"),
        py::arg("silu"));
  m.def("causal_conv1d_backward_cpu", &cpu::causal_conv1d_backward,
        "Depthwise causal conv1d backward on CPU -> [dx, dweight, dbias, dinitial_states]", py::arg("dout"),
        py::arg("dfinal_states"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("seq_idx"),
        py::arg("initial_states"), py::arg("silu"), py::arg("want_dinitial_states"));
  m.def("causal_conv1d_update_cpu", &cpu::causal_conv1d_update,
        "Causal conv1d decode step(s) on CPU, conv_state updated in place -> out", py::arg("x"),
        py::arg("conv_state"), py::arg("weight"), py::arg("bias"), py::arg("silu"), py::arg("conv_state_indices"),
        py::arg("cache_seqlens"));
  m.def("selective_state_update_cpu", &cpu::selective_state_update,
        "Selective state update (one decode step) on CPU, state updated in place -> out", py::arg("state"),
        py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("dt_bias"), py::arg("dt_softplus"), py::arg("state_batch_indices"));
}

}  // namespace fastnn
