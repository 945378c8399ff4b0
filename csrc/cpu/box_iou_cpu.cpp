// CPU pairwise IoU / generalized IoU, forward and backward, fused: one pass over the N x M pairs with no
// intermediate (N, M, 2) tensors (torchvision materialises five of them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/alloc.h"
#include "../common/box_math.h"

namespace fastnn::cpu {
namespace {

// Rows of about this many pairs per parallel task keep both cores busy down to ~100 x 100 inputs.
constexpr int64_t kPairsPerTask = 16384;

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
void iou_forward(const T* b1, const T* b2, int64_t n, int64_t m, bool generalized, T* out) {
  const int64_t grain = std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(m, 1));
  at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* a = b1 + 4 * i;
      T* row = out + i * m;
      for (int64_t j = 0; j < m; ++j) row[j] = pair_iou(a, b2 + 4 * j, generalized);
    }
  });
}

// Two deterministic passes: rows of boxes1 reduce over boxes2, then rows of boxes2 over boxes1.
template <typename T>
void iou_backward(const T* grad, const T* b1, const T* b2, int64_t n, int64_t m, bool generalized,
                  bool clamp_grad_at_zero, T* g1, T* g2) {
  at::parallel_for(0, n, std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(m, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T acc[4] = {0, 0, 0, 0}, unused[4];
      for (int64_t j = 0; j < m; ++j) pair_iou_backward(b1 + 4 * i, b2 + 4 * j, grad[i * m + j], generalized, clamp_grad_at_zero, acc, unused);
      for (int k = 0; k < 4; ++k) g1[4 * i + k] = acc[k];
    }
  });
  at::parallel_for(0, m, std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(n, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      T acc[4] = {0, 0, 0, 0}, unused[4];
      for (int64_t i = 0; i < n; ++i) pair_iou_backward(b1 + 4 * i, b2 + 4 * j, grad[i * m + j], generalized, clamp_grad_at_zero, unused, acc);
      for (int k = 0; k < 4; ++k) g2[4 * j + k] = acc[k];
    }
  });
}

// The kernels read boxes as rows of 4 coordinates (the ops' Python bodies check this too; a direct call of
// the pybind function may not).
void check_boxes(const char* who, const at::Tensor& boxes1, const at::Tensor& boxes2) {
  for (const at::Tensor* b : {&boxes1, &boxes2}) {
    TORCH_CHECK(b->dim() == 2 && b->size(1) == 4, "fastnn ", who, ": boxes must be (N, 4), got ", b->sizes());
  }
}

}  // namespace

// boxes1 (N, 4), boxes2 (M, 4), floating. Returns (N, M) in float32 (float64 for double input), the
// dtype torchvision.ops.box_iou returns.
at::Tensor pairwise_box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2, bool generalized) {
  TORCH_CHECK(boxes1.device().is_cpu() && boxes2.device().is_cpu(), "fastnn pairwise_box_iou: CPU tensors expected");
  check_boxes("pairwise_box_iou", boxes1, boxes2);
  const auto ct = compute_type(boxes1);
  at::Tensor a = boxes1.to(ct).contiguous(), b = boxes2.to(ct).contiguous();
  at::Tensor out = new_output({a.size(0), b.size(0)}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(ct, "pairwise_box_iou", [&] {
    iou_forward<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.size(0), b.size(0), generalized,
                          out.data_ptr<scalar_t>());
  });
  return out;
}

// Returns (grad_boxes1, grad_boxes2) in the dtypes of boxes1 and boxes2. clamp_grad_at_zero: see
// pair_iou_backward.
std::vector<at::Tensor> pairwise_box_iou_backward(const at::Tensor& grad, const at::Tensor& boxes1,
                                                  const at::Tensor& boxes2, bool generalized,
                                                  bool clamp_grad_at_zero) {
  check_boxes("pairwise_box_iou_backward", boxes1, boxes2);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == boxes1.size(0) && grad.size(1) == boxes2.size(0),
              "fastnn pairwise_box_iou_backward: grad must be (", boxes1.size(0), ", ", boxes2.size(0), "), got ",
              grad.sizes());
  const auto ct = compute_type(boxes1);
  at::Tensor a = boxes1.to(ct).contiguous(), b = boxes2.to(ct).contiguous(), g = grad.to(ct).contiguous();
  at::Tensor g1 = new_output(a.sizes(), a.options()), g2 = new_output(b.sizes(), b.options());
  if (g.numel() == 0) {  // no pairs: the gradients are zero
    g1.zero_();
    g2.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "pairwise_box_iou_backward", [&] {
      iou_backward<scalar_t>(g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.size(0),
                             b.size(0), generalized, clamp_grad_at_zero, g1.data_ptr<scalar_t>(),
                             g2.data_ptr<scalar_t>());
    });
  }
  return {g1.to(boxes1.scalar_type()), g2.to(boxes2.scalar_type())};
}

}  // namespace fastnn::cpu
