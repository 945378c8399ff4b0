// CPU RoIAlign (one or several feature levels in one call) and RoIPool, forward and backward.
//
// RoIs are grouped by (level, image) with a stable counting sort; within a group they keep their order.
//   NCHW:          one task per (group, block of 8 channel planes): the planes are interleaved into a
//                  per-thread buffer that stays in L2 while every RoI of the group samples it, one vector per
//                  tap. Sample taps are computed once per RoI (shared by all channels) as separable row and
//                  column tables, for a bounded chunk of RoIs at a time.
//   channels-last: one task per RoI (forward) or per (group, channel block) (backward); the four taps of a
//                  sample are contiguous channel vectors, so the inner loop is a vectorised axpy.
//   roi_pool:      the forward reads channels-last (an NCHW input is transposed once); the backward owns
//                  planes or channel blocks like RoIAlign's.
// Every output element is written by one task, and backward tasks add their RoIs in RoI order, bins in
// order, samples in order: the gradient is bitwise deterministic, equal to torchvision's serial CPU
// backward, and independent of the thread count. float16 / bfloat16 run in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/alloc.h"
#include "../common/roi_math.h"
#include "../cuda/roi_align_plan.h"  // input preparation shared with the CUDA launchers (ATen only)
#include "../families/roi.h"

namespace fastnn::cpu {
namespace {

}  // namespace

// Sample tables for this many bytes of RoIs are built at a time (adaptive grids on large boxes can need
// many samples). Settable for the tests, which make it small to exercise the chunking.
int64_t& roi_sample_budget() {
  static int64_t bytes = int64_t(32) << 20;
  return bytes;
}

namespace {
// Channels per backward task on channels-last input: four cache lines of float32.
constexpr int64_t kChannelBlock = 64;
// Planes per task on NCHW input, interleaved into a per-thread buffer so that a tap of all of them is one
// AVX-512 vector (bench/NOTES.md: per-channel tasks re-read the sample tables per channel, v1; gathers
// across 16 planes were slower than scalar loads here, v2; interleaving, v3).
constexpr int kPlaneBlock = 8;


// RoIs sorted by group = level * N + batch (stable), and where each group starts.
struct Groups {
  std::vector<int64_t> order;  // sorted position -> RoI index
  std::vector<int64_t> start;  // group -> first sorted position; size groups + 1
  int64_t n_batch = 0;
};

template <typename T>
Groups group_rois(const T* rois, const int64_t* levels, int64_t k, int64_t n_levels, int64_t n_batch) {
  Groups g;
  g.n_batch = n_batch;
  std::vector<int64_t> key(k);
  for (int64_t i = 0; i < k; ++i) {
    const T b = rois[5 * i];
    // torchvision truncates the batch index; NaN and out-of-range indices are errors here (with N = 0 every
    // index is: -0.5 would truncate to image 0 of no images).
    TORCH_CHECK_VALUE(n_batch > 0 && b == b && b > T(-1) && b < static_cast<T>(n_batch), "boxes[", i, ", 0] (batch index) is ",
                      static_cast<double>(b), ", expected an integer in [0, ", n_batch, ")");
    const int64_t lvl = levels ? levels[i] : 0;
    TORCH_CHECK_VALUE(lvl >= 0 && lvl < n_levels, "levels[", i, "] is ", lvl, ", expected a level in [0, ", n_levels,
                      ")");
    key[i] = lvl * n_batch + static_cast<int64_t>(b);
  }
  const int64_t groups = n_levels * n_batch;
  g.start.assign(groups + 1, 0);
  for (int64_t i = 0; i < k; ++i) ++g.start[key[i] + 1];
  for (int64_t j = 0; j < groups; ++j) g.start[j + 1] += g.start[j];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  g.order.resize(k);
  for (int64_t i = 0; i < k; ++i) g.order[fill[key[i]]++] = i;
  return g;
}

// Sorted positions [lo, hi) cut at group boundaries: the (group, first, last) runs a task walks.
struct Run {
  int64_t group, lo, hi;
};

std::vector<Run> runs_between(const Groups& g, int64_t lo, int64_t hi) {
  std::vector<Run> runs;
  const int64_t groups = static_cast<int64_t>(g.start.size()) - 1;
  int64_t grp = std::upper_bound(g.start.begin(), g.start.end(), lo) - g.start.begin() - 1;
  for (int64_t p = lo; p < hi && grp < groups; ++grp) {
    const int64_t end = std::min(hi, g.start[grp + 1]);
    if (end > p) runs.push_back({grp, p, end});
    p = std::max(p, end);
  }
  return runs;
}

struct Level {
  int64_t height, width;
  double scale;
};

// The samples of one RoI, kept separable: the taps of every sample row (pooled_h x grid_h) and column
// (pooled_w x grid_w); a sample's four corners and weights are formed from its row and column when used
// (the same products as torchvision's table). 16 bytes per row or column instead of 32 per sample: the
// NCHW kernels re-read these tables for every block of planes.
template <typename T>
struct RoiSamples {
  std::vector<AxisTaps<T>> rows, cols;
  int grid_h = 0, grid_w = 0, pooled_w = 1, width = 1;
  T count = T(1);

  // f(BilinearSample) for each valid sample of `bin`, in torchvision's order (iy, then ix).
  template <typename F>
  void for_each(int64_t bin, F&& f) const {
    const AxisTaps<T>* ty = rows.data() + (bin / pooled_w) * grid_h;
    const AxisTaps<T>* tx = cols.data() + (bin % pooled_w) * grid_w;
    for (int iy = 0; iy < grid_h; ++iy) {
      if (!ty[iy].valid) continue;
      for (int ix = 0; ix < grid_w; ++ix) {
        if (tx[ix].valid) f(bilinear_sample(ty[iy], tx[ix], width));
      }
    }
  }
};

template <typename T>
void build_samples(const T* roi, const Level& lv, int pooled_h, int pooled_w, int sampling_ratio, bool aligned,
                   RoiSamples<T>& out) {
  const auto g = roi_align_geometry<T>(roi, static_cast<T>(lv.scale), pooled_h, pooled_w, sampling_ratio, aligned);
  out.count = g.count;
  out.grid_h = g.grid_h;
  out.grid_w = g.grid_w;
  out.pooled_w = pooled_w;
  out.width = static_cast<int>(lv.width);
  out.rows.resize(size_t(pooled_h) * g.grid_h);
  out.cols.resize(size_t(pooled_w) * g.grid_w);
  for (int ph = 0; ph < pooled_h; ++ph) {
    for (int iy = 0; iy < g.grid_h; ++iy) {
      out.rows[ph * g.grid_h + iy] =
          axis_taps(roi_sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), static_cast<int>(lv.height));
    }
  }
  for (int pw = 0; pw < pooled_w; ++pw) {
    for (int ix = 0; ix < g.grid_w; ++ix) {
      out.cols[pw * g.grid_w + ix] =
          axis_taps(roi_sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), static_cast<int>(lv.width));
    }
  }
}

// f(per_count) with per_count(v) == v / count: a multiplication by the reciprocal when count is a power
// of two (the same correctly rounded quotient; sampling_ratio 2 gives 4), else the division torchvision does.
template <typename T, typename F>
void with_count_divisor(const RoiSamples<T>& s, F&& f) {
  int exponent = 0;
  if (std::frexp(s.count, &exponent) == T(0.5)) {
    const T inverse = T(1) / s.count;
    f([inverse](T v) { return v * inverse; });
  } else {
    const T count = s.count;
    f([count](T v) { return v / count; });
  }
}

// Walks the sorted RoIs in chunks whose sample tables fit the budget (at least one RoI a chunk): builds the
// chunk's tables in parallel, then calls body(lo, runs, samples), where samples[p - lo] belongs to sorted
// position p and runs are the chunk's (group, positions) pieces.
template <typename T, typename F>
void for_each_chunk(const Groups& g, const T* rois, const int64_t* levels, const std::vector<Level>& lv,
                    int pooled_h, int pooled_w, int sampling_ratio, bool aligned, F&& body) {
  const int64_t k = static_cast<int64_t>(g.order.size());
  std::vector<RoiSamples<T>> samples;
  for (int64_t lo = 0; lo < k;) {
    double bytes = 0;
    int64_t hi = lo;
    while (hi < k) {
      const int64_t r = g.order[hi];
      const Level& l = lv[levels ? levels[r] : 0];
      const auto geo = roi_align_geometry<T>(rois + 5 * r, static_cast<T>(l.scale), pooled_h, pooled_w,
                                             sampling_ratio, aligned);
      bytes += (double(pooled_h) * geo.grid_h + double(pooled_w) * geo.grid_w) * sizeof(AxisTaps<T>) + 128;
      if (hi > lo && bytes > static_cast<double>(roi_sample_budget())) break;
      ++hi;
    }
    samples.resize(hi - lo);
    at::parallel_for(lo, hi, 1, [&](int64_t a, int64_t b) {
      for (int64_t p = a; p < b; ++p) {
        const int64_t r = g.order[p];
        build_samples(rois + 5 * r, lv[levels ? levels[r] : 0], pooled_h, pooled_w, sampling_ratio, aligned,
                      samples[p - lo]);
      }
    });
    body(lo, runs_between(g, lo, hi), samples);
    lo = hi;
  }
}

// ---------------------------------------------------------------- roi_align, NCHW

// A per-thread scratch buffer for the interleaved plane block (grown, never shrunk).
template <typename T>
struct Tile {
  std::vector<T> data;
  T* get(int64_t pixels) {
    if (static_cast<int64_t>(data.size()) < pixels * kPlaneBlock) data.resize(pixels * kPlaneBlock);
    return data.data();
  }
};

// cn planes of hw pixels -> buf[pixel * kPlaneBlock + c], lanes cn.. zero.
template <typename T>
void to_interleaved(const T* plane, int64_t hw, int64_t cn, T* buf) {
  constexpr int64_t kRows = 256;  // pixels per pass: 16 planes x 1 KB stay in L1
  for (int64_t p0 = 0; p0 < hw; p0 += kRows) {
    const int64_t p1 = std::min(hw, p0 + kRows);
    for (int64_t c = 0; c < kPlaneBlock; ++c) {
      if (c < cn) {
        const T* src = plane + c * hw;
        for (int64_t px = p0; px < p1; ++px) buf[px * kPlaneBlock + c] = src[px];
      } else {
        for (int64_t px = p0; px < p1; ++px) buf[px * kPlaneBlock + c] = T(0);
      }
    }
  }
}

// buf[pixel * kPlaneBlock + c] -> cn planes.
template <typename T>
void from_interleaved(const T* buf, int64_t hw, int64_t cn, T* plane) {
  constexpr int64_t kRows = 256;
  for (int64_t p0 = 0; p0 < hw; p0 += kRows) {
    const int64_t p1 = std::min(hw, p0 + kRows);
    for (int64_t c = 0; c < cn; ++c) {
      T* dst = plane + c * hw;
      for (int64_t px = p0; px < p1; ++px) dst[px] = buf[px * kPlaneBlock + c];
    }
  }
}

template <typename T>
void align_forward_nchw(const std::vector<const T*>& feats, const std::vector<Level>& lv, const T* rois,
                        const int64_t* levels, const Groups& g, int64_t channels, int pooled_h, int pooled_w,
                        int sampling_ratio, bool aligned, T* out) {
  const int64_t bins = int64_t(pooled_h) * pooled_w;
  for_each_chunk(g, rois, levels, lv, pooled_h, pooled_w, sampling_ratio, aligned,
                 [&](int64_t lo, const std::vector<Run>& runs, const std::vector<RoiSamples<T>>& samples) {
    const int64_t blocks = (channels + kPlaneBlock - 1) / kPlaneBlock;
    at::parallel_for(0, static_cast<int64_t>(runs.size()) * blocks, 1, [&](int64_t a, int64_t b) {
      Tile<T> tile;
      for (int64_t t = a; t < b; ++t) {
        const Run& run = runs[t / blocks];
        const int64_t c0 = (t % blocks) * kPlaneBlock, cn = std::min<int64_t>(kPlaneBlock, channels - c0);
        const int64_t lvl = run.group / g.n_batch, n = run.group % g.n_batch;
        const int64_t hw = lv[lvl].height * lv[lvl].width;
        const T* plane = feats[lvl] + (n * channels + c0) * hw;
        // The block's planes, interleaved (pixel-major, kPlaneBlock channels per pixel; unused lanes zero):
        // each tap is then one contiguous vector, as on channels-last input.
        T* buf = tile.get(hw);
        to_interleaved(plane, hw, cn, buf);
        for (int64_t p = run.lo; p < run.hi; ++p) {
          const RoiSamples<T>& s = samples[p - lo];
          T* o = out + (g.order[p] * channels + c0) * bins;
          for (int64_t bin = 0; bin < bins; ++bin) {
            T acc[kPlaneBlock] = {};
            s.for_each(bin, [&](const BilinearSample<T>& q) {
              const T* v1 = buf + int64_t(q.p1) * kPlaneBlock;
              const T* v2 = buf + int64_t(q.p2) * kPlaneBlock;
              const T* v3 = buf + int64_t(q.p3) * kPlaneBlock;
              const T* v4 = buf + int64_t(q.p4) * kPlaneBlock;
#pragma omp simd
              for (int c = 0; c < kPlaneBlock; ++c) {
                acc[c] += q.w1 * v1[c] + q.w2 * v2[c] + q.w3 * v3[c] + q.w4 * v4[c];
              }
            });
            for (int64_t c = 0; c < cn; ++c) o[c * bins + bin] = acc[c] / s.count;
          }
        }
      }
    });
  });
}

template <typename T>
void align_backward_nchw(const std::vector<T*>& grads, const std::vector<Level>& lv, const T* rois,
                         const int64_t* levels, const Groups& g, int64_t channels, int pooled_h, int pooled_w,
                         int sampling_ratio, bool aligned, const T* grad_out) {
  const int64_t bins = int64_t(pooled_h) * pooled_w;
  for_each_chunk(g, rois, levels, lv, pooled_h, pooled_w, sampling_ratio, aligned,
                 [&](int64_t lo, const std::vector<Run>& runs, const std::vector<RoiSamples<T>>& samples) {
    const int64_t blocks = (channels + kPlaneBlock - 1) / kPlaneBlock;
    at::parallel_for(0, static_cast<int64_t>(runs.size()) * blocks, 1, [&](int64_t a, int64_t b) {
      Tile<T> tile;
      for (int64_t t = a; t < b; ++t) {
        const Run& run = runs[t / blocks];
        const int64_t c0 = (t % blocks) * kPlaneBlock, cn = std::min<int64_t>(kPlaneBlock, channels - c0);
        const int64_t lvl = run.group / g.n_batch, n = run.group % g.n_batch;
        const int64_t hw = lv[lvl].height * lv[lvl].width;
        T* plane = grads[lvl] + (n * channels + c0) * hw;
        // Accumulate in the interleaved layout (one vector per tap), continuing from the planes' values when
        // an earlier chunk already added to them, so the additions keep their order across chunks.
        T* buf = tile.get(hw);
        if (run.lo == g.start[run.group]) {
          std::fill(buf, buf + hw * kPlaneBlock, T(0));  // the group's first RoI: the planes are still zero
        } else {
          to_interleaved(plane, hw, cn, buf);
        }
        for (int64_t p = run.lo; p < run.hi; ++p) {
          const RoiSamples<T>& s = samples[p - lo];
          const T* go = grad_out + (g.order[p] * channels + c0) * bins;
          with_count_divisor(s, [&](auto per_count) {
            for (int64_t bin = 0; bin < bins; ++bin) {
              T gb[kPlaneBlock] = {};
              for (int64_t c = 0; c < cn; ++c) gb[c] = go[c * bins + bin];
              s.for_each(bin, [&](const BilinearSample<T>& q) {
                T* d1 = buf + int64_t(q.p1) * kPlaneBlock;
                T* d2 = buf + int64_t(q.p2) * kPlaneBlock;
                T* d3 = buf + int64_t(q.p3) * kPlaneBlock;
                T* d4 = buf + int64_t(q.p4) * kPlaneBlock;
                const T w1 = q.w1, w2 = q.w2, w3 = q.w3, w4 = q.w4;
                // taps may coincide at the border: four sequential vector updates, each in torchvision's
                // order (grad * w) / count
#pragma omp simd
                for (int c = 0; c < kPlaneBlock; ++c) d1[c] += per_count(gb[c] * w1);
#pragma omp simd
                for (int c = 0; c < kPlaneBlock; ++c) d2[c] += per_count(gb[c] * w2);
#pragma omp simd
                for (int c = 0; c < kPlaneBlock; ++c) d3[c] += per_count(gb[c] * w3);
#pragma omp simd
                for (int c = 0; c < kPlaneBlock; ++c) d4[c] += per_count(gb[c] * w4);
              });
            }
          });
        }
        from_interleaved(buf, hw, cn, plane);
      }
    });
  });
}

// ---------------------------------------------------------------- roi_align, channels-last

template <typename T>
void align_forward_nhwc(const std::vector<const T*>& feats, const std::vector<Level>& lv, const T* rois,
                        const int64_t* levels, const Groups& g, int64_t channels, int pooled_h, int pooled_w,
                        int sampling_ratio, bool aligned, T* out) {
  const int64_t k = static_cast<int64_t>(g.order.size());
  const int64_t bins = int64_t(pooled_h) * pooled_w;
  at::parallel_for(0, k, 1, [&](int64_t a, int64_t b) {
    RoiSamples<T> s;
    std::vector<T> acc(channels);
    for (int64_t r = a; r < b; ++r) {
      const int64_t lvl = levels ? levels[r] : 0;
      const Level& l = lv[lvl];
      build_samples(rois + 5 * r, l, pooled_h, pooled_w, sampling_ratio, aligned, s);
      const int64_t n = static_cast<int64_t>(rois[5 * r]);
      const T* img = feats[lvl] + n * l.height * l.width * channels;
      T* acc_p = acc.data();
      for (int64_t bin = 0; bin < bins; ++bin) {
        std::fill(acc.begin(), acc.end(), T(0));
        s.for_each(bin, [&](const BilinearSample<T>& q) {
          const T* v1 = img + int64_t(q.p1) * channels;
          const T* v2 = img + int64_t(q.p2) * channels;
          const T* v3 = img + int64_t(q.p3) * channels;
          const T* v4 = img + int64_t(q.p4) * channels;
          const T w1 = q.w1, w2 = q.w2, w3 = q.w3, w4 = q.w4;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) acc_p[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
        });
        T* o = out + (r * bins + bin) * channels;
        const T cnt = s.count;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) o[c] = acc_p[c] / cnt;
      }
    }
  });
  (void)g;
}

template <typename T>
void align_backward_nhwc(const std::vector<T*>& grads, const std::vector<Level>& lv, const T* rois,
                         const int64_t* levels, const Groups& g, int64_t channels, int pooled_h, int pooled_w,
                         int sampling_ratio, bool aligned, const T* grad_out) {
  const int64_t bins = int64_t(pooled_h) * pooled_w;
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  for_each_chunk(g, rois, levels, lv, pooled_h, pooled_w, sampling_ratio, aligned,
                 [&](int64_t lo, const std::vector<Run>& runs, const std::vector<RoiSamples<T>>& samples) {
    const int64_t tasks = static_cast<int64_t>(runs.size()) * blocks;
    at::parallel_for(0, tasks, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const Run& run = runs[t / blocks];
        const int64_t c0 = (t % blocks) * kChannelBlock, cn = std::min(kChannelBlock, channels - c0);
        const int64_t lvl = run.group / g.n_batch, n = run.group % g.n_batch;
        T* img = grads[lvl] + n * lv[lvl].height * lv[lvl].width * channels + c0;
        for (int64_t p = run.lo; p < run.hi; ++p) {
          const RoiSamples<T>& s = samples[p - lo];
          with_count_divisor(s, [&](auto per_count) {
            for (int64_t bin = 0; bin < bins; ++bin) {
              const T* gb = grad_out + (g.order[p] * bins + bin) * channels + c0;
              s.for_each(bin, [&](const BilinearSample<T>& q) {
                T* d1 = img + int64_t(q.p1) * channels;
                T* d2 = img + int64_t(q.p2) * channels;
                T* d3 = img + int64_t(q.p3) * channels;
                T* d4 = img + int64_t(q.p4) * channels;
                const T w1 = q.w1, w2 = q.w2, w3 = q.w3, w4 = q.w4;
                // Sequential per channel (taps may coincide at the border): same order as the NCHW path.
                for (int64_t c = 0; c < cn; ++c) {
                  d1[c] += per_count(gb[c] * w1);
                  d2[c] += per_count(gb[c] * w2);
                  d3[c] += per_count(gb[c] * w3);
                  d4[c] += per_count(gb[c] * w4);
                }
              });
            }
          });
        }
      }
    });
  });
}

std::vector<Level> levels_of(const std::vector<int64_t>& shapes, const std::vector<double>& scales) {
  std::vector<Level> lv;
  for (size_t l = 0; l < scales.size(); ++l) lv.push_back({shapes[4 * l + 2], shapes[4 * l + 3], scales[l]});
  return lv;
}

void check_common(const at::Tensor& rois, const c10::optional<at::Tensor>& levels, size_t n_levels,
                  const std::vector<double>& scales, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(n_levels >= 1 && scales.size() == n_levels, "fastnn roi_align: one scale per level expected");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "fastnn roi_align: rois must be (K, 5)");
  TORCH_CHECK(pooled_h >= 0 && pooled_w >= 0, "fastnn roi_align: output size must be non-negative");
  TORCH_CHECK(levels.has_value() || n_levels == 1, "fastnn roi_align: levels are required with several levels");
  if (levels.has_value()) {
    TORCH_CHECK(levels->scalar_type() == at::kLong && levels->dim() == 1 && levels->size(0) == rois.size(0),
                "fastnn roi_align: levels must be int64 (K,)");
  }
}

}  // namespace

at::Tensor roi_align_forward(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                             const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                             int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                             bool channels_last) {
  check_common(rois, levels, features.size(), scales, pooled_h, pooled_w);
  const RoiAlignInputs in = roi_align_inputs(features, rois, levels, pooled_h, pooled_w, channels_last);
  if (in.out.numel() == 0) return in.out.to(in.dtype);
  const int64_t n_batch = in.shapes[0], channels = in.shapes[1], k = in.rois.size(0);
  AT_DISPATCH_FLOATING_TYPES(in.out.scalar_type(), "roi_align_forward_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& f : in.feats) ptrs.push_back(f.data_ptr<scalar_t>());
    const scalar_t* r = in.rois.data_ptr<scalar_t>();
    const int64_t* lp = in.levels.defined() ? in.levels.data_ptr<int64_t>() : nullptr;
    const Groups g = group_rois(r, lp, k, static_cast<int64_t>(in.feats.size()), n_batch);
    const auto lv = levels_of(in.shapes, scales);
    scalar_t* out = in.out.data_ptr<scalar_t>();
    if (channels_last) {
      align_forward_nhwc(ptrs, lv, r, lp, g, channels, int(pooled_h), int(pooled_w), int(sampling_ratio), aligned,
                         out);
    } else {
      align_forward_nchw(ptrs, lv, r, lp, g, channels, int(pooled_h), int(pooled_w), int(sampling_ratio), aligned,
                         out);
    }
  });
  return in.out.to(in.dtype);
}

std::vector<at::Tensor> roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                           const c10::optional<at::Tensor>& levels, const std::vector<double>& scales,
                                           const std::vector<int64_t>& feature_shapes, bool channels_last,
                                           int64_t sampling_ratio, bool aligned) {
  const size_t n_levels = scales.size();
  TORCH_CHECK(feature_shapes.size() == 4 * n_levels, "fastnn roi_align backward: 4 sizes per level expected");
  check_common(rois, levels, n_levels, scales, grad.size(2), grad.size(3));
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const int64_t n_batch = feature_shapes[0], channels = feature_shapes[1], k = rois.size(0);
  std::vector<at::Tensor> grads = roi_grad_buffers(feature_shapes, grad.options().dtype(ct), channels_last);
  if (k > 0 && channels > 0) {
    const at::Tensor go = grad.to(ct).contiguous(roi_format(channels_last));
    const at::Tensor r = rois.to(ct).contiguous();
    const at::Tensor lvl = levels.has_value() ? levels->contiguous() : at::Tensor();
    const int pooled_h = static_cast<int>(grad.size(2)), pooled_w = static_cast<int>(grad.size(3));
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_align_backward_cpu", [&] {
      std::vector<scalar_t*> ptrs;
      for (auto& gi : grads) ptrs.push_back(gi.data_ptr<scalar_t>());
      const int64_t* lp = lvl.defined() ? lvl.data_ptr<int64_t>() : nullptr;
      const Groups g = group_rois(r.data_ptr<scalar_t>(), lp, k, static_cast<int64_t>(n_levels), n_batch);
      const auto lv = levels_of(feature_shapes, scales);
      if (channels_last) {
        align_backward_nhwc(ptrs, lv, r.data_ptr<scalar_t>(), lp, g, channels, pooled_h, pooled_w,
                            int(sampling_ratio), aligned, go.data_ptr<scalar_t>());
      } else {
        align_backward_nchw(ptrs, lv, r.data_ptr<scalar_t>(), lp, g, channels, pooled_h, pooled_w,
                            int(sampling_ratio), aligned, go.data_ptr<scalar_t>());
      }
    });
  }
  for (auto& gi : grads) gi = gi.to(dtype);
  return grads;
}

// ---------------------------------------------------------------- roi_pool

// The forward always reads channels-last (an NCHW input is transposed once): the max over a bin's window
// then runs along contiguous channels, vectorised, where NCHW windows are short strided rows (bench/NOTES.md).
std::vector<at::Tensor> roi_pool_forward(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                         int64_t pooled_h, int64_t pooled_w, bool channels_last) {
  TORCH_CHECK(input.dim() == 4 && rois.dim() == 2 && rois.size(1) == 5, "fastnn roi_pool: bad shapes");
  TORCH_CHECK(pooled_h >= 0 && pooled_w >= 0, "fastnn roi_pool: output size must be non-negative");
  const auto dtype = input.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.to(ct).contiguous(cl);
  const at::Tensor r = rois.to(ct).contiguous();
  const int64_t n_batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3), k = r.size(0);
  at::Tensor out = new_output({k, channels, pooled_h, pooled_w}, x.options().memory_format(cl));
  at::Tensor arg = new_output({k, channels, pooled_h, pooled_w}, x.options().dtype(at::kInt).memory_format(cl));
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_forward_cpu", [&] {
      using T = scalar_t;
      const T* rp = r.data_ptr<T>();
      group_rois(rp, nullptr, k, 1, n_batch);  // validates the batch indices
      const T* xp = x.data_ptr<T>();
      T* op = out.data_ptr<T>();
      int32_t* ap = arg.data_ptr<int32_t>();
      const int64_t bins = pooled_h * pooled_w;
      const T lowest = static_cast<T>(-std::numeric_limits<float>::max());  // torchvision's -FLT_MAX
      at::parallel_for(0, k, 1, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) {
          const int64_t n = static_cast<int64_t>(rp[5 * i]);
          const T* img = xp + n * channels * height * width;
          for (int64_t bin = 0; bin < bins; ++bin) {
            const auto w = roi_pool_window<T>(rp + 5 * i, static_cast<T>(spatial_scale), int(pooled_h), int(pooled_w),
                                              int(bin / pooled_w), int(bin % pooled_w), int(height), int(width));
            const bool empty = w.h1 <= w.h0 || w.w1 <= w.w0;
            T* best = op + (i * bins + bin) * channels;
            int32_t* where = ap + (i * bins + bin) * channels;
            std::fill(best, best + channels, empty ? T(0) : lowest);
            std::fill(where, where + channels, -1);
            for (int h = w.h0; h < w.h1; ++h) {
              for (int x0 = w.w0; x0 < w.w1; ++x0) {
                const int32_t pos = h * int32_t(width) + x0;
                const T* v = img + int64_t(pos) * channels;
                _Pragma("omp simd")  // a #pragma cannot sit in AT_DISPATCH's macro argument
                for (int64_t c = 0; c < channels; ++c) {
                  const bool more = v[c] > best[c];  // strict: the first maximum wins, NaN never does
                  best[c] = more ? v[c] : best[c];
                  where[c] = more ? pos : where[c];
                }
              }
            }
          }
        }
      });
    });
  }
  if (!channels_last) return {out.contiguous().to(dtype), arg.contiguous()};
  return {out.to(dtype), arg};
}

at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             const std::vector<int64_t>& input_shape, bool channels_last) {
  TORCH_CHECK(input_shape.size() == 4, "fastnn roi_pool backward: input_shape must have 4 sizes");
  const auto dtype = grad.scalar_type();
  const auto ct = roi_compute_type(dtype);
  const auto fmt = roi_format(channels_last);
  const int64_t n_batch = input_shape[0], channels = input_shape[1], hw = input_shape[2] * input_shape[3];
  at::Tensor gi = roi_grad_buffers(input_shape, grad.options().dtype(ct), channels_last)[0];
  const int64_t k = rois.size(0);
  if (k > 0 && channels > 0) {
    const at::Tensor go = grad.to(ct).contiguous(fmt);
    const at::Tensor am = argmax.contiguous(fmt);
    const at::Tensor r = rois.to(ct).contiguous();
    const int64_t bins = grad.size(2) * grad.size(3);
    AT_DISPATCH_FLOATING_TYPES(ct, "roi_pool_backward_cpu", [&] {
      using T = scalar_t;
      const Groups g = group_rois(r.data_ptr<T>(), nullptr, k, 1, n_batch);
      const auto runs = runs_between(g, 0, k);
      const T* gp = go.data_ptr<T>();
      const int32_t* ap = am.data_ptr<int32_t>();
      T* dp = gi.data_ptr<T>();
      const int64_t blocks = channels_last ? (channels + kChannelBlock - 1) / kChannelBlock : channels;
      at::parallel_for(0, static_cast<int64_t>(runs.size()) * blocks, 1, [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) {
          const Run& run = runs[t / blocks];
          const int64_t n = run.group;
          if (channels_last) {
            const int64_t c0 = (t % blocks) * kChannelBlock, cn = std::min(kChannelBlock, channels - c0);
            T* img = dp + n * hw * channels + c0;
            for (int64_t p = run.lo; p < run.hi; ++p) {
              const int64_t base = g.order[p] * bins * channels + c0;
              for (int64_t bin = 0; bin < bins; ++bin) {
                for (int64_t c = 0; c < cn; ++c) {
                  const int32_t at = ap[base + bin * channels + c];
                  if (at >= 0 && at < hw) img[int64_t(at) * channels + c] += gp[base + bin * channels + c];
                }
              }
            }
          } else {
            const int64_t c = t % blocks;
            T* plane = dp + (n * channels + c) * hw;
            for (int64_t p = run.lo; p < run.hi; ++p) {
              const int64_t base = (g.order[p] * channels + c) * bins;
              for (int64_t bin = 0; bin < bins; ++bin) {
                const int32_t at = ap[base + bin];
                if (at >= 0 && at < hw) plane[at] += gp[base + bin];
              }
            }
          }
        }
      });
    });
  }
  return gi.to(dtype);
}

}  // namespace fastnn::cpu
