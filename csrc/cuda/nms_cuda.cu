// Launchers for the CUDA NMS kernels: take the torch stream, check every launch. Compiled with
// --fmad=false (setup.py) so the IoU matches the CPU kernels and torchvision bit for bit.
//
// The whole op runs here, in one call from Python, to keep the per-call overhead to a few launches:
//   sort by score -> [group by class] -> prepare (gather, valid bits) -> mask (+ row summaries) -> sweep
//   -> kept indices. Plain nms reads the host once (the kept count, to size the output); batched nms
//   also reads the class layout sizes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "../common/alloc.h"
#include "../common/box_math.h"
#include "../common/check.h"
#include "nms_kernels.cuh"

namespace fastnn::cuda {
namespace {

// Largest dynamic shared memory the sweep asks for before keeping the removed-bits in global memory.
constexpr int64_t kMaxSharedRemovedBytes = 200 * 1024;

void check_i64(const at::Tensor& t, const char* name) {
  FASTNN_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous(), "fastnn nms cuda: ", name,
               " must be a contiguous int64 CUDA tensor");
}

template <typename T>
void launch_prepare(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& order,
                    const int64_t* pos_box, int64_t n, const at::Tensor& laid, const at::Tensor& valid_words,
                    cudaStream_t stream) {
  const int64_t positions = laid.size(0);
  const unsigned grid = static_cast<unsigned>((positions + 255) / 256);
  nms_prepare_kernel<T><<<grid, 256, 0, stream>>>(
      boxes.data_ptr<T>(), scores.data_ptr<T>(), order.data_ptr<int64_t>(), pos_box, n, positions,
      laid.data_ptr<T>(), reinterpret_cast<uint32_t*>(valid_words.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_mask(const at::Tensor& laid, const Segments& seg, int64_t max_blocks, double threshold,
                 const at::Tensor& mask, const at::Tensor& summary, cudaStream_t stream) {
  const int64_t total_blocks = laid.size(0) / kNmsBlock;
  if (total_blocks == 0) return;
  FASTNN_CHECK(total_blocks < (int64_t(1) << 31), "fastnn nms: too many boxes");
  const int64_t grid_y = (max_blocks + kMaskColsPerCta - 1) / kMaskColsPerCta;
  FASTNN_CHECK(grid_y <= 65535, "fastnn nms: a class with more than ", 65535 * kMaskColsPerCta * kNmsBlock,
               " boxes is not supported");
  nms_mask_kernel<T><<<dim3(static_cast<unsigned>(total_blocks), static_cast<unsigned>(grid_y)), kNmsBlock, 0,
                       stream>>>(laid.data_ptr<T>(), seg, threshold_below<T>(threshold),
                                 reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()),
                                 reinterpret_cast<unsigned long long*>(summary.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_sweep(const at::Tensor& mask, const at::Tensor& summary, const at::Tensor& valid_words,
                  const Segments& seg, int64_t segments, int64_t max_blocks, const at::Tensor& keep_words,
                  const int64_t* order, int64_t order_len, int64_t* out, int64_t* out_count,
                  cudaStream_t stream) {
  const auto* m = reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>());
  const auto* sm = reinterpret_cast<const unsigned long long*>(summary.data_ptr<int64_t>());
  const auto* v = reinterpret_cast<const uint64_t*>(valid_words.data_ptr<int64_t>());
  auto* k = reinterpret_cast<uint64_t*>(keep_words.data_ptr<int64_t>());
  FASTNN_CHECK(segments < (int64_t(1) << 31), "fastnn nms: too many classes");
  const int64_t shared_bytes = max_blocks * static_cast<int64_t>(sizeof(uint64_t));
  if (shared_bytes <= kMaxSharedRemovedBytes) {
    if (shared_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(nms_sweep_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    nms_sweep_kernel<true><<<static_cast<unsigned>(segments), kSweepThreads, shared_bytes, stream>>>(
        m, sm, v, seg, nullptr, k, order, order_len, out, out_count);
  } else {
    at::Tensor removed = at::empty({keep_words.size(0)}, keep_words.options());
    nms_sweep_kernel<false><<<static_cast<unsigned>(segments), kSweepThreads, 0, stream>>>(
        m, sm, v, seg, reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), k, order, order_len, out,
        out_count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Class layout for batched NMS (see nms_kernels.cuh): returns segment tables, pos_box, pos_rank and sizes.
struct ClassLayout {
  at::Tensor block_segment, first_block, num_blocks, mask_offset, pos_box, pos_rank;
  int64_t segments, total_blocks, max_blocks, total_words;
};

ClassLayout class_layout(const at::Tensor& idxs, const at::Tensor& order) {
  const int64_t n = order.size(0);
  const auto lo = order.options();
  ClassLayout L;
  auto [cls_sorted, perm] = at::sort(idxs.index_select(0, order), /*stable=*/true, 0, /*descending=*/false);
  at::Tensor is_start = at::ones({n}, lo.dtype(at::kBool));
  if (n > 1) is_start.slice(0, 1).copy_(cls_sorted.slice(0, 1).ne(cls_sorted.slice(0, 0, n - 1)));
  at::Tensor seg_id = at::cumsum(is_start, 0).sub_(1);
  at::Tensor starts = at::nonzero(is_start).squeeze(1);
  L.segments = starts.size(0);
  at::Tensor counts = at::diff(starts, 1, 0, c10::nullopt, at::full({1}, n, lo));
  L.num_blocks = counts.add(kNmsBlock - 1).floor_divide(kNmsBlock);
  L.first_block = at::cumsum(L.num_blocks, 0).sub_(L.num_blocks);
  at::Tensor words = L.num_blocks.mul(L.num_blocks + 1).floor_divide(2).mul_(kNmsBlock);
  L.mask_offset = at::cumsum(words, 0).sub_(words);
  at::Tensor sizes = at::stack({L.num_blocks.sum(), L.num_blocks.max(), words.sum()}).cpu();
  const int64_t* sz = sizes.data_ptr<int64_t>();
  L.total_blocks = sz[0];
  L.max_blocks = sz[1];
  L.total_words = sz[2];
  L.block_segment = at::repeat_interleave(at::arange(L.segments, lo), L.num_blocks, 0, L.total_blocks);
  at::Tensor pos = L.first_block.index_select(0, seg_id).mul_(kNmsBlock).add_(at::arange(n, lo)).sub_(starts.index_select(0, seg_id));
  L.pos_box = at::full({L.total_blocks * kNmsBlock}, -1, lo);
  L.pos_box.index_put_({pos}, order.index_select(0, perm));
  L.pos_rank = at::full({L.total_blocks * kNmsBlock}, -1, lo);
  L.pos_rank.index_put_({pos}, perm);
  return L;
}

template <typename T>
at::Tensor nms_typed(const at::Tensor& boxes, const at::Tensor& scores_ct, const at::Tensor& order,
                     const c10::optional<at::Tensor>& idxs, double threshold) {
  const int64_t n = boxes.size(0);
  const auto lo = boxes.options().dtype(at::kLong);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!idxs.has_value()) {
    const int64_t nb = (n + kNmsBlock - 1) / kNmsBlock;
    at::Tensor laid = at::empty({nb * kNmsBlock, 4}, boxes.options());
    at::Tensor valid = at::empty({nb}, lo);
    launch_prepare<T>(boxes, scores_ct, order, nullptr, n, laid, valid, stream);
    const Segments seg{nullptr, nullptr, nullptr, nullptr, nb};
    at::Tensor summary = at::zeros({nb * kNmsBlock}, lo);
    at::Tensor mask = new_output({kNmsBlock * nb * (nb + 1) / 2}, lo);
    launch_mask<T>(laid, seg, nb, threshold, mask, summary, stream);
    at::Tensor keep = new_output({nb}, lo);
    at::Tensor out = new_output({n}, lo);
    at::Tensor count = at::empty({1}, lo);
    launch_sweep(mask, summary, valid, seg, 1, nb, keep, order.data_ptr<int64_t>(), n, out.data_ptr<int64_t>(),
                 count.data_ptr<int64_t>(), stream);
    return out.narrow(0, 0, count.item<int64_t>());
  }
  FASTNN_CHECK(idxs->is_cuda() && idxs->dim() == 1 && idxs->size(0) == n, "fastnn nms_cuda: idxs must be (N,) on CUDA");
  ClassLayout L = class_layout(idxs->to(at::kLong).contiguous(), order);
  at::Tensor laid = at::empty({L.total_blocks * kNmsBlock, 4}, boxes.options());
  at::Tensor valid = at::empty({L.total_blocks}, lo);
  launch_prepare<T>(boxes, scores_ct, order, L.pos_box.data_ptr<int64_t>(), n, laid, valid, stream);
  const Segments seg{L.block_segment.data_ptr<int64_t>(), L.first_block.data_ptr<int64_t>(),
                     L.num_blocks.data_ptr<int64_t>(), L.mask_offset.data_ptr<int64_t>(), 0};
  at::Tensor summary = at::zeros({L.total_blocks * kNmsBlock}, lo);
  at::Tensor mask = new_output({L.total_words}, lo);
  launch_mask<T>(laid, seg, L.max_blocks, threshold, mask, summary, stream);
  at::Tensor keep = new_output({L.total_blocks}, lo);
  launch_sweep(mask, summary, valid, seg, L.segments, L.max_blocks, keep, nullptr, 0, nullptr, nullptr, stream);
  at::Tensor keep_rank = at::zeros({n}, boxes.options().dtype(at::kByte));
  const int64_t positions = L.total_blocks * kNmsBlock;
  nms_scatter_keep_kernel<<<static_cast<unsigned>((positions + 255) / 256), 256, 0, stream>>>(
      reinterpret_cast<const uint64_t*>(keep.data_ptr<int64_t>()), L.pos_rank.data_ptr<int64_t>(), positions,
      keep_rank.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order.index_select(0, at::nonzero(keep_rank).squeeze(1));
}

}  // namespace

// Full NMS on CUDA tensors (inputs validated by the Python wrapper). boxes (N, 4) floating, scores (N,)
// floating, idxs optional (N,) integer. Returns kept indices (int64) by descending score, ties by index.
at::Tensor nms(const at::Tensor& boxes_in, const at::Tensor& scores_in, const c10::optional<at::Tensor>& idxs,
               double threshold) {
  FASTNN_CHECK(boxes_in.is_cuda() && boxes_in.dim() == 2 && boxes_in.size(1) == 4,
               "fastnn nms_cuda: boxes must be (N, 4) on CUDA");
  FASTNN_CHECK(scores_in.is_cuda() && scores_in.dim() == 1 && scores_in.size(0) == boxes_in.size(0),
               "fastnn nms_cuda: scores must be (N,) on CUDA");
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  if (boxes_in.size(0) == 0) return at::empty({0}, boxes_in.options().dtype(at::kLong));
  const auto ct = boxes_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor boxes = boxes_in.to(ct).contiguous();
  at::Tensor order = std::get<1>(at::sort(scores_in.contiguous(), /*stable=*/true, 0, /*descending=*/true));
  at::Tensor scores_ct = scores_in.to(ct).contiguous();  // only its NaN-ness is read
  if (ct == at::kDouble) return nms_typed<double>(boxes, scores_ct, order, idxs, threshold);
  return nms_typed<float>(boxes, scores_ct, order, idxs, threshold);
}

// The suppression bitmask alone, over a layout built in Python (tests compare it with the Triton mask).
at::Tensor nms_mask(const at::Tensor& boxes, const at::Tensor& block_segment, const at::Tensor& seg_first_block,
                    const at::Tensor& seg_num_blocks, const at::Tensor& seg_mask_offset, int64_t max_blocks,
                    int64_t total_words, double threshold) {
  FASTNN_CHECK(boxes.is_cuda() && boxes.dim() == 2 && boxes.size(1) == 4 && boxes.is_contiguous() &&
                   boxes.size(0) % kNmsBlock == 0,
               "fastnn nms_mask: boxes must be a contiguous (P, 4) CUDA tensor, P a multiple of 64");
  check_i64(block_segment, "block_segment");
  check_i64(seg_first_block, "seg_first_block");
  check_i64(seg_num_blocks, "seg_num_blocks");
  check_i64(seg_mask_offset, "seg_mask_offset");
  const c10::cuda::CUDAGuard guard(boxes.device());
  const auto lo = boxes.options().dtype(at::kLong);
  at::Tensor mask = new_output({total_words}, lo);
  at::Tensor summary = at::zeros({boxes.size(0)}, lo);
  const Segments seg{block_segment.data_ptr<int64_t>(), seg_first_block.data_ptr<int64_t>(),
                     seg_num_blocks.data_ptr<int64_t>(), seg_mask_offset.data_ptr<int64_t>(), 0};
  auto stream = at::cuda::getCurrentCUDAStream();
  if (boxes.scalar_type() == at::kDouble) {
    launch_mask<double>(boxes, seg, max_blocks, threshold, mask, summary, stream);
  } else {
    FASTNN_CHECK(boxes.scalar_type() == at::kFloat, "fastnn nms_mask: boxes must be float32 or float64");
    launch_mask<float>(boxes, seg, max_blocks, threshold, mask, summary, stream);
  }
  return mask;
}

}  // namespace fastnn::cuda
