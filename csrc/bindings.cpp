// The one pybind11 module, fastnn._C. Each kernel family registers its functions here.
#include <torch/extension.h>

#include "common/alloc.h"
#include "families/attention.h"
#include "families/boxes.h"
#include "families/detect.h"
#include "families/fpn.h"
#include "families/rnn.h"
#include "families/rnn_ln.h"
#include "families/roi.h"
#include "families/ssm.h"
#include "families/spp.h"
#include "families/ssm_conv.h"
#include "generated/build_config.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnn compiled kernels (C++ CPU, and CUDA C++ when built with it)";
  m.attr("with_cuda") = pybind11::bool_(FASTNN_BUILD_WITH_CUDA);
  m.attr("cuda_archs") = pybind11::str(FASTNN_BUILD_CUDA_ARCHS);
  m.attr("cxx_flags") = pybind11::str(FASTNN_BUILD_CXX_FLAGS);
  m.attr("nvcc_flags") = pybind11::str(FASTNN_BUILD_NVCC_FLAGS);
  m.attr("cuda_home") = pybind11::str(FASTNN_BUILD_CUDA_HOME);
  m.attr("built_with_torch") = pybind11::str(FASTNN_BUILD_TORCH_VERSION);
  m.def("set_poison", [](bool on) { fastnn::poison_outputs() = on; },
        "Fill new kernel outputs with NaN / -1 before the kernel writes (tests)");
  fastnn::register_boxes(m);
  fastnn::register_detect(m);
  fastnn::register_fpn(m);
  fastnn::register_attention(m);
  fastnn::register_ssm(m);
  fastnn::register_ssm_conv(m);
  fastnn::register_rnn(m);
  fastnn::register_rnn_ln(m);
  fastnn::register_roi(m);
  fastnn::register_spp(m);
}
