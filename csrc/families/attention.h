// Attention family: entry points of the CPU kernels and their pybind11 registration.
// Calling convention and semantics: fastnn/reference/attention.py (attention_forward / attention_backward).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {
namespace cpu {
// -> [out (B, Lq, H, Dv) in q's dtype, lse (B, H, Lq) fp32 (fp64 for fp64)]
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& cu_seqlens_q,
                                          const c10::optional<at::Tensor>& cu_seqlens_k,
                                          const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, const c10::optional<at::Tensor>& bias, double scale,
                                          double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
                                          double dropout_p, int64_t seed);
// -> (dq, dk, dv, dbias or None)
pybind11::tuple attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                   const c10::optional<at::Tensor>& cu_seqlens_q,
                                   const c10::optional<at::Tensor>& cu_seqlens_k,
                                   const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                                   int64_t max_seqlen_k, const c10::optional<at::Tensor>& bias, bool bias_requires_grad,
                                   double scale, double softcap, int64_t window_left, int64_t window_right,
                                   bool bottom_right, double dropout_p, int64_t seed);
// Whether every element of the given CPU tensors (None entries skipped) is finite: the ops' input screen.
bool all_finite(const std::vector<c10::optional<at::Tensor>>& tensors);
}  // namespace cpu

inline void register_attention(pybind11::module& m) {
  namespace py = pybind11;
  m.def(
      "attention_forward_cpu",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
         const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& seqused_k,
         int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& bias, double scale,
         double softcap, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
         int64_t seed) {
        auto r = cpu::attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                        bias, scale, softcap, window_left, window_right, bottom_right, dropout_p, seed);
        return py::make_tuple(r[0], r[1]);
      },
      "Fused attention forward on CPU -> (out, lse); semantics of fastnn.reference.attention.attention_forward",
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
      py::arg("seqused_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("bias"), py::arg("scale"),
      py::arg("softcap"), py::arg("window_left"), py::arg("window_right"), py::arg("bottom_right"),
      py::arg("dropout_p"), py::arg("seed"));
  m.def("all_finite_cpu", &cpu::all_finite,
        "Whether every element of the CPU tensors (None skipped) is finite; one parallel pass over the stored "
        "elements testing exponent bits",
        py::arg("tensors"));
  m.def("attention_backward_cpu", &cpu::attention_backward,
        "Fused attention backward on CPU -> (dq, dk, dv, dbias or None); deterministic",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("bias"), py::arg("bias_requires_grad"), py::arg("scale"), py::arg("softcap"),
        py::arg("window_left"), py::arg("window_right"), py::arg("bottom_right"), py::arg("dropout_p"),
        py::arg("seed"));
}

}  // namespace fastnn
