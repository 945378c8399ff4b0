// CPU FPN top-down step: out = lateral + nearest_upsample(top, lateral's size), fused in one pass (torch
// writes the upsampled top to memory, then reads it back for the add), and its deterministic backward.
//
// Nearest source index: torch's rule for F.interpolate(size=...), scale = float(in) / float(out) in float32,
// src(o) = min(floor(float(o) * scale), in - 1), tabulated once per call for rows and columns.
//
// NCHW: parallel over output rows (plane, y). A row's upsampled top row is gathered once into a float
// buffer and reused by the following output rows with the same source row (two at a time for the usual 2x
// pyramid), so the add itself is a unit-stride, vectorised loop.
// channels_last: parallel over (image, y) rows; each output pixel is a unit-stride add over the C channels
// of its lateral pixel and its source top pixel.
// Backward (grad_top): a gather over each top pixel's preimage, which is a rectangle [ys[i], ys[i+1]) x
// [xs[j], xs[j+1]) because src is non-decreasing: rows are summed first (unit stride), then columns, in
// the same order in both layouts, so NCHW and channels_last give the same bits. No atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/alloc.h"
#include "../families/fpn.h"

namespace fastnn::cpu {
namespace {

// About this many output elements per parallel task (a 256-channel 128 x 128 level has 4M).
constexpr int64_t kElemsPerTask = 16384;

std::vector<int64_t> nearest_source(int64_t in, int64_t out) {
  std::vector<int64_t> src(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t o = 0; o < out; ++o) {
    src[o] = std::min(static_cast<int64_t>(std::floor(static_cast<float>(o) * scale)), in - 1);
  }
  return src;
}

// start[i] = first output index whose source is >= i (start[in] = out): the preimage of i is
// [start[i], start[i + 1]).
std::vector<int64_t> preimage_starts(int64_t in, int64_t out) {
  const std::vector<int64_t> src = nearest_source(in, out);
  std::vector<int64_t> start(in + 1);
  int64_t o = 0;
  for (int64_t i = 0; i <= in; ++i) {
    while (o < out && src[o] < i) ++o;
    start[i] = o;
  }
  return start;
}

bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename scalar_t>
void forward_nchw(const scalar_t* lat, const scalar_t* top, scalar_t* out, int64_t planes, int64_t hl, int64_t wl,
                  int64_t ht, int64_t wt, const int64_t* ysrc, const int64_t* xsrc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = planes * hl;
  const bool twice = wl == 2 * wt;
  at::parallel_for(0, rows, std::max<int64_t>(1, kElemsPerTask / wl), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(wl);
    int64_t have = -1;  // plane * ht + source row held in buf
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t p = r / hl, y = r % hl;
      const int64_t key = p * ht + ysrc[y];
      if (key != have) {
        const scalar_t* trow = top + key * wt;
        if (twice) {
          for (int64_t j = 0; j < wt; ++j) {
            const acc_t v = static_cast<acc_t>(trow[j]);
            buf[2 * j] = v;
            buf[2 * j + 1] = v;
          }
        } else {
          for (int64_t x = 0; x < wl; ++x) buf[x] = static_cast<acc_t>(trow[xsrc[x]]);
        }
        have = key;
      }
      const scalar_t* lrow = lat + r * wl;
      scalar_t* orow = out + r * wl;
      const acc_t* b = buf.data();
#pragma omp simd
      for (int64_t x = 0; x < wl; ++x) orow[x] = static_cast<scalar_t>(static_cast<acc_t>(lrow[x]) + b[x]);
    }
  });
}

template <typename scalar_t>
void forward_channels_last(const scalar_t* lat, const scalar_t* top, scalar_t* out, int64_t n, int64_t c, int64_t hl,
                           int64_t wl, int64_t ht, int64_t wt, const int64_t* ysrc, const int64_t* xsrc) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n * hl, std::max<int64_t>(1, kElemsPerTask / (wl * c)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t img = r / hl, y = r % hl;
      const scalar_t* trow = top + (img * ht + ysrc[y]) * wt * c;
      for (int64_t x = 0; x < wl; ++x) {
        const scalar_t* tp = trow + xsrc[x] * c;
        const scalar_t* lp = lat + (r * wl + x) * c;
        scalar_t* op = out + (r * wl + x) * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) {
          op[k] = static_cast<scalar_t>(static_cast<acc_t>(lp[k]) + static_cast<acc_t>(tp[k]));
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_nchw(const scalar_t* grad, scalar_t* gtop, int64_t planes, int64_t hl, int64_t wl, int64_t ht,
                   int64_t wt, const int64_t* ys, const int64_t* xs) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool twice = wl == 2 * wt;  // then xs[j] = 2j (src(x) = x >> 1)
  at::parallel_for(0, planes * ht, std::max<int64_t>(1, kElemsPerTask / wl), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(wl);
    acc_t* b = buf.data();
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t p = r / ht, i = r % ht;
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t y = ys[i]; y < ys[i + 1]; ++y) {
        const scalar_t* grow = grad + (p * hl + y) * wl;
#pragma omp simd
        for (int64_t x = 0; x < wl; ++x) b[x] += static_cast<acc_t>(grow[x]);
      }
      scalar_t* orow = gtop + r * wt;
      if (twice) {  // the 2x pyramid: every preimage is the column pair (2j, 2j + 1)
#pragma omp simd
        for (int64_t j = 0; j < wt; ++j) orow[j] = static_cast<scalar_t>(b[2 * j] + b[2 * j + 1]);
      } else {
        for (int64_t j = 0; j < wt; ++j) {
          acc_t s = 0;
          for (int64_t x = xs[j]; x < xs[j + 1]; ++x) s += b[x];
          orow[j] = static_cast<scalar_t>(s);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_channels_last(const scalar_t* grad, scalar_t* gtop, int64_t n, int64_t c, int64_t hl, int64_t wl,
                            int64_t ht, int64_t wt, const int64_t* ys, const int64_t* xs) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n * ht, std::max<int64_t>(1, kElemsPerTask / (wl * c)), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> col(c), acc(c);
    acc_t* cb = col.data();
    acc_t* ab = acc.data();
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t img = r / ht, i = r % ht;
      for (int64_t j = 0; j < wt; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        // Same order as the NCHW kernel: each column's rows summed first, then the columns.
        for (int64_t x = xs[j]; x < xs[j + 1]; ++x) {
          std::fill(col.begin(), col.end(), acc_t(0));
          for (int64_t y = ys[i]; y < ys[i + 1]; ++y) {
            const scalar_t* gp = grad + ((img * hl + y) * wl + x) * c;
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) cb[k] += static_cast<acc_t>(gp[k]);
          }
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) ab[k] += cb[k];
        }
        scalar_t* op = gtop + ((img * ht + i) * wt + j) * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) op[k] = static_cast<scalar_t>(ab[k]);
      }
    }
  });
}

}  // namespace

at::Tensor fpn_topdown_add(const at::Tensor& lateral, const at::Tensor& top) {
  TORCH_CHECK(lateral.device().is_cpu() && top.device().is_cpu(), "fastnn fpn_topdown_add: CPU tensors expected");
  TORCH_CHECK(lateral.dim() == 4 && top.dim() == 4, "fastnn fpn_topdown_add: 4-d tensors expected");
  TORCH_CHECK(lateral.scalar_type() == top.scalar_type(), "fastnn fpn_topdown_add: lateral and top dtypes differ");
  const int64_t n = lateral.size(0), c = lateral.size(1), hl = lateral.size(2), wl = lateral.size(3);
  const int64_t ht = top.size(2), wt = top.size(3);
  TORCH_CHECK(top.size(0) == n && top.size(1) == c, "fastnn fpn_topdown_add: top batch/channels differ from lateral");
  const bool cl = use_channels_last(lateral);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = new_output(lateral.sizes(), lateral.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  TORCH_CHECK(ht > 0 && wt > 0, "fastnn fpn_topdown_add: top has an empty spatial size");
  const at::Tensor lat = lateral.contiguous(fmt), tp = top.contiguous(fmt);
  const std::vector<int64_t> ysrc = nearest_source(ht, hl), xsrc = nearest_source(wt, wl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lat.scalar_type(), "fpn_topdown_add_cpu", [&] {
    if (cl) {
      forward_channels_last<scalar_t>(lat.data_ptr<scalar_t>(), tp.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
                                      c, hl, wl, ht, wt, ysrc.data(), xsrc.data());
    } else {
      forward_nchw<scalar_t>(lat.data_ptr<scalar_t>(), tp.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n * c, hl,
                             wl, ht, wt, ysrc.data(), xsrc.data());
    }
  });
  return out;
}

at::Tensor fpn_topdown_add_backward(const at::Tensor& grad, int64_t top_h, int64_t top_w, bool channels_last) {
  TORCH_CHECK(grad.device().is_cpu(), "fastnn fpn_topdown_add_backward: CPU tensor expected");
  TORCH_CHECK(grad.dim() == 4, "fastnn fpn_topdown_add_backward: 4-d grad expected");
  TORCH_CHECK(top_h >= 0 && top_w >= 0, "fastnn fpn_topdown_add_backward: negative top size");
  const int64_t n = grad.size(0), c = grad.size(1), hl = grad.size(2), wl = grad.size(3);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gtop = new_output({n, c, top_h, top_w}, grad.options().memory_format(fmt));
  if (gtop.numel() == 0) return gtop;
  if (grad.numel() == 0) {  // no output pixels: nothing flows back
    gtop.zero_();
    return gtop;
  }
  const at::Tensor g = grad.contiguous(fmt);
  const std::vector<int64_t> ys = preimage_starts(top_h, hl), xs = preimage_starts(top_w, wl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fpn_topdown_add_backward_cpu", [&] {
    if (channels_last) {
      backward_channels_last<scalar_t>(g.data_ptr<scalar_t>(), gtop.data_ptr<scalar_t>(), n, c, hl, wl, top_h, top_w,
                                       ys.data(), xs.data());
    } else {
      backward_nchw<scalar_t>(g.data_ptr<scalar_t>(), gtop.data_ptr<scalar_t>(), n * c, hl, wl, top_h, top_w,
                              ys.data(), xs.data());
    }
  });
  return gtop;
}

}  // namespace fastnn::cpu
