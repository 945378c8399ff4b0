// FPN family: the fused top-down step of a feature pyramid, out = lateral + nearest_upsample(top), and its
// backward. Entry points of the CPU kernels and their registration. Semantics: fastnn/reference/fpn.py.
//
// Inputs are validated by fastnn/ops/fpn.py: lateral (N, C, Hl, Wl) and top (N, C, Ht, Wt) of one float
// dtype, Ht, Wt >= 1 when lateral is non-empty. Layout: channels_last when lateral is channels_last-dense
// and not also contiguous, NCHW otherwise; the kernels read both layouts without a copy when the tensors
// are dense in that layout (anything else is copied into it once).
// fpn_topdown_add(lateral, top) -> out (N, C, Hl, Wl) in lateral's dtype and layout
// fpn_topdown_add_backward(grad, Ht, Wt, channels_last) -> grad_top (N, C, Ht, Wt) in grad's dtype and the
//   given layout: each top pixel sums grad over its nearest-source preimage (a gather in a fixed order:
//   rows of the preimage first, then its columns; deterministic, no atomics)
#pragma once
#include <torch/extension.h>

namespace fastnn {

namespace cpu {
at::Tensor fpn_topdown_add(const at::Tensor& lateral, const at::Tensor& top);
at::Tensor fpn_topdown_add_backward(const at::Tensor& grad, int64_t top_h, int64_t top_w, bool channels_last);
}  // namespace cpu

inline void register_fpn(pybind11::module& m) {
  m.def("fpn_topdown_add_cpu", &cpu::fpn_topdown_add,
        "FPN top-down step on CPU: lateral + nearest_upsample(top, lateral's size)", pybind11::arg("lateral"),
        pybind11::arg("top"));
  m.def("fpn_topdown_add_backward_cpu", &cpu::fpn_topdown_add_backward,
        "Gradient of the FPN top-down step with respect to top (CPU, deterministic gather)", pybind11::arg("grad"),
        pybind11::arg("top_h"), pybind11::arg("top_w"), pybind11::arg("channels_last"));
}

}  // namespace fastnn
