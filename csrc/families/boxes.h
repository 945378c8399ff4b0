// Box family: entry points of the CPU and CUDA kernels and their pybind11 registration.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {
namespace cpu {
at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, const c10::optional<at::Tensor>& idxs,
               double threshold);
at::Tensor pairwise_box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2, bool generalized);
std::vector<at::Tensor> pairwise_box_iou_backward(const at::Tensor& grad, const at::Tensor& boxes1,
                                                  const at::Tensor& boxes2, bool generalized,
                                                  bool clamp_grad_at_zero);
}  // namespace cpu

#ifdef FASTNN_WITH_CUDA
namespace cuda {
at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, const c10::optional<at::Tensor>& idxs,
               double threshold);
at::Tensor nms_mask(const at::Tensor& boxes, const at::Tensor& block_segment, const at::Tensor& seg_first_block,
                    const at::Tensor& seg_num_blocks, const at::Tensor& seg_mask_offset, int64_t max_blocks,
                    int64_t total_words, double threshold);
}  // namespace cuda
#endif

inline void register_boxes(pybind11::module& m) {
  m.def("nms_cpu", &cpu::nms, "Greedy NMS on CPU; kept indices in descending score order",
        pybind11::arg("boxes"), pybind11::arg("scores"), pybind11::arg("idxs"), pybind11::arg("iou_threshold"));
  m.def("pairwise_box_iou_cpu", &cpu::pairwise_box_iou, "Pairwise (generalized) IoU on CPU",
        pybind11::arg("boxes1"), pybind11::arg("boxes2"), pybind11::arg("generalized"));
  m.def("pairwise_box_iou_backward_cpu", &cpu::pairwise_box_iou_backward,
        "Gradients of pairwise (generalized) IoU on CPU", pybind11::arg("grad"), pybind11::arg("boxes1"),
        pybind11::arg("boxes2"), pybind11::arg("generalized"), pybind11::arg("clamp_grad_at_zero"));
#ifdef FASTNN_WITH_CUDA
  m.def("nms_cuda", &cuda::nms, "Greedy NMS on CUDA (bitmask + on-GPU sweep); kept indices by descending score",
        pybind11::arg("boxes"), pybind11::arg("scores"), pybind11::arg("idxs"), pybind11::arg("iou_threshold"));
  m.def("nms_mask_cuda", &cuda::nms_mask, "NMS suppression bitmask over a segmented layout (CUDA; tests)");
#endif
}

}  // namespace fastnn
