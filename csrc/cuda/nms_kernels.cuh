// CUDA NMS kernels (no ATen here). Launchers: nms_cuda.cu.
//
// Layout: boxes sorted by (class, descending score), each class segment padded to a multiple of 64
// positions, so every 64-box block belongs to one segment. A segment of nb blocks owns an upper-triangular
// suppression bitmask: row r of block b stores the words for column blocks b..nb-1, rows of block b
// starting at word 64 * (b * nb - b * (b - 1) / 2). Bit c of word (r, w) says box 64*b + r suppresses box
// 64*w + c (only boxes later in score order are marked). Same layout as the Triton kernels.
//
// Each row also has a summary word: bit k set when some off-diagonal word of the row in chunk k is non-zero
// (a chunk is 32 words, or more for classes over 131072 boxes so that 64 chunks cover the row). Most words
// are zero (a box overlaps few others), so the sweep reads only the chunks that matter.
#pragma once
#include <cstdint>

#include "../common/box_math.h"

namespace fastnn::cuda {

constexpr int kNmsBlock = 64;        // boxes per block: one bit each in a 64-bit word
constexpr int kMaskColsPerCta = 4;   // 4 consecutive words per thread = one full 32-byte sector
constexpr int kSweepThreads = 512;   // 16 warps share a block's (kept row, chunk) loads
constexpr int kSweepQueue = 4;       // loads each lane keeps in flight in the sweep

// Segment tables. A single segment (plain nms) passes null tables and its block count in single_nb.
struct Segments {
  const int64_t* block_segment;  // (B,) segment of each block
  const int64_t* first_block;    // (S,)
  const int64_t* num_blocks;     // (S,)
  const int64_t* mask_offset;    // (S,) first mask word
  int64_t single_nb;

  __device__ __forceinline__ int64_t segment_of(int64_t g) const { return block_segment ? block_segment[g] : 0; }
  __device__ __forceinline__ int64_t first(int64_t s) const { return first_block ? first_block[s] : 0; }
  __device__ __forceinline__ int64_t blocks(int64_t s) const { return num_blocks ? num_blocks[s] : single_nb; }
  __device__ __forceinline__ int64_t offset(int64_t s) const { return mask_offset ? mask_offset[s] : 0; }
};

__device__ __forceinline__ int64_t tri_row_base(int64_t b, int64_t nb) {
  return kNmsBlock * (b * nb - b * (b - 1) / 2);
}

// log2 of the summary chunk size in words for a segment of nb blocks: 32 words, doubled until 64 chunks
// cover a row (word offsets 0..nb-1).
__device__ __forceinline__ int summary_chunk_log2(int64_t nb) {
  int l = 5;
  while (((nb - 1) >> l) >= 64) ++l;
  return l;
}

// grid ceil(P / 256), block 256. Writes the boxes in layout order (zeros where invalid) and the valid bits:
// position p holds box pos_box[p] (or order[p] for p < n when pos_box is null); a box is valid when it
// exists and no coordinate or score is NaN.
template <typename T>
__global__ void nms_prepare_kernel(const T* __restrict__ boxes, const T* __restrict__ scores,
                                   const int64_t* __restrict__ order, const int64_t* __restrict__ pos_box, int64_t n,
                                   int64_t positions, T* __restrict__ laid, uint32_t* __restrict__ valid_halves) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bool valid = false;
  if (p < positions) {
    const int64_t box = pos_box ? pos_box[p] : (p < n ? order[p] : -1);
    T v[4] = {T(0), T(0), T(0), T(0)};
    if (box >= 0) {
      const T* q = boxes + 4 * box;
      v[0] = q[0]; v[1] = q[1]; v[2] = q[2]; v[3] = q[3];
      const T s = scores[box];
      valid = v[0] == v[0] && v[1] == v[1] && v[2] == v[2] && v[3] == v[3] && s == s;
      if (!valid) v[0] = v[1] = v[2] = v[3] = T(0);
    }
    T* out = laid + 4 * p;
    out[0] = v[0]; out[1] = v[1]; out[2] = v[2]; out[3] = v[3];
  }
  const unsigned ballot = __ballot_sync(0xffffffffu, valid);
  if ((threadIdx.x & 31) == 0 && p < positions) valid_halves[p >> 5] = ballot;
}

// grid (total_blocks, ceil(max_blocks_per_segment / kMaskColsPerCta)), block kNmsBlock threads.
// CTA (g, y) computes the words of row block g against column blocks b + y*kMaskColsPerCta + [0, 4), and
// sets the rows' summary bits (summary zeroed by the caller).
template <typename T>
__global__ void __launch_bounds__(kNmsBlock) nms_mask_kernel(const T* __restrict__ boxes, Segments seg, T threshold,
                                                              uint64_t* __restrict__ mask,
                                                              unsigned long long* __restrict__ summary) {
  const int64_t g = blockIdx.x;
  const int64_t s = seg.segment_of(g);
  const int64_t nb = seg.blocks(s), first_block = seg.first(s);
  const int64_t b = g - first_block;
  const int64_t w_begin = b + static_cast<int64_t>(blockIdx.y) * kMaskColsPerCta;
  if (w_begin >= nb) return;
  const int ncols = nb - w_begin < kMaskColsPerCta ? static_cast<int>(nb - w_begin) : kMaskColsPerCta;

  __shared__ T cols[kMaskColsPerCta * kNmsBlock][5];
  const int64_t col_pos0 = (first_block + w_begin) * kNmsBlock;
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
  uint64_t* out = mask + seg.offset(s) + tri_row_base(b, nb) + r * (nb - b) + (w_begin - b);
  uint64_t off_diagonal = 0;
  for (int c = 0; c < ncols; ++c) {
    // On the diagonal block only later boxes (k > r) are marked.
    const bool diagonal = w_begin + c == b;
    uint64_t word = 0;
    for (int k = diagonal ? r + 1 : 0; k < kNmsBlock; ++k) {
      const T* q = cols[c * kNmsBlock + k];
      if (iou_exceeds_branchy(x1, y1, x2, y2, area, q[0], q[1], q[2], q[3], q[4], threshold)) word |= 1ull << k;
    }
    out[c] = word;
    if (!diagonal) off_diagonal |= word;
  }
  // The CTA's 4 words share one chunk (chunks are multiples of 32 words, w_begin - b a multiple of 4).
  if (off_diagonal) atomicOr(summary + g * kNmsBlock + r, 1ull << ((w_begin - b) >> summary_chunk_log2(nb)));
}

// grid (num_segments), block kSweepThreads. The greedy sweep of one segment, block by block:
//  1. warp 0 resolves the 64 boxes of block b in order (kept unless removed by an earlier kept box); the
//     block's diagonal words, valid bits and summaries were prefetched during the previous step;
//  2. the (kept row, non-zero chunk) pairs are dealt round-robin to the warps; each lane keeps up to
//     kSweepQueue coalesced loads in flight and ORs the non-zero words into the removed-bits of later
//     blocks (shared-memory atomics, rarely taken).
// removed lives in shared memory when it fits (kSharedRemoved), else in removed_global (one word per
// block). keep_words gets the kept bits of every block. With a single segment and `out` set, the kept
// boxes' indices order[p] are also written to out in order and their count to *out_count.
template <bool kSharedRemoved>
__global__ void __launch_bounds__(kSweepThreads) nms_sweep_kernel(
    const uint64_t* __restrict__ mask, const unsigned long long* __restrict__ summary,
    const uint64_t* __restrict__ valid_words, Segments seg, uint64_t* __restrict__ removed_global,
    uint64_t* __restrict__ keep_words, const int64_t* __restrict__ order, int64_t* __restrict__ out,
    int64_t* __restrict__ out_count) {
  extern __shared__ unsigned long long removed_shared[];
  __shared__ unsigned long long tasks[kNmsBlock];  // summary of each kept row of the block, 0 if not kept
  __shared__ uint64_t kept_now;
  const int64_t s = blockIdx.x;
  const int64_t first = seg.first(s), nb = seg.blocks(s), offset = seg.offset(s);
  unsigned long long* removed =
      kSharedRemoved ? removed_shared : reinterpret_cast<unsigned long long*>(removed_global) + first;
  for (int64_t w = threadIdx.x; w < nb; w += blockDim.x) removed[w] = 0;
  const int chunk_log2 = summary_chunk_log2(nb);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  uint64_t d_lo = 0, d_hi = 0, valid = 0, sum_lo = 0, sum_hi = 0;
  int64_t kept_total = 0;
  if (warp == 0) {  // prefetch block 0
    d_lo = mask[offset + lane * nb];
    d_hi = mask[offset + (lane + 32) * nb];
    sum_lo = summary[first * kNmsBlock + lane];
    sum_hi = summary[first * kNmsBlock + lane + 32];
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
      tasks[lane] = ((kept >> lane) & 1ull) ? sum_lo : 0;
      tasks[lane + 32] = ((kept >> (lane + 32)) & 1ull) ? sum_hi : 0;
      if (lane == 0) {
        kept_now = kept;
        keep_words[first + b] = kept;
      }
      if (out != nullptr) {  // compaction, in score order
        const uint64_t below = (1ull << lane) - 1;
        const int64_t p0 = (first + b) * kNmsBlock;
        if ((kept >> lane) & 1ull) out[kept_total + __popcll(kept & below)] = order[p0 + lane];
        if ((kept >> (lane + 32)) & 1ull)
          out[kept_total + __popcll(kept & 0xffffffffull) + __popcll((kept >> 32) & below)] = order[p0 + lane + 32];
        kept_total += __popcll(kept);
      }
      if (b + 1 < nb) {  // the next block's words load while the OR step runs
        const int64_t next0 = offset + tri_row_base(b + 1, nb), next_stride = nb - b - 1;
        d_lo = mask[next0 + lane * next_stride];
        d_hi = mask[next0 + (lane + 32) * next_stride];
        sum_lo = summary[(first + b + 1) * kNmsBlock + lane];
        sum_hi = summary[(first + b + 1) * kNmsBlock + lane + 32];
        valid = valid_words[first + b + 1];
      }
    }
    __syncthreads();

    // (kept row i, sub-chunk) tasks, numbered in a fixed order; task t goes to warp t % num_warps.
    const uint64_t kept = kept_now;
    const int sub_per_chunk = 1 << (chunk_log2 - 5);
    int t = 0, queued = 0;
    int64_t q_row[kSweepQueue], q_word[kSweepQueue];  // row index in block, first word offset (from b)
    auto flush = [&]() {
      uint64_t v[kSweepQueue];
#pragma unroll
      for (int u = 0; u < kSweepQueue; ++u) {
        v[u] = 0;
        if (u < queued) {
          const int64_t off = q_word[u] + lane;  // word offset in the row: column block b + off
          if (off > 0 && off < stride) v[u] = mask[row0 + q_row[u] * stride + off];
        }
      }
#pragma unroll
      for (int u = 0; u < kSweepQueue; ++u)
        if (v[u]) atomicOr(removed + b + q_word[u] + lane, static_cast<unsigned long long>(v[u]));
      queued = 0;
    };
    for (uint64_t k = kept; k != 0; k &= k - 1) {
      const int i = __ffsll(static_cast<long long>(k)) - 1;
      for (unsigned long long c = tasks[i]; c != 0; c &= c - 1) {
        const int chunk = __ffsll(static_cast<long long>(c)) - 1;
        for (int sub = 0; sub < sub_per_chunk; ++sub, ++t) {
          if (t % num_warps != warp) continue;
#pragma unroll
          for (int u = 0; u < kSweepQueue; ++u) {  // constant indices keep the queue in registers
            if (u == queued) {
              q_row[u] = i;
              q_word[u] = (static_cast<int64_t>(chunk) << chunk_log2) + 32 * sub;
            }
          }
          if (++queued == kSweepQueue) flush();
        }
      }
    }
    if (queued) flush();
    __syncthreads();
  }
  if (out_count != nullptr && threadIdx.x == 0) *out_count = kept_total;
}

// grid ceil(P / 256), block 256: keep_rank[pos_rank[p]] = 1 for every kept position p (ranks are distinct).
__global__ void nms_scatter_keep_kernel(const uint64_t* __restrict__ keep_words, const int64_t* __restrict__ pos_rank,
                                        int64_t positions, uint8_t* __restrict__ keep_rank) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= positions) return;
  if ((keep_words[p >> 6] >> (p & 63)) & 1ull) keep_rank[pos_rank[p]] = 1;
}

}  // namespace fastnn::cuda
