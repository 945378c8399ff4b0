// RoI family: roi_align (one or several feature levels in one call) and roi_pool, forward and backward.
// Entry points of the CPU and CUDA kernels and their registration. Semantics: fastnn/reference/roi.py.
//
// Inputs come validated from fastnn/ops/roi.py:
//   features: L >= 1 maps (N, C, H_l, W_l), one float dtype, the same N and C. channels_last (the caller
//     decides: every level channels-last) selects the channels-last kernels and a channels-last output;
//     otherwise every level is read NCHW-contiguous (copied if it is not).
//   rois (K, 5) float; levels (K,) int64 in [0, L) or absent when L == 1; scales: L spatial scales
//   batch indices are checked here: one outside [0, N) raises a ValueError naming the RoI.
// roi_align_forward -> (K, C, PH, PW) in the features' dtype
// roi_align_backward(grad (K, C, PH, PW), ..., feature_shapes: 4 * L sizes, channels_last) -> L gradients
// roi_pool_forward -> [out (K, C, PH, PW), argmax (K, C, PH, PW) int32: h * W + w, -1 for an empty bin]
// roi_pool_backward -> grad_input (N, C, H, W)
// Backward passes own their outputs (one thread per plane, or per channel block for channels-last) and add
// in a fixed order: bitwise deterministic and independent of the thread count.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {

namespace cpu {
int64_t& roi_sample_budget();  // bytes of sample tables built at a time (tests make it small)
at::Tensor roi_align_forward(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                             const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                             int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                             bool channels_last);
std::vector<at::Tensor> roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                           const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                                           const std::vector<int64_t>& feature_shapes, bool channels_last,
                                           int64_t sampling_ratio, bool aligned);
std::vector<at::Tensor> roi_pool_forward(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                         int64_t pooled_h, int64_t pooled_w, bool channels_last);
at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             const std::vector<int64_t>& input_shape, bool channels_last);
// The CUDA kernels' per-thread bodies run on the CPU (tests without a GPU): same contract as cuda::.
at::Tensor roi_align_forward_emulated(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                                      const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                                      int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                      bool channels_last);
std::vector<at::Tensor> roi_align_backward_emulated(const at::Tensor& grad, const at::Tensor& rois,
                                                    const c10::optional<at::Tensor>& levels,
                                                    const std::vector<double>& scales,
                                                    const std::vector<int64_t>& feature_shapes, bool channels_last,
                                                    int64_t sampling_ratio, bool aligned);
std::vector<at::Tensor> roi_pool_forward_emulated(const at::Tensor& input, const at::Tensor& rois,
                                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                                  bool channels_last);
at::Tensor roi_pool_backward_emulated(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                      const std::vector<int64_t>& input_shape, bool channels_last);
}  // namespace cpu

#ifdef FASTNN_WITH_CUDA
namespace cuda {
at::Tensor roi_align_forward(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                             const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                             int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                             bool channels_last);
std::vector<at::Tensor> roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                           const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                                           const std::vector<int64_t>& feature_shapes, bool channels_last,
                                           int64_t sampling_ratio, bool aligned);
std::vector<at::Tensor> roi_pool_forward(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                         int64_t pooled_h, int64_t pooled_w, bool channels_last);
at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             const std::vector<int64_t>& input_shape, bool channels_last);
}  // namespace cuda
#endif

inline void register_roi(pybind11::module& m) {
  using pybind11::arg;
  m.def("roi_align_forward_cpu", &cpu::roi_align_forward, "RoIAlign over one or several levels (CPU)",
        arg("features"), arg("rois"), arg("levels"), arg("scales"), arg("pooled_h"), arg("pooled_w"),
        arg("sampling_ratio"), arg("aligned"), arg("channels_last"));
  m.def("roi_align_backward_cpu", &cpu::roi_align_backward, "RoIAlign gradient, deterministic (CPU)", arg("grad"),
        arg("rois"), arg("levels"), arg("scales"), arg("feature_shapes"), arg("channels_last"),
        arg("sampling_ratio"), arg("aligned"));
  m.def("roi_pool_forward_cpu", &cpu::roi_pool_forward, "RoIPool with argmax (CPU)", arg("input"), arg("rois"),
        arg("spatial_scale"), arg("pooled_h"), arg("pooled_w"), arg("channels_last"));
  m.def("roi_pool_backward_cpu", &cpu::roi_pool_backward, "RoIPool gradient, deterministic (CPU)", arg("grad"),
        arg("rois"), arg("argmax"), arg("input_shape"), arg("channels_last"));
  m.def("set_roi_sample_budget", [](int64_t bytes) { cpu::roi_sample_budget() = bytes; },
        "Bytes of RoIAlign sample tables the CPU kernels build at a time (tests)");
  m.def("roi_align_forward_emulated", &cpu::roi_align_forward_emulated,
        "The CUDA RoIAlign forward's per-thread bodies run on CPU tensors (tests)");
  m.def("roi_align_backward_emulated", &cpu::roi_align_backward_emulated,
        "The CUDA RoIAlign backward (entries, stable sort, reduce) run on CPU tensors (tests)");
  m.def("roi_pool_forward_emulated", &cpu::roi_pool_forward_emulated,
        "The CUDA RoIPool forward's per-thread bodies run on CPU tensors (tests)");
  m.def("roi_pool_backward_emulated", &cpu::roi_pool_backward_emulated,
        "The CUDA RoIPool backward (keys, stable sort, reduce) run on CPU tensors (tests)");
#ifdef FASTNN_WITH_CUDA
  m.def("roi_align_forward_cuda", &cuda::roi_align_forward, "RoIAlign over one or several levels (CUDA)");
  m.def("roi_align_backward_cuda", &cuda::roi_align_backward, "RoIAlign gradient, deterministic (CUDA)");
  m.def("roi_pool_forward_cuda", &cuda::roi_pool_forward, "RoIPool with argmax (CUDA)");
  m.def("roi_pool_backward_cuda", &cuda::roi_pool_backward, "RoIPool gradient, deterministic (CUDA)");
#endif
}

}  // namespace fastnn
