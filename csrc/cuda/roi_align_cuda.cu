// Launchers for the CUDA RoIAlign kernels (csrc/cuda/roi_align_kernels.cuh): take the torch stream, check
// every launch. Compiled with --fmad=false, so values equal the CPU kernels' and torchvision's CPU kernel.
// float16 / bfloat16 run in float32 (converted at the boundary). The glue is roi_align_plan.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../families/roi.h"
#include "roi_align_plan.h"

namespace fastnn::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// Blocks for a grid-stride kernel over at most `bound` items whose exact count is only on the device: enough
// for every SM to hold several, no more than the bound needs.
unsigned stride_blocks_for(int64_t bound) {
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t needed = (bound + kThreads - 1) / kThreads;  // (in 64 bits: blocks_for's unsigned could wrap)
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(needed, resident)));
}

// kGrid: roi_align_forward_element's compile-time sampling ratio (0: any)
template <typename T, int kGrid>
__global__ void roi_align_forward_kernel(RoiAlignParams p, int64_t total, T* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  int64_t at;
  const T v = roi_align_forward_element<T, kGrid>(p, i, at);
  out[at] = v;
}

template <typename T>
__global__ void roi_align_count_kernel(RoiAlignParams p, int64_t* counts) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k < p.n_rois) counts[k] = roi_align_sample_count<T>(p, k);
}

template <typename T>
__global__ void roi_align_entries_kernel(RoiAlignParams p, const int64_t* sample_start, int64_t per_roi,
                                         int64_t samples, int64_t* keys, int64_t* sources, T* weights, T* divisors) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= samples) return;
  roi_align_backward_entries<T>(p, sample_start, per_roi, s, keys, sources, weights, divisors);
}

// (segment, channel) items, channels fastest: the grad_out reads and channels-last writes coalesce. The
// number of segments is read on the device (sort_segments), so the grid strides over them.
template <typename T>
__global__ void roi_align_reduce_kernel(RoiAlignParams p, const int64_t* seg_start, const int64_t* segment_count,
                                        const int64_t* sorted_keys, const int64_t* order, const int64_t* sources,
                                        const T* weights, const T* divisors, const T* grad_out, RoiGradTargets<T> out) {
  const int64_t total = *segment_count * p.channels;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t seg = i / p.channels, c = i % p.channels;
    roi_align_backward_segment<T>(p, seg_start, sorted_keys, order, sources, weights, divisors, grad_out, seg, c,
                                  out);
  }
}

template <typename T>
__global__ void roi_pool_forward_kernel(RoiPoolParams p, int64_t total, T* out, int32_t* argmax) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  int32_t a;
  out[i] = roi_pool_forward_element<T>(p, i, a);
  argmax[i] = a;
}

template <typename T>
__global__ void roi_pool_keys_kernel(RoiPoolParams p, const int32_t* argmax, int64_t total, int64_t* keys) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < total) keys[i] = roi_pool_backward_key<T>(p, argmax, i);
}

template <typename T>
__global__ void roi_pool_reduce_kernel(const int64_t* seg_start, const int64_t* segment_count,
                                       const int64_t* sorted_keys, const int64_t* order, const T* grad_out,
                                       T* grad_in) {
  const int64_t segments = *segment_count;
  for (int64_t seg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; seg < segments;
       seg += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = seg_start[seg], key = sorted_keys[b];
    if (key != kNoPixel) grad_in[key] = roi_pool_backward_reduce<T>(order, b, seg_start[seg + 1], grad_out);
  }
}

}  // namespace

at::Tensor roi_align_forward(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                             const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                             int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                             bool channels_last) {
  FASTNN_CHECK(!features.empty() && features.size() == scales.size(), "fastnn roi_align cuda: one scale per level");
  c10::cuda::CUDAGuard guard(rois.device());
  const RoiAlignInputs in = roi_align_inputs(features, rois, levels, pooled_h, pooled_w, channels_last);
  if (in.out.numel() == 0) return in.out.to(in.dtype);
  RoiAlignParams p = roi_align_params(in.shapes, scales, in.rois, in.levels, pooled_h, pooled_w, sampling_ratio,
                                      aligned, channels_last);
  for (size_t l = 0; l < in.feats.size(); ++l) p.levels[l].data = in.feats[l].data_ptr();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = in.out.numel();
  AT_DISPATCH_FLOATING_TYPES(in.out.scalar_type(), "roi_align_forward_cuda", [&] {
    scalar_t* out = in.out.data_ptr<scalar_t>();
    if (sampling_ratio == kRoiUnrolledGrid) {
      roi_align_forward_kernel<scalar_t, kRoiUnrolledGrid>
          <<<blocks_for(total), kThreads, 0, stream>>>(p, total, out);
    } else {
      roi_align_forward_kernel<scalar_t, 0><<<blocks_for(total), kThreads, 0, stream>>>(p, total, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t n_levels = static_cast<int64_t>(in.feats.size());
  const at::Tensor result = in.out.to(in.dtype);
  // After the kernel (it skipped any invalid RoI): the host read waits for the GPU, not the GPU for it.
  roi_raise_bad_indices(roi_indices_ok(in.rois, in.levels, in.shapes[0], n_levels), in.rois, in.levels, in.shapes[0],
                        n_levels);
  return result;
}

std::vector<at::Tensor> roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                           const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                                           const std::vector<int64_t>& feature_shapes, bool channels_last,
                                           int64_t sampling_ratio, bool aligned) {
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const size_t n_levels = scales.size();
  FASTNN_CHECK(feature_shapes.size() == 4 * n_levels, "fastnn roi_align cuda backward: 4 sizes per level");
  // Channels-last whatever the features' layout: the reduce runs a thread per (pixel, channel), channels
  // fastest, so its stores coalesce. An NCHW result costs one transposing copy at the end instead of one
  // 32-byte sector written per gradient element.
  std::vector<at::Tensor> grads = roi_grad_buffers(feature_shapes, grad.options().dtype(ct), /*channels_last=*/true);
  const int64_t k = rois.size(0), channels = feature_shapes[1];
  at::Tensor r, lvl, indices_ok;
  if (k > 0 && channels > 0) {
    r = rois.to(ct).contiguous();
    lvl = levels.has_value() ? levels->contiguous() : at::Tensor();
    const at::Tensor go = grad.to(ct).contiguous(at::MemoryFormat::ChannelsLast);  // (K * bins, C) rows
    const RoiAlignParams p = roi_align_params(feature_shapes, scales, r, lvl, grad.size(2), grad.size(3),
                                              sampling_ratio, aligned, /*channels_last=*/true);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_align_backward_cuda", [&] {
      using T = scalar_t;
      RoiGradTargets<T> targets{};
      for (size_t l = 0; l < n_levels; ++l) targets.grad[l] = grads[l].data_ptr<T>();
      roi_align_backward_sequence(
          p, grad.options().dtype(ct),
          [&](RoiBackwardPlan& pl) {
            roi_align_count_kernel<T><<<blocks_for(k), kThreads, 0, stream>>>(p, pl.counts.data_ptr<int64_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          },
          [&](RoiBackwardPlan& pl) {
            roi_align_entries_kernel<T><<<blocks_for(pl.samples), kThreads, 0, stream>>>(
                p, pl.starts.defined() ? pl.starts.data_ptr<int64_t>() : nullptr, pl.per_roi, pl.samples,
                pl.keys.data_ptr<int64_t>(), pl.sources.data_ptr<int64_t>(), pl.weights.data_ptr<T>(),
                pl.divisors.data_ptr<T>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          },
          [&](RoiBackwardPlan& pl) {
            roi_align_reduce_kernel<T><<<stride_blocks_for(pl.seg.bound * channels), kThreads, 0, stream>>>(
                p, pl.seg.seg_start.data_ptr<int64_t>(), pl.seg.count.data_ptr<int64_t>(),
                pl.seg.sorted_keys.data_ptr<int64_t>(), pl.seg.order.data_ptr<int64_t>(),
                pl.sources.data_ptr<int64_t>(), pl.weights.data_ptr<T>(), pl.divisors.data_ptr<T>(), go.data_ptr<T>(),
                targets);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
    indices_ok = roi_indices_ok(r, lvl, feature_shapes[0], static_cast<int64_t>(n_levels));
  }
  for (auto& g : grads) g = g.to(dtype, /*non_blocking=*/false, /*copy=*/false, roi_format(channels_last));
  // the one host read, after every launch (the kernels skipped invalid RoIs)
  if (indices_ok.defined()) roi_raise_bad_indices(indices_ok, r, lvl, feature_shapes[0], static_cast<int64_t>(n_levels));
  return grads;
}

std::vector<at::Tensor> roi_pool_forward(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                         int64_t pooled_h, int64_t pooled_w, bool channels_last) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto dtype = input.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto fmt = roi_format(channels_last);
  const at::Tensor x = input.to(ct).contiguous(fmt);
  const at::Tensor r = rois.to(ct).contiguous();
  const int64_t k = r.size(0);
  at::Tensor out = new_output({k, x.size(1), pooled_h, pooled_w}, x.options().memory_format(fmt));
  at::Tensor arg = new_output({k, x.size(1), pooled_h, pooled_w}, x.options().dtype(at::kInt).memory_format(fmt));
  if (out.numel() == 0) return {out.to(dtype), arg};
  RoiPoolParams p = roi_pool_params(x, x.sizes().vec(), r, spatial_scale, pooled_h, pooled_w, channels_last);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_forward_cuda", [&] {
    roi_pool_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(p, total, out.data_ptr<scalar_t>(),
                                                                                 arg.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  std::vector<at::Tensor> result{out.to(dtype), arg};
  roi_raise_bad_indices(roi_indices_ok(r, at::Tensor(), x.size(0), 1), r, at::Tensor(), x.size(0), 1);
  return result;
}

at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             const std::vector<int64_t>& input_shape, bool channels_last) {
  FASTNN_CHECK(input_shape.size() == 4, "fastnn roi_pool backward: the input shape must have 4 sizes, got ",
               input_shape.size());
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto fmt = roi_format(channels_last);
  at::Tensor gi = roi_grad_buffers(input_shape, grad.options().dtype(ct), channels_last)[0];
  const int64_t total = grad.numel();
  at::Tensor r, indices_ok;
  if (total > 0) {
    const at::Tensor go = grad.to(ct).contiguous(fmt);
    const at::Tensor am = argmax.contiguous(fmt);
    r = rois.to(ct).contiguous();
    RoiPoolParams p = roi_pool_params(at::Tensor(), input_shape, r, 1.0, grad.size(2), grad.size(3), channels_last);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_backward_cuda", [&] {
      at::Tensor keys = at::empty({total}, grad.options().dtype(at::kLong));
      roi_pool_keys_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(p, am.data_ptr<int32_t>(), total,
                                                                              keys.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const KeySegments seg = sort_segments(keys);
      roi_pool_reduce_kernel<scalar_t><<<stride_blocks_for(seg.bound), kThreads, 0, stream>>>(
          seg.seg_start.data_ptr<int64_t>(), seg.count.data_ptr<int64_t>(), seg.sorted_keys.data_ptr<int64_t>(),
          seg.order.data_ptr<int64_t>(), go.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    indices_ok = roi_indices_ok(r, at::Tensor(), input_shape[0], 1);
  }
  at::Tensor result = gi.to(dtype);
  // the one host read, after every launch (the keys kernel skipped invalid RoIs), as the CPU kernel checks
  if (indices_ok.defined()) roi_raise_bad_indices(indices_ok, r, at::Tensor(), input_shape[0], 1);
  return result;
}

}  // namespace fastnn::cuda
