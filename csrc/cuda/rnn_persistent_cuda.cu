// Launcher of the persistent LSTM / GRU forward (kernel: rnn_persistent_kernels.cuh; glue:
// rnn_persistent_plan.h). One cooperative launch per layer and direction; the caller (fastnn/ops/rnn.py)
// asks rnn_persistent_fits first and otherwise runs the per-step fallback.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../families/rnn.h"
#include "rnn_persistent_plan.h"

namespace fastnn::cuda {
namespace {

namespace rp = fastnn::rnn_persistent;

int sm_count(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
}

// Blocks of `kernel` that can be resident at once with the plan's shared memory (0: it cannot launch).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, const rp::Plan& pl, int sms) {
  if (pl.smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(pl.smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, rp::kThreads, pl.smem));
  return int64_t(per_sm) * sms;
}

template <typename T, int G, int KPT>
void launch(rp::Params<T> a, rp::Plan pl, int sms, cudaStream_t stream) {
  auto kernel = rp::persistent_forward_kernel<T, G, KPT>;
  TORCH_CHECK(resident_blocks(kernel, pl, sms) >= pl.blocks,
              "rnn_layer_forward_persistent_cuda: the grid does not fit on the device at once (",
              pl.blocks, " blocks)");
  void* args[] = {&a, &pl};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(pl.blocks), dim3(rp::kThreads),
                                             args, pl.smem, stream));
}

template <typename T, int G>
void launch_kpt(rp::Buffers& b, const rp::Plan& pl, int sms, cudaStream_t stream) {
  const rp::Params<T> a = rp::params_of<T>(b);
  switch (pl.kpt) {
    case 8: return launch<T, G, 8>(a, pl, sms, stream);
    case 16: return launch<T, G, 16>(a, pl, sms, stream);
    case 32: return launch<T, G, 32>(a, pl, sms, stream);
    case 64: return launch<T, G, 64>(a, pl, sms, stream);
    case 128: return launch<T, G, 128>(a, pl, sms, stream);
    default: TORCH_CHECK(false, "rnn_layer_forward_persistent_cuda: no kernel for ", pl.kpt, " weights per thread");
  }
}

template <typename T>
void launch_mode(rp::Buffers& b, const rp::Plan& pl, int sms, cudaStream_t stream) {
  if (b.lstm) {
    launch_kpt<T, 4>(b, pl, sms, stream);
  } else {
    launch_kpt<T, 3>(b, pl, sms, stream);
  }
}

}  // namespace

bool rnn_persistent_fits(const std::string& mode, int64_t hidden_size, int64_t batch, const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "rnn_persistent_fits: a CUDA device expected");
  const int G = mode == "lstm" ? 4 : 3;
  return rp::make_plan(G, static_cast<int>(hidden_size), static_cast<int>(batch), sm_count(device)).fits;
}

std::vector<at::Tensor> rnn_layer_forward_persistent(const std::string& mode, const at::Tensor& x,
                                                     const at::Tensor& batch_sizes, const at::Tensor& w_ih,
                                                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                     const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                     const c10::optional<at::Tensor>& c0, bool reverse, bool train) {
  const char* fn = "rnn_layer_forward_persistent_cuda";
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  rp::Buffers b = rp::prepare(fn, mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, train);
  const int sms = sm_count(x.device());
  const rp::Plan pl = rp::make_plan(b.G, b.H, b.B, sms);
  TORCH_CHECK(pl.fits, fn, ": H = ", b.H, " does not fit the persistent kernel (check rnn_persistent_fits)");
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: launch_mode<float>(b, pl, sms, stream); break;
    case at::kHalf: launch_mode<__half>(b, pl, sms, stream); break;
    case at::kBFloat16: launch_mode<__nv_bfloat16>(b, pl, sms, stream); break;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", x.scalar_type());
  }
  return rp::finish(b);
}

}  // namespace fastnn::cuda
