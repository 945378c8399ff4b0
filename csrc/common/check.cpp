// The formatting half of FASTNN_CHECK (check.h): compiled by the host compiler, never by nvcc.
#include "check.h"

#include <c10/util/Exception.h>

#include <string>

namespace fastnn {

void check_failed(bool value_error, std::initializer_list<CheckArg> pieces) {
  std::string msg;
  for (const CheckArg& p : pieces) {
    switch (p.kind) {
      case CheckArg::Kind::kText: msg += p.text != nullptr ? p.text : "(null)"; break;
      case CheckArg::Kind::kInt: msg += std::to_string(p.i); break;
      case CheckArg::Kind::kUInt: msg += std::to_string(p.u); break;
      case CheckArg::Kind::kFloat: msg += c10::str(p.f); break;
      case CheckArg::Kind::kDtype: msg += c10::toString(p.dtype); break;
      case CheckArg::Kind::kDevice: msg += p.device.str(); break;
      case CheckArg::Kind::kShape: msg += c10::str(p.shape); break;
    }
  }
  if (value_error) TORCH_CHECK_VALUE(false, msg);
  TORCH_CHECK(false, msg);
}

}  // namespace fastnn
