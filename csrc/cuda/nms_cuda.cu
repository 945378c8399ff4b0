// Launchers for the CUDA NMS kernels: take the torch stream, check every launch. Compiled with
// --fmad=false (setup.py) so the IoU matches the CPU kernels and torchvision bit for bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/alloc.h"
#include "../common/box_math.h"
#include "nms_kernels.cuh"

namespace fastnn::cuda {
namespace {

void check_i64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous(), "fastnn nms cuda: ", name,
              " must be a contiguous int64 CUDA tensor");
}

// Largest dynamic shared memory the sweep asks for before keeping the removed-bits in global memory.
constexpr int64_t kMaxSharedRemovedBytes = 200 * 1024;

}  // namespace

// boxes: (P, 4) float32/float64 in layout order; tables: see nms_kernels.cuh. Returns the int64 mask.
at::Tensor nms_mask(const at::Tensor& boxes, const at::Tensor& block_segment, const at::Tensor& seg_first_block,
                    const at::Tensor& seg_num_blocks, const at::Tensor& seg_mask_offset, int64_t max_blocks,
                    int64_t total_words, double threshold) {
  TORCH_CHECK(boxes.is_cuda() && boxes.dim() == 2 && boxes.size(1) == 4 && boxes.is_contiguous(),
              "fastnn nms_mask: boxes must be a contiguous (P, 4) CUDA tensor");
  TORCH_CHECK(boxes.size(0) % kNmsBlock == 0, "fastnn nms_mask: boxes must be padded to a multiple of 64");
  check_i64(block_segment, "block_segment");
  check_i64(seg_first_block, "seg_first_block");
  check_i64(seg_num_blocks, "seg_num_blocks");
  check_i64(seg_mask_offset, "seg_mask_offset");
  const c10::cuda::CUDAGuard guard(boxes.device());
  at::Tensor mask = new_output({total_words}, boxes.options().dtype(at::kLong));
  const int64_t total_blocks = boxes.size(0) / kNmsBlock;
  if (total_blocks == 0) return mask;
  TORCH_CHECK(total_blocks < (int64_t(1) << 31), "fastnn nms_mask: too many boxes");
  const dim3 grid(static_cast<unsigned>(total_blocks),
                  static_cast<unsigned>((max_blocks + kMaskColsPerCta - 1) / kMaskColsPerCta));
  TORCH_CHECK(grid.y <= 65535, "fastnn nms_mask: a class with more than ",
              65535 * kMaskColsPerCta * kNmsBlock, " boxes is not supported");
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* out = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  if (boxes.scalar_type() == at::kDouble) {
    nms_mask_kernel<double><<<grid, kNmsBlock, 0, stream>>>(
        boxes.data_ptr<double>(), block_segment.data_ptr<int64_t>(), seg_first_block.data_ptr<int64_t>(),
        seg_num_blocks.data_ptr<int64_t>(), seg_mask_offset.data_ptr<int64_t>(), threshold_below<double>(threshold),
        out);
  } else {
    TORCH_CHECK(boxes.scalar_type() == at::kFloat, "fastnn nms_mask: boxes must be float32 or float64");
    nms_mask_kernel<float><<<grid, kNmsBlock, 0, stream>>>(
        boxes.data_ptr<float>(), block_segment.data_ptr<int64_t>(), seg_first_block.data_ptr<int64_t>(),
        seg_num_blocks.data_ptr<int64_t>(), seg_mask_offset.data_ptr<int64_t>(), threshold_below<float>(threshold),
        out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

// Returns keep words (int64, one per block): bit r of word g set when position 64*g + r is kept.
at::Tensor nms_sweep(const at::Tensor& mask, const at::Tensor& valid_words, const at::Tensor& seg_first_block,
                     const at::Tensor& seg_num_blocks, const at::Tensor& seg_mask_offset, int64_t max_blocks) {
  check_i64(mask, "mask");
  check_i64(valid_words, "valid_words");
  check_i64(seg_first_block, "seg_first_block");
  check_i64(seg_num_blocks, "seg_num_blocks");
  check_i64(seg_mask_offset, "seg_mask_offset");
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t total_blocks = valid_words.size(0);
  const int64_t segments = seg_first_block.size(0);
  at::Tensor keep = new_output({total_blocks}, valid_words.options());
  if (segments == 0 || total_blocks == 0) return keep.zero_();
  TORCH_CHECK(segments < (int64_t(1) << 31), "fastnn nms_sweep: too many segments");
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* m = reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>());
  const auto* v = reinterpret_cast<const uint64_t*>(valid_words.data_ptr<int64_t>());
  auto* k = reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>());
  const int64_t shared_bytes = max_blocks * static_cast<int64_t>(sizeof(uint64_t));
  if (shared_bytes <= kMaxSharedRemovedBytes) {
    if (shared_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(nms_sweep_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    nms_sweep_kernel<true><<<static_cast<unsigned>(segments), kSweepThreads, shared_bytes, stream>>>(
        m, v, seg_first_block.data_ptr<int64_t>(), seg_num_blocks.data_ptr<int64_t>(),
        seg_mask_offset.data_ptr<int64_t>(), nullptr, k);
  } else {
    at::Tensor removed = at::empty({total_blocks}, valid_words.options());
    nms_sweep_kernel<false><<<static_cast<unsigned>(segments), kSweepThreads, 0, stream>>>(
        m, v, seg_first_block.data_ptr<int64_t>(), seg_num_blocks.data_ptr<int64_t>(),
        seg_mask_offset.data_ptr<int64_t>(), reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace fastnn::cuda
