// Launchers of the persistent LSTM / GRU forward and backward recurrence (kernels:
// rnn_persistent_kernels.cuh; glue: rnn_persistent_plan.h). One cooperative launch per layer and direction;
// the caller (fastnn/ops/rnn.py) asks rnn_persistent_fits first and otherwise runs the per-step fallback.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/check.h"
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

template <typename Kernel, typename Args>
void cooperative_launch(const char* fn, Kernel kernel, Args a, rp::Plan pl, int sms, cudaStream_t stream) {
  FASTNN_CHECK(resident_blocks(kernel, pl, sms) >= pl.blocks, fn, ": the grid does not fit on the device at once (",
               pl.blocks, " blocks)");
  void* args[] = {&a, &pl};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(pl.blocks), dim3(rp::kThreads),
                                             args, pl.smem, stream));
}

template <typename T, int G, int KPT>
void launch(const char* fn, rp::Buffers& b, const rp::Plan& pl, int sms, cudaStream_t stream) {
  cooperative_launch(fn, rp::persistent_forward_kernel<T, G, KPT>, rp::params_of<T>(b), pl, sms, stream);
}

template <typename T, int G, int KPT>
void launch(const char* fn, rp::BwdBuffers& b, const rp::Plan& pl, int sms, cudaStream_t stream) {
  cooperative_launch(fn, rp::persistent_backward_kernel<T, G, KPT>, rp::bwd_params_of<T>(b), pl, sms, stream);
}

// The kernel for the buffers' dtype (T: at::ScalarType -> device type), mode (G) and weights per thread.
template <typename T, int G, typename Buf>
void launch_kpt(const char* fn, Buf& b, const rp::Plan& pl, int sms, cudaStream_t stream) {
  switch (pl.kpt) {
    case 8: return launch<T, G, 8>(fn, b, pl, sms, stream);
    case 16: return launch<T, G, 16>(fn, b, pl, sms, stream);
    case 32: return launch<T, G, 32>(fn, b, pl, sms, stream);
    case 64: return launch<T, G, 64>(fn, b, pl, sms, stream);
    case 128: return launch<T, G, 128>(fn, b, pl, sms, stream);
    default: FASTNN_CHECK(false, fn, ": no kernel for ", pl.kpt, " weights per thread");
  }
}

template <typename Buf>
void launch_any(const char* fn, at::ScalarType dt, Buf& b, const rp::Plan& pl, int sms) {
  auto stream = at::cuda::getCurrentCUDAStream();
  auto by_mode = [&](auto tag) {
    using T = decltype(tag);
    if (b.lstm) {
      launch_kpt<T, 4>(fn, b, pl, sms, stream);
    } else {
      launch_kpt<T, 3>(fn, b, pl, sms, stream);
    }
  };
  switch (dt) {
    case at::kFloat: by_mode(float{}); break;
    case at::kHalf: by_mode(__half{}); break;
    case at::kBFloat16: by_mode(__nv_bfloat16{}); break;
    default: FASTNN_CHECK(false, fn, ": unsupported dtype ", dt);
  }
}

}  // namespace

bool rnn_persistent_fits(const std::string& mode, int64_t hidden_size, int64_t batch, const at::Device& device) {
  FASTNN_CHECK(device.is_cuda(), "rnn_persistent_fits: a CUDA device expected");
  const int G = mode == "lstm" ? 4 : 3, H = static_cast<int>(hidden_size), B = static_cast<int>(batch);
  const int sms = sm_count(device);
  return rp::make_plan(G, H, B, sms).fits && rp::make_plan(G, H, B, sms, /*backward=*/true).fits;
}

std::vector<at::Tensor> rnn_layer_forward_persistent(const std::string& mode, const at::Tensor& x,
                                                     const at::Tensor& batch_sizes, const at::Tensor& w_ih,
                                                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                     const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                     const c10::optional<at::Tensor>& c0, bool reverse, bool train) {
  const char* fn = "rnn_layer_forward_persistent_cuda";
  FASTNN_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  rp::Buffers b = rp::prepare(fn, mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, train);
  const int sms = sm_count(x.device());
  const rp::Plan pl = rp::make_plan(b.G, b.H, b.B, sms);
  FASTNN_CHECK(pl.fits, fn, ": H = ", b.H, " does not fit the persistent kernel (check rnn_persistent_fits)");
  launch_any(fn, x.scalar_type(), b, pl, sms);
  return rp::finish(b);
}

std::vector<at::Tensor> rnn_layer_backward_persistent(const std::string& mode, const at::Tensor& dy,
                                                      const at::Tensor& dh_n, const c10::optional<at::Tensor>& dc_n,
                                                      const at::Tensor& batch_sizes, const at::Tensor& w_hh,
                                                      const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                                      const at::Tensor& y, const at::Tensor& gates,
                                                      const at::Tensor& aux, bool reverse) {
  const char* fn = "rnn_layer_backward_persistent_cuda";
  FASTNN_CHECK(w_hh.is_cuda(), fn, ": w_hh must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(w_hh.device());
  rp::BwdBuffers b = rp::prepare_backward(fn, mode, dy, dh_n, dc_n, batch_sizes, w_hh, h0, c0, y, gates, aux, reverse);
  const int sms = sm_count(w_hh.device());
  const rp::Plan pl = rp::make_plan(b.G, b.H, b.B, sms, /*backward=*/true);
  FASTNN_CHECK(pl.fits, fn, ": H = ", b.H, " does not fit the persistent kernel (check rnn_persistent_fits)");
  launch_any(fn, w_hh.scalar_type(), b, pl, sms);
  return rp::finish_backward(b);
}

}  // namespace fastnn::cuda
