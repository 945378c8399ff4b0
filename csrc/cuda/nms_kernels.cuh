// CUDA NMS kernels over the segmented layout built by fastnn/ops/boxes.py (no ATen here).
//
// Layout: boxes sorted by (class, descending score), each class segment padded to a multiple of 64
// positions, so every 64-box block belongs to one segment. A segment of nb blocks owns an upper-triangular
// suppression bitmask: row r of block b stores the words for column blocks b..nb-1, rows of block b
// starting at word 64 * (b * nb - b * (b - 1) / 2). Bit c of word (r, w) says box 64*b + r suppresses box
// 64*w + c (only boxes later in score order are marked).
#pragma once
#include <cstdint>

#include "../common/box_math.h"

namespace fastnn::cuda {

constexpr int kNmsBlock = 64;        // boxes per block: one bit each in a 64-bit word
constexpr int kMaskColsPerCta = 4;   // 4 consecutive words per thread = one full 32-byte sector
constexpr int kSweepThreads = 256;  // 8 warps stream 8 kept rows at a time

__device__ __forceinline__ int64_t tri_row_base(int64_t b, int64_t nb) {
  return kNmsBlock * (b * nb - b * (b - 1) / 2);
}

// grid (total_blocks, ceil(max_blocks_per_segment / kMaskColsPerCta)), block kNmsBlock threads.
// CTA (g, y) computes the words of row block g against column blocks b + y*kMaskColsPerCta + [0, 4).
template <typename T>
__global__ void __launch_bounds__(kNmsBlock) nms_mask_kernel(
    const T* __restrict__ boxes, const int64_t* __restrict__ block_segment,
    const int64_t* __restrict__ seg_first_block, const int64_t* __restrict__ seg_num_blocks,
    const int64_t* __restrict__ seg_mask_offset, T threshold, uint64_t* __restrict__ mask) {
  const int64_t g = blockIdx.x;
  const int64_t s = block_segment[g];
  const int64_t nb = seg_num_blocks[s];
  const int64_t b = g - seg_first_block[s];
  const int64_t w_begin = b + static_cast<int64_t>(blockIdx.y) * kMaskColsPerCta;
  if (w_begin >= nb) return;
  const int ncols = nb - w_begin < kMaskColsPerCta ? static_cast<int>(nb - w_begin) : kMaskColsPerCta;

  __shared__ T cols[kMaskColsPerCta * kNmsBlock][5];
  const int64_t col_pos0 = (seg_first_block[s] + w_begin) * kNmsBlock;
  for (int k = threadIdx.x; k < ncols * kNmsBlock; k += blockDim.x) {
    const T* p = boxes + 4 * (col_pos0 + k);
    cols[k][0] = p[0]; cols[k][1] = p[1]; cols[k][2] = p[2]; cols[k][3] = p[3];
    cols[k][4] = box_area(p[0], p[1], p[2], p[3]);
  }
  __syncthreads();

  const int r = threadIdx.x;
  const T* me = boxes + 4 * (g * kNmsBlock + r);
  const T x1 = me[0], y1 = me[1], x2 = me[2], y2 = me[3];
  const T area = box_area(x1, y1, x2, y2);
  uint64_t* out = mask + seg_mask_offset[s] + tri_row_base(b, nb) + r * (nb - b) + (w_begin - b);
  for (int c = 0; c < ncols; ++c) {
    // On the diagonal block only later boxes (c > r) are marked.
    const int first = (w_begin + c == b) ? r + 1 : 0;
    uint64_t word = 0;
    for (int k = first; k < kNmsBlock; ++k) {
      const T* q = cols[c * kNmsBlock + k];
      if (iou_exceeds_branchy(x1, y1, x2, y2, area, q[0], q[1], q[2], q[3], q[4], threshold)) word |= 1ull << k;
    }
    out[c] = word;
  }
}

// grid (num_segments), block kSweepThreads. The greedy sweep of one segment, block by block:
//  1. warp 0 resolves the 64 boxes of block b in order (kept unless removed by an earlier kept box), with
//     the block's diagonal mask words prefetched during the previous step;
//  2. each warp takes some kept boxes and streams their mask rows (coalesced, independent loads), ORing
//     the non-zero words into the removed-bits of later blocks (atomics, rarely taken: most words are 0).
// `removed` lives in shared memory when it fits (kSharedRemoved), else in `removed_global`.
template <bool kSharedRemoved>
__global__ void __launch_bounds__(kSweepThreads) nms_sweep_kernel(
    const uint64_t* __restrict__ mask, const uint64_t* __restrict__ valid_words,
    const int64_t* __restrict__ seg_first_block, const int64_t* __restrict__ seg_num_blocks,
    const int64_t* __restrict__ seg_mask_offset, uint64_t* __restrict__ removed_global,
    uint64_t* __restrict__ keep_words) {
  extern __shared__ uint64_t removed_shared[];
  __shared__ uint64_t kept_now;
  const int64_t s = blockIdx.x;
  const int64_t first = seg_first_block[s], nb = seg_num_blocks[s], offset = seg_mask_offset[s];
  uint64_t* removed = kSharedRemoved ? removed_shared : removed_global + first;
  for (int64_t w = threadIdx.x; w < nb; w += blockDim.x) removed[w] = 0;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  uint64_t d_lo = 0, d_hi = 0, valid = 0;
  if (warp == 0) {  // prefetch block 0
    d_lo = mask[offset + lane * nb];
    d_hi = mask[offset + (lane + 32) * nb];
    valid = valid_words[first];
  }
  __syncthreads();

  for (int64_t b = 0; b < nb; ++b) {
    const int64_t row0 = offset + tri_row_base(b, nb), stride = nb - b;
    if (warp == 0) {
      // Global scratch is read around L1 (__ldcg): the atomics that updated it happened in L2.
      uint64_t cur = (kSharedRemoved ? removed[b] : __ldcg(removed + b)) | ~valid;
      uint64_t kept = 0;
      if (cur != ~0ull) {
#pragma unroll
        for (int i = 0; i < kNmsBlock; ++i) {
          const uint64_t di = __shfl_sync(0xffffffffu, i < 32 ? d_lo : d_hi, i & 31);
          if (!((cur >> i) & 1ull)) {
            kept |= 1ull << i;
            cur |= di;
          }
        }
      }
      if (lane == 0) {
        kept_now = kept;
        keep_words[first + b] = kept;
      }
      if (b + 1 < nb) {  // the next block's diagonal words load while the OR step runs
        const int64_t next0 = offset + tri_row_base(b + 1, nb), next_stride = nb - b - 1;
        d_lo = mask[next0 + lane * next_stride];
        d_hi = mask[next0 + (lane + 32) * next_stride];
        valid = valid_words[first + b + 1];
      }
    }
    __syncthreads();
    const uint64_t kept = kept_now;
    int j = 0;
    for (uint64_t k = kept; k != 0; k &= k - 1, ++j) {
      if (j % num_warps != warp) continue;
      const uint64_t* row = mask + row0 + (__ffsll(static_cast<long long>(k)) - 1) * stride - b;
      for (int64_t w = b + 1 + lane; w < nb; w += 32) {
        const uint64_t bits = row[w];
        if (bits) atomicOr(reinterpret_cast<unsigned long long*>(removed + w), static_cast<unsigned long long>(bits));
      }
    }
    __syncthreads();
  }
}

}  // namespace fastnn::cuda
