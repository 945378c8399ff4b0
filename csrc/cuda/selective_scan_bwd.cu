// Launcher of the CUDA selective-scan backward (kernels: selective_scan_kernels.cuh).
//
// Sums over the batch (dA, fixed dB / dC, dD, ddelta_bias) always go through per-(b, d) partials and an
// ordered sum over b, so they are deterministic whatever `deterministic` says (they are small).
// Per-step dB / dC (B, G, N, L) sum over the channels of a group:
//   deterministic=false: every channel red.adds its values into dB / dC (float atomics, order varies);
//   deterministic=true:  every channel writes its own plane (N x L floats) to a scratch buffer, then a
//                        second kernel sums a group's planes in channel order. The scratch is capped at
//                        kMaxScratchFloats by running the backward over windows of rows / channels, each
//                        window's sum added to the previous ones in a fixed order.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../families/ssm.h"
#include "selective_scan_common.h"
#include "selective_scan_kernels.cuh"

namespace fastnn::cuda {
namespace {

constexpr int64_t kMaxScratchFloats = int64_t(64) << 20;  // 256 MiB of per-channel dB / dC planes

template <typename T>
void launch_bwd(const ScanBwdParams& q, bool has_z, int rows, cudaStream_t stream) {
  const int threads = scan_threads(q.f.seqlen, kBwdItems, kBwdMaxThreads);
  const dim3 grid(static_cast<unsigned>(q.dcount), static_cast<unsigned>(rows));
  const size_t shared = static_cast<size_t>(4 + 3 * (threads / 32)) * q.f.dstate * sizeof(float);
  if (has_z) {
    selective_scan_bwd_kernel<T, true><<<grid, threads, shared, stream>>>(q);
  } else {
    selective_scan_bwd_kernel<T, false><<<grid, threads, shared, stream>>>(q);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sum_rows(const at::Tensor& part, int64_t rows, at::Tensor& out, cudaStream_t stream) {
  const int64_t M = out.numel();
  if (M == 0) return;
  scan_sum_rows_kernel<kReduceThreads><<<static_cast<unsigned>((M + kReduceThreads - 1) / kReduceThreads),
                                         kReduceThreads, 0, stream>>>(
      part.data_ptr<float>(), static_cast<int>(rows), M, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void reduce_groups(const float* planes, const ScanShapes& s, int b0, int rows, int d0, int dcount, at::Tensor& dX,
                   cudaStream_t stream) {
  const int64_t NL = s.dstate * s.seqlen;
  const dim3 grid(static_cast<unsigned>((NL + kReduceThreads - 1) / kReduceThreads), static_cast<unsigned>(s.groups),
                  static_cast<unsigned>(rows));
  scan_reduce_group_kernel<kReduceThreads><<<grid, kReduceThreads, 0, stream>>>(
      planes, b0, d0, dcount, static_cast<int>(s.groups), static_cast<int>(s.dim), NL, dX.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::vector<at::Tensor> selective_scan_backward(FASTNN_SCAN_BWD_ARGS) {
  const char* fn = "selective_scan_backward_cuda";
  const ScanShapes s = check_scan_inputs(fn, u, delta, A, Bm, Cm, D_skip, z, delta_bias, initial_state, seq_idx,
                                         per_sequence_states, chunk_size);
  check_like_u(dout, fn, "dout", u);
  check_float_cuda(chunk_states, fn, "chunk_states", u);
  FASTNN_CHECK(chunk_states.dim() == 4 && chunk_states.size(0) == s.batch && chunk_states.size(1) == s.dim &&
                   chunk_states.size(2) == s.nchunks && chunk_states.size(3) == s.dstate,
               fn, ": chunk_states must be (", s.batch, ", ", s.dim, ", ", s.nchunks, ", ", s.dstate,
               ") (the forward's, chunk ", kScanChunk, ")");
  if (dlast_state.has_value()) {
    check_float_cuda(*dlast_state, fn, "dlast_state", u);
    FASTNN_CHECK(dlast_state->dim() == 3 && dlast_state->size(0) == s.state_rows && dlast_state->size(1) == s.dim &&
                     dlast_state->size(2) == s.dstate,
                 fn, ": dlast_state must be (", s.state_rows, ", ", s.dim, ", ", s.dstate, ")");
  }
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = new_output(u.sizes(), u.options());
  at::Tensor ddelta = new_output(u.sizes(), u.options());
  at::Tensor dz = z.has_value() ? new_output(u.sizes(), u.options()) : at::Tensor();
  at::Tensor dA = new_output(A.sizes(), f32);
  at::Tensor dB = new_output(Bm.sizes(), f32);
  at::Tensor dC = new_output(Cm.sizes(), f32);
  at::Tensor dD = D_skip.has_value() ? new_output(D_skip->sizes(), f32) : at::Tensor();
  at::Tensor dbias = delta_bias.has_value() ? new_output(delta_bias->sizes(), f32) : at::Tensor();
  at::Tensor dinit = initial_state.has_value() ? new_output(initial_state->sizes(), f32) : at::Tensor();
  const std::vector<at::Tensor> empty_result{du, ddelta, dz, dA, dB, dC, dD, dbias, dinit};

  if (s.batch == 0 || s.dim == 0 || s.seqlen == 0) {  // no step: gradients are zero, the state passes through
    for (const at::Tensor& t : empty_result)
      if (t.defined()) t.zero_();
    if (dinit.defined() && dlast_state.has_value() && !s.per_seq) dinit.copy_(*dlast_state);
    return empty_result;
  }
  auto stream = at::cuda::getCurrentCUDAStream();

  ScanBwdParams q{};
  q.f = make_fwd_params(s, u, delta, A, Bm, Cm, D_skip, z, delta_bias, initial_state, seq_idx, delta_softplus);
  q.dout = dout.data_ptr();
  q.dlast = dlast_state.has_value() ? dlast_state->data_ptr<float>() : nullptr;
  q.chunk_states = chunk_states.data_ptr<float>();
  q.du = du.data_ptr();
  q.ddelta = ddelta.data_ptr();
  q.dz = z.has_value() ? dz.data_ptr() : nullptr;
  if (dinit.defined()) {
    if (s.per_seq) dinit.zero_();  // a sequence that never starts in the row gets no gradient
    q.dinit = dinit.data_ptr<float>();
  }
  at::Tensor part_dA = at::empty({s.batch, s.dim, s.dstate}, f32);
  at::Tensor part_dB = s.B_var ? at::Tensor() : at::empty({s.batch, s.dim, s.dstate}, f32);
  at::Tensor part_dC = s.C_var ? at::Tensor() : at::empty({s.batch, s.dim, s.dstate}, f32);
  at::Tensor part_dD = dD.defined() ? at::empty({s.batch, s.dim}, f32) : at::Tensor();
  at::Tensor part_dbias = dbias.defined() ? at::empty({s.batch, s.dim}, f32) : at::Tensor();
  q.part_dA = part_dA.data_ptr<float>();
  q.part_dB = s.B_var ? nullptr : part_dB.data_ptr<float>();
  q.part_dC = s.C_var ? nullptr : part_dC.data_ptr<float>();
  q.part_dD = dD.defined() ? part_dD.data_ptr<float>() : nullptr;
  q.part_dbias = dbias.defined() ? part_dbias.data_ptr<float>() : nullptr;
  if (s.B_var) dB.zero_();
  if (s.C_var) dC.zero_();

  auto launch = [&](int rows) {
    switch (u.scalar_type()) {
      case at::kFloat: launch_bwd<float>(q, z.has_value(), rows, stream); break;
      case at::kHalf: launch_bwd<__half>(q, z.has_value(), rows, stream); break;
      case at::kBFloat16: launch_bwd<__nv_bfloat16>(q, z.has_value(), rows, stream); break;
      default: FASTNN_CHECK(false, fn, ": unsupported dtype ", u.scalar_type());
    }
  };

  const int64_t planes_per_channel = (s.B_var ? 1 : 0) + (s.C_var ? 1 : 0);
  if (planes_per_channel == 0 || !deterministic) {
    q.atomic_var = true;
    q.dB_var = s.B_var ? dB.data_ptr<float>() : nullptr;
    q.dC_var = s.C_var ? dC.data_ptr<float>() : nullptr;
    q.b0 = 0;
    q.d0 = 0;
    q.dcount = static_cast<int>(s.dim);
    launch(static_cast<int>(s.batch));
  } else {
    // Windows of whole rows when a row's planes fit, else of channels within one row.
    const int64_t plane = s.dstate * s.seqlen;
    const int64_t per_row = s.dim * plane * planes_per_channel;
    const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(s.batch, kMaxScratchFloats / per_row));
    const int64_t chans_per =
        rows_per > 1 || per_row <= kMaxScratchFloats
            ? s.dim
            : std::max<int64_t>(1, kMaxScratchFloats / (plane * planes_per_channel));
    const int64_t window_planes = rows_per * chans_per;
    at::Tensor scratch_B = s.B_var ? at::empty({window_planes * plane}, f32) : at::Tensor();
    at::Tensor scratch_C = s.C_var ? at::empty({window_planes * plane}, f32) : at::Tensor();
    q.atomic_var = false;
    q.dB_var = s.B_var ? scratch_B.data_ptr<float>() : nullptr;
    q.dC_var = s.C_var ? scratch_C.data_ptr<float>() : nullptr;
    for (int64_t b0 = 0; b0 < s.batch; b0 += rows_per) {
      const int rows = static_cast<int>(std::min(rows_per, s.batch - b0));
      for (int64_t d0 = 0; d0 < s.dim; d0 += chans_per) {
        const int dcount = static_cast<int>(std::min(chans_per, s.dim - d0));
        q.b0 = static_cast<int>(b0);
        q.d0 = static_cast<int>(d0);
        q.dcount = dcount;
        launch(rows);
        if (s.B_var) reduce_groups(q.dB_var, s, q.b0, rows, q.d0, dcount, dB, stream);
        if (s.C_var) reduce_groups(q.dC_var, s, q.b0, rows, q.d0, dcount, dC, stream);
      }
    }
  }

  sum_rows(part_dA, s.batch, dA, stream);
  if (!s.B_var) sum_rows(part_dB, s.batch, dB, stream);
  if (!s.C_var) sum_rows(part_dC, s.batch, dC, stream);
  if (dD.defined()) sum_rows(part_dD, s.batch, dD, stream);
  if (dbias.defined()) sum_rows(part_dbias, s.batch, dbias, stream);
  return {du, ddelta, dz, dA, dB, dC, dD, dbias, dinit};
}

}  // namespace fastnn::cuda
