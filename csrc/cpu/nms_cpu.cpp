// CPU non-maximum suppression: sort once, then a greedy sweep in score order where each candidate is
// tested only against already-kept boxes near it (a uniform grid of kept boxes), stopping at the first
// suppressor. Memory is O(N). Decisions are bit-identical to torchvision's O(N^2) loop because the IoU
// formula is shared (csrc/common/box_math.h) and compiled without FP contraction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/box_math.h"
#include "radix_sort.h"

namespace fastnn::cpu {
namespace {

// Boxes of one class segment, in descending score order, structure-of-arrays.
template <typename T>
struct BoxSpan {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const T* area;
};

template <typename T>
struct KeptList {
  std::vector<T> x1, y1, x2, y2, area;
  void clear() {
    x1.clear(); y1.clear(); x2.clear(); y2.clear(); area.clear();
  }
  void push(const BoxSpan<T>& b, int64_t i) {
    x1.push_back(b.x1[i]); y1.push_back(b.y1[i]); x2.push_back(b.x2[i]); y2.push_back(b.y2[i]);
    area.push_back(b.area[i]);
  }
  int64_t size() const { return static_cast<int64_t>(x1.size()); }

  // Vectorised scan in chunks, leaving at the first chunk holding a suppressor.
  bool suppresses(const BoxSpan<T>& b, int64_t i, T thr) const {
    constexpr int64_t kChunk = 32;
    const T bx1 = b.x1[i], by1 = b.y1[i], bx2 = b.x2[i], by2 = b.y2[i], ba = b.area[i];
    const int64_t n = size();
    const T* kx1 = x1.data(); const T* ky1 = y1.data(); const T* kx2 = x2.data();
    const T* ky2 = y2.data(); const T* ka = area.data();
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t e = std::min(n, s + kChunk);
      int hit = 0;
      for (int64_t j = s; j < e; ++j)
        hit |= iou_exceeds(kx1[j], ky1[j], kx2[j], ky2[j], ka[j], bx1, by1, bx2, by2, ba, thr);
      if (hit) return true;
    }
    return false;
  }
};

// Greedy NMS against the full kept list. Exact for every threshold, O(N * kept).
template <typename T>
void nms_against_kept(const BoxSpan<T>& b, int64_t n, T thr, uint8_t* keep, KeptList<T>& kept) {
  kept.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (kept.suppresses(b, i, thr)) {
      keep[i] = 0;
    } else {
      keep[i] = 1;
      kept.push(b, i);
    }
  }
}

// Greedy NMS with kept boxes bucketed in a uniform grid. Valid only for thr >= 0: then a pair can
// suppress only if its intersection is positive, and two boxes with a common interior point share the
// grid cell of that point (the cell map is monotone in each coordinate).
template <typename T>
class GridNms {
 public:
  void run(const BoxSpan<T>& b, int64_t n, T thr, uint8_t* keep) {
    if (!build_grid(b, n)) {
      nms_against_kept(b, n, thr, keep, everything_);
      return;
    }
    everything_.clear();
    big_.clear();
    for (int64_t i = 0; i < n; ++i) {
      const Kind kind = classify(b, i);
      bool suppressed = false;
      if (kind == Kind::kEmpty) {
        suppressed = false;  // zero intersection with every box
      } else if (kind == Kind::kBig) {
        suppressed = everything_.suppresses(b, i, thr);
      } else {
        suppressed = big_.suppresses(b, i, thr) || cells_suppress(b, i, thr);
      }
      keep[i] = suppressed ? 0 : 1;
      if (suppressed || kind == Kind::kEmpty) continue;
      everything_.push(b, i);
      if (kind == Kind::kBig) {
        big_.push(b, i);
      } else {
        insert(b, i);
      }
    }
  }

 private:
  enum class Kind { kEmpty, kSmall, kBig };
  static constexpr int64_t kMaxCellsPerBox = 16;

  Kind classify(const BoxSpan<T>& b, int64_t i) {
    const T x1 = b.x1[i], y1 = b.y1[i], x2 = b.x2[i], y2 = b.y2[i];
    if (!(std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2))) return Kind::kBig;
    if (!(x2 > x1 && y2 > y1)) return Kind::kEmpty;
    cx0_ = cell(x1, ox_, gx_); cx1_ = cell(x2, ox_, gx_);
    cy0_ = cell(y1, oy_, gy_); cy1_ = cell(y2, oy_, gy_);
    if ((cx1_ - cx0_ + 1) * (cy1_ - cy0_ + 1) > kMaxCellsPerBox) return Kind::kBig;
    return Kind::kSmall;
  }

  int64_t cell(T v, double origin, int64_t count) const {
    double c = std::floor((static_cast<double>(v) - origin) * inv_cell_);
    if (c < 0) return 0;
    if (c > static_cast<double>(count - 1)) return count - 1;
    return static_cast<int64_t>(c);
  }

  // Picks the cell size from the boxes (median extent of a sample) and sizes the grid to O(n) cells.
  bool build_grid(const BoxSpan<T>& b, int64_t n) {
    double xmin = INFINITY, ymin = INFINITY, xmax = -INFINITY, ymax = -INFINITY;
    std::vector<double> extents;
    const int64_t stride = std::max<int64_t>(1, n / 512);
    for (int64_t i = 0; i < n; ++i) {
      const double x1 = b.x1[i], y1 = b.y1[i], x2 = b.x2[i], y2 = b.y2[i];
      if (!(std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2))) continue;
      if (!(x2 > x1 && y2 > y1)) continue;
      xmin = std::min(xmin, x1); ymin = std::min(ymin, y1);
      xmax = std::max(xmax, x2); ymax = std::max(ymax, y2);
      if (i % stride == 0) extents.push_back(std::max(x2 - x1, y2 - y1));
    }
    if (extents.empty()) return false;
    std::nth_element(extents.begin(), extents.begin() + extents.size() / 2, extents.end());
    double cell_size = extents[extents.size() / 2];
    const double span_x = xmax - xmin, span_y = ymax - ymin;
    const double max_cells = static_cast<double>(std::max<int64_t>(64, 2 * n));
    cell_size = std::max(cell_size, std::sqrt(span_x * span_y / max_cells));
    cell_size = std::max({cell_size, span_x / max_cells, span_y / max_cells});
    if (!(cell_size > 0) || !std::isfinite(cell_size)) return false;
    inv_cell_ = 1.0 / cell_size;
    if (!std::isfinite(inv_cell_)) return false;
    ox_ = xmin; oy_ = ymin;
    gx_ = static_cast<int64_t>(std::min(span_x * inv_cell_, max_cells)) + 1;
    gy_ = static_cast<int64_t>(std::min(span_y * inv_cell_, max_cells)) + 1;
    head_.assign(static_cast<size_t>(gx_ * gy_), -1);
    chunks_.clear();
    return true;
  }

  // Each cell holds its kept boxes in 16-wide structure-of-arrays chunks, newest chunk first, so the
  // test of a candidate against a cell is a few full-width vector passes. Unfilled lanes stay all-zero
  // boxes, whose intersection with anything is 0: they never suppress when thr >= 0.
  static constexpr int kLanes = 16;
  struct Chunk {
    T x1[kLanes], y1[kLanes], x2[kLanes], y2[kLanes], area[kLanes];
    int32_t next;
    int32_t count;
  };

  void insert(const BoxSpan<T>& b, int64_t i) {
    for (int64_t cy = cy0_; cy <= cy1_; ++cy)
      for (int64_t cx = cx0_; cx <= cx1_; ++cx) {
        int32_t& h = head_[static_cast<size_t>(cy * gx_ + cx)];
        if (h < 0 || chunks_[h].count == kLanes) {
          Chunk fresh{};
          fresh.next = h;
          chunks_.push_back(fresh);
          h = static_cast<int32_t>(chunks_.size() - 1);
        }
        Chunk& c = chunks_[h];
        const int k = c.count++;
        c.x1[k] = b.x1[i]; c.y1[k] = b.y1[i]; c.x2[k] = b.x2[i]; c.y2[k] = b.y2[i]; c.area[k] = b.area[i];
      }
  }

  bool cells_suppress(const BoxSpan<T>& b, int64_t i, T thr) const {
    const T bx1 = b.x1[i], by1 = b.y1[i], bx2 = b.x2[i], by2 = b.y2[i], ba = b.area[i];
    for (int64_t cy = cy0_; cy <= cy1_; ++cy)
      for (int64_t cx = cx0_; cx <= cx1_; ++cx)
        for (int32_t h = head_[static_cast<size_t>(cy * gx_ + cx)]; h >= 0; h = chunks_[h].next) {
          const Chunk& c = chunks_[h];
          int hit = 0;
          for (int k = 0; k < kLanes; ++k)
            hit |= iou_exceeds(c.x1[k], c.y1[k], c.x2[k], c.y2[k], c.area[k], bx1, by1, bx2, by2, ba, thr);
          if (hit) return true;
        }
    return false;
  }

  double ox_ = 0, oy_ = 0, inv_cell_ = 1;
  int64_t gx_ = 1, gy_ = 1;
  int64_t cx0_ = 0, cx1_ = 0, cy0_ = 0, cy1_ = 0;  // cell range of the box last classified
  std::vector<int32_t> head_;
  std::vector<Chunk> chunks_;
  KeptList<T> everything_, big_;
};

// Below this size a kept-list scan beats building a grid (measured: bench/NOTES.md).
constexpr int64_t kGridMinBoxes = 256;

template <typename T>
void nms_segment(const BoxSpan<T>& b, int64_t n, T thr, uint8_t* keep) {
  if (n < kGridMinBoxes || !(thr >= T(0))) {
    KeptList<T> kept;
    nms_against_kept(b, n, thr, keep, kept);
  } else {
    GridNms<T> grid;
    grid.run(b, n, thr, keep);
  }
}

template <typename T>
bool box_has_nan(const T* p) {
  return std::isnan(p[0]) || std::isnan(p[1]) || std::isnan(p[2]) || std::isnan(p[3]);
}

// Positions of the valid boxes (no NaN coordinate or score) in descending score order, ties by index.
template <typename T, typename S>
std::vector<int64_t> score_order(const T* boxes, const S* scores, int64_t n) {
  using Key = decltype(descending_key(S()));
  std::vector<Key> keys;
  std::vector<int64_t> order;
  keys.reserve(n);
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(scores[i]) || box_has_nan(boxes + 4 * i)) continue;
    keys.push_back(descending_key(scores[i]));
    order.push_back(i);
  }
  radix_sort_pairs(keys, order, static_cast<int>(sizeof(Key) * 8));
  return order;
}

// Stable regrouping of `order` by class; returns the start offset of each class segment (+ the end).
std::vector<int64_t> group_by_class(std::vector<int64_t>& order, const int64_t* idxs) {
  const size_t n = order.size();
  std::vector<int64_t> starts{0};
  if (n == 0) return starts;
  int64_t lo = idxs[order[0]], hi = lo;
  for (size_t k = 1; k < n; ++k) {
    lo = std::min(lo, idxs[order[k]]);
    hi = std::max(hi, idxs[order[k]]);
  }
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  int bits = 0;
  while (bits < 64 && (range >> bits) != 0) ++bits;
  std::vector<uint64_t> keys(n);
  for (size_t k = 0; k < n; ++k) keys[k] = static_cast<uint64_t>(idxs[order[k]]) - static_cast<uint64_t>(lo);
  radix_sort_pairs(keys, order, bits);
  for (size_t k = 1; k < n; ++k)
    if (keys[k] != keys[k - 1]) starts.push_back(static_cast<int64_t>(k));
  starts.push_back(static_cast<int64_t>(n));
  return starts;
}

template <typename T, typename S>
at::Tensor nms_impl(const at::Tensor& boxes, const at::Tensor& scores, const int64_t* idxs, double threshold) {
  const int64_t n = boxes.size(0);
  const T* box_data = boxes.data_ptr<T>();
  std::vector<int64_t> order = score_order(box_data, scores.data_ptr<S>(), n);
  std::vector<int64_t> ranked;  // score order, kept to restore it after grouping by class
  if (idxs) ranked = order;
  std::vector<int64_t> seg_starts =
      idxs ? group_by_class(order, idxs) : std::vector<int64_t>{0, static_cast<int64_t>(order.size())};
  const int64_t m = static_cast<int64_t>(order.size());

  // Gather into structure-of-arrays in segment order so each segment is a contiguous slice.
  std::vector<T> x1(m), y1(m), x2(m), y2(m), area(m);
  at::parallel_for(0, m, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const T* p = box_data + 4 * order[k];
      x1[k] = p[0]; y1[k] = p[1]; x2[k] = p[2]; y2[k] = p[3];
      area[k] = box_area(p[0], p[1], p[2], p[3]);
    }
  });

  std::vector<uint8_t> keep(m, 0);
  const T thr = threshold_below<T>(threshold);
  const int64_t num_segments = static_cast<int64_t>(seg_starts.size()) - 1;
  at::parallel_for(0, num_segments, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t a = seg_starts[s], len = seg_starts[s + 1] - a;
      BoxSpan<T> span{x1.data() + a, y1.data() + a, x2.data() + a, y2.data() + a, area.data() + a};
      nms_segment(span, len, thr, keep.data() + a);
    }
  });

  // Output in descending score order: for grouped input, recover each kept box's global rank.
  std::vector<int64_t> kept;
  if (!idxs) {
    for (int64_t k = 0; k < m; ++k)
      if (keep[k]) kept.push_back(order[k]);
  } else {
    std::vector<int64_t> rank_key(n, -1);
    for (int64_t r = 0; r < m; ++r) rank_key[ranked[r]] = r;
    std::vector<uint8_t> keep_by_rank(m, 0);
    for (int64_t k = 0; k < m; ++k)
      if (keep[k]) keep_by_rank[rank_key[order[k]]] = 1;
    for (int64_t r = 0; r < m; ++r)
      if (keep_by_rank[r]) kept.push_back(ranked[r]);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(kept.size())}, boxes.options().dtype(at::kLong));
  std::copy(kept.begin(), kept.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

// boxes: (N, 4) float/double/half/bfloat16, scores: (N,) floating, idxs: optional (N,) int64.
// Returns kept indices (int64) in descending score order. Inputs are validated by the Python wrapper.
at::Tensor nms(const at::Tensor& boxes_in, const at::Tensor& scores_in, const c10::optional<at::Tensor>& idxs_in,
               double threshold) {
  TORCH_CHECK(boxes_in.device().is_cpu(), "fastnn nms_cpu: boxes must be a CPU tensor");
  TORCH_CHECK(boxes_in.dim() == 2 && boxes_in.size(1) == 4, "fastnn nms_cpu: boxes must be (N, 4)");
  TORCH_CHECK(scores_in.dim() == 1 && scores_in.size(0) == boxes_in.size(0), "fastnn nms_cpu: scores must be (N,)");
  const bool wide = boxes_in.scalar_type() == at::kDouble;
  at::Tensor boxes = boxes_in.to(wide ? at::kDouble : at::kFloat).contiguous();
  const bool wide_scores = scores_in.scalar_type() == at::kDouble;
  at::Tensor scores = scores_in.to(wide_scores ? at::kDouble : at::kFloat).contiguous();
  at::Tensor idxs;
  if (idxs_in.has_value()) {
    TORCH_CHECK(idxs_in->dim() == 1 && idxs_in->size(0) == boxes_in.size(0), "fastnn nms_cpu: idxs must be (N,)");
    idxs = idxs_in->to(at::kLong).contiguous();
  }
  const int64_t* idx_ptr = idxs.defined() ? idxs.data_ptr<int64_t>() : nullptr;
  if (wide) {
    return wide_scores ? nms_impl<double, double>(boxes, scores, idx_ptr, threshold)
                       : nms_impl<double, float>(boxes, scores, idx_ptr, threshold);
  }
  return wide_scores ? nms_impl<float, double>(boxes, scores, idx_ptr, threshold)
                     : nms_impl<float, float>(boxes, scores, idx_ptr, threshold);
}

}  // namespace fastnn::cpu
