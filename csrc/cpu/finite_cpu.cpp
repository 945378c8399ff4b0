// all_finite_cpu: whether tensors hold only finite values, as one parallel pass over their stored
// elements that tests exponent bits (no arithmetic, so no overflow can flag finite data). The attention
// ops screen their CPU inputs with it: torch.isfinite(t.sum()) took ~0.45 ms per 2 M-element bf16
// tensor here, against a memory-speed scan.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "families/attention.h"

namespace fastnn {
namespace cpu {
namespace {

// U: the element's bit pattern type; an element is non-finite when all its exponent bits are set.
template <typename U>
bool span_finite(const U* p, int64_t n, U exp_mask) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    constexpr int64_t kChunk = 4096;  // a flag check per chunk; the inner loop vectorises
    for (int64_t c = b; c < e && !bad.load(std::memory_order_relaxed); c += kChunk) {
      const int64_t ce = std::min(e, c + kChunk);
      U hit = 0;
      for (int64_t i = c; i < ce; ++i) hit |= static_cast<U>((p[i] & exp_mask) == exp_mask);
      if (hit) bad.store(true, std::memory_order_relaxed);
    }
  });
  return !bad.load();
}

bool tensor_finite(const at::Tensor& t) {
  if (t.numel() == 0 || !(t.is_floating_point() || t.is_complex())) return true;
  TORCH_CHECK(t.device().is_cpu(), "all_finite_cpu: tensors must be on the CPU, got ", t.device());
  // A non-overlapping, dense tensor (any permutation of dims, strides >= 0) stores its numel elements
  // contiguously from data_ptr on; anything else is scanned through a contiguous copy.
  const at::Tensor d = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  const void* p = d.data_ptr();
  const int64_t n = d.numel();
  switch (d.scalar_type()) {
    case at::kFloat: return span_finite(static_cast<const uint32_t*>(p), n, uint32_t{0x7F800000u});
    case at::kDouble: return span_finite(static_cast<const uint64_t*>(p), n, uint64_t{0x7FF0000000000000ull});
    case at::kBFloat16: return span_finite(static_cast<const uint16_t*>(p), n, uint16_t{0x7F80u});
    case at::kHalf: return span_finite(static_cast<const uint16_t*>(p), n, uint16_t{0x7C00u});
    default:
      // (a complex value is finite when both parts are: scanned as its real pairs)
      if (d.is_complex()) return tensor_finite(at::view_as_real(d.resolve_conj()));
      return at::isfinite(d).all().item<bool>();
  }
}

}  // namespace

bool all_finite(const std::vector<c10::optional<at::Tensor>>& tensors) {
  for (const auto& t : tensors)
    if (t.has_value() && !tensor_finite(*t)) return false;
  return true;
}

}  // namespace cpu
}  // namespace fastnn
