// Input checks and kernel parameters shared by the selective-scan launchers (selective_scan_fwd.cu and
// selective_scan_bwd.cu). Torch-side code: the kernels themselves (selective_scan_kernels.cuh) see only the
// plain parameter structs filled here.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "../common/check.h"
#include "selective_scan_kernels.cuh"

namespace fastnn::cuda {

struct ScanShapes {
  int64_t batch, dim, seqlen, dstate, groups, nchunks, state_rows;
  bool B_var, C_var, per_seq;
};

inline void check_float_cuda(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& like) {
  FASTNN_CHECK(t.is_cuda() && t.device() == like.device(), fn, ": ", name, " must be on ", like.device());
  FASTNN_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32 (got ", t.scalar_type(), ")");
  FASTNN_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

inline void check_like_u(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& u) {
  FASTNN_CHECK(t.is_cuda() && t.device() == u.device(), fn, ": ", name, " must be on ", u.device());
  FASTNN_CHECK(t.scalar_type() == u.scalar_type(), fn, ": ", name, " must have u's dtype ", u.scalar_type());
  FASTNN_CHECK(t.sizes() == u.sizes(), fn, ": ", name, " must have u's shape ", u.sizes(), " (got ", t.sizes(), ")");
  FASTNN_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// B or C: (D, N) fixed, or per step (B, G, N, L) / (B, N, L) (one group). Returns the group count (0: fixed).
inline int64_t check_coef(const at::Tensor& X, const char* fn, const char* name, const at::Tensor& u, int64_t N) {
  check_float_cuda(X, fn, name, u);
  const int64_t B = u.size(0), D = u.size(1), L = u.size(2);
  if (X.dim() == 2) {
    FASTNN_CHECK(X.size(0) == D && X.size(1) == N, fn, ": ", name, " (D, N) must be (", D, ", ", N, ")");
    return 0;
  }
  if (X.dim() == 3) {
    FASTNN_CHECK(X.size(0) == B && X.size(1) == N && X.size(2) == L, fn, ": ", name, " (B, N, L) must be (", B, ", ",
                 N, ", ", L, ")");
    return 1;
  }
  FASTNN_CHECK(X.dim() == 4 && X.size(0) == B && X.size(2) == N && X.size(3) == L, fn, ": ", name,
               " must be (D, N) or (B, G, N, L) = (", B, ", G, ", N, ", ", L, ")");
  const int64_t G = X.size(1);
  FASTNN_CHECK(G >= 1 && D % G == 0, fn, ": ", name, " groups (", G, ") must divide D (", D, ")");
  return G;
}

inline ScanShapes check_scan_inputs(const char* fn, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                    const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D_skip,
                                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                    const c10::optional<at::Tensor>& initial_state,
                                    const c10::optional<at::Tensor>& seq_idx, bool per_sequence_states,
                                    int64_t chunk_size) {
  FASTNN_CHECK(u.is_cuda() && u.dim() == 3, fn, ": u must be a (B, D, L) CUDA tensor");
  FASTNN_CHECK(u.scalar_type() != at::kDouble, fn,
               ": float64 is not supported on CUDA (the reference runs float64 inputs)");
  FASTNN_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kHalf || u.scalar_type() == at::kBFloat16, fn,
               ": u must be float32, float16 or bfloat16 (got ", u.scalar_type(), ")");
  FASTNN_CHECK(u.is_contiguous(), fn, ": u must be contiguous");
  FASTNN_CHECK(chunk_size == kScanChunk, fn, ": chunk_size must be ", kScanChunk, " (the kernel's chunk), got ",
               chunk_size);
  check_like_u(delta, fn, "delta", u);
  if (z.has_value()) check_like_u(*z, fn, "z", u);
  ScanShapes s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.seqlen = u.size(2);
  check_float_cuda(A, fn, "A", u);
  FASTNN_CHECK(A.dim() == 2 && A.size(0) == s.dim, fn, ": A must be (D, N) with D = ", s.dim);
  s.dstate = A.size(1);
  FASTNN_CHECK(s.dstate >= 1 && s.dstate <= kMaxScanState, fn, ": N must be in [1, ", kMaxScanState, "], got ",
               s.dstate);
  const int64_t gB = check_coef(Bm, fn, "B", u, s.dstate), gC = check_coef(Cm, fn, "C", u, s.dstate);
  FASTNN_CHECK(gB == 0 || gC == 0 || gB == gC, fn, ": per-step B and C must have the same number of groups");
  s.B_var = gB > 0;
  s.C_var = gC > 0;
  s.groups = gB > 0 ? gB : (gC > 0 ? gC : 1);
  if (D_skip.has_value()) {
    check_float_cuda(*D_skip, fn, "D", u);
    FASTNN_CHECK(D_skip->dim() == 1 && D_skip->size(0) == s.dim, fn, ": D must be (", s.dim, ",)");
  }
  if (delta_bias.has_value()) {
    check_float_cuda(*delta_bias, fn, "delta_bias", u);
    FASTNN_CHECK(delta_bias->dim() == 1 && delta_bias->size(0) == s.dim, fn, ": delta_bias must be (", s.dim, ",)");
  }
  if (seq_idx.has_value()) {
    FASTNN_CHECK(seq_idx->is_cuda() && seq_idx->device() == u.device() && seq_idx->scalar_type() == at::kInt &&
                     seq_idx->is_contiguous(),
                 fn, ": seq_idx must be a contiguous int32 tensor on ", u.device());
    FASTNN_CHECK(seq_idx->dim() == 2 && seq_idx->size(0) == s.batch && seq_idx->size(1) == s.seqlen, fn,
                 ": seq_idx must be (B, L) = (", s.batch, ", ", s.seqlen, ")");
  }
  s.per_seq = per_sequence_states && seq_idx.has_value();
  FASTNN_CHECK(!s.per_seq || s.batch == 1, fn, ": per-sequence states need B == 1 (packed sequences)");
  if (initial_state.has_value()) {
    check_float_cuda(*initial_state, fn, "initial_state", u);
    FASTNN_CHECK(initial_state->dim() == 3 && initial_state->size(1) == s.dim && initial_state->size(2) == s.dstate &&
                     (s.per_seq || initial_state->size(0) == s.batch),
                 fn, ": initial_state must be (", s.per_seq ? "S" : std::to_string(s.batch), ", ", s.dim, ", ",
                 s.dstate, ")");
  }
  if (!s.per_seq) {
    s.state_rows = s.batch;
  } else if (s.seqlen == 0) {
    s.state_rows = initial_state.has_value() ? initial_state->size(0) : 0;
  } else {
    // Per-sequence states are indexed by the sequence id, so every id must name a state row. One host read
    // (per-sequence states are the packed-prefill path, not a decode step's).
    const auto range = at::aminmax(*seq_idx);
    const int64_t low = std::get<0>(range).item<int>(), high = std::get<1>(range).item<int>();
    s.state_rows = initial_state.has_value() ? initial_state->size(0) : high + 1;
    FASTNN_CHECK(low >= 0 && high < s.state_rows, fn, ": with per-sequence states seq_idx must be in [0, ",
                 s.state_rows, ") (the number of states), got [", low, ", ", high, "]");
  }
  s.nchunks = (s.seqlen + kScanChunk - 1) / kScanChunk;
  FASTNN_CHECK(s.batch <= 65535, fn, ": B must be at most 65535");
  FASTNN_CHECK(s.dim <= INT32_MAX && s.seqlen <= INT32_MAX - kScanChunk && s.state_rows <= INT32_MAX, fn,
               ": sizes too large");
  return s;
}

inline ScanFwdParams make_fwd_params(const ScanShapes& s, const at::Tensor& u, const at::Tensor& delta,
                                     const at::Tensor& A, const at::Tensor& Bm, const at::Tensor& Cm,
                                     const c10::optional<at::Tensor>& D_skip, const c10::optional<at::Tensor>& z,
                                     const c10::optional<at::Tensor>& delta_bias,
                                     const c10::optional<at::Tensor>& initial_state,
                                     const c10::optional<at::Tensor>& seq_idx, bool delta_softplus) {
  ScanFwdParams p{};
  p.softplus = delta_softplus;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.A = A.data_ptr<float>();
  p.Bm = Bm.data_ptr<float>();
  p.Cm = Cm.data_ptr<float>();
  p.D_skip = D_skip.has_value() ? D_skip->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.init = initial_state.has_value() ? initial_state->data_ptr<float>() : nullptr;
  p.seq_idx = seq_idx.has_value() ? seq_idx->data_ptr<int>() : nullptr;
  p.batch = static_cast<int>(s.batch);
  p.dim = static_cast<int>(s.dim);
  p.seqlen = static_cast<int>(s.seqlen);
  p.dstate = static_cast<int>(s.dstate);
  p.groups = static_cast<int>(s.groups);
  p.nchunks = static_cast<int>(s.nchunks);
  p.B_var = s.B_var;
  p.C_var = s.C_var;
  p.per_seq = s.per_seq;
  return p;
}

}  // namespace fastnn::cuda
