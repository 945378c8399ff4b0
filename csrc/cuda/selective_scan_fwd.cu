// Launcher of the CUDA selective-scan forward (kernels: selective_scan_kernels.cuh). Inputs are validated
// and made contiguous by fastnn/ops/ssm.py; the checks here guard the kernel's own assumptions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../families/ssm.h"
#include "selective_scan_common.h"
#include "selective_scan_kernels.cuh"

namespace fastnn::cuda {
namespace {

template <typename T>
void launch_fwd(const ScanFwdParams& p, bool has_z, cudaStream_t stream) {
  const int threads = scan_threads(p.seqlen, kFwdItems, kFwdMaxThreads);
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  const size_t shared = 2 * static_cast<size_t>(p.dstate) * sizeof(float);
  if (has_z) {
    selective_scan_fwd_kernel<T, true><<<grid, threads, shared, stream>>>(p);
  } else {
    selective_scan_fwd_kernel<T, false><<<grid, threads, shared, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::vector<at::Tensor> selective_scan_forward(FASTNN_SCAN_FWD_ARGS) {
  const ScanShapes s = check_scan_inputs("selective_scan_forward_cuda", u, delta, A, Bm, Cm, D_skip, z, delta_bias,
                                         initial_state, seq_idx, per_sequence_states, chunk_size);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = new_output({s.batch, s.dim, s.seqlen}, u.options());
  at::Tensor last = new_output({s.state_rows, s.dim, s.dstate}, f32);
  at::Tensor chunks = new_output({s.batch, s.dim, s.nchunks, s.dstate}, f32);
  if (s.batch == 0 || s.dim == 0) return {out, last, chunks};
  if (s.seqlen == 0) {  // no step: the final state is the initial one
    if (initial_state.has_value() && !s.per_seq) {
      last.copy_(*initial_state);
    } else {
      last.zero_();
    }
    return {out, last, chunks};
  }
  ScanFwdParams p = make_fwd_params(s, u, delta, A, Bm, Cm, D_skip, z, delta_bias, initial_state, seq_idx,
                                   delta_softplus);
  p.out = out.data_ptr();
  p.last_state = last.data_ptr<float>();
  p.chunk_states = chunks.data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (u.scalar_type()) {
    case at::kFloat: launch_fwd<float>(p, z.has_value(), stream); break;
    case at::kHalf: launch_fwd<__half>(p, z.has_value(), stream); break;
    case at::kBFloat16: launch_fwd<__nv_bfloat16>(p, z.has_value(), stream); break;
    default: FASTNN_CHECK(false, "selective_scan_forward_cuda: unsupported dtype ", u.scalar_type());
  }
  return {out, last, chunks};
}

}  // namespace fastnn::cuda
