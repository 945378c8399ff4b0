// RoIAlign CUDA kernels (torch-free). The per-thread bodies are FASTNN_HD functions so that
// csrc/cpu/roi_align_emulated.cpp can run the same index math on the CPU (tests without a GPU).
//
// Forward: one thread per output element (RoI, channel, bin); channels are the fastest index for
// channels-last input (coalesced taps) and the bin for NCHW input.
//
// Backward without float atomics, in three steps (the launcher adds a stable sort between 1 and 2):
//   1. entries: one thread per sample writes its four taps as (key = flat pixel index, or kNoPixel for a
//      sample outside the map; source = RoI * bins + bin; weight; divisor = the RoI's averaging count, so the
//      reduce's inner loop needs no division or lookup to find it);
//   2. a stable sort by key groups the taps of each pixel and keeps them in generation order (RoI, bin,
//      sample, tap), which is the CPU kernels' and torchvision's order;
//   3. reduce: one thread per (pixel segment, channel) adds grad * weight / count over its segment.
// Each gradient element is then written once, the sum in a fixed order: bitwise deterministic and equal to
// the CPU kernel's gradient.
#pragma once

#include <cstdint>

#include "../common/roi_math.h"

namespace fastnn {

constexpr int kRoiMaxLevels = 8;
constexpr int64_t kNoPixel = INT64_MAX;

struct RoiLevel {
  const void* data;    // features of this level (forward), in the kernel's T
  int64_t height, width;
  double scale;
  int64_t pixel_base;  // first flat pixel index of this level: sum over lower levels of N * H * W
};

struct RoiAlignParams {
  RoiLevel levels[kRoiMaxLevels];
  int n_levels;
  int64_t n_batch, channels;
  int pooled_h, pooled_w;
  int sampling_ratio;
  bool aligned;
  bool channels_last;
  const void* rois;           // (K, 5) in T
  const int64_t* roi_levels;  // (K,) or null
  int64_t n_rois;
};

template <typename T>
FASTNN_HD int roi_level(const RoiAlignParams& p, int64_t k) {
  return p.roi_levels ? static_cast<int>(p.roi_levels[k]) : 0;
}

// RoI k's batch index is in (-1, N) (it is truncated, as torchvision does) and its level in [0, L). The CUDA
// launchers check the indices after launching the kernels (a host read then waits for the kernels, not the
// kernels for it), so every kernel skips an invalid RoI instead of reading out of bounds: its outputs and
// taps are discarded when the check raises.
template <typename T>
FASTNN_HD bool roi_valid(const RoiAlignParams& p, int64_t k) {
  const T b = static_cast<const T*>(p.rois)[5 * k];
  // (NaN fails too; with N = 0 every index does: -0.5 would truncate to image 0 of no images)
  if (!(p.n_batch > 0 && b > T(-1) && b < static_cast<T>(p.n_batch))) return false;
  const int64_t level = p.roi_levels ? p.roi_levels[k] : 0;
  return level >= 0 && level < p.n_levels;
}

// Output element `index` of the forward: returns its value and stores its flat output offset in `out_at`.
// kGrid > 0: compiled for sampling_ratio == kGrid, so the sample loops unroll and a thread's 4 kGrid^2 tap
// loads are all in flight at once, instead of one sample's four at a time (the additions keep their order).
// kGrid == 0: any sampling_ratio, adaptive included.
// The sampling ratio the launchers run as roi_align_forward_element<T, kRoiUnrolledGrid>: detectors' usual
// setting (torchvision's MultiScaleRoIAlign, Mask R-CNN).
constexpr int kRoiUnrolledGrid = 2;

template <typename T, int kGrid = 0>
FASTNN_HD T roi_align_forward_element(const RoiAlignParams& p, int64_t index, int64_t& out_at) {
  const int64_t bins = int64_t(p.pooled_h) * p.pooled_w;
  int64_t k, c, bin;
  if (p.channels_last) {  // output (K, PH, PW, C)
    c = index % p.channels;
    bin = (index / p.channels) % bins;
    k = index / p.channels / bins;
  } else {  // output (K, C, PH, PW)
    bin = index % bins;
    c = (index / bins) % p.channels;
    k = index / bins / p.channels;
  }
  out_at = index;
  if (!roi_valid<T>(p, k)) return T(0);
  const int ph = static_cast<int>(bin / p.pooled_w), pw = static_cast<int>(bin % p.pooled_w);
  const T* roi = static_cast<const T*>(p.rois) + 5 * k;
  const RoiLevel& lv = p.levels[roi_level<T>(p, k)];
  const auto g = roi_align_geometry<T>(roi, static_cast<T>(lv.scale), p.pooled_h, p.pooled_w, p.sampling_ratio,
                                       p.aligned);
  const int h = static_cast<int>(lv.height), w = static_cast<int>(lv.width);
  const int64_t n = static_cast<int64_t>(roi[0]);
  const T* img = static_cast<const T*>(lv.data);
  int64_t pix_stride, base;
  if (p.channels_last) {
    pix_stride = p.channels;
    base = n * lv.height * lv.width * p.channels + c;
  } else {
    pix_stride = 1;
    base = (n * p.channels + c) * lv.height * lv.width;
  }
  // With kGrid the loop bounds and divisors are constants. geometry gives sampling_ratio samples a side, or
  // none for a NaN RoI (then the average is 0 / 1).
  if (kGrid > 0 && g.grid_h == 0) return T(0);
  const int grid_h = kGrid > 0 ? kGrid : g.grid_h;
  const int grid_w = kGrid > 0 ? kGrid : g.grid_w;
  T acc = T(0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int iy = 0; iy < grid_h; ++iy) {
    const AxisTaps<T> ty = axis_taps(roi_sample_coord(g.start_h, g.bin_h, ph, iy, grid_h), h);
    if (!ty.valid) continue;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int ix = 0; ix < grid_w; ++ix) {
      const AxisTaps<T> tx = axis_taps(roi_sample_coord(g.start_w, g.bin_w, pw, ix, grid_w), w);
      if (!tx.valid) continue;
      const BilinearSample<T> s = bilinear_sample(ty, tx, w);
      acc += s.w1 * img[base + s.p1 * pix_stride] + s.w2 * img[base + s.p2 * pix_stride] +
             s.w3 * img[base + s.p3 * pix_stride] + s.w4 * img[base + s.p4 * pix_stride];
    }
  }
  return acc / g.count;
}

// Number of samples of RoI k: bins * grid_h * grid_w.
template <typename T>
FASTNN_HD int64_t roi_align_sample_count(const RoiAlignParams& p, int64_t k) {
  if (!roi_valid<T>(p, k)) return 0;
  const T* roi = static_cast<const T*>(p.rois) + 5 * k;
  const RoiLevel& lv = p.levels[roi_level<T>(p, k)];
  const auto g = roi_align_geometry<T>(roi, static_cast<T>(lv.scale), p.pooled_h, p.pooled_w, p.sampling_ratio,
                                       p.aligned);
  return int64_t(p.pooled_h) * p.pooled_w * g.grid_h * g.grid_w;
}

// Step 1 for sample `s` (global over all RoIs): writes keys / sources / weights / divisors [4 s, 4 s + 4).
// With a fixed sampling ratio every RoI has per_roi = bins * ratio^2 samples (sample_start is null), so the
// launcher sizes the buffers without reading anything back; an invalid RoI's samples, and a NaN RoI's (whose
// geometry has no grid), are then taps of no pixel. Otherwise sample_start is the exclusive prefix sum of
// roi_align_sample_count, which is 0 for those RoIs.
template <typename T>
FASTNN_HD void roi_align_backward_entries(const RoiAlignParams& p, const int64_t* sample_start, int64_t per_roi,
                                          int64_t s, int64_t* keys, int64_t* sources, T* weights, T* divisors) {
  int64_t k, local;
  if (sample_start == nullptr) {
    k = s / per_roi;
    local = s % per_roi;
  } else {  // the RoI owning sample s: the last k with sample_start[k] <= s (RoIs with no samples are skipped)
    int64_t lo = 0, hi = p.n_rois - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (sample_start[mid] <= s) lo = mid; else hi = mid - 1;
    }
    k = lo;
    local = s - sample_start[k];
  }
  const int64_t bins = int64_t(p.pooled_h) * p.pooled_w;
  bool valid = roi_valid<T>(p, k);
  const T* roi = static_cast<const T*>(p.rois) + 5 * k;
  const RoiLevel& lv = p.levels[valid ? roi_level<T>(p, k) : 0];
  const auto g = roi_align_geometry<T>(roi, static_cast<T>(lv.scale), p.pooled_h, p.pooled_w, p.sampling_ratio,
                                       p.aligned);
  valid = valid && g.grid_h > 0 && g.grid_w > 0;
  const int64_t per_bin = valid ? int64_t(g.grid_h) * g.grid_w : 1;
  const int64_t bin = valid ? local / per_bin : 0;
  BilinearSample<T> smp{};
  if (valid) {
    const int iy = static_cast<int>((local % per_bin) / g.grid_w), ix = static_cast<int>(local % g.grid_w);
    const int ph = static_cast<int>(bin / p.pooled_w), pw = static_cast<int>(bin % p.pooled_w);
    const int h = static_cast<int>(lv.height), w = static_cast<int>(lv.width);
    const AxisTaps<T> ty = axis_taps(roi_sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), h);
    const AxisTaps<T> tx = axis_taps(roi_sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), w);
    smp = bilinear_sample(ty, tx, w);
    valid = smp.valid;
  }
  const int64_t image_base = valid ? lv.pixel_base + static_cast<int64_t>(roi[0]) * lv.height * lv.width : 0;
  const int64_t src = k * bins + bin;
  const int32_t pix[4] = {smp.p1, smp.p2, smp.p3, smp.p4};
  const T wt[4] = {smp.w1, smp.w2, smp.w3, smp.w4};
  for (int t = 0; t < 4; ++t) {
    keys[4 * s + t] = valid ? image_base + pix[t] : kNoPixel;
    sources[4 * s + t] = src;
    weights[4 * s + t] = valid ? wt[t] : T(0);
    divisors[4 * s + t] = g.count;
  }
}

// Step 3 for (segment, channel): the gradient of one pixel and channel. `order` is the stable sort's
// permutation (sorted position -> entry), [seg_begin, seg_end) the segment's sorted positions;
// grad_out is channels-last (K * bins, C); divisors[e] the averaging count of entry e's RoI.
template <typename T>
FASTNN_HD T roi_align_backward_reduce(const int64_t* order, int64_t seg_begin, int64_t seg_end,
                                      const int64_t* sources, const T* weights, const T* divisors,
                                      const T* grad_out, int64_t channels, int64_t c) {
  T acc = T(0);
  for (int64_t i = seg_begin; i < seg_end; ++i) {
    const int64_t e = order[i];
    // torchvision's order: (grad * w) / count, added to the running gradient
    acc += grad_out[sources[e] * channels + c] * weights[e] / divisors[e];
  }
  return acc;
}

// The per-level gradient buffers the reduce writes (NCHW or channels-last, as RoiAlignParams says), held by
// value in the kernel's parameters: no pointer table to copy to the device (a blocking copy) before launch.
template <typename T>
struct RoiGradTargets {
  T* grad[kRoiMaxLevels];

  // grad[level] by selects: an index computed at run time into a parameter array would copy it to the stack
  FASTNN_HD T* level(int level) const {
    T* out = grad[0];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int l = 1; l < kRoiMaxLevels; ++l) out = level == l ? grad[l] : out;
    return out;
  }
};

FASTNN_HD void roi_pixel_destination(const RoiAlignParams& p, int64_t key, int64_t c, int& level, int64_t& offset);

// Step 3 for (segment `seg`, channel c): sums the segment and writes the pixel's gradient.
template <typename T>
FASTNN_HD void roi_align_backward_segment(const RoiAlignParams& p, const int64_t* seg_start,
                                          const int64_t* sorted_keys, const int64_t* order, const int64_t* sources,
                                          const T* weights, const T* divisors, const T* grad_out, int64_t seg,
                                          int64_t c, const RoiGradTargets<T>& out) {
  const int64_t b = seg_start[seg], e = seg_start[seg + 1];
  const int64_t key = sorted_keys[b];
  if (key == kNoPixel) return;  // taps of samples outside the map
  const T g = roi_align_backward_reduce<T>(order, b, e, sources, weights, divisors, grad_out, p.channels, c);
  int level;
  int64_t off;
  roi_pixel_destination(p, key, c, level, off);
  out.level(level)[off] = g;
}

// Where the gradient of flat pixel `key` and channel c goes: level, and offset within that level's
// gradient tensor (NCHW or channels-last).
FASTNN_HD void roi_pixel_destination(const RoiAlignParams& p, int64_t key, int64_t c, int& level, int64_t& offset) {
  level = 0;
  while (level + 1 < p.n_levels && key >= p.levels[level + 1].pixel_base) ++level;
  const RoiLevel& lv = p.levels[level];
  const int64_t hw = lv.height * lv.width;
  const int64_t local = key - lv.pixel_base;
  const int64_t n = local / hw, pix = local % hw;
  offset = p.channels_last ? (n * hw + pix) * p.channels + c : (n * p.channels + c) * hw + pix;
}

// ---------------------------------------------------------------- roi_pool

struct RoiPoolParams {
  const void* input;  // (N, C, H, W), NCHW or channels-last, in T
  const void* rois;   // (K, 5) in T
  int64_t n_rois, n_batch, channels, height, width;
  int pooled_h, pooled_w;
  double scale;
  bool channels_last;
};

// RoI k's batch index is in (-1, N): as roi_valid.
template <typename T>
FASTNN_HD bool roi_pool_valid(const RoiPoolParams& p, int64_t k) {
  const T b = static_cast<const T*>(p.rois)[5 * k];
  return p.n_batch > 0 && b > T(-1) && b < static_cast<T>(p.n_batch);
}

// Output element `index` (flat in the output's layout): its maximum and where it was read (h * W + w, or -1).
template <typename T>
FASTNN_HD T roi_pool_forward_element(const RoiPoolParams& p, int64_t index, int32_t& argmax) {
  const int64_t bins = int64_t(p.pooled_h) * p.pooled_w;
  int64_t k, c, bin;
  if (p.channels_last) {
    c = index % p.channels;
    bin = (index / p.channels) % bins;
    k = index / p.channels / bins;
  } else {
    bin = index % bins;
    c = (index / bins) % p.channels;
    k = index / bins / p.channels;
  }
  const T* roi = static_cast<const T*>(p.rois) + 5 * k;
  argmax = -1;
  if (!roi_pool_valid<T>(p, k)) return T(0);  // discarded: the launcher's check raises (see roi_valid)
  const RoiPoolWindow w = roi_pool_window<T>(roi, static_cast<T>(p.scale), p.pooled_h, p.pooled_w,
                                             static_cast<int>(bin / p.pooled_w), static_cast<int>(bin % p.pooled_w),
                                             static_cast<int>(p.height), static_cast<int>(p.width));
  const bool empty = w.h1 <= w.h0 || w.w1 <= w.w0;
  const int64_t n = static_cast<int64_t>(roi[0]), hw = p.height * p.width;
  const T* x = static_cast<const T*>(p.input);
  const int64_t base = p.channels_last ? n * hw * p.channels + c : (n * p.channels + c) * hw;
  const int64_t step = p.channels_last ? p.channels : 1;
  T best = empty ? T(0) : static_cast<T>(-3.402823466e+38f);  // torchvision's -FLT_MAX
  for (int h = w.h0; h < w.h1; ++h) {
    for (int x0 = w.w0; x0 < w.w1; ++x0) {
      const int32_t pos = h * static_cast<int32_t>(p.width) + x0;
      const T v = x[base + pos * step];
      if (v > best) {
        best = v;
        argmax = pos;
      }
    }
  }
  return best;
}

// Backward key of output element `index`: the flat input element its gradient goes to, numbered in the
// input's layout (NCHW or channels-last), or kNoPixel when the bin pooled nothing. Sorting the keys stably
// keeps each element's contributions in output order (RoI, then bin): the CPU kernel's order.
template <typename T>
FASTNN_HD int64_t roi_pool_backward_key(const RoiPoolParams& p, const int32_t* argmax, int64_t index) {
  const int32_t a = argmax[index];
  const int64_t hw = p.height * p.width;
  if (a < 0 || a >= hw) return kNoPixel;
  const int64_t bins = int64_t(p.pooled_h) * p.pooled_w;
  const int64_t c = p.channels_last ? index % p.channels : (index / bins) % p.channels;
  const int64_t k = p.channels_last ? index / p.channels / bins : index / bins / p.channels;
  if (!roi_pool_valid<T>(p, k)) return kNoPixel;
  const int64_t n = static_cast<int64_t>(static_cast<const T*>(p.rois)[5 * k]);
  return p.channels_last ? (n * hw + a) * p.channels + c : (n * p.channels + c) * hw + a;
}

// Sum of the gradients of a key's segment of sorted positions [b, e), in order.
template <typename T>
FASTNN_HD T roi_pool_backward_reduce(const int64_t* order, int64_t b, int64_t e, const T* grad_out) {
  T acc = T(0);
  for (int64_t i = b; i < e; ++i) acc += grad_out[order[i]];
  return acc;
}

}  // namespace fastnn
