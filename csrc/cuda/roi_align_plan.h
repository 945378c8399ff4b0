// The device-independent glue of the RoIAlign kernels (ATen calls only): inputs in the kernels' form,
// parameters, RoI checks and the backward's count -> entries -> stable sort -> segments -> reduce sequence.
// The CUDA launchers (roi_align_cuda.cu) and the CPU emulation used by the tests
// (csrc/cpu/roi_align_emulated.cpp) both run it, with their own way of running the per-thread bodies of
// roi_align_kernels.cuh; the CPU kernels (csrc/cpu/roi_align_cpu.cpp) share the input preparation.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "roi_align_kernels.cuh"

namespace fastnn {

inline at::ScalarType roi_compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline at::MemoryFormat roi_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A RoIAlign forward's inputs in the kernels' form: every level in the compute dtype and the chosen layout
// (no copy when it already is), the levels' sizes (4 each), rois in the compute dtype, levels contiguous
// (undefined when absent), and the (poisoned) output in the compute dtype and the same layout.
struct RoiAlignInputs {
  at::ScalarType dtype;  // the features' dtype, which the caller returns
  std::vector<at::Tensor> feats;
  std::vector<int64_t> shapes;
  at::Tensor rois, levels, out;
};

inline RoiAlignInputs roi_align_inputs(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                                       const c10::optional<at::Tensor>& levels, int64_t pooled_h, int64_t pooled_w,
                                       bool channels_last) {
  FASTNN_CHECK(!features.empty(), "fastnn roi_align: at least one feature level expected");
  RoiAlignInputs in;
  in.dtype = features[0].scalar_type();
  const auto ct = roi_compute_type(in.dtype);
  const auto fmt = roi_format(channels_last);
  for (const auto& f : features) {
    FASTNN_CHECK(f.dim() == 4 && f.size(0) == features[0].size(0) && f.size(1) == features[0].size(1) &&
                     f.scalar_type() == in.dtype,
                 "fastnn roi_align: every level must be (N, C, H, W) with the same N, C and dtype");
    in.feats.push_back(f.to(ct).contiguous(fmt));
    for (int d = 0; d < 4; ++d) in.shapes.push_back(f.size(d));
  }
  in.rois = rois.to(ct).contiguous();
  in.levels = levels.has_value() ? levels->contiguous() : at::Tensor();
  in.out = new_output({rois.size(0), in.shapes[1], pooled_h, pooled_w}, in.feats[0].options().memory_format(fmt));
  return in;
}

// Zeroed gradient buffers for the levels of `shapes` (4 sizes each), in `options`' dtype and device and the
// chosen layout.
inline std::vector<at::Tensor> roi_grad_buffers(const std::vector<int64_t>& shapes, const at::TensorOptions& options,
                                                bool channels_last) {
  std::vector<at::Tensor> grads;
  for (size_t l = 0; l + 3 < shapes.size(); l += 4) {
    // at::zeros would drop the memory format
    grads.push_back(at::empty({shapes[l], shapes[l + 1], shapes[l + 2], shapes[l + 3]},
                              options.memory_format(roi_format(channels_last)))
                        .zero_());
  }
  return grads;
}

inline RoiAlignParams roi_align_params(const std::vector<int64_t>& shapes, const std::vector<double>& scales,
                                       const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_h,
                                       int64_t pooled_w, int64_t sampling_ratio, bool aligned, bool channels_last) {
  const int n_levels = static_cast<int>(scales.size());
  FASTNN_CHECK(n_levels >= 1 && n_levels <= kRoiMaxLevels && shapes.size() == 4 * scales.size(),
               "fastnn roi_align: 1 to ", kRoiMaxLevels, " levels supported, got ", n_levels);
  RoiAlignParams p{};
  int64_t base = 0;
  for (int l = 0; l < n_levels; ++l) {
    p.levels[l] = RoiLevel{nullptr, shapes[4 * l + 2], shapes[4 * l + 3], scales[l], base};
    base += shapes[4 * l] * shapes[4 * l + 2] * shapes[4 * l + 3];
  }
  p.n_levels = n_levels;
  p.n_batch = shapes[0];
  p.channels = shapes[1];
  p.pooled_h = static_cast<int>(pooled_h);
  p.pooled_w = static_cast<int>(pooled_w);
  p.sampling_ratio = static_cast<int>(sampling_ratio);
  p.aligned = aligned;
  p.channels_last = channels_last;
  p.rois = rois.data_ptr();
  p.roi_levels = levels.defined() ? levels.data_ptr<int64_t>() : nullptr;
  p.n_rois = rois.size(0);
  return p;
}

// Per RoI: whether its batch index is bad: outside (-1, N) (it is truncated, as torchvision does), NaN, or any
// index when N = 0 (-0.5 would truncate to image 0 of no images).
inline at::Tensor roi_bad_batch(const at::Tensor& b, int64_t n_batch) {
  if (n_batch <= 0) return at::ones(b.sizes(), b.options().dtype(at::kBool));
  return (b <= -1) | (b >= n_batch) | b.isnan();
}

inline at::Tensor roi_bad_level(const at::Tensor& levels, int64_t n_levels) {
  return (levels < 0) | (levels >= n_levels);
}

// Batch indices in [0, N) and levels in [0, L), so that a bad RoI raises a ValueError naming it instead of
// reading out of bounds (on CUDA: one small reduction and a host read).
inline void roi_check_indices(const at::Tensor& rois, const at::Tensor& levels, int64_t n_batch, int64_t n_levels) {
  const at::Tensor b = rois.select(1, 0);
  const at::Tensor bad_batch = roi_bad_batch(b, n_batch).nonzero();
  if (bad_batch.numel() > 0) {
    const int64_t k = bad_batch[0][0].item<int64_t>();
    FASTNN_CHECK_VALUE(false, "boxes[", k, ", 0] (batch index) is ", b[k].item<double>(),
                       ", expected an integer in [0, ", n_batch, ")");
  }
  if (levels.defined()) {
    const at::Tensor bad_level = roi_bad_level(levels, n_levels).nonzero();
    if (bad_level.numel() > 0) {
      const int64_t k = bad_level[0][0].item<int64_t>();
      FASTNN_CHECK_VALUE(false, "levels[", k, "] is ", levels[k].item<int64_t>(), ", expected a level in [0, ",
                         n_levels, ")");
    }
  }
}

// The same check in two halves for the CUDA launchers, which launch their kernels first (the kernels skip
// invalid RoIs: roi_valid) and only then wait: roi_indices_ok queues a reduction to one bool, and
// roi_raise_bad_indices reads it back (the launcher's one host read, after the kernels) and, only when it
// is false, finds and names the first bad RoI.
inline at::Tensor roi_indices_ok(const at::Tensor& rois, const at::Tensor& levels, int64_t n_batch, int64_t n_levels) {
  at::Tensor bad = roi_bad_batch(rois.select(1, 0), n_batch).any();
  if (levels.defined()) bad = bad | roi_bad_level(levels, n_levels).any();
  return bad.logical_not();
}

inline void roi_raise_bad_indices(const at::Tensor& ok, const at::Tensor& rois, const at::Tensor& levels,
                                  int64_t n_batch, int64_t n_levels) {
  if (!ok.item<bool>()) roi_check_indices(rois, levels, n_batch, n_levels);
}

// Stable sort of `keys` and the start of each run of equal keys: the segments the reduce kernels sum,
// found without a host read. seg_start[i] for i < count is segment i's first sorted position and
// seg_start[count] is n (the kernels read the count from `count`, a one-element device tensor; `bound`,
// at least count, sizes their grid).
struct KeySegments {
  at::Tensor sorted_keys, order, seg_start, count;
  int64_t bound = 0;
};

inline KeySegments sort_segments(const at::Tensor& keys) {
  KeySegments out;
  const int64_t n = keys.size(0);
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  out.sorted_keys = std::get<0>(sorted);
  out.order = std::get<1>(sorted);
  out.bound = n;
  if (n == 0) {
    out.seg_start = at::zeros({1}, keys.options());
    out.count = at::zeros({1}, keys.options());
    return out;
  }
  at::Tensor is_start = at::ones({n}, keys.options().dtype(at::kBool));
  if (n > 1) is_start.slice(0, 1).copy_(out.sorted_keys.slice(0, 1) != out.sorted_keys.slice(0, 0, n - 1));
  const at::Tensor number = is_start.cumsum(0);  // a start's segment number + 1 (int64)
  const at::Tensor position = at::arange(n, keys.options());
  // Each start writes its position to its segment's slot; every other position to a spare slot of its own
  // (n + 1 + position), so no two writes meet. Slots from count to n keep the initial n.
  const at::Tensor slot = at::where(is_start, number - 1, position + (n + 1));
  out.seg_start = at::full({2 * n + 1}, n, keys.options()).scatter_(0, slot, position);
  out.count = number.narrow(0, n - 1, 1);
  return out;
}

// The backward's buffers, filled step by step.
struct RoiBackwardPlan {
  at::Tensor counts, starts;               // per RoI: samples, first sample (undefined with a fixed ratio)
  int64_t per_roi = 0;                     // with a fixed ratio: every RoI's samples
  int64_t samples = 0;
  at::Tensor keys, sources, weights, divisors;  // per tap (4 per sample); divisor: the RoI's averaging count
  KeySegments seg;
};

// count(plan) fills counts (only for an adaptive ratio); entries(plan) fills keys / sources / weights /
// divisors; reduce(plan) writes the gradients. With a fixed sampling ratio nothing is read back: every RoI
// has bins * ratio^2 samples. An adaptive ratio needs the total first (one host read). Returns false when
// no sample exists (the gradients stay zero).
template <typename CountFn, typename EntriesFn, typename ReduceFn>
bool roi_align_backward_sequence(const RoiAlignParams& p, const at::TensorOptions& compute, CountFn count,
                                 EntriesFn entries, ReduceFn reduce) {
  RoiBackwardPlan plan;
  const auto i64 = compute.dtype(at::kLong);
  const int64_t k = p.n_rois;
  if (p.sampling_ratio > 0) {
    const int64_t ratio = p.sampling_ratio, bins = int64_t(p.pooled_h) * p.pooled_w;
    int64_t per_roi = 0, samples = 0, taps = 0;
    FASTNN_CHECK(!__builtin_mul_overflow(bins, ratio * ratio, &per_roi) &&
                     !__builtin_mul_overflow(per_roi, k, &samples) && !__builtin_mul_overflow(samples, 4, &taps),
                 "fastnn roi_align backward: ", k, " RoIs of ", bins, " bins at sampling_ratio ", ratio,
                 " have more samples than an int64 counts");
    plan.per_roi = per_roi;
    plan.samples = samples;
  } else {
    plan.counts = at::empty({k}, i64);
    count(plan);
    const at::Tensor ends = plan.counts.cumsum(0);
    plan.starts = ends - plan.counts;
    plan.samples = ends[k - 1].item<int64_t>();
  }
  if (plan.samples == 0) return false;
  const int64_t taps = 4 * plan.samples;
  plan.keys = at::empty({taps}, i64);
  plan.sources = at::empty({taps}, i64);
  plan.weights = at::empty({taps}, compute);
  plan.divisors = at::empty({taps}, compute);
  entries(plan);
  plan.seg = sort_segments(plan.keys);
  reduce(plan);
  return true;
}

// input: the features (forward) or null (backward); shape: their (N, C, H, W).
inline RoiPoolParams roi_pool_params(const at::Tensor& input, const std::vector<int64_t>& shape, const at::Tensor& rois,
                                     double scale, int64_t pooled_h, int64_t pooled_w, bool channels_last) {
  FASTNN_CHECK(shape.size() == 4, "fastnn roi_pool: the input shape must have 4 sizes, got ", shape.size());
  RoiPoolParams p{};
  p.input = input.defined() ? input.data_ptr() : nullptr;
  p.rois = rois.data_ptr();
  p.n_rois = rois.size(0);
  p.n_batch = shape[0];
  p.channels = shape[1];
  p.height = shape[2];
  p.width = shape[3];
  p.pooled_h = static_cast<int>(pooled_h);
  p.pooled_w = static_cast<int>(pooled_w);
  p.scale = scale;
  p.channels_last = channels_last;
  return p;
}

}  // namespace fastnn
