// Detection post-processing family: heatmap peaks, fixed-size detection post-processing, Soft-NMS.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastnn {
namespace cpu {
std::vector<at::Tensor> heatmap_peaks(const at::Tensor& heatmap, int64_t k, int64_t kernel);
std::vector<at::Tensor> detection_postprocess(const at::Tensor& boxes, const at::Tensor& scores,
                                              double score_threshold, double iou_threshold, int64_t max_detections,
                                              bool class_agnostic, int64_t pre_nms_top_k);
std::vector<at::Tensor> soft_nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                                 double sigma, double score_threshold, bool gaussian);
}  // namespace cpu

inline void register_detect(pybind11::module& m) {
  m.def("heatmap_peaks_cpu", &cpu::heatmap_peaks,
        "CenterNet peaks (local max in a kernel x kernel window) and their top-k per image on CPU",
        pybind11::arg("heatmap"), pybind11::arg("k"), pybind11::arg("kernel"));
  m.def("detection_postprocess_cpu", &cpu::detection_postprocess,
        "Score filter + top-k + per-class greedy NMS + fixed-size padded outputs, per image in parallel (CPU)",
        pybind11::arg("boxes"), pybind11::arg("scores"), pybind11::arg("score_threshold"),
        pybind11::arg("iou_threshold"), pybind11::arg("max_detections"), pybind11::arg("class_agnostic"),
        pybind11::arg("pre_nms_top_k"));
  m.def("soft_nms_cpu", &cpu::soft_nms, "Soft-NMS (linear or gaussian decay) on CPU",
        pybind11::arg("boxes"), pybind11::arg("scores"), pybind11::arg("iou_threshold"), pybind11::arg("sigma"),
        pybind11::arg("score_threshold"), pybind11::arg("gaussian"));
}

}  // namespace fastnn
