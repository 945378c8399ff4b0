// Detection post-processing on the CPU:
//   heatmap_peaks          CenterNet peaks: separable NaN-propagating window max, then a bounded top-k
//   detection_postprocess  per image in parallel: score filter, lazy top-k (nth_element in growing chunks),
//                          per-class greedy NMS with an early exit at max_detections kept, padded outputs
//   soft_nms               Soft-NMS over a compacted structure-of-arrays of the surviving boxes
// Inputs are validated by the Python wrappers (fastnn/ops/detect.py); float16/bfloat16 are converted to
// float32 at the boundary and the outputs back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/alloc.h"
#include "../common/box_math.h"
#include "radix_sort.h"

namespace fastnn::cpu {
namespace {

at::ScalarType wide_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A candidate: descending-score key (radix_sort.h: ascending key = descending score, -0 == +0) and
// its flattened index. Ordering by (key, index) is a strict total order, so nth_element + sort give
// exactly the stable descending order.
template <typename Key>
struct Cand {
  Key key;
  int64_t idx;
  bool operator<(const Cand& o) const { return key < o.key || (key == o.key && idx < o.idx); }
};

// ---------------------------------------------------------------- heatmap peaks

// Peak scores of one H x W plane: separable NaN-propagating window max (rows, then columns), then the
// equality test. Every inner loop runs over x with shifted operands only, so it vectorises.
template <typename T>
void peak_scores_plane(const T* heat, int64_t h, int64_t w, int64_t pad, T* rowmax, T* out) {
  for (int64_t y = 0; y < h; ++y) {
    const T* r = heat + y * w;
    T* rm = rowmax + y * w;
    for (int64_t x = 0; x < w; ++x) rm[x] = r[x];
    for (int64_t d = 1; d <= pad && d < w; ++d) {
      for (int64_t x = 0; x < w - d; ++x) rm[x] = nan_max(rm[x], r[x + d]);
      for (int64_t x = d; x < w; ++x) rm[x] = nan_max(rm[x], r[x - d]);
    }
  }
  for (int64_t y = 0; y < h; ++y) {
    const int64_t lo = std::max<int64_t>(0, y - pad), hi = std::min<int64_t>(h - 1, y + pad);
    T* o = out + y * w;
    for (int64_t x = 0; x < w; ++x) o[x] = rowmax[lo * w + x];
    for (int64_t i = lo + 1; i <= hi; ++i) {
      const T* r = rowmax + i * w;
      for (int64_t x = 0; x < w; ++x) o[x] = nan_max(o[x], r[x]);
    }
    const T* hr = heat + y * w;
    for (int64_t x = 0; x < w; ++x) o[x] = (o[x] == hr[x]) ? hr[x] : T(0);  // NaN window: not a peak -> 0
  }
}

template <typename T>
void heatmap_peaks_impl(const at::Tensor& heat, int64_t k, int64_t kernel, at::Tensor& scores, at::Tensor& cls,
                        at::Tensor& ys, at::Tensor& xs) {
  const int64_t b = heat.size(0), c = heat.size(1), h = heat.size(2), w = heat.size(3);
  const int64_t plane = h * w, per_image = c * plane, pad = kernel / 2;
  at::Tensor v = at::empty({b, per_image}, heat.options());
  const T* src = heat.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  // pass 1: peak scores, parallel over the B*C planes
  at::parallel_for(0, b * c, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> rowmax(plane);
    for (int64_t p = lo; p < hi; ++p) peak_scores_plane(src + p * plane, h, w, pad, rowmax.data(), vp + p * plane);
  });
  // pass 2: per image, the k best (score desc, index asc): positives, then zeros by index, then negatives
  using Key = decltype(descending_key(T()));
  T* so = scores.data_ptr<T>();
  int64_t* co = cls.data_ptr<int64_t>();
  int64_t* yo = ys.data_ptr<int64_t>();
  int64_t* xo = xs.data_ptr<int64_t>();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<Cand<Key>> pos, neg;
    for (int64_t img = lo; img < hi; ++img) {
      const T* vi = vp + img * per_image;
      pos.clear();
      neg.clear();
      // Bounded top-k of the positive scores: a buffer of up to `cap` candidates; when it fills, only the
      // k best stay and the scan then admits only scores above the k-th (an equal score arriving later
      // has a larger index, so it ranks below all k).
      const size_t cap = static_cast<size_t>(std::max<int64_t>(2 * k, 1024));
      T floor_score = T(0);
      for (int64_t i = 0; i < per_image; ++i) {
        const T x = vi[i];
        if (x > floor_score) {
          pos.push_back({descending_key(x), i});
          if (pos.size() >= cap) {
            std::nth_element(pos.begin(), pos.begin() + (k - 1), pos.end());
            pos.resize(k);
            floor_score = vi[pos[k - 1].idx];
          }
        }
      }
      std::vector<int64_t> picked;
      picked.reserve(k);
      const int64_t np = std::min<int64_t>(k, static_cast<int64_t>(pos.size()));
      if (np < static_cast<int64_t>(pos.size())) std::nth_element(pos.begin(), pos.begin() + np, pos.end());
      std::sort(pos.begin(), pos.begin() + np);
      for (int64_t j = 0; j < np; ++j) picked.push_back(pos[j].idx);
      for (int64_t i = 0; i < per_image && static_cast<int64_t>(picked.size()) < k; ++i)
        if (vi[i] == T(0)) picked.push_back(i);
      if (static_cast<int64_t>(picked.size()) < k) {
        for (int64_t i = 0; i < per_image; ++i)
          if (vi[i] < T(0)) neg.push_back({descending_key(vi[i]), i});
        std::sort(neg.begin(), neg.end());
        for (size_t j = 0; j < neg.size() && static_cast<int64_t>(picked.size()) < k; ++j) picked.push_back(neg[j].idx);
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = picked[j];
        so[img * k + j] = vi[i];
        co[img * k + j] = i / plane;
        yo[img * k + j] = (i % plane) / w;
        xo[img * k + j] = i % w;
      }
    }
  });
}

// ---------------------------------------------------------------- detection post-processing

template <typename T>
struct Kept {
  std::vector<T> x1, y1, x2, y2, area;
  void clear() { x1.clear(); y1.clear(); x2.clear(); y2.clear(); area.clear(); }
  void push(const T* p) {
    x1.push_back(p[0]); y1.push_back(p[1]); x2.push_back(p[2]); y2.push_back(p[3]);
    area.push_back(box_area(p[0], p[1], p[2], p[3]));
  }
  // Whether a kept box overlaps p by more than thr; the loop over kept boxes vectorises.
  bool suppresses(const T* p, T thr) const {
    const T a = box_area(p[0], p[1], p[2], p[3]);
    const int64_t n = static_cast<int64_t>(x1.size());
    int hit = 0;
    for (int64_t j = 0; j < n; ++j)
      hit |= iou_exceeds(x1[j], y1[j], x2[j], y2[j], area[j], p[0], p[1], p[2], p[3], a, thr);
    return hit != 0;
  }
};

template <typename T, typename S>
void postprocess_impl(const at::Tensor& boxes, const at::Tensor& scores, double score_threshold,
                      double iou_threshold, int64_t max_det, bool agnostic, int64_t top_k, at::Tensor& num,
                      at::Tensor& out_boxes, at::Tensor& out_scores, at::Tensor& out_classes) {
  const int64_t b = scores.size(0), n = scores.size(1), c = scores.size(2);
  const bool per_class = boxes.dim() == 4;
  const T* bp = boxes.data_ptr<T>();
  const S* sp = scores.data_ptr<S>();
  const S sthr = static_cast<S>(score_threshold);
  const T thr = threshold_below<T>(iou_threshold);
  int64_t* nump = num.data_ptr<int64_t>();
  T* obp = out_boxes.data_ptr<T>();
  S* osp = out_scores.data_ptr<S>();
  int64_t* ocp = out_classes.data_ptr<int64_t>();
  using Key = decltype(descending_key(S()));
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<Cand<Key>> cand;
    std::vector<uint8_t> box_ok;
    std::vector<Kept<T>> kept(agnostic ? 1 : c);
    for (int64_t img = lo; img < hi; ++img) {
      const S* si = sp + img * n * c;
      const T* bi = bp + img * n * (per_class ? c : 1) * 4;
      // Two attempts at most. The first keeps a bounded buffer: when it reaches `cap` candidates, only the
      // best cap/2 stay and the scan then admits only scores above the worst of them (a later equal score
      // has a larger index, so it ranks below), which leaves an exact prefix of the ranking. If NMS runs
      // out of that prefix before max_det boxes are kept, the second attempt collects every candidate.
      const size_t cap = static_cast<size_t>(std::max<int64_t>(8 * max_det, 4096));
      int64_t count = 0;
      for (int attempt = 0; attempt < 2; ++attempt) {
      const bool bounded = attempt == 0;
      bool truncated = false;
      S floor_score = sthr;
      cand.clear();
      // Score filter over the flat (N * C) scores in blocks of 16: a vectorised "any above" test per
      // block, the scalar path only for blocks holding a candidate (~10% of them at 0.7% density).
      box_ok.assign(per_class ? 0 : n, 1);
      if (!per_class) {
        for (int64_t i = 0; i < n; ++i) {
          const T* p = bi + i * 4;
          box_ok[i] = !(std::isnan(p[0]) || std::isnan(p[1]) || std::isnan(p[2]) || std::isnan(p[3]));
        }
      }
      const int64_t total = n * c;
      constexpr int64_t kBlock = 16;
      for (int64_t f0 = 0; f0 < total; f0 += kBlock) {
        const int64_t f1 = std::min(total, f0 + kBlock);
        int any = 0;
        if (f1 - f0 == kBlock) {
          for (int64_t j = 0; j < kBlock; ++j) any |= si[f0 + j] > floor_score;
        } else {
          any = 1;
        }
        if (!any) continue;
        for (int64_t f = f0; f < f1; ++f) {
          const S sc = si[f];
          if (!(sc > floor_score)) continue;
          if (per_class) {
            const T* p = bi + f * 4;
            if (std::isnan(p[0]) || std::isnan(p[1]) || std::isnan(p[2]) || std::isnan(p[3])) continue;
          } else if (!box_ok[f / c]) {
            continue;
          }
          cand.push_back({descending_key(sc), f});
          if (bounded && cand.size() >= cap) {
            const size_t keep_n = cap / 2;
            std::nth_element(cand.begin(), cand.begin() + (keep_n - 1), cand.end());
            cand.resize(keep_n);
            floor_score = si[cand[keep_n - 1].idx];
            truncated = true;
          }
        }
      }
      for (auto& kl : kept) kl.clear();
      const int64_t m = static_cast<int64_t>(cand.size());
      const int64_t limit = top_k >= 0 ? std::min(m, top_k) : m;
      count = 0;
      int64_t start = 0;
      int64_t chunk = std::max<int64_t>(256, 2 * max_det);
      // Candidates are ranked lazily: the next chunk is selected (nth_element) and sorted only when the
      // greedy sweep needs it; the sweep stops as soon as max_det boxes are kept.
      while (start < limit && count < max_det) {
        const int64_t end = std::min(limit, start + chunk);
        if (end < m) std::nth_element(cand.begin() + start, cand.begin() + end, cand.end());
        std::sort(cand.begin() + start, cand.begin() + end);
        for (int64_t r = start; r < end && count < max_det; ++r) {
          const int64_t f = cand[r].idx;
          const int64_t cl = f % c;
          const T* p = per_class ? bi + f * 4 : bi + (f / c) * 4;
          Kept<T>& kl = kept[agnostic ? 0 : cl];
          if (kl.suppresses(p, thr)) continue;
          kl.push(p);
          T* ob = obp + (img * max_det + count) * 4;
          ob[0] = p[0]; ob[1] = p[1]; ob[2] = p[2]; ob[3] = p[3];
          osp[img * max_det + count] = si[f];
          ocp[img * max_det + count] = cl;
          ++count;
        }
        start = end;
        chunk *= 2;
      }
      // Done unless the prefix was cut short of what NMS (or pre_nms_top_k) could still use.
      const bool prefix_enough = !truncated || count >= max_det || (top_k >= 0 && top_k <= m);
      if (prefix_enough) break;
      }
      nump[img] = count;
      for (int64_t r = count; r < max_det; ++r) {
        T* ob = obp + (img * max_det + r) * 4;
        ob[0] = ob[1] = ob[2] = ob[3] = T(0);
        osp[img * max_det + r] = S(0);
        ocp[img * max_det + r] = -1;
      }
    }
  });
}

// ---------------------------------------------------------------- Soft-NMS

template <typename T, typename S>
void soft_nms_impl(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, double sigma,
                   double score_threshold, bool gaussian, std::vector<int64_t>& keep, std::vector<S>& kept_scores) {
  const int64_t n = boxes.size(0);
  const T* bp = boxes.data_ptr<T>();
  const S* sp = scores.data_ptr<S>();
  const S sthr = static_cast<S>(score_threshold);
  const T thr = static_cast<T>(iou_threshold);
  const T sig = static_cast<T>(sigma);
  // survivors, structure-of-arrays, in ascending index order (compaction is stable, so the first
  // maximum found is the lowest index)
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<S> s;
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < n; ++i) {
    const T* p = bp + 4 * i;
    if (std::isnan(p[0]) || std::isnan(p[1]) || std::isnan(p[2]) || std::isnan(p[3])) continue;
    if (!(sp[i] >= sthr)) continue;
    x1.push_back(p[0]); y1.push_back(p[1]); x2.push_back(p[2]); y2.push_back(p[3]);
    area.push_back((p[2] - p[0]) * (p[3] - p[1]));
    s.push_back(sp[i]);
    idx.push_back(i);
  }
  int64_t m = static_cast<int64_t>(idx.size());
  std::vector<T> iou(m);
  while (m > 0) {
    int64_t best = 0;
    for (int64_t j = 1; j < m; ++j)
      if (s[j] > s[best]) best = j;
    keep.push_back(idx[best]);
    kept_scores.push_back(s[best]);
    const T bx1 = x1[best], by1 = y1[best], bx2 = x2[best], by2 = y2[best], ba = area[best];
    // IoU with torchvision.ops.box_iou's formula (vectorised pass), then decay and compaction
    for (int64_t j = 0; j < m; ++j) {
      const T w = clamp_min0(nan_min(bx2, x2[j]) - nan_max(bx1, x1[j]));
      const T h = clamp_min0(nan_min(by2, y2[j]) - nan_max(by1, y1[j]));
      const T inter = w * h;
      iou[j] = inter / (ba + area[j] - inter);
    }
    int64_t out = 0;
    for (int64_t j = 0; j < m; ++j) {
      if (j == best) continue;
      const T o = iou[j];
      T wgt;
      if (gaussian) {
        wgt = std::exp(-(o * o) / sig);
      } else {
        wgt = o > thr ? T(1) - o : T(1);
      }
      const S ns = s[j] * static_cast<S>(wgt);
      if (!(ns >= sthr)) continue;
      x1[out] = x1[j]; y1[out] = y1[j]; x2[out] = x2[j]; y2[out] = y2[j]; area[out] = area[j];
      s[out] = ns;
      idx[out] = idx[j];
      ++out;
    }
    m = out;
  }
}

}  // namespace

std::vector<at::Tensor> heatmap_peaks(const at::Tensor& heatmap_in, int64_t k, int64_t kernel) {
  TORCH_CHECK(heatmap_in.device().is_cpu() && heatmap_in.dim() == 4, "fastnn heatmap_peaks_cpu: (B, C, H, W) CPU");
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "fastnn heatmap_peaks_cpu: kernel must be odd");
  TORCH_CHECK(k >= 0 && k <= heatmap_in.size(1) * heatmap_in.size(2) * heatmap_in.size(3),
              "fastnn heatmap_peaks_cpu: k out of range");
  const at::Tensor heat = heatmap_in.to(wide_type(heatmap_in.scalar_type())).contiguous();
  const int64_t b = heat.size(0);
  auto lopt = heat.options().dtype(at::kLong);
  at::Tensor scores = new_output({b, k}, heat.options());
  at::Tensor cls = new_output({b, k}, lopt), ys = new_output({b, k}, lopt), xs = new_output({b, k}, lopt);
  if (b > 0 && k > 0) {
    if (heat.scalar_type() == at::kDouble) {
      heatmap_peaks_impl<double>(heat, k, kernel, scores, cls, ys, xs);
    } else {
      heatmap_peaks_impl<float>(heat, k, kernel, scores, cls, ys, xs);
    }
  }
  return {scores.to(heatmap_in.scalar_type()), cls, ys, xs};
}

std::vector<at::Tensor> detection_postprocess(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                                              double score_threshold, double iou_threshold, int64_t max_det,
                                              bool class_agnostic, int64_t pre_nms_top_k) {
  TORCH_CHECK(scores_in.device().is_cpu() && scores_in.dim() == 3, "fastnn detection_postprocess_cpu: scores (B, N, C)");
  TORCH_CHECK(boxes_in.dim() == 3 || boxes_in.dim() == 4, "fastnn detection_postprocess_cpu: boxes (B, N[, C], 4)");
  TORCH_CHECK(max_det >= 0, "fastnn detection_postprocess_cpu: max_detections >= 0");
  // boxes (B, N, 4) shared by the classes, or (B, N, C, 4) per class: the kernel indexes them by the scores'
  // B, N and C
  const bool per_class = boxes_in.dim() == 4;
  TORCH_CHECK(boxes_in.size(0) == scores_in.size(0) && boxes_in.size(1) == scores_in.size(1) &&
                  boxes_in.size(-1) == 4 && (!per_class || boxes_in.size(2) == scores_in.size(2)),
              "fastnn detection_postprocess_cpu: boxes must be (", scores_in.size(0), ", ", scores_in.size(1),
              ", 4) or (", scores_in.size(0), ", ", scores_in.size(1), ", ", scores_in.size(2),
              ", 4) for scores of shape ", scores_in.sizes(), ", got ", boxes_in.sizes());
  const at::Tensor boxes = boxes_in.to(wide_type(boxes_in.scalar_type())).contiguous();
  const at::Tensor scores = scores_in.to(wide_type(scores_in.scalar_type())).contiguous();
  const int64_t b = scores.size(0);
  at::Tensor num = new_output({b}, scores.options().dtype(at::kLong));
  at::Tensor ob = new_output({b, max_det, 4}, boxes.options());
  at::Tensor os = new_output({b, max_det}, scores.options());
  at::Tensor oc = new_output({b, max_det}, scores.options().dtype(at::kLong));
  if (b > 0) {
    if (scores.size(1) * scores.size(2) == 0 || max_det == 0) {  // nothing can be kept
      num.zero_();
      ob.zero_();
      os.zero_();
      oc.fill_(-1);
    } else {
      const bool bd = boxes.scalar_type() == at::kDouble, sd = scores.scalar_type() == at::kDouble;
      auto args = std::forward_as_tuple(boxes, scores, score_threshold, iou_threshold, max_det, class_agnostic,
                                        pre_nms_top_k, num, ob, os, oc);
      if (bd && sd) std::apply(postprocess_impl<double, double>, args);
      else if (bd) std::apply(postprocess_impl<double, float>, args);
      else if (sd) std::apply(postprocess_impl<float, double>, args);
      else std::apply(postprocess_impl<float, float>, args);
    }
  }
  return {num, ob.to(boxes_in.scalar_type()), os.to(scores_in.scalar_type()), oc};
}

std::vector<at::Tensor> soft_nms(const at::Tensor& boxes_in, const at::Tensor& scores_in, double iou_threshold,
                                 double sigma, double score_threshold, bool gaussian) {
  TORCH_CHECK(boxes_in.device().is_cpu() && boxes_in.dim() == 2 && boxes_in.size(1) == 4,
              "fastnn soft_nms_cpu: boxes (N, 4) on CPU");
  TORCH_CHECK(scores_in.dim() == 1 && scores_in.size(0) == boxes_in.size(0), "fastnn soft_nms_cpu: scores must be (",
              boxes_in.size(0), ",), one per box, got ", scores_in.sizes());
  const at::Tensor boxes = boxes_in.to(wide_type(boxes_in.scalar_type())).contiguous();
  const at::Tensor scores = scores_in.to(wide_type(scores_in.scalar_type())).contiguous();
  std::vector<int64_t> keep;
  at::Tensor out_scores;
  auto finish = [&](auto& ks) {
    at::Tensor o = new_output({static_cast<int64_t>(ks.size())}, scores.options());
    using S = typename std::remove_reference_t<decltype(ks)>::value_type;
    std::copy(ks.begin(), ks.end(), o.data_ptr<S>());
    out_scores = o;
  };
  const bool bd = boxes.scalar_type() == at::kDouble;
  if (scores.scalar_type() == at::kDouble) {
    std::vector<double> ks;
    if (bd) soft_nms_impl<double, double>(boxes, scores, iou_threshold, sigma, score_threshold, gaussian, keep, ks);
    else soft_nms_impl<float, double>(boxes, scores, iou_threshold, sigma, score_threshold, gaussian, keep, ks);
    finish(ks);
  } else {
    std::vector<float> ks;
    if (bd) soft_nms_impl<double, float>(boxes, scores, iou_threshold, sigma, score_threshold, gaussian, keep, ks);
    else soft_nms_impl<float, float>(boxes, scores, iou_threshold, sigma, score_threshold, gaussian, keep, ks);
    finish(ks);
  }
  at::Tensor idx = new_output({static_cast<int64_t>(keep.size())}, boxes.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), idx.data_ptr<int64_t>());
  return {idx, out_scores.to(scores_in.scalar_type())};
}

}  // namespace fastnn::cpu
