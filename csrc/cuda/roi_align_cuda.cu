// Launchers for the CUDA RoIAlign kernels (csrc/cuda/roi_align_kernels.cuh): take the torch stream, check
// every launch. Compiled with --fmad=false, so values equal the CPU kernels' and torchvision's CPU kernel.
// float16 / bfloat16 run in float32 (converted at the boundary). The glue is roi_align_plan.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../families/roi.h"
#include "roi_align_plan.h"

namespace fastnn::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

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
__global__ void roi_align_entries_kernel(RoiAlignParams p, const int64_t* sample_start, int64_t samples,
                                         int64_t* keys, int64_t* sources, T* weights, T* divisors) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= samples) return;
  roi_align_backward_entries<T>(p, sample_start, s, keys, sources, weights, divisors);
}

// One thread per (segment, channel), channels fastest: the grad_out reads and channels-last writes coalesce.
template <typename T>
__global__ void roi_align_reduce_kernel(RoiAlignParams p, const int64_t* seg_start, int64_t segments,
                                        const int64_t* sorted_keys, const int64_t* order, const int64_t* sources,
                                        const T* weights, const T* divisors, const T* grad_out, RoiGradTargets<T> out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= segments * p.channels) return;
  const int64_t seg = i / p.channels, c = i % p.channels;
  roi_align_backward_segment<T>(p, seg_start, sorted_keys, order, sources, weights, divisors, grad_out, seg, c, out);
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
__global__ void roi_pool_reduce_kernel(const int64_t* seg_start, int64_t segments, const int64_t* sorted_keys,
                                       const int64_t* order, const T* grad_out, T* grad_in) {
  const int64_t seg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (seg >= segments) return;
  const int64_t b = seg_start[seg], key = sorted_keys[b];
  if (key != kNoPixel) grad_in[key] = roi_pool_backward_reduce<T>(order, b, seg_start[seg + 1], grad_out);
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
  roi_check_indices(in.rois, in.levels, in.shapes[0], static_cast<int64_t>(in.feats.size()));
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
  return in.out.to(in.dtype);
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
  if (k > 0 && channels > 0) {
    const at::Tensor r = rois.to(ct).contiguous();
    const at::Tensor lvl = levels.has_value() ? levels->contiguous() : at::Tensor();
    roi_check_indices(r, lvl, feature_shapes[0], static_cast<int64_t>(n_levels));
    const at::Tensor go = grad.to(ct).contiguous(at::MemoryFormat::ChannelsLast);  // (K * bins, C) rows
    const RoiAlignParams p = roi_align_params(feature_shapes, scales, r, lvl, grad.size(2), grad.size(3),
                                              sampling_ratio, aligned, /*channels_last=*/true);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_align_backward_cuda", [&] {
      using T = scalar_t;
      at::Tensor table = at::empty({static_cast<int64_t>(n_levels)}, at::TensorOptions().dtype(at::kLong));
      for (size_t l = 0; l < n_levels; ++l) table[l] = reinterpret_cast<int64_t>(grads[l].data_ptr<T>());
      const at::Tensor table_dev = table.to(grad.device());
      const RoiGradTargets<T> targets{reinterpret_cast<T* const*>(table_dev.data_ptr<int64_t>())};
      roi_align_backward_sequence(
          k, grad.options().dtype(ct),
          [&](RoiBackwardPlan& pl) {
            roi_align_count_kernel<T><<<blocks_for(k), kThreads, 0, stream>>>(p, pl.counts.data_ptr<int64_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          },
          [&](RoiBackwardPlan& pl) {
            roi_align_entries_kernel<T><<<blocks_for(pl.samples), kThreads, 0, stream>>>(
                p, pl.starts.data_ptr<int64_t>(), pl.samples, pl.keys.data_ptr<int64_t>(),
                pl.sources.data_ptr<int64_t>(), pl.weights.data_ptr<T>(), pl.divisors.data_ptr<T>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          },
          [&](RoiBackwardPlan& pl) {
            roi_align_reduce_kernel<T><<<blocks_for(pl.segments * channels), kThreads, 0, stream>>>(
                p, pl.seg_start.data_ptr<int64_t>(), pl.segments, pl.sorted_keys.data_ptr<int64_t>(),
                pl.order.data_ptr<int64_t>(), pl.sources.data_ptr<int64_t>(), pl.weights.data_ptr<T>(),
                pl.divisors.data_ptr<T>(), go.data_ptr<T>(), targets);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  }
  for (auto& g : grads) g = g.to(dtype, /*non_blocking=*/false, /*copy=*/false, roi_format(channels_last));
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
  roi_check_indices(r, at::Tensor(), x.size(0), 1);
  RoiPoolParams p = roi_pool_params(x, r, spatial_scale, pooled_h, pooled_w, channels_last);
  p.channels = x.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_forward_cuda", [&] {
    roi_pool_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(p, total, out.data_ptr<scalar_t>(),
                                                                                 arg.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.to(dtype), arg};
}

at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             const std::vector<int64_t>& input_shape, bool channels_last) {
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto fmt = roi_format(channels_last);
  at::Tensor gi = roi_grad_buffers(input_shape, grad.options().dtype(ct), channels_last)[0];
  const int64_t total = grad.numel();
  if (total > 0) {
    const at::Tensor go = grad.to(ct).contiguous(fmt);
    const at::Tensor am = argmax.contiguous(fmt);
    const at::Tensor r = rois.to(ct).contiguous();
    RoiPoolParams p = roi_pool_params(at::Tensor(), r, 1.0, grad.size(2), grad.size(3), channels_last);
    p.channels = input_shape[1];
    p.height = input_shape[2];
    p.width = input_shape[3];
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_backward_cuda", [&] {
      at::Tensor keys = at::empty({total}, grad.options().dtype(at::kLong));
      roi_pool_keys_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(p, am.data_ptr<int32_t>(), total,
                                                                              keys.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const KeySegments seg = sort_segments(keys);
      roi_pool_reduce_kernel<scalar_t><<<blocks_for(seg.segments), kThreads, 0, stream>>>(
          seg.seg_start.data_ptr<int64_t>(), seg.segments, seg.sorted_keys.data_ptr<int64_t>(),
          seg.order.data_ptr<int64_t>(), go.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gi.to(dtype);
}

}  // namespace fastnn::cuda
