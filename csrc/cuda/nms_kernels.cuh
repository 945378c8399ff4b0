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
//  1. warp 0 resolves the 64 boxes of block b in order (kept unless removed by an earlier kept box) and
//     lists the (kept row, non-zero chunk) pairs in shared memory (a warp prefix sum places each lane's);
//     the block's diagonal words, valid bits, summaries and indices were prefetched during the previous
//     step;
//  2. every warp takes every num_warps-th listed 32-word load, kSweepQueue of them in flight per lane, and
//     ORs the non-zero words into the removed-bits of later blocks (shared atomics, rarely taken).
// removed lives in shared memory when it fits (kSharedRemoved), else in removed_global (one word per
// block). keep_words gets the kept bits of every block. With a single segment and `out` set, the kept
// boxes' indices order[p] (p < order_len) are also written to out in order and their count to *out_count.
template <bool kSharedRemoved>
__global__ void __launch_bounds__(kSweepThreads) nms_sweep_kernel(
    const uint64_t* __restrict__ mask, const unsigned long long* __restrict__ summary,
    const uint64_t* __restrict__ valid_words, Segments seg, uint64_t* __restrict__ removed_global,
    uint64_t* __restrict__ keep_words, const int64_t* __restrict__ order, int64_t order_len,
    int64_t* __restrict__ out, int64_t* __restrict__ out_count) {
  extern __shared__ unsigned long long removed_shared[];
  __shared__ uint16_t task_list[kNmsBlock * 64];  // (chunk << 6) | row, for each kept row's non-zero chunk
  __shared__ int task_count;
  const int64_t s = blockIdx.x;
  const int64_t first = seg.first(s), nb = seg.blocks(s), offset = seg.offset(s);
  unsigned long long* removed =
      kSharedRemoved ? removed_shared : reinterpret_cast<unsigned long long*>(removed_global) + first;
  for (int64_t w = threadIdx.x; w < nb; w += blockDim.x) removed[w] = 0;
  const int chunk_log2 = summary_chunk_log2(nb);
  const int sub_log2 = chunk_log2 - 5;  // 32-word loads per chunk, log2

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  uint64_t d_lo = 0, d_hi = 0, valid = 0, sum_lo = 0, sum_hi = 0;
  int64_t ord_lo = 0, ord_hi = 0, kept_total = 0;
  if (warp == 0) {  // prefetch block 0
    d_lo = mask[offset + lane * nb];
    d_hi = mask[offset + (lane + 32) * nb];
    sum_lo = summary[first * kNmsBlock + lane];
    sum_hi = summary[first * kNmsBlock + lane + 32];
    valid = valid_words[first];
    if (out != nullptr) {
      ord_lo = lane < order_len ? order[lane] : -1;
      ord_hi = lane + 32 < order_len ? order[lane + 32] : -1;
    }
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
      const bool keep_lo = (kept >> lane) & 1ull, keep_hi = (kept >> (lane + 32)) & 1ull;
      // List this lane's tasks (rows lane and lane + 32) after those of the lanes below it.
      const unsigned long long m_lo = keep_lo ? sum_lo : 0ull, m_hi = keep_hi ? sum_hi : 0ull;
      const int mine = __popcll(m_lo) + __popcll(m_hi);
      int inclusive = mine;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += v;
      }
      int slot = inclusive - mine;
      for (unsigned long long c = m_lo; c != 0; c &= c - 1)
        task_list[slot++] = static_cast<uint16_t>(((__ffsll(static_cast<long long>(c)) - 1) << 6) | lane);
      for (unsigned long long c = m_hi; c != 0; c &= c - 1)
        task_list[slot++] = static_cast<uint16_t>(((__ffsll(static_cast<long long>(c)) - 1) << 6) | (lane + 32));
      if (lane == 31) task_count = inclusive;
      if (lane == 0) keep_words[first + b] = kept;
      if (out != nullptr) {  // compaction, in score order
        const uint64_t below = (1ull << lane) - 1;
        if (keep_lo) out[kept_total + __popcll(kept & below)] = ord_lo;
        if (keep_hi) out[kept_total + __popcll(kept & 0xffffffffull) + __popcll((kept >> 32) & below)] = ord_hi;
        kept_total += __popcll(kept);
      }
      if (b + 1 < nb) {  // the next block's words load while the OR step runs
        const int64_t next0 = offset + tri_row_base(b + 1, nb), next_stride = nb - b - 1;
        d_lo = mask[next0 + lane * next_stride];
        d_hi = mask[next0 + (lane + 32) * next_stride];
        sum_lo = summary[(first + b + 1) * kNmsBlock + lane];
        sum_hi = summary[(first + b + 1) * kNmsBlock + lane + 32];
        valid = valid_words[first + b + 1];
        if (out != nullptr) {
          const int64_t p = (b + 1) * kNmsBlock + lane;
          ord_lo = p < order_len ? order[p] : -1;
          ord_hi = p + 32 < order_len ? order[p + 32] : -1;
        }
      }
    }
    __syncthreads();

    const int loads = task_count << sub_log2;
    for (int base = warp; base < loads; base += num_warps * kSweepQueue) {
      uint64_t v[kSweepQueue];
      int64_t off[kSweepQueue];
#pragma unroll
      for (int u = 0; u < kSweepQueue; ++u) {
        v[u] = 0;
        off[u] = 0;
        const int idx = base + u * num_warps;
        if (idx < loads) {
          const int task = task_list[idx >> sub_log2];
          const int row = task & 63;
          off[u] = ((static_cast<int64_t>(task >> 6)) << chunk_log2) + 32 * (idx & ((1 << sub_log2) - 1)) + lane;
          if (off[u] > 0 && off[u] < stride) v[u] = mask[row0 + row * stride + off[u]];
        }
      }
#pragma unroll
      for (int u = 0; u < kSweepQueue; ++u)
        if (v[u]) atomicOr(removed + b + off[u], static_cast<unsigned long long>(v[u]));
    }
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
