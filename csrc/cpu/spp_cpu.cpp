// CPU spatial pyramid pooling: SPP (adaptive max / average bins of every level, flattened, concatenated) and
// YOLOv5 SPPF pooling (cat([x, y1, y2, y3], 1) with y_j = max_pool(k, stride 1, pad k/2) applied j times),
// forward and backward, each one pass per block of channels that writes the concatenated output directly.
//
// Work unit: a block of L channels of one image, held as a [pixel][lane] float (double for fp64) buffer, so
// every inner loop runs over W * L contiguous values and vectorises:
//   channels_last input  L = 16 channels, read and written in place (no layout copy);
//   NCHW, SPPF           L = 1 (one plane; rows are contiguous, the loops vectorise along W);
//   NCHW, SPP            L = 8 planes interleaved on load (bin reductions then vectorise across planes).
// Blocks are independent: at::parallel_for over N * ceil(C / L) blocks, per-task scratch, no atomics, so
// forward and backward are deterministic (each block owns its part of the gradient).
//
// Max pooling follows torch's CPU max_pool2d / adaptive_max_pool2d rule exactly: scan the window row-major,
// take a value when it is greater than the running max or NaN (first maximum, last NaN), start from the
// window's first element. SPPF's backward replays torch's chain m(m(m(x))) level by level (argmax of each
// k x k window of the previous level, then scatter back), so gradients land where torch's chain puts them,
// ties included.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/alloc.h"
#include "../families/spp.h"

namespace fastnn::cpu {
namespace {

constexpr int64_t kLanesChannelsLast = 16;  // two AVX2 vectors of float per pixel
constexpr int64_t kLanesPlanesSpp = 8;      // NCHW SPP: planes interleaved per block
// Blocks per parallel task: at least ~16k elements, so small inputs stay on one thread (waking the pool costs
// more than the work there).
constexpr int64_t kElementsPerTask = 16384;

// torch's max-pool update: take v when it beats the running max or is NaN. Bitwise |, not ||: no branch
// (a short-circuit branch on random data mispredicts; the select compiles to a compare + blend). The
// builtins (v > m, isnan v) rather than `(v > m) | (v != v)`: with the latter GCC does not vectorise the
// fused argmax passes below.
template <typename A>
inline bool takes(A v, A m) {
  return static_cast<bool>(static_cast<int>(__builtin_isgreater(v, m)) | static_cast<int>(__builtin_isunordered(v, v)));
}

// Strides of one block's elements in a tensor: (pixel p, lane l) at base + p * sp + l * sl.
struct Strides {
  int64_t sp, sl;
};

struct Layout {
  int64_t N, C, H, W, L;
  bool cl;
  int64_t blocks_per_image() const { return (C + L - 1) / L; }
  int64_t blocks() const { return N * blocks_per_image(); }
  int64_t grain() const { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, H * W * L)); }
};

// Block b -> (image n, first channel c0, lanes).
struct BlockId {
  int64_t n, c0, lanes;
};

inline BlockId block_id(const Layout& g, int64_t b) {
  const int64_t per = g.blocks_per_image();
  const int64_t n = b / per, c0 = (b % per) * g.L;
  return {n, c0, std::min(g.L, g.C - c0)};
}

// Element (n, c0 + lane, pixel) of a (N, CT, H, W) tensor in the layout: channels_last or NCHW.
template <typename T>
inline T* tensor_block(T* base, const Layout& g, int64_t CT, int64_t n, int64_t c, Strides& s) {
  const int64_t hw = g.H * g.W;
  if (g.cl) {
    s = {CT, 1};
    return base + n * hw * CT + c;
  }
  s = {1, hw};
  return base + (n * CT + c) * hw;
}

// d[l] = s[l] for the lanes of one pixel; a full channels_last block is a fixed-length (vector) copy.
template <typename D, typename S>
inline void copy_lanes(D* __restrict__ d, const S* __restrict__ s, int64_t lanes) {
  if (lanes == kLanesChannelsLast) {
    for (int64_t l = 0; l < kLanesChannelsLast; ++l) d[l] = static_cast<D>(s[l]);
  } else {
    for (int64_t l = 0; l < lanes; ++l) d[l] = static_cast<D>(s[l]);
  }
}

// dst[(row0 + h) * row_stride + (col0 + w) * L + l] = src(h, w, l); rows are W pixels long.
template <typename T, typename A>
void load_block(const T* src, Strides s, int64_t H, int64_t W, int64_t L, int64_t lanes, A* dst, int64_t row_stride,
                int64_t col0) {
  for (int64_t h = 0; h < H; ++h) {
    A* d = dst + h * row_stride + col0 * L;
    const T* sr = src + h * W * s.sp;
    if (L == 1 && s.sp == 1) {
      for (int64_t w = 0; w < W; ++w) d[w] = static_cast<A>(sr[w]);
    } else if (s.sl == 1) {
      for (int64_t w = 0; w < W; ++w) copy_lanes(d + w * L, sr + w * s.sp, lanes);
    } else {
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t w = 0; w < W; ++w) d[w * L + l] = static_cast<A>(sr[w * s.sp + l * s.sl]);
    }
    for (int64_t w = 0; w < W; ++w)
      for (int64_t l = lanes; l < L; ++l) d[w * L + l] = A(0);  // unused lanes: keep them finite
  }
}

// dst(h, w, l) = src[h * row_stride + w * L + l] for the H x W pixels (the inverse of load_block).
template <typename T, typename A>
void store_block(const A* src, int64_t H, int64_t W, int64_t row_stride, int64_t L, int64_t lanes, T* dst,
                 Strides s) {
  for (int64_t h = 0; h < H; ++h) {
    const A* sr = src + h * row_stride;
    T* d = dst + h * W * s.sp;
    if (L == 1 && s.sp == 1) {
      for (int64_t w = 0; w < W; ++w) d[w] = static_cast<T>(sr[w]);
    } else if (s.sl == 1) {
      for (int64_t w = 0; w < W; ++w) copy_lanes(d + w * s.sp, sr + w * L, lanes);
    } else {
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t w = 0; w < W; ++w) d[w * s.sp + l * s.sl] = static_cast<T>(sr[w * L + l]);
    }
  }
}

Layout make_layout(const at::Tensor& x, int64_t lanes_nchw) {
  const bool cl = x.size(1) > 1 && x.size(2) * x.size(3) > 1 && !x.is_contiguous() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return {x.size(0), x.size(1), x.size(2), x.size(3), cl ? kLanesChannelsLast : lanes_nchw, cl};
}

at::Tensor in_layout(const at::Tensor& t, bool cl) {
  return cl ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// A new (N, C, H, W) output in the layout (channels_last: a permuted (N, H, W, C) allocation).
at::Tensor new_4d(int64_t N, int64_t C, int64_t H, int64_t W, bool cl, const at::TensorOptions& opt) {
  if (cl) return new_output({N, H, W, C}, opt).permute({0, 3, 1, 2});
  return new_output({N, C, H, W}, opt);
}

// ------------------------------------------------------------------------------------------------ SPPF

// Per-task scratch of the SPPF kernels, sized for one block.
template <typename A>
struct SppfScratch {
  int64_t H, W, L, r, Wp, rowP, rowW, n;
  std::vector<A> P, HP, G, Gin;
  std::vector<uint8_t> PADCOL;  // over the H interior rows: 1 at the pad columns
  std::vector<int32_t> HD, D0, VD0, BASE, VD, VC, IDX;
  SppfScratch(int64_t H_, int64_t W_, int64_t L_, int64_t r_, bool backward)
      : H(H_), W(W_), L(L_), r(r_), Wp(W_ + 2 * r_), rowP((W_ + 2 * r_) * L_), rowW(W_ * L_), n(H_ * rowP) {
    const A ninf = -std::numeric_limits<A>::infinity();
    P.assign((H + 2 * r) * rowP, ninf);   // -inf border of r pixels: torch's max-pool padding
    HP.assign((H + 2 * r) * rowP, ninf);  // row maxima in P's padded geometry, -inf rows above and below
    PADCOL.assign(n, 0);
    for (int64_t h = 0; h < H; ++h) {
      std::fill_n(PADCOL.begin() + h * rowP, r * L, uint8_t{1});
      std::fill_n(PADCOL.begin() + h * rowP + (r + W) * L, r * L, uint8_t{1});
    }
    if (!backward) return;
    // Argmax state over the H interior rows of the padded geometry (index j = h * rowP + c * L + l, padded
    // column c = w + r); entries at pad columns are junk and never used.
    HD.assign((H + 2 * r) * rowP, 0);     // column offset (0..2r) of each row maximum
    D0.assign(n, 0);                      // first column offset inside the image (window start)
    VD0.assign(n, 0);                     // first row offset inside the image
    BASE.assign(n, 0);                    // pixel index of the window's top-left corner (h - r, w - r)
    VD.resize(n);
    VC.resize(n);
    IDX.resize(3 * n);
    G.resize(H * rowW);
    Gin.resize(H * rowW);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < Wp; ++c)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t j = h * rowP + c * L + l, w = c - r;
          D0[j] = static_cast<int32_t>(std::max<int64_t>(0, r - w));
          VD0[j] = static_cast<int32_t>(std::max<int64_t>(0, r - h));
          BASE[j] = static_cast<int32_t>((h - r) * W + (w - r));
        }
  }
  A* interior_row(int64_t h) { return P.data() + (h + r) * rowP + r * L; }
};

// One pass of a separable max: out[j] = the window max of in[j + d * stride], d in [-r, r], scanned from
// d = -r with torch's rule. Without NaNs in the plane, `v > m ? v : m` is that rule (ties keep the earlier
// element, so signed zeros come out as torch's) and compiles to one vmaxps; with NaNs, `takes` decides.
// The window is one expression per output (R a compile-time radius: unrolled, in registers), so each pass
// loads 2r + 1 vectors and stores one; the loop per offset it replaces stored and reloaded the running
// maximum 2r + 1 times (bench/NOTES.md, SPPF v3).
template <typename A, bool kNaNs>
inline A max_pick(A v, A m) {
  if constexpr (kNaNs) {
    return takes(v, m) ? v : m;
  } else {
    return v > m ? v : m;
  }
}

template <typename A, int R, bool kNaNs, bool kMaskPads>
void window_max_pass(const A* __restrict__ in, A* __restrict__ out, int64_t n, int64_t stride,
                     const uint8_t* __restrict__ pad) {
  const A ninf = -std::numeric_limits<A>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    A m = in[j - R * stride];
#pragma GCC unroll 8
    for (int d = 1 - R; d <= R; ++d) m = max_pick<A, kNaNs>(in[j + d * stride], m);
    if constexpr (kMaskPads) m = pad[j] ? ninf : m;
    out[j] = m;
  }
}

template <typename A, int R, bool kNaNs>
void window_max_radius(const A* in, A* out, int64_t n, int64_t stride, const uint8_t* pad) {
  if (pad != nullptr) {
    window_max_pass<A, R, kNaNs, true>(in, out, n, stride, pad);
  } else {
    window_max_pass<A, R, kNaNs, false>(in, out, n, stride, pad);
  }
}

// Any radius (k > 9): one loop per window offset.
template <typename A, bool kNaNs>
void window_max_any_radius(const A* __restrict__ in, A* __restrict__ out, int64_t n, int64_t stride, int64_t r,
                           const uint8_t* __restrict__ pad) {
  {
    const A* q0 = in - r * stride;
    for (int64_t j = 0; j < n; ++j) out[j] = q0[j];
  }
  for (int64_t d = 1 - r; d <= r; ++d) {
    const A* q = in + d * stride;
    for (int64_t j = 0; j < n; ++j) out[j] = max_pick<A, kNaNs>(q[j], out[j]);
  }
  const A ninf = -std::numeric_limits<A>::infinity();
  if (pad != nullptr)
    for (int64_t j = 0; j < n; ++j) out[j] = pad[j] ? ninf : out[j];
}

// out = window maxima of in along `stride`; where pad[j] (when given), -inf instead.
template <typename A, bool kNaNs>
void window_max(const A* in, A* out, int64_t n, int64_t stride, int64_t r, const uint8_t* pad) {
  switch (r) {
    case 0: window_max_radius<A, 0, kNaNs>(in, out, n, stride, pad); break;
    case 1: window_max_radius<A, 1, kNaNs>(in, out, n, stride, pad); break;
    case 2: window_max_radius<A, 2, kNaNs>(in, out, n, stride, pad); break;
    case 3: window_max_radius<A, 3, kNaNs>(in, out, n, stride, pad); break;
    case 4: window_max_radius<A, 4, kNaNs>(in, out, n, stride, pad); break;
    default: window_max_any_radius<A, kNaNs>(in, out, n, stride, r, pad);
  }
}

// One k x k stride-1 max pool of the padded P, in place (values only): row maxima of all H padded rows as
// one flat pass, with -inf written at the pad columns, then column maxima of those written back into P's
// interior rows (its pad columns come out -inf again: the maxima of -inf columns). Whole-plane loops: rows
// of W = 20 pixels are too short for the per-loop overhead (per-row loops measured 3x slower at 20 x 20).
// `nans`: the block holds a NaN (a pool never makes one, so one check of x covers every level).
template <typename A>
void max_pool_in_place(SppfScratch<A>& s, bool nans) {
  const int64_t r = s.r, L = s.L, rowP = s.rowP, n = s.H * rowP, lo = r * rowP;
  A* hm = s.HP.data() + lo;
  A* p = s.P.data() + lo;
  if (nans) {
    window_max<A, true>(p, hm, n, L, r, s.PADCOL.data());
    window_max<A, true>(hm, p, n, rowP, r, nullptr);
  } else {
    window_max<A, false>(p, hm, n, L, r, s.PADCOL.data());
    window_max<A, false>(hm, p, n, rowP, r, nullptr);
  }
}

template <typename A>
bool has_nan(const A* v, int64_t n) {
  int any = 0;  // an int reduction vectorises; a bool one ran as a scalar loop
#pragma omp simd reduction(| : any)
  for (int64_t j = 0; j < n; ++j) any |= static_cast<int>(v[j] != v[j]);
  return any != 0;
}

// The same pool in place with torch's argmax: idx[j] (padded interior geometry) = pixel h' * W + w' of the
// previous level that max_pool2d picks (row-major first maximum, last NaN, window start when all -inf).
// Separable: the row pass keeps each row maximum's column, the column pass the first row (scanning top to
// bottom with the same rule) and that row's column: together the row-major first pick of the 2-D window.
template <typename A>
void max_pool_argmax_any_radius(SppfScratch<A>& s, int32_t* idx) {
  const int64_t r = s.r, L = s.L, rowP = s.rowP, n = s.n, k = 2 * r + 1;
  const int32_t W = static_cast<int32_t>(s.W);
  const A ninf = -std::numeric_limits<A>::infinity();
  A* hm = s.HP.data() + r * rowP;
  int32_t* hd = s.HD.data() + r * rowP;
  A* p = s.P.data() + r * rowP;
  const int32_t* d0 = s.D0.data();
  const int32_t* v0 = s.VD0.data();
  const int32_t* base = s.BASE.data();
  int32_t* vd = s.VD.data();
  int32_t* vc = s.VC.data();
  for (int64_t j = 0; j < n; ++j) {
    hm[j] = ninf;
    hd[j] = d0[j];
  }
  for (int64_t d = 0; d < k; ++d) {
    const A* q = p + (d - r) * L;
    const int32_t dd = static_cast<int32_t>(d);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const bool c = takes(q[j], hm[j]);
      hm[j] = c ? q[j] : hm[j];
      hd[j] = c ? dd : hd[j];
    }
  }
  const uint8_t* pad = s.PADCOL.data();  // -inf at the pad columns: the column pass keeps P's pads -inf
  for (int64_t j = 0; j < n; ++j) hm[j] = pad[j] ? ninf : hm[j];
  for (int64_t j = 0; j < n; ++j) {
    p[j] = ninf;
    vd[j] = v0[j];
    vc[j] = hd[j + (v0[j] - r) * rowP];
  }
  for (int64_t d = 0; d < k; ++d) {
    const A* q = hm + (d - r) * rowP;
    const int32_t* qd = hd + (d - r) * rowP;
    const int32_t dd = static_cast<int32_t>(d);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const bool c = takes(q[j], p[j]);
      p[j] = c ? q[j] : p[j];
      vd[j] = c ? dd : vd[j];
      vc[j] = c ? qd[j] : vc[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) idx[j] = base[j] + vd[j] * W + vc[j];
}

// The same two passes for a compile-time radius R, each one expression per output kept in registers (as
// window_max_pass; bench/NOTES.md, SPPF v3). Row pass: the maximum of in[j + (d - R) L], d = 0..2R, and its
// offset, from (-inf, first in-image offset d0); -inf at pad columns so that the column pass gives -inf
// there (P's pads stay -inf for the next level).
template <typename A, int R, bool kNaNs>
void argmax_row_pass(const A* __restrict__ in, A* __restrict__ hm, int32_t* __restrict__ hd,
                     const int32_t* __restrict__ d0, const uint8_t* __restrict__ pad, int64_t n, int64_t L) {
  const A ninf = -std::numeric_limits<A>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    A m = ninf;
    int32_t a = d0[j];
#pragma GCC unroll 9  // fully: a loop left inside stops the vectoriser
    for (int d = 0; d <= 2 * R; ++d) {
      const A v = in[j + (d - R) * L];
      const bool c = kNaNs ? takes(v, m) : v > m;
      m = c ? v : m;
      a = c ? d : a;
    }
    hm[j] = pad[j] ? ninf : m;
    hd[j] = a;
  }
}

// Column pass: the first row by the same rule (from -inf and the first in-image row v0, with that row's
// column), then idx = the picked pixel of the previous level.
template <typename A, int R, bool kNaNs>
void argmax_col_pass(const A* __restrict__ hm, const int32_t* __restrict__ hd, A* __restrict__ p,
                     int32_t* __restrict__ idx, const int32_t* __restrict__ v0, const int32_t* __restrict__ base,
                     int64_t n, int64_t rowP, int32_t W) {
  const A ninf = -std::numeric_limits<A>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    A m = ninf;
    const int32_t first = v0[j];
    int32_t vd = first, vc = 0, vc_first = 0;
#pragma GCC unroll 9  // fully: a loop left inside stops the vectoriser
    for (int d = 0; d <= 2 * R; ++d) {
      const A v = hm[j + (d - R) * rowP];
      const int32_t col = hd[j + (d - R) * rowP];
      const bool c = kNaNs ? takes(v, m) : v > m;
      m = c ? v : m;
      vd = c ? d : vd;
      vc = c ? col : vc;
      vc_first = d == first ? col : vc_first;
    }
    p[j] = m;
    // rows above `first` are -inf padding and never taken, so vd == first: nothing taken or `first` taken,
    // and either way the column is that row's (a "taken" flag instead stops GCC's vectoriser)
    idx[j] = base[j] + vd * W + (vd == first ? vc_first : vc);
  }
}

template <typename A, int R, bool kNaNs>
void max_pool_argmax_radius(SppfScratch<A>& s, int32_t* idx) {
  const int64_t rowP = s.rowP, lo = R * rowP;
  argmax_row_pass<A, R, kNaNs>(s.P.data() + lo, s.HP.data() + lo, s.HD.data() + lo, s.D0.data(), s.PADCOL.data(),
                               s.n, s.L);
  argmax_col_pass<A, R, kNaNs>(s.HP.data() + lo, s.HD.data() + lo, s.P.data() + lo, idx, s.VD0.data(),
                               s.BASE.data(), s.n, rowP, static_cast<int32_t>(s.W));
}

template <typename A, bool kNaNs>
void max_pool_argmax_in_place(SppfScratch<A>& s, int32_t* idx) {
  switch (s.r) {
    case 1: max_pool_argmax_radius<A, 1, kNaNs>(s, idx); break;
    case 2: max_pool_argmax_radius<A, 2, kNaNs>(s, idx); break;
    case 3: max_pool_argmax_radius<A, 3, kNaNs>(s, idx); break;
    case 4: max_pool_argmax_radius<A, 4, kNaNs>(s, idx); break;
    default: max_pool_argmax_any_radius(s, idx);
  }
}

template <typename T>
void sppf_forward_impl(const T* x, T* out, const Layout& g, int64_t r) {
  using A = at::opmath_type<T>;
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, g.blocks(), g.grain(), [&](int64_t lo, int64_t hi) {
    SppfScratch<A> s(g.H, g.W, g.L, r, false);
    for (int64_t b = lo; b < hi; ++b) {
      const BlockId id = block_id(g, b);
      Strides xs, os;
      const T* xb = tensor_block(x, g, g.C, id.n, id.c0, xs);
      load_block(xb, xs, g.H, g.W, g.L, id.lanes, s.P.data() + s.r * s.rowP, s.rowP, s.r);
      const bool nans = has_nan(s.P.data(), static_cast<int64_t>(s.P.size()));
      for (int64_t slot = 0; slot < 4; ++slot) {
        T* ob = tensor_block(out, g, 4 * g.C, id.n, slot * g.C + id.c0, os);
        if (slot == 0) {  // x itself: a straight copy
          if (g.cl) {
            for (int64_t p = 0; p < HW; ++p) copy_lanes(ob + p * os.sp, xb + p * xs.sp, id.lanes);
          } else {
            std::copy(xb, xb + HW, ob);
          }
          continue;
        }
        max_pool_in_place(s, nans);
        store_block(s.interior_row(0), g.H, g.W, s.rowP, g.L, id.lanes, ob, os);
      }
    }
  });
}

template <typename T>
void sppf_backward_impl(const T* grad, const T* x, T* gx, const Layout& g, int64_t r) {
  using A = at::opmath_type<T>;
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, g.blocks(), g.grain(), [&](int64_t lo, int64_t hi) {
    SppfScratch<A> s(g.H, g.W, g.L, r, true);
    const int64_t n_el = HW * g.L;
    for (int64_t b = lo; b < hi; ++b) {
      const BlockId id = block_id(g, b);
      Strides xs, gs;
      const T* xb = tensor_block(x, g, g.C, id.n, id.c0, xs);
      load_block(xb, xs, g.H, g.W, g.L, id.lanes, s.P.data() + s.r * s.rowP, s.rowP, s.r);
      const bool nans = has_nan(s.P.data(), static_cast<int64_t>(s.P.size()));
      for (int64_t level = 0; level < 3; ++level) {  // replay the chain, keeping each level's argmax
        int32_t* idx = s.IDX.data() + level * s.n;
        if (nans) {
          max_pool_argmax_in_place<A, true>(s, idx);
        } else {
          max_pool_argmax_in_place<A, false>(s, idx);
        }
      }
      // G: gradient reaching the output of the current level; walk back y3 -> y2 -> y1 -> x.
      const T* g3 = tensor_block(grad, g, 4 * g.C, id.n, 3 * g.C + id.c0, gs);
      load_block(g3, gs, g.H, g.W, g.L, id.lanes, s.G.data(), s.rowW, 0);
      for (int64_t level = 2; level >= 0; --level) {
        const int32_t* idx = s.IDX.data() + level * s.n;
        std::fill(s.Gin.begin(), s.Gin.end(), A(0));
        A* gin = s.Gin.data();
        const A* gout = s.G.data();
        for (int64_t h = 0; h < g.H; ++h)  // torch's max_pool2d backward order: outputs row-major
          for (int64_t w = 0; w < g.W; ++w) {
            const int32_t* ir = idx + h * s.rowP + (w + r) * g.L;
            const A* go = gout + (h * g.W + w) * g.L;
            if (g.L == 1) {  // NCHW: one plane (a fixed-length lane loop, not one of run-time length 1)
              gin[ir[0]] += go[0];
            } else {
              // the lanes' targets are distinct (lane l adds into lane l), so they may go as one vector
#pragma omp simd
              for (int64_t l = 0; l < g.L; ++l) gin[static_cast<int64_t>(ir[l]) * g.L + l] += go[l];
            }
          }
        // plus the gradient of this level's input as a slice of the concatenated output
        const T* gd = tensor_block(grad, g, 4 * g.C, id.n, level * g.C + id.c0, gs);
        load_block(gd, gs, g.H, g.W, g.L, id.lanes, s.G.data(), s.rowW, 0);
        for (int64_t j = 0; j < n_el; ++j) s.G[j] = gin[j] + s.G[j];
      }
      Strides xo;
      T* gxb = tensor_block(gx, g, g.C, id.n, id.c0, xo);
      store_block(s.G.data(), g.H, g.W, s.rowW, g.L, id.lanes, gxb, xo);
    }
  });
}

// ------------------------------------------------------------------------------------------------ SPP

struct Bin {
  int64_t h0, h1, w0, w1, out;  // rows [h0, h1), cols [w0, w1); output index of channel 0 (add c * l * l)
  int64_t ll;                   // l * l: output stride between channels inside the level's block
};

// Every bin of every level, in output order. Output index of (n, c, bin): n * C * S + bin.out + c * bin.ll.
std::vector<Bin> make_bins(int64_t C, int64_t H, int64_t W, const std::vector<int64_t>& levels) {
  std::vector<Bin> bins;
  int64_t off = 0;
  for (int64_t l : levels) {
    for (int64_t i = 0; i < l; ++i)
      for (int64_t j = 0; j < l; ++j)
        bins.push_back({(i * H) / l, ((i + 1) * H + l - 1) / l, (j * W) / l, ((j + 1) * W + l - 1) / l,
                        off + i * l + j, l * l});
    off += C * l * l;
  }
  return bins;
}

// LN: lanes per block as a compile-time constant, so the per-bin lane loops are fixed-length vector code.
template <typename T, int64_t LN>
void spp_forward_impl(const T* x, T* out, const Layout& g, const std::vector<Bin>& bins, int64_t S, bool avg) {
  using A = at::opmath_type<T>;
  constexpr int64_t L = LN;
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, g.blocks(), g.grain(), [&](int64_t lo, int64_t hi) {
    std::vector<A> X(HW * L);
    A acc[L];
    for (int64_t b = lo; b < hi; ++b) {
      const BlockId id = block_id(g, b);
      Strides xs;
      load_block(tensor_block(x, g, g.C, id.n, id.c0, xs), xs, g.H, g.W, L, id.lanes, X.data(), g.W * L, 0);
      T* ob = out + id.n * g.C * S;
      for (const Bin& bn : bins) {
        if (avg) {
          std::fill(acc, acc + L, A(0));
          for (int64_t h = bn.h0; h < bn.h1; ++h)
            for (int64_t w = bn.w0; w < bn.w1; ++w) {
              const A* q = X.data() + (h * g.W + w) * L;
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) acc[l] += q[l];
            }
          const A kh = static_cast<A>(bn.h1 - bn.h0), kw = static_cast<A>(bn.w1 - bn.w0);
          for (int64_t l = 0; l < L; ++l) acc[l] = acc[l] / kh / kw;  // torch: sum / kh / kw
        } else {
          std::fill(acc, acc + L, -std::numeric_limits<A>::infinity());
          for (int64_t h = bn.h0; h < bn.h1; ++h)
            for (int64_t w = bn.w0; w < bn.w1; ++w) {
              const A* q = X.data() + (h * g.W + w) * L;
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) acc[l] = takes(q[l], acc[l]) ? q[l] : acc[l];
            }
        }
        for (int64_t l = 0; l < id.lanes; ++l) ob[bn.out + (id.c0 + l) * bn.ll] = static_cast<T>(acc[l]);
      }
    }
  });
}

template <typename T, int64_t LN>
void spp_backward_impl(const T* grad, const T* x, T* gx, const Layout& g, const std::vector<Bin>& bins, int64_t S,
                       bool avg) {
  using A = at::opmath_type<T>;
  constexpr int64_t L = LN;
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, g.blocks(), g.grain(), [&](int64_t lo, int64_t hi) {
    std::vector<A> X(avg ? 0 : HW * L), GX(HW * L);
    A m[L], gb[L];
    int32_t arg[L];
    for (int64_t b = lo; b < hi; ++b) {
      const BlockId id = block_id(g, b);
      Strides xs;
      if (!avg) load_block(tensor_block(x, g, g.C, id.n, id.c0, xs), xs, g.H, g.W, L, id.lanes, X.data(), g.W * L, 0);
      std::fill(GX.begin(), GX.end(), A(0));
      const T* gr = grad + id.n * g.C * S;
      for (const Bin& bn : bins) {
        for (int64_t l = 0; l < L; ++l) gb[l] = l < id.lanes ? static_cast<A>(gr[bn.out + (id.c0 + l) * bn.ll]) : A(0);
        if (avg) {  // torch: grad / kh / kw added to every pixel of the bin
          const A kh = static_cast<A>(bn.h1 - bn.h0), kw = static_cast<A>(bn.w1 - bn.w0);
          for (int64_t l = 0; l < L; ++l) gb[l] = gb[l] / kh / kw;
          for (int64_t h = bn.h0; h < bn.h1; ++h)
            for (int64_t w = bn.w0; w < bn.w1; ++w) {
              A* q = GX.data() + (h * g.W + w) * L;
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) q[l] += gb[l];
            }
        } else {  // argmax by torch's rule, then route the bin's gradient there
          std::fill(m, m + L, -std::numeric_limits<A>::infinity());
          std::fill(arg, arg + L, static_cast<int32_t>(bn.h0 * g.W + bn.w0));
          for (int64_t h = bn.h0; h < bn.h1; ++h)
            for (int64_t w = bn.w0; w < bn.w1; ++w) {
              const int32_t p = static_cast<int32_t>(h * g.W + w);
              const A* q = X.data() + p * L;
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) {
                const bool c = takes(q[l], m[l]);
                m[l] = c ? q[l] : m[l];
                arg[l] = c ? p : arg[l];
              }
            }
          for (int64_t l = 0; l < L; ++l) GX[static_cast<int64_t>(arg[l]) * L + l] += gb[l];
        }
      }
      Strides os;
      store_block(GX.data(), g.H, g.W, g.W * L, L, id.lanes, tensor_block(gx, g, g.C, id.n, id.c0, os), os);
    }
  });
}

void check_4d(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensor expected");
  TORCH_CHECK(x.dim() == 4, what, ": (N, C, H, W) input expected");
}

int64_t total_bins(const std::vector<int64_t>& levels) {
  int64_t S = 0;
  for (int64_t l : levels) {
    TORCH_CHECK(l > 0, "fastnn spp_pool: levels must be positive");
    S += l * l;
  }
  return S;
}

}  // namespace

at::Tensor sppf_pool(const at::Tensor& x_in, int64_t k) {
  check_4d(x_in, "fastnn sppf_pool");
  TORCH_CHECK(k > 0 && k % 2 == 1, "fastnn sppf_pool: k must be a positive odd integer");
  const Layout g = make_layout(x_in, 1);
  const at::Tensor x = in_layout(x_in, g.cl);
  at::Tensor out = new_4d(g.N, 4 * g.C, g.H, g.W, g.cl, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sppf_pool", [&] {
    sppf_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, k / 2);
  });
  return out;
}

at::Tensor sppf_pool_backward(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t k) {
  check_4d(x_in, "fastnn sppf_pool_backward");
  TORCH_CHECK(k > 0 && k % 2 == 1, "fastnn sppf_pool_backward: k must be a positive odd integer");
  const Layout g = make_layout(x_in, 1);
  const at::Tensor x = in_layout(x_in, g.cl);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({g.N, 4 * g.C, g.H, g.W}),
              "fastnn sppf_pool_backward: grad must be (N, 4C, H, W)");
  const at::Tensor grad = in_layout(grad_in.to(x.scalar_type()), g.cl);
  at::Tensor gx = new_4d(g.N, g.C, g.H, g.W, g.cl, x.options());
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sppf_pool_backward", [&] {
    sppf_backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g, k / 2);
  });
  return gx;
}

at::Tensor spp_pool(const at::Tensor& x_in, const std::vector<int64_t>& levels, bool avg) {
  check_4d(x_in, "fastnn spp_pool");
  const int64_t S = total_bins(levels);
  const Layout g = make_layout(x_in, kLanesPlanesSpp);
  TORCH_CHECK(g.H > 0 && g.W > 0, "fastnn spp_pool: H and W must be positive");
  const at::Tensor x = in_layout(x_in, g.cl);
  at::Tensor out = new_output({g.N, g.C * S}, x.options());
  if (out.numel() == 0) return out;
  const auto bins = make_bins(g.C, g.H, g.W, levels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spp_pool", [&] {
    if (g.L == kLanesChannelsLast)
      spp_forward_impl<scalar_t, kLanesChannelsLast>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, bins, S, avg);
    else
      spp_forward_impl<scalar_t, kLanesPlanesSpp>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, bins, S, avg);
  });
  return out;
}

at::Tensor spp_pool_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const std::vector<int64_t>& levels,
                             bool avg) {
  check_4d(x_in, "fastnn spp_pool_backward");
  const int64_t S = total_bins(levels);
  const Layout g = make_layout(x_in, kLanesPlanesSpp);
  TORCH_CHECK(g.H > 0 && g.W > 0, "fastnn spp_pool_backward: H and W must be positive");
  const at::Tensor x = in_layout(x_in, g.cl);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({g.N, g.C * S}), "fastnn spp_pool_backward: grad must be (N, C * S)");
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor gx = new_4d(g.N, g.C, g.H, g.W, g.cl, x.options());
  if (gx.numel() == 0) return gx;
  const auto bins = make_bins(g.C, g.H, g.W, levels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spp_pool_backward", [&] {
    if (g.L == kLanesChannelsLast)
      spp_backward_impl<scalar_t, kLanesChannelsLast>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                      gx.data_ptr<scalar_t>(), g, bins, S, avg);
    else
      spp_backward_impl<scalar_t, kLanesPlanesSpp>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                   gx.data_ptr<scalar_t>(), g, bins, S, avg);
  });
  return gx;
}

}  // namespace fastnn::cpu
