// Output allocation for the C++ launchers. In poison mode (set from Python by the tests) new outputs are
// filled with NaN / -1, so an element a kernel forgets to write shows up in the comparison.
#pragma once
#include <ATen/ATen.h>

namespace fastnn {

inline bool& poison_outputs() {
  static bool on = false;
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs() && out.numel() > 0) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-1);
    }
  }
  return out;
}

}  // namespace fastnn
