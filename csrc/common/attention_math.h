// Attention helpers shared by the CPU and CUDA kernels: one formula, compiled twice.
//
//  - fmix32 / dropout_keep: the counter-based dropout mask of fastnn/reference/attention.py
//    (MurmurHash3's finaliser; 24-bit threshold), bit-identical on every backend and in the backward.
//  - the causal / sliding-window visibility rule, as the contiguous range of keys a query row sees.
#pragma once

#include "hd.h"

#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <cstdint>
#endif

namespace fastnn {
namespace attn {

// MurmurHash3's 32-bit finaliser (all arithmetic mod 2^32).
FASTNN_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Integer threshold on 24 hash bits: keep when (hash >> 8) >= threshold. Python's round() is
// round-half-to-even, as rint in the default rounding mode; p * 2^24 is exact in double.
FASTNN_HD uint32_t dropout_threshold(double dropout_p) {
  double t = rint(dropout_p * 16777216.0);
  if (t >= 16777216.0) return 16777216u;
  if (t <= 0.0) return 0u;
  return static_cast<uint32_t>(t);
}

// Per-row and per-column halves of the hash (each reused across a whole row / column of a tile).
// row = (h * total_q + global query index) mod 2^32, col = key index within its sequence.
FASTNN_HD uint32_t dropout_row_hash(uint32_t row, uint32_t seed_lo) { return fmix32(row ^ seed_lo); }
FASTNN_HD uint32_t dropout_col_hash(uint32_t col, uint32_t seed_hi) { return fmix32(col + seed_hi); }
FASTNN_HD bool dropout_keep_hashed(uint32_t row_hash, uint32_t col_hash, uint32_t threshold) {
  return (fmix32(row_hash + col_hash) >> 8) >= threshold;
}
FASTNN_HD bool dropout_keep(uint32_t row, uint32_t col, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold) {
  return dropout_keep_hashed(dropout_row_hash(row, seed_lo), dropout_col_hash(col, seed_hi), threshold);
}

// Visibility: key j is visible from query i (both local to their sequence) when
//   j >= i + off - window_left   (window_left >= 0)   and   j <= i + off + window_right (window_right >= 0),
// off = lk - lq for bottom-right alignment, 0 for top-left. -1 means unbounded.
FASTNN_HD bool key_visible(int64_t i, int64_t j, int64_t off, int64_t window_left, int64_t window_right) {
  return (window_left < 0 || j >= i + off - window_left) && (window_right < 0 || j <= i + off + window_right);
}

// The visible keys of query row i form the range [*lo, *hi) of [0, lk) (empty when *lo >= *hi).
FASTNN_HD void visible_range(int64_t i, int64_t lk, int64_t off, int64_t window_left, int64_t window_right,
                             int64_t* lo, int64_t* hi) {
  int64_t a = window_left >= 0 ? i + off - window_left : 0;
  int64_t b = window_right >= 0 ? i + off + window_right + 1 : lk;
  a = a < 0 ? 0 : (a > lk ? lk : a);
  b = b < 0 ? 0 : (b > lk ? lk : b);
  *lo = a;
  *hi = b;
}

}  // namespace attn
}  // namespace fastnn
