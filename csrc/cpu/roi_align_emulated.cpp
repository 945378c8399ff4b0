// The CUDA RoIAlign kernels run on the CPU: the per-thread bodies of csrc/cuda/roi_align_kernels.cuh, one
// loop iteration per CUDA thread, and the same glue (csrc/cuda/roi_align_plan.h) as the CUDA launchers.
// For the tests on machines without a GPU: the index math, the entry layout, the stable-sort segments and
// the reduce order are checked against the reference and the CPU kernels. Not a production path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/alloc.h"
#include "../cuda/roi_align_plan.h"
#include "../families/roi.h"

namespace fastnn::cpu {

at::Tensor roi_align_forward_emulated(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                                      const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                                      int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                      bool channels_last) {
  const RoiAlignInputs in = roi_align_inputs(features, rois, levels, pooled_h, pooled_w, channels_last);
  if (in.out.numel() == 0) return in.out.to(in.dtype);
  RoiAlignParams p = roi_align_params(in.shapes, scales, in.rois, in.levels, pooled_h, pooled_w, sampling_ratio,
                                      aligned, channels_last);
  for (size_t l = 0; l < in.feats.size(); ++l) p.levels[l].data = in.feats[l].data_ptr();
  AT_DISPATCH_FLOATING_TYPES(in.out.scalar_type(), "roi_align_forward_emulated", [&] {
    scalar_t* o = in.out.data_ptr<scalar_t>();
    at::parallel_for(0, in.out.numel(), 1024, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {  // one CUDA thread each
        int64_t at_;
        // the CUDA launcher's choice of kernel
        const scalar_t v = sampling_ratio == kRoiUnrolledGrid
                               ? roi_align_forward_element<scalar_t, kRoiUnrolledGrid>(p, i, at_)
                               : roi_align_forward_element<scalar_t, 0>(p, i, at_);
        o[at_] = v;
      }
    });
  });
  // the launcher's order: the kernel first (it skips invalid RoIs), then the check
  const int64_t n_levels = static_cast<int64_t>(in.feats.size());
  roi_raise_bad_indices(roi_indices_ok(in.rois, in.levels, in.shapes[0], n_levels), in.rois, in.levels, in.shapes[0],
                        n_levels);
  return in.out.to(in.dtype);
}

std::vector<at::Tensor> roi_align_backward_emulated(const at::Tensor& grad, const at::Tensor& rois,
                                                    const c10::optional<at::Tensor>& levels,
                                                    const std::vector<double>& scales,
                                                    const std::vector<int64_t>& feature_shapes, bool channels_last,
                                                    int64_t sampling_ratio, bool aligned) {
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const size_t n_levels = scales.size();
  // Channels-last whatever the features' layout: the reduce runs a thread per (pixel, channel), channels
  // fastest, so its stores coalesce. An NCHW result costs one transposing copy at the end instead of one
  // 32-byte sector written per gradient element.
  std::vector<at::Tensor> grads = roi_grad_buffers(feature_shapes, grad.options().dtype(ct), /*channels_last=*/true);
  const int64_t k = rois.size(0), channels = feature_shapes[1];
  if (k > 0 && channels > 0) {
    const at::Tensor r = rois.to(ct).contiguous();
    const at::Tensor lvl = levels.has_value() ? levels->contiguous() : at::Tensor();
    const at::Tensor go = grad.to(ct).contiguous(at::MemoryFormat::ChannelsLast);
    const RoiAlignParams p = roi_align_params(feature_shapes, scales, r, lvl, grad.size(2), grad.size(3),
                                              sampling_ratio, aligned, /*channels_last=*/true);
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_align_backward_emulated", [&] {
      using T = scalar_t;
      RoiGradTargets<T> targets{};
      for (size_t l = 0; l < n_levels; ++l) targets.grad[l] = grads[l].data_ptr<T>();
      roi_align_backward_sequence(
          p, grad.options().dtype(ct),
          [&](RoiBackwardPlan& pl) {
            for (int64_t i = 0; i < k; ++i) pl.counts.data_ptr<int64_t>()[i] = roi_align_sample_count<T>(p, i);
          },
          [&](RoiBackwardPlan& pl) {
            const int64_t* starts = pl.starts.defined() ? pl.starts.data_ptr<int64_t>() : nullptr;
            at::parallel_for(0, pl.samples, 1024, [&](int64_t a, int64_t b) {
              for (int64_t s = a; s < b; ++s) {
                roi_align_backward_entries<T>(p, starts, pl.per_roi, s, pl.keys.data_ptr<int64_t>(),
                                              pl.sources.data_ptr<int64_t>(), pl.weights.data_ptr<T>(),
                                              pl.divisors.data_ptr<T>());
              }
            });
          },
          [&](RoiBackwardPlan& pl) {
            // the CUDA kernel reads the segment count on the device; here it is a read of host memory
            const int64_t segments = pl.seg.count.item<int64_t>();
            at::parallel_for(0, segments * channels, 1024, [&](int64_t a, int64_t b) {
              for (int64_t i = a; i < b; ++i) {
                roi_align_backward_segment<T>(p, pl.seg.seg_start.data_ptr<int64_t>(),
                                              pl.seg.sorted_keys.data_ptr<int64_t>(), pl.seg.order.data_ptr<int64_t>(),
                                              pl.sources.data_ptr<int64_t>(), pl.weights.data_ptr<T>(),
                                              pl.divisors.data_ptr<T>(), go.data_ptr<T>(), i / channels, i % channels,
                                              targets);
              }
            });
          });
    });
    roi_raise_bad_indices(roi_indices_ok(r, lvl, feature_shapes[0], static_cast<int64_t>(n_levels)), r, lvl,
                          feature_shapes[0], static_cast<int64_t>(n_levels));
  }
  for (auto& g : grads) g = g.to(dtype, /*non_blocking=*/false, /*copy=*/false, roi_format(channels_last));
  return grads;
}

std::vector<at::Tensor> roi_pool_forward_emulated(const at::Tensor& input, const at::Tensor& rois,
                                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                                  bool channels_last) {
  const auto dtype = input.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto fmt = roi_format(channels_last);
  const at::Tensor x = input.to(ct).contiguous(fmt);
  const at::Tensor r = rois.to(ct).contiguous();
  at::Tensor out = new_output({r.size(0), x.size(1), pooled_h, pooled_w}, x.options().memory_format(fmt));
  at::Tensor arg = new_output({r.size(0), x.size(1), pooled_h, pooled_w}, x.options().dtype(at::kInt).memory_format(fmt));
  if (out.numel() == 0) return {out.to(dtype), arg};
  RoiPoolParams p = roi_pool_params(x, x.sizes().vec(), r, spatial_scale, pooled_h, pooled_w, channels_last);
  AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_forward_emulated", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    int32_t* a = arg.data_ptr<int32_t>();
    for (int64_t i = 0; i < out.numel(); ++i) o[i] = roi_pool_forward_element<scalar_t>(p, i, a[i]);
  });
  roi_raise_bad_indices(roi_indices_ok(r, at::Tensor(), x.size(0), 1), r, at::Tensor(), x.size(0), 1);
  return {out.to(dtype), arg};
}

at::Tensor roi_pool_backward_emulated(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                      const std::vector<int64_t>& input_shape, bool channels_last) {
  FASTNN_CHECK(input_shape.size() == 4, "fastnn roi_pool backward: the input shape must have 4 sizes, got ",
               input_shape.size());
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto fmt = roi_format(channels_last);
  at::Tensor gi = roi_grad_buffers(input_shape, grad.options().dtype(ct), channels_last)[0];
  const int64_t total = grad.numel();
  if (total == 0) return gi.to(dtype);
  const at::Tensor go = grad.to(ct).contiguous(fmt);
  const at::Tensor am = argmax.contiguous(fmt);
  const at::Tensor r = rois.to(ct).contiguous();
  RoiPoolParams p = roi_pool_params(at::Tensor(), input_shape, r, 1.0, grad.size(2), grad.size(3), channels_last);
  AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_backward_emulated", [&] {
    at::Tensor keys = at::empty({total}, grad.options().dtype(at::kLong));
    for (int64_t i = 0; i < total; ++i) {
      keys.data_ptr<int64_t>()[i] = roi_pool_backward_key<scalar_t>(p, am.data_ptr<int32_t>(), i);
    }
    const KeySegments seg = sort_segments(keys);
    const int64_t* ss = seg.seg_start.data_ptr<int64_t>();
    const int64_t* sk = seg.sorted_keys.data_ptr<int64_t>();
    const int64_t segments = seg.count.item<int64_t>();
    for (int64_t s = 0; s < segments; ++s) {
      if (sk[ss[s]] == kNoPixel) continue;
      gi.data_ptr<scalar_t>()[sk[ss[s]]] =
          roi_pool_backward_reduce<scalar_t>(seg.order.data_ptr<int64_t>(), ss[s], ss[s + 1], go.data_ptr<scalar_t>());
    }
  });
  roi_raise_bad_indices(roi_indices_ok(r, at::Tensor(), input_shape[0], 1), r, at::Tensor(), input_shape[0], 1);
  return gi.to(dtype);
}

}  // namespace fastnn::cpu
