// FASTNN_CHECK / FASTNN_CHECK_VALUE: TORCH_CHECK / TORCH_CHECK_VALUE for the CUDA launchers and the glue
// headers they share with the CPU (csrc/cuda/*.cu, *_plan.h, selective_scan_common.h).
//
// Why not TORCH_CHECK there: TORCH_CHECK formats its message with std::ostringstream in the translation unit
// that calls it. On the H100 and H200 machines, a TORCH_CHECK formatting an integer inside an nvcc-compiled
// launcher segfaulted in std::ostream::_M_insert<long> (bench/NOTES.md, "First H200 run"). Here the call
// site only packs its arguments (pointers and numbers, no stream code); check.cpp, compiled by the host
// compiler like the CPU kernels, formats them and throws the same c10 errors (RuntimeError / ValueError).
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

namespace fastnn {

// One piece of an error message. Holds pointers into the caller's objects, which outlive the call (the
// pieces are built and consumed within one full expression).
struct CheckArg {
  enum class Kind { kText, kInt, kUInt, kFloat, kDtype, kDevice, kShape };
  Kind kind;
  union {
    const char* text;
    int64_t i;
    uint64_t u;
    double f;
    c10::ScalarType dtype;
  };
  c10::Device device{c10::kCPU};
  c10::IntArrayRef shape;

  CheckArg(const char* s) : kind(Kind::kText), text(s) {}
  CheckArg(const std::string& s) : kind(Kind::kText), text(s.c_str()) {}
  template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
  CheckArg(I v) : kind(std::is_signed_v<I> ? Kind::kInt : Kind::kUInt) {
    if constexpr (std::is_signed_v<I>) {
      i = static_cast<int64_t>(v);
    } else {
      u = static_cast<uint64_t>(v);
    }
  }
  CheckArg(double v) : kind(Kind::kFloat), f(v) {}
  CheckArg(c10::ScalarType t) : kind(Kind::kDtype), dtype(t) {}
  CheckArg(c10::Device d) : kind(Kind::kDevice), i(0), device(d) {}
  CheckArg(c10::IntArrayRef s) : kind(Kind::kShape), i(0), shape(s) {}
};

// Formats the pieces (as TORCH_CHECK would) and throws c10::ValueError when value_error, else c10::Error.
[[noreturn]] void check_failed(bool value_error, std::initializer_list<CheckArg> pieces);

}  // namespace fastnn

#define FASTNN_CHECK(cond, ...)                                              \
  do {                                                                       \
    if (C10_UNLIKELY(!(cond))) ::fastnn::check_failed(false, {__VA_ARGS__}); \
  } while (0)

#define FASTNN_CHECK_VALUE(cond, ...)                                       \
  do {                                                                      \
    if (C10_UNLIKELY(!(cond))) ::fastnn::check_failed(true, {__VA_ARGS__}); \
  } while (0)
