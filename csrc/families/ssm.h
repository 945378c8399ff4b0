// State-space family (selective scan): entry points of the CPU and CUDA kernels and their registration.
// Calling convention and semantics: fastnn/reference/ssm.py (selective_scan, chunk_states).
//
// Inputs are validated and made contiguous by fastnn/ops/ssm.py:
//   u, delta, z: (B, D, L), one dtype (fp32 / fp16 / bf16 / fp64)
//   A (D, N), D_skip (D,), delta_bias (D,), initial_state (R, D, N): compute dtype (fp32, fp64 for fp64 u)
//   Bm, Cm: (D, N) or per step (B, G, N, L), compute dtype
//   seq_idx (B, L) int32; per_sequence_states: states numbered by seq_idx value (B == 1), else by row
// forward -> [out (B, D, L) in u's dtype, last_state (R, D, N), chunk_states (B, D, ceil(L/chunk), N)]
// backward -> [du, ddelta, dz (or undefined)] in u's dtype, [dA, dB, dC, dD, ddelta_bias, dinitial_state]
//   in the compute dtype (undefined where the input is absent); dB/dC summed deterministically when
//   `deterministic` (CUDA; the CPU kernel always is).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {

#define FASTNN_SCAN_FWD_ARGS                                                                                   \
  const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &Bm, const at::Tensor &Cm, \
      const c10::optional<at::Tensor>&D_skip, const c10::optional<at::Tensor>&z,                               \
      const c10::optional<at::Tensor>&delta_bias, bool delta_softplus,                                         \
      const c10::optional<at::Tensor>&initial_state, const c10::optional<at::Tensor>&seq_idx,                  \
      bool per_sequence_states, int64_t chunk_size
#define FASTNN_SCAN_BWD_ARGS                                                                                   \
  const at::Tensor &dout, const c10::optional<at::Tensor>&dlast_state, const at::Tensor &chunk_states,        \
      FASTNN_SCAN_FWD_ARGS, bool deterministic

namespace cpu {
std::vector<at::Tensor> selective_scan_forward(FASTNN_SCAN_FWD_ARGS);
std::vector<at::Tensor> selective_scan_backward(FASTNN_SCAN_BWD_ARGS);
// y = 2^x, reps times, by the CPU kernels' vectorised exp2 (vec_math.h), every thread: the bench's exp ceiling.
void exp2_throughput(const at::Tensor& x, at::Tensor& y, int64_t reps);
}  // namespace cpu

#ifdef FASTNN_WITH_CUDA
namespace cuda {
std::vector<at::Tensor> selective_scan_forward(FASTNN_SCAN_FWD_ARGS);
std::vector<at::Tensor> selective_scan_backward(FASTNN_SCAN_BWD_ARGS);
}  // namespace cuda
#endif

inline void register_ssm(pybind11::module& m) {
  namespace py = pybind11;
#define FASTNN_SCAN_PYARGS                                                                                 \
  py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),    \
      py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("initial_state"), py::arg("seq_idx"),      \
      py::arg("per_sequence_states"), py::arg("chunk_size")
#define FASTNN_SCAN_BWD_PYARGS \
  py::arg("dout"), py::arg("dlast_state"), py::arg("chunk_states"), FASTNN_SCAN_PYARGS, py::arg("deterministic")
  m.def("selective_scan_forward_cpu", &cpu::selective_scan_forward,
        "Selective scan forward on CPU -> [out, last_state, chunk_states]", FASTNN_SCAN_PYARGS);
  m.def("selective_scan_backward_cpu", &cpu::selective_scan_backward,
        "Selective scan backward on CPU -> [du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial_state]",
        FASTNN_SCAN_BWD_PYARGS);
  m.def("exp2_throughput_cpu", &cpu::exp2_throughput,
        "y = 2^x, reps times, by the CPU kernels' vectorised exp2 on every thread (the bench's exp ceiling)",
        py::arg("x"), py::arg("y"), py::arg("reps"));
#ifdef FASTNN_WITH_CUDA
  m.def("selective_scan_forward_cuda", &cuda::selective_scan_forward,
        "Selective scan forward on CUDA -> [out, last_state, chunk_states]", FASTNN_SCAN_PYARGS);
  m.def("selective_scan_backward_cuda", &cuda::selective_scan_backward,
        "Selective scan backward on CUDA -> [du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial_state]",
        FASTNN_SCAN_BWD_PYARGS);
#endif
#undef FASTNN_SCAN_BWD_PYARGS
#undef FASTNN_SCAN_PYARGS
}

}  // namespace fastnn
