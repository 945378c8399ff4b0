// Spatial pyramid pooling family: SPP (adaptive max / average bins, flattened and concatenated) and YOLOv5's
// SPPF pooling (x and three chained k x k stride-1 max pools, concatenated), forward and backward on the CPU.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {
namespace cpu {
at::Tensor spp_pool(const at::Tensor& x, const std::vector<int64_t>& levels, bool avg);
at::Tensor spp_pool_backward(const at::Tensor& grad, const at::Tensor& x, const std::vector<int64_t>& levels,
                             bool avg);
at::Tensor sppf_pool(const at::Tensor& x, int64_t k);
at::Tensor sppf_pool_backward(const at::Tensor& grad, const at::Tensor& x, int64_t k);
}  // namespace cpu

inline void register_spp(pybind11::module& m) {
  m.def("spp_pool_cpu", &cpu::spp_pool, "SPP: adaptive max/avg pools per level, flattened and concatenated (CPU)",
        pybind11::arg("x"), pybind11::arg("levels"), pybind11::arg("avg"));
  m.def("spp_pool_backward_cpu", &cpu::spp_pool_backward, "Gradient of spp_pool with respect to x (CPU)",
        pybind11::arg("grad"), pybind11::arg("x"), pybind11::arg("levels"), pybind11::arg("avg"));
  m.def("sppf_pool_cpu", &cpu::sppf_pool, "SPPF pooling: cat([x, m(x), m(m(x)), m(m(m(x)))], 1) (CPU)",
        pybind11::arg("x"), pybind11::arg("k"));
  m.def("sppf_pool_backward_cpu", &cpu::sppf_pool_backward, "Gradient of sppf_pool with respect to x (CPU)",
        pybind11::arg("grad"), pybind11::arg("x"), pybind11::arg("k"));
}

}  // namespace fastnn
