// Box geometry shared by the CPU and CUDA kernels: one formula, compiled twice.
//
// The IoU is evaluated exactly as torchvision writes it,
//   inter / (area_a + area_b - inter),
// so that with floating-point contraction disabled (-ffp-contract=off on the host, --fmad=false on the
// device) every backend produces bit-identical overlaps and therefore identical NMS decisions.
#pragma once

#include "hd.h"

#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <limits>
#endif

namespace fastnn {

template <typename T>
FASTNN_HD T fmax_nonnan(T a, T b) { return a < b ? b : a; }
template <typename T>
FASTNN_HD T fmin_nonnan(T a, T b) { return b < a ? b : a; }

template <typename T>
FASTNN_HD T box_area(T x1, T y1, T x2, T y2) { return (x2 - x1) * (y2 - y1); }

template <typename T>
FASTNN_HD T box_intersection(T ax1, T ay1, T ax2, T ay2, T bx1, T by1, T bx2, T by2) {
  T w = fmin_nonnan(ax2, bx2) - fmax_nonnan(ax1, bx1);
  T h = fmin_nonnan(ay2, by2) - fmax_nonnan(ay1, by1);
  w = w > T(0) ? w : T(0);
  h = h > T(0) ? h : T(0);
  return w * h;
}

template <typename T>
FASTNN_HD T box_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b) {
  T inter = box_intersection(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2);
  return inter / (area_a + area_b - inter);
}

// True when one box suppresses the other at `threshold` (IoU strictly greater, as torchvision).
// Branch-free, so that loops over many boxes vectorise.
template <typename T>
FASTNN_HD bool iou_exceeds(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b,
                           T threshold) {
  return box_iou(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b) > threshold;
}

// Same decision as iou_exceeds, skipping the division for disjoint pairs (most pairs): 0 / union is
// +-0, or NaN when union is 0 or NaN, and that exceeds only a negative threshold.
template <typename T>
FASTNN_HD bool iou_exceeds_branchy(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2,
                                   T area_b, T threshold) {
  T inter = box_intersection(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2);
  T uni = area_a + area_b - inter;
  if (inter > T(0)) return inter / uni > threshold;
  return threshold < T(0) && uni == uni && uni != T(0);
}

// ---- pairwise IoU / GIoU with torch's elementwise semantics (torchvision.ops.box_iou) ----
// NaN propagates through min/max and clamp here, as torch.maximum / torch.minimum / clamp do.
template <typename T>
FASTNN_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T>
FASTNN_HD T nan_min(T a, T b) { return (a != a || a < b) ? a : b; }
template <typename T>
FASTNN_HD T clamp_min0(T v) { return v < T(0) ? T(0) : v; }

// IoU (generalized = false) or generalized IoU of boxes a and b given as (x1, y1, x2, y2).
template <typename T>
FASTNN_HD T pair_iou(const T* a, const T* b, bool generalized) {
  const T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  const T w = clamp_min0(nan_min(a[2], b[2]) - nan_max(a[0], b[0]));
  const T h = clamp_min0(nan_min(a[3], b[3]) - nan_max(a[1], b[1]));
  const T inter = w * h;
  const T uni = area_a + area_b - inter;
  const T iou = inter / uni;
  if (!generalized) return iou;
  const T cw = clamp_min0(nan_max(a[2], b[2]) - nan_min(a[0], b[0]));
  const T ch = clamp_min0(nan_max(a[3], b[3]) - nan_min(a[1], b[1]));
  const T enclose = cw * ch;
  return iou - (enclose - uni) / enclose;
}

// d max(x, y) / dx as torch defines it: 1 where x wins, 1/2 on a tie, 0 where y wins.
template <typename T>
FASTNN_HD T max_share(T x, T y) { return x > y ? T(1) : (x == y ? T(0.5) : T(0)); }
template <typename T>
FASTNN_HD T min_share(T x, T y) { return x < y ? T(1) : (x == y ? T(0.5) : T(0)); }

// Adds d pair_iou(a, b) / da * g to ga and d / db * g to gb, following torch autograd through the
// forward above: min/max split ties evenly; clamp(min=0) passes the gradient where its input is > 0, and
// also at exactly 0 when clamp_grad_at_zero (torch changed this convention between releases, so the
// caller passes what the running torch does).
template <typename T>
FASTNN_HD void pair_iou_backward(const T* a, const T* b, T g, bool generalized, bool clamp_grad_at_zero, T* ga,
                                 T* gb) {
  const T wa = a[2] - a[0], ha = a[3] - a[1], wb = b[2] - b[0], hb = b[3] - b[1];
  const T area_a = wa * ha, area_b = wb * hb;
  const T w0 = nan_min(a[2], b[2]) - nan_max(a[0], b[0]);
  const T h0 = nan_min(a[3], b[3]) - nan_max(a[1], b[1]);
  const T w = clamp_min0(w0), h = clamp_min0(h0);
  const T inter = w * h;
  const T uni = area_a + area_b - inter;
  T d_uni = T(0), d_inter = T(0);
  if (generalized) {
    const T cw0 = nan_max(a[2], b[2]) - nan_min(a[0], b[0]);
    const T ch0 = nan_max(a[3], b[3]) - nan_min(a[1], b[1]);
    const T cw = clamp_min0(cw0), ch = clamp_min0(ch0);
    const T enclose = cw * ch;
    // giou = iou - (enclose - uni) / enclose
    const T d_num = -g / enclose;
    const T d_enclose = g * (enclose - uni) / (enclose * enclose) + d_num;
    d_uni -= d_num;
    const T d_cw0 = (cw0 > T(0) || (clamp_grad_at_zero && cw0 == T(0))) ? d_enclose * ch : T(0);
    const T d_ch0 = (ch0 > T(0) || (clamp_grad_at_zero && ch0 == T(0))) ? d_enclose * cw : T(0);
    ga[2] += d_cw0 * max_share(a[2], b[2]); gb[2] += d_cw0 * max_share(b[2], a[2]);
    ga[0] -= d_cw0 * min_share(a[0], b[0]); gb[0] -= d_cw0 * min_share(b[0], a[0]);
    ga[3] += d_ch0 * max_share(a[3], b[3]); gb[3] += d_ch0 * max_share(b[3], a[3]);
    ga[1] -= d_ch0 * min_share(a[1], b[1]); gb[1] -= d_ch0 * min_share(b[1], a[1]);
  }
  // iou = inter / uni
  d_inter += g / uni;
  d_uni -= g * inter / (uni * uni);
  // uni = area_a + area_b - inter
  d_inter -= d_uni;
  ga[2] += d_uni * ha; ga[0] -= d_uni * ha; ga[3] += d_uni * wa; ga[1] -= d_uni * wa;
  gb[2] += d_uni * hb; gb[0] -= d_uni * hb; gb[3] += d_uni * wb; gb[1] -= d_uni * wb;
  // inter = clamp(w0) * clamp(h0)
  const T d_w0 = (w0 > T(0) || (clamp_grad_at_zero && w0 == T(0))) ? d_inter * h : T(0);
  const T d_h0 = (h0 > T(0) || (clamp_grad_at_zero && h0 == T(0))) ? d_inter * w : T(0);
  ga[2] += d_w0 * min_share(a[2], b[2]); gb[2] += d_w0 * min_share(b[2], a[2]);
  ga[0] -= d_w0 * max_share(a[0], b[0]); gb[0] -= d_w0 * max_share(b[0], a[0]);
  ga[3] += d_h0 * min_share(a[3], b[3]); gb[3] += d_h0 * min_share(b[3], a[3]);
  ga[1] -= d_h0 * max_share(a[1], b[1]); gb[1] -= d_h0 * max_share(b[1], a[1]);
}

// torchvision compares the IoU (computed in T) with the threshold as a double. For any T-valued v,
// v > threshold holds exactly when v > (the largest T not above threshold), so kernels compare in T
// against this value and agree with the double comparison on every input.
template <typename T>
inline T threshold_below(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

}  // namespace fastnn
