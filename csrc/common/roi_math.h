// RoIAlign / RoIPool geometry shared by the CPU and CUDA kernels: one formula, compiled twice.
//
// Every expression follows torchvision's kernels operation for operation (the same products, the same
// order of additions), so that with floating-point contraction off (-ffp-contract=off, --fmad=false) the
// float32 and float64 results equal torchvision's bit for bit. Semantics: fastnn/reference/roi.py.
#pragma once

#include "hd.h"

#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <cstdint>
#endif

namespace fastnn {

// One RoI of roi_align as the sampling loop sees it.
template <typename T>
struct RoiAlignGeometry {
  T start_h, start_w;  // top-left corner in feature-map coordinates
  T bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;  // samples per bin along each axis (>= 0)
  T count;             // max(grid_h * grid_w, 1): the divisor of the average
};

// roi = (batch, x1, y1, x2, y2). aligned shifts by half a pixel; unaligned RoIs are at least 1x1.
// A NaN coordinate gives a zero-sample grid (no sample is read), where torchvision's int cast is undefined.
template <typename T>
FASTNN_HD RoiAlignGeometry<T> roi_align_geometry(const T* roi, T spatial_scale, int pooled_h, int pooled_w,
                                                 int sampling_ratio, bool aligned) {
  RoiAlignGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * spatial_scale - offset;
  g.start_h = roi[2] * spatial_scale - offset;
  const T end_w = roi[3] * spatial_scale - offset;
  const T end_h = roi[4] * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {  // torchvision: std::max(roi_w, 1), which keeps a NaN first argument
    roi_w = roi_w < T(1) ? T(1) : roi_w;
    roi_h = roi_h < T(1) ? T(1) : roi_h;
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  if (sampling_ratio > 0) {
    g.grid_h = g.grid_w = sampling_ratio;
  } else {
    const T gh = ceil(roi_h / static_cast<T>(pooled_h));
    const T gw = ceil(roi_w / static_cast<T>(pooled_w));
    // Negative sizes (aligned, inverted boxes) give an empty grid; NaN likewise. The cap only guards the
    // int conversion: a grid that large would never finish anyway.
    g.grid_h = gh > T(0) ? (gh < T(1 << 20) ? static_cast<int>(gh) : (1 << 20)) : 0;
    g.grid_w = gw > T(0) ? (gw < T(1 << 20) ? static_cast<int>(gw) : (1 << 20)) : 0;
  }
  if (g.start_h != g.start_h || g.start_w != g.start_w || g.bin_h != g.bin_h || g.bin_w != g.bin_w) {
    g.grid_h = g.grid_w = 0;
  }
  // in 64 bits: adaptive grids of up to 2^20 a side would wrap an int product (and divide by 1)
  const int64_t n = static_cast<int64_t>(g.grid_h) * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample `i` of bin `p` along one axis (torchvision's expression and order).
template <typename T>
FASTNN_HD T roi_sample_coord(T start, T bin, int p, int i, int grid) {
  return start + static_cast<T>(p) * bin + static_cast<T>(static_cast<float>(i) + 0.5f) * bin / static_cast<T>(grid);
}

// Bilinear taps of one sample along one axis: pixels `low` and `high` with weights `w_low` (h) and
// `w_high` (l). `valid` is false when the coordinate lies outside [-1, size] (or is NaN), or the axis is
// empty (size 0: no pixel to clamp to): the sample then reads nothing and receives no gradient.
template <typename T>
struct AxisTaps {
  int low, high;
  T w_low, w_high;
  bool valid;
};

template <typename T>
FASTNN_HD AxisTaps<T> axis_taps(T v, int size) {
  AxisTaps<T> t;
  t.valid = size > 0 && v >= T(-1) && v <= static_cast<T>(size);
  if (!t.valid) {
    t.low = t.high = 0;
    t.w_low = t.w_high = T(0);
    return t;
  }
  if (v <= T(0)) v = T(0);
  t.low = static_cast<int>(v);
  if (t.low >= size - 1) {
    t.high = t.low = size - 1;
    v = static_cast<T>(t.low);
  } else {
    t.high = t.low + 1;
  }
  t.w_high = v - static_cast<T>(t.low);
  t.w_low = T(1) - t.w_high;
  return t;
}

// The four corner weights of a sample as torchvision forms them: w1 = hy*hx, w2 = hy*lx, w3 = ly*hx,
// w4 = ly*lx.
template <typename T>
struct BilinearSample {
  int p1, p2, p3, p4;  // y_low*W + x_low, y_low*W + x_high, y_high*W + x_low, y_high*W + x_high
  T w1, w2, w3, w4;
  bool valid;
};

template <typename T>
FASTNN_HD BilinearSample<T> bilinear_sample(const AxisTaps<T>& ty, const AxisTaps<T>& tx, int width) {
  BilinearSample<T> s;
  s.valid = ty.valid && tx.valid;
  s.p1 = ty.low * width + tx.low;
  s.p2 = ty.low * width + tx.high;
  s.p3 = ty.high * width + tx.low;
  s.p4 = ty.high * width + tx.high;
  s.w1 = ty.w_low * tx.w_low;
  s.w2 = ty.w_low * tx.w_high;
  s.w3 = ty.w_high * tx.w_low;
  s.w4 = ty.w_high * tx.w_high;
  return s;
}

// One output bin of roi_pool: the clipped window [h0, h1) x [w0, w1) (empty when h1 <= h0 or w1 <= w0).
struct RoiPoolWindow {
  int h0, h1, w0, w1;
};

// std::round: halves away from zero, as torchvision rounds RoI corners.
template <typename T>
FASTNN_HD int round_half_away(T v) {
  return static_cast<int>(round(v));
}

FASTNN_HD int clip_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// roi_pool's window for bin (ph, pw): the RoI is rounded to whole pixels, at least 1x1, and split into
// bins of floor / ceil edges. A non-finite coordinate gives an empty window.
template <typename T>
FASTNN_HD RoiPoolWindow roi_pool_window(const T* roi, T spatial_scale, int pooled_h, int pooled_w, int ph, int pw,
                                        int height, int width) {
  RoiPoolWindow w{0, 0, 0, 0};
  const T x1 = roi[1] * spatial_scale, y1 = roi[2] * spatial_scale;
  const T x2 = roi[3] * spatial_scale, y2 = roi[4] * spatial_scale;
  // A non-finite corner (NaN or +-inf; v - v is then NaN) gives an empty window, as in the reference. Finite
  // coordinates beyond +-2^29 saturate (no int overflow below): such windows are clipped to the map anyway.
  const T lim = T(1 << 29);
  if (!(x1 - x1 == T(0) && y1 - y1 == T(0) && x2 - x2 == T(0) && y2 - y2 == T(0))) return w;
  auto clamp_coord = [lim](T v) { return v < -lim ? -lim : (v > lim ? lim : v); };
  const int start_w = round_half_away(clamp_coord(x1)), start_h = round_half_away(clamp_coord(y1));
  const int end_w = round_half_away(clamp_coord(x2)), end_h = round_half_away(clamp_coord(y2));
  const int roi_w = end_w - start_w + 1 > 1 ? end_w - start_w + 1 : 1;
  const int roi_h = end_h - start_h + 1 > 1 ? end_h - start_h + 1 : 1;
  const T bin_h = static_cast<T>(roi_h) / static_cast<T>(pooled_h);
  const T bin_w = static_cast<T>(roi_w) / static_cast<T>(pooled_w);
  w.h0 = clip_int(static_cast<int>(floor(static_cast<T>(ph) * bin_h)) + start_h, 0, height);
  w.h1 = clip_int(static_cast<int>(ceil(static_cast<T>(ph + 1) * bin_h)) + start_h, 0, height);
  w.w0 = clip_int(static_cast<int>(floor(static_cast<T>(pw) * bin_w)) + start_w, 0, width);
  w.w1 = clip_int(static_cast<int>(ceil(static_cast<T>(pw + 1) * bin_w)) + start_w, 0, width);
  return w;
}

}  // namespace fastnn
