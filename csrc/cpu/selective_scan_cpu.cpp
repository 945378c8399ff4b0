// Selective scan (Mamba) on the CPU: forward and backward, semantics of fastnn/reference/ssm.py.
//
// Layout of the work: a "slab" is up to W channels of one group (W = 16 fp32 lanes, 8 fp64) of one batch
// row; the slab's channels are the lanes of one vector, so every step is vertical vector math over the
// channels with B[t, n] and C[t, n] broadcast (one group per slab), and the N states are N vectors in
// registers. Why channels and not the state dimension in the lanes: the output y_t = sum_n h[n] C[n] and
// the backward's d(dt) are then plain vector FMAs, no horizontal sums; only dB / dC sum over channels.
//
// Each slab walks its sequence in chunks of `chunk_size` steps, staging u, dt, z (and dout) transposed
// into [step][lane] buffers. The forward saves the state before every chunk; the backward walks the
// chunks in reverse, recomputes the chunk's states from that saved state (a_t h_{t-1} and the decay
// a_t kept in per-thread buffers, so exp runs once per state element in the backward too; dC is summed
// there, where h_t is in a register), then runs the adjoint recurrence g_t = a_{t+1} g_{t+1} + C_t dy_t.
//
// Determinism: dB / dC (per step) are summed over the channels of a group. A task owns a fixed set of
// slabs (kSlabsPerTask, independent of the thread count) and writes its own partial buffer; the partials
// are added in task order afterwards. dA, dD, d(delta_bias) and fixed (D, N) dB / dC are summed over the
// batch through per-row partials likewise. Results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/alloc.h"
#include "common/ssm_math.h"
#include "cpu/vec_math.h"
#include "families/ssm.h"

namespace fastnn {
namespace cpu {
namespace {

using at::Tensor;

// softplus with torch's threshold (vec_math.h's vsoftplus) and, with `d`, its derivative
inline VF vsoftplus(VF x, VF* d) { return fastnn::cpu::vsoftplus(x, ssm::kSoftplusThreshold, d); }
inline VD vsoftplus(VD x, VD* d) {
  for (int i = 0; i < 8; ++i) {
    if (d != nullptr) (*d)[i] = ssm::softplus_grad(x[i]);
    x[i] = ssm::softplus(x[i]);
  }
  return x;
}
inline VF vsigmoid(VF x) { return 1.0f / (1.0f + vexp(-x)); }
inline VD vsigmoid(VD x) {
  for (int i = 0; i < 8; ++i) x[i] = ssm::sigmoid(x[i]);
  return x;
}

template <typename V>
inline auto hsum(V v) -> typename std::remove_reference<decltype(v[0])>::type {
  typename std::remove_reference<decltype(v[0])>::type s = 0;
  for (size_t i = 0; i < sizeof(V) / sizeof(s); ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------- staging (dtype conversion + transpose)

// dst[t * W + lane] = src[t] for t < T, converting the row of one channel into the lane-major buffer.
template <typename acc_t, int W>
void load_lane(const void* src, at::ScalarType st, int64_t T, acc_t* dst, int lane) {
  switch (st) {
    case at::kFloat: {
      const float* s = static_cast<const float*>(src);
      for (int64_t t = 0; t < T; ++t) dst[t * W + lane] = static_cast<acc_t>(s[t]);
      break;
    }
    case at::kDouble: {
      const double* s = static_cast<const double*>(src);
      for (int64_t t = 0; t < T; ++t) dst[t * W + lane] = static_cast<acc_t>(s[t]);
      break;
    }
    case at::kHalf: {
      const at::Half* s = static_cast<const at::Half*>(src);
      for (int64_t t = 0; t < T; ++t) dst[t * W + lane] = static_cast<acc_t>(static_cast<float>(s[t]));
      break;
    }
    case at::kBFloat16: {
      const at::BFloat16* s = static_cast<const at::BFloat16*>(src);
      for (int64_t t = 0; t < T; ++t) dst[t * W + lane] = static_cast<acc_t>(static_cast<float>(s[t]));
      break;
    }
    default:
      TORCH_CHECK(false, "selective_scan (cpu): unsupported dtype ", st);
  }
}

template <typename acc_t, int W>
void store_lane(void* dst, at::ScalarType st, int64_t T, const acc_t* src, int lane) {
  switch (st) {
    case at::kFloat: {
      float* d = static_cast<float*>(dst);
      for (int64_t t = 0; t < T; ++t) d[t] = static_cast<float>(src[t * W + lane]);
      break;
    }
    case at::kDouble: {
      double* d = static_cast<double*>(dst);
      for (int64_t t = 0; t < T; ++t) d[t] = static_cast<double>(src[t * W + lane]);
      break;
    }
    case at::kHalf: {
      at::Half* d = static_cast<at::Half*>(dst);
      for (int64_t t = 0; t < T; ++t) d[t] = static_cast<at::Half>(static_cast<float>(src[t * W + lane]));
      break;
    }
    case at::kBFloat16: {
      at::BFloat16* d = static_cast<at::BFloat16*>(dst);
      for (int64_t t = 0; t < T; ++t) d[t] = static_cast<at::BFloat16>(static_cast<float>(src[t * W + lane]));
      break;
    }
    default:
      TORCH_CHECK(false, "selective_scan (cpu): unsupported dtype ", st);
  }
}

// Whole-slab staging: dst[t * W + l] = row l of the slab at step t (rows >= nl: zeros), and back. With
// AVX-512 and fp32 lanes, 16 x 16 blocks are loaded a row (16 steps of one channel) at a time, converted,
// and transposed in registers; elsewhere one scalar per element.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FASTNN_SCAN_TILES 1
inline __m512 load16(const char* src, at::ScalarType st, __mmask16 m) {
  switch (st) {
    case at::kHalf:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src));
    case at::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src)), 16));
    default:
      return _mm512_maskz_loadu_ps(m, src);
  }
}

// fp32 -> bf16 with round to nearest even, NaN kept NaN (as c10::BFloat16).
inline __m256i to_bf16(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0)));
#endif
}

inline void store16(char* dst, at::ScalarType st, __m512 x, __mmask16 m) {
  switch (st) {
    case at::kHalf:
      _mm256_mask_storeu_epi16(dst, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case at::kBFloat16:
      _mm256_mask_storeu_epi16(dst, m, to_bf16(x));
      break;
    default:
      _mm512_mask_storeu_ps(dst, m, x);
  }
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
#endif

// rows[l]: step 0 of the tile in channel l's row (l < nl)
template <typename acc_t>
void load_tile(const char* const* rows, int nl, at::ScalarType st, size_t esize, int64_t T, acc_t* dst) {
  constexpr int W = Lanes<acc_t>::W;
#ifdef FASTNN_SCAN_TILES
  if constexpr (std::is_same<acc_t, float>::value) {
    if (st != at::kDouble) {
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const __mmask16 m = tail_mask(T - t0);
        __m512 r[16];
        for (int l = 0; l < 16; ++l) r[l] = l < nl ? load16(rows[l] + t0 * esize, st, m) : _mm512_setzero_ps();
        transpose16(r);
        if (T - t0 >= 16) {  // a fixed count: stored from registers (a variable one compiled to a stack copy)
          for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + (t0 + k) * W, r[k]);
        } else {
          for (int64_t k = 0; k < T - t0; ++k) _mm512_storeu_ps(dst + (t0 + k) * W, r[k]);
        }
      }
      return;
    }
  }
#endif
  if (nl < W) std::memset(dst, 0, sizeof(acc_t) * W * T);
  for (int l = 0; l < nl; ++l) load_lane<acc_t, W>(rows[l], st, T, dst, l);
}

// Whether the forward gates its output in the rows' layout (store_tile's gate_rows) instead of staging z as a
// tile: it saves z's transpose. With AVX-512 and fp32 lanes.
template <typename acc_t>
constexpr bool kGateInRows =
#ifdef FASTNN_SCAN_TILES
    std::is_same<acc_t, float>::value;
#else
    false;
#endif

// With gate_rows (only where kGateInRows), row l gets src's y times silu(z) read from gate_rows[l] in z's own
// layout, so z is never transposed.
template <typename acc_t>
void store_tile(char* const* rows, int nl, at::ScalarType st, size_t esize, int64_t T, const acc_t* src,
                const char* const* gate_rows = nullptr) {
  constexpr int W = Lanes<acc_t>::W;
#ifdef FASTNN_SCAN_TILES
  if constexpr (std::is_same<acc_t, float>::value) {
    if (st != at::kDouble) {
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, T - t0);
        __m512 r[16];
        for (int k = 0; k < 16; ++k) r[k] = k < n ? _mm512_loadu_ps(src + (t0 + k) * W) : _mm512_setzero_ps();
        transpose16(r);
        const __mmask16 m = tail_mask(n);
        for (int l = 0; l < nl; ++l) {
          if (gate_rows != nullptr) {
            const VF z = (VF)load16(gate_rows[l] + t0 * esize, st, m);
            r[l] = (__m512)((VF)r[l] * (z * vsigmoid(z)));
          }
          store16(rows[l] + t0 * esize, st, r[l], m);
        }
      }
      return;
    }
  }
#endif
  for (int l = 0; l < nl; ++l) store_lane<acc_t, W>(rows[l], st, T, src, l);
}

// Software prefetch of the next slab-chunk's input rows into L2, spread over the current chunk's steps. A
// chunk reads 16 rows x (chunk x element size) bytes per tensor, runs of 8 cache lines at fp32 (chunk 128):
// too short for the hardware prefetchers to ramp up, so without this the staging waited on DRAM.
struct RowPrefetcher {
  static constexpr int kMaxRows = 112;  // 16 rows of up to 4 inputs and 3 outputs
  const char* rows[kMaxRows];
  bool write[kMaxRows];  // output rows: prefetched for writing, so the stores find their lines owned
  int nrows = 0, r = 0;
  int64_t span = 0, off = 0;  // bytes per row (+ 63: an unaligned row's last line), position in row r
  int per_step = 0;           // lines per step, so the whole plan is issued within the chunk
  void reset(int64_t row_bytes) { nrows = r = 0, off = 0, span = row_bytes + 63; }
  void add(const char* row, bool for_write = false) {
    if (nrows < kMaxRows) write[nrows] = for_write, rows[nrows++] = row;
  }
  void plan(int64_t steps) {
    const int64_t lines = nrows * ((span + 63) / 64);
    per_step = steps > 0 ? static_cast<int>((lines + steps - 1) / steps) : 0;
  }
  inline void step() {
    for (int i = 0; i < per_step && r < nrows; ++i) {
      if (write[r]) {
        __builtin_prefetch(rows[r] + off, 1, 2);  // prefetchw
      } else {
        __builtin_prefetch(rows[r] + off, 0, 2);  // prefetcht1: into L2
      }
      off += 64;
      if (off >= span) off = 0, ++r;
    }
  }
};

// ---------------------------------------------------------------- problem description

template <typename acc_t>
struct Scan {
  int64_t batch, dim, len, nstate, ngroups, chunk, nchunks;
  at::ScalarType io;         // dtype of u, delta, z, out (and dout, du, ddelta, dz)
  size_t io_size;
  const char *u, *delta, *z;  // (B, D, L)
  const acc_t *A, *Bm, *Cm, *Dskip, *dbias, *init;
  bool b_fixed, c_fixed, softplus, per_seq;
  const int32_t* seq_idx;  // (B, L) or null
  // forward outputs
  char* out;
  acc_t *last, *chunk_states;
  // backward
  const char* dout;
  const acc_t* dlast;
  char *du, *ddelta, *dz;
  acc_t *dA_part, *dD_part, *dbias_part, *dBfix_part, *dCfix_part;  // per batch row: (B, D, N) / (B, D)
  acc_t *dBstep_part, *dCstep_part;                                  // per task: (tasks, N, L)
  acc_t* dinit;

  int64_t group_size() const { return dim / ngroups; }
  int64_t slabs_per_group(int W) const { return (group_size() + W - 1) / W; }
  const char* row(const char* base, int64_t b, int64_t d, int64_t t) const {
    return base + ((b * dim + d) * len + t) * io_size;
  }
  char* row(char* base, int64_t b, int64_t d, int64_t t) const {
    return base + ((b * dim + d) * len + t) * io_size;
  }
  bool is_start(int64_t b, int64_t t) const {
    return t == 0 || (seq_idx != nullptr && seq_idx[b * len + t] != seq_idx[b * len + t - 1]);
  }
  bool is_end(int64_t b, int64_t t) const {
    return t == len - 1 || (seq_idx != nullptr && seq_idx[b * len + t + 1] != seq_idx[b * len + t]);
  }
  // Row of initial_state / last_state that a segment starting or ending at t uses (-1: none).
  int64_t state_row(int64_t b, int64_t t, bool at_boundary_of_row) const {
    if (per_seq) return seq_idx[b * len + t];
    return at_boundary_of_row ? b : -1;
  }
};

// One slab: channels d0 .. d0 + nl - 1 (nl <= W) of batch row b, all in group g.
struct Slab {
  int64_t b, g, d0;
  int nl;
};

template <typename acc_t>
struct Buffers {
  static constexpr int W = Lanes<acc_t>::W;
  using V = typename Lanes<acc_t>::V;
  std::vector<V> U, DT, DTU, Z, Y, DO, M, AA, PB, PC, DU, DDT, DZ, DSP;  // DSP: d softplus / d raw dt
  std::vector<acc_t> Bs, Cs;  // [t][n] per chunk (per-step B / C)
  explicit Buffers(int64_t chunk, int64_t nstate, bool backward) {
    for (auto* v : {&U, &DT, &DTU, &Z, &Y}) v->resize(chunk);
    Bs.resize(chunk * nstate);
    Cs.resize(chunk * nstate);
    if (backward) {
      for (auto* v : {&DO, &DU, &DDT, &DZ, &DSP}) v->resize(chunk);
      for (auto* v : {&M, &AA, &PB, &PC}) v->resize(chunk * nstate);
    }
  }
};

template <typename acc_t>
using VecOf = typename Lanes<acc_t>::V;

// Lane vector of a per-channel (D,) parameter (0 in unused lanes and when absent).
template <typename acc_t>
VecOf<acc_t> channel_vec(const acc_t* p, const Slab& s, acc_t absent) {
  VecOf<acc_t> v = splat<VecOf<acc_t>>(absent);
  if (p != nullptr)
    for (int l = 0; l < s.nl; ++l) v[l] = p[s.d0 + l];
  return v;
}

// Lane vectors of a (rows, D, N) state row `r` (zeros when r < 0 or the tensor is absent).
template <typename acc_t>
void load_state(const acc_t* base, int64_t r, const Scan<acc_t>& p, const Slab& s, VecOf<acc_t>* h) {
  for (int64_t n = 0; n < p.nstate; ++n) h[n] = splat<VecOf<acc_t>>(acc_t(0));
  if (base == nullptr || r < 0) return;
  for (int l = 0; l < s.nl; ++l) {
    const acc_t* src = base + (r * p.dim + s.d0 + l) * p.nstate;
    for (int64_t n = 0; n < p.nstate; ++n) h[n][l] = src[n];
  }
}

template <typename acc_t>
void store_state(acc_t* base, int64_t r, const Scan<acc_t>& p, const Slab& s, const VecOf<acc_t>* h) {
  for (int l = 0; l < s.nl; ++l) {
    acc_t* dst = base + (r * p.dim + s.d0 + l) * p.nstate;
    for (int64_t n = 0; n < p.nstate; ++n) dst[n] = h[n][l];
  }
}

// Stage one chunk [t0, t0 + T) of the slab: u, dt (bias + softplus applied), dt * u, z (and dout, d softplus /
// d raw dt).
template <typename acc_t>
void stage_chunk(const Scan<acc_t>& p, const Slab& s, int64_t t0, int64_t T, Buffers<acc_t>& buf,
                 VecOf<acc_t> bias_v, bool backward) {
  using V = VecOf<acc_t>;
  constexpr int W = Lanes<acc_t>::W;
  acc_t* U = reinterpret_cast<acc_t*>(buf.U.data());
  acc_t* DT = reinterpret_cast<acc_t*>(buf.DT.data());
  acc_t* Z = reinterpret_cast<acc_t*>(buf.Z.data());
  acc_t* DO = backward ? reinterpret_cast<acc_t*>(buf.DO.data()) : nullptr;
  // unused lanes hold zeros: A = 0 there keeps their state at 0
  const char* rows[W];
  auto tile = [&](const char* base, acc_t* dst) {
    for (int l = 0; l < s.nl; ++l) rows[l] = p.row(base, s.b, s.d0 + l, t0);
    load_tile<acc_t>(rows, s.nl, p.io, p.io_size, T, dst);
  };
  tile(p.u, U);
  tile(p.delta, DT);
  if (p.z != nullptr && (backward || !kGateInRows<acc_t>)) tile(p.z, Z);
  if (backward) tile(p.dout, DO);
  for (int64_t t = 0; t < T; ++t) {
    const V raw = buf.DT[t] + bias_v;
    const V dt = p.softplus ? vsoftplus(raw, backward ? &buf.DSP[t] : nullptr) : raw;
    buf.DT[t] = dt;
    buf.DTU[t] = dt * buf.U[t];
  }
}

// Stage per-step B / C of one chunk as [t][n] (shared by every slab of the task: one batch row, one group).
template <typename acc_t>
void stage_bc(const Scan<acc_t>& p, int64_t b, int64_t g, int64_t t0, int64_t T, Buffers<acc_t>& buf) {
  const int64_t N = p.nstate;
  auto stage = [&](const acc_t* M, std::vector<acc_t>& dst) {
    const acc_t* src = M + (b * p.ngroups + g) * N * p.len + t0;
    if (N == Lanes<acc_t>::W) {  // [t][n] is a tile of N-lane rows: transposed in registers (Mamba's N = 16)
      const char* rows[Lanes<acc_t>::W];
      for (int64_t n = 0; n < N; ++n) rows[n] = reinterpret_cast<const char*>(src + n * p.len);
      load_tile<acc_t>(rows, static_cast<int>(N), c10::CppTypeToScalarType<acc_t>::value, sizeof(acc_t), T,
                       dst.data());
      return;
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < T; ++t) dst[t * N + n] = src[n * p.len + t];
  };
  if (!p.b_fixed) stage(p.Bm, buf.Bs);
  if (!p.c_fixed) stage(p.Cm, buf.Cs);
}

// Per-state lane vectors of a fixed (D, N) B or C, or of A (times `scale`).
template <typename acc_t>
void state_matrix(const acc_t* M, const Scan<acc_t>& p, const Slab& s, VecOf<acc_t>* out, acc_t scale = 1) {
  for (int64_t n = 0; n < p.nstate; ++n) {
    out[n] = splat<VecOf<acc_t>>(acc_t(0));
    for (int l = 0; l < s.nl; ++l) out[n][l] = M[(s.d0 + l) * p.nstate + n] * scale;
  }
}

// exp(dt * A) from the slab's scaled A: fp32 runs exp2 on A * log2(e); fp64 runs exp on A itself.
inline VF decay(VF dt, VF a_scaled) { return vexp2(dt * a_scaled); }
inline VD decay(VD dt, VD a_scaled) { return vexp(dt * a_scaled); }
template <typename acc_t>
constexpr acc_t a_scale() {
  return sizeof(acc_t) == 4 ? acc_t(kLog2e) : acc_t(1);
}

// What a slab carries across chunks, and its per-channel constants.
template <typename acc_t>
struct SlabState {
  using V = VecOf<acc_t>;
  Slab s;
  std::vector<V> h, A, Bf, Cf;     // state (forward) / adjoint g (backward); scaled A; fixed B, C
  std::vector<V> dA, dBf, dCf;      // backward accumulators
  V bias_v, D_v, dD, dbias;
  void init(const Scan<acc_t>& p, const Slab& slab, bool backward) {
    s = slab;
    const int64_t N = p.nstate;
    const V zero = splat<V>(acc_t(0));
    h.assign(N, zero);
    A.resize(N);
    state_matrix(p.A, p, s, A.data(), a_scale<acc_t>());
    if (p.b_fixed) Bf.resize(N), state_matrix(p.Bm, p, s, Bf.data());
    if (p.c_fixed) Cf.resize(N), state_matrix(p.Cm, p, s, Cf.data());
    bias_v = channel_vec(p.dbias, s, acc_t(0));
    D_v = channel_vec(p.Dskip, s, acc_t(0));
    dD = dbias = zero;
    if (backward) {
      dA.assign(N, zero);
      if (p.b_fixed) dBf.assign(N, zero);
      if (p.c_fixed) dCf.assign(N, zero);
    }
  }
};

// One step's update of the N states in `h` and its y before the gate (D u included). Inlined into the
// step loop, so with a fixed kN the loop over the states unrolls fully and a local `h` lives in
// registers (GCC unrolls neither a 16-trip loop of this size nor keeps a vector's data in registers).
// With kRecord (the backward's recompute) it also stores each state's a_t h_{t-1} in M and a_t in AA, and
// adds h_t dy_t to PC (the step's dC lanes): h_t is in a register here, and the adjoint then needs
// neither h_t nor a read-modify-write of PC.
template <typename acc_t, bool kBFixed, bool kCFixed, int kN, bool kRecord>
inline __attribute__((always_inline)) VecOf<acc_t> scan_one_step(const SlabState<acc_t>& st, int64_t N, VecOf<acc_t> dt,
                                                                  VecOf<acc_t> dtu, VecOf<acc_t> y, const acc_t* Bt,
                                                                  const acc_t* Ct, VecOf<acc_t>* h, VecOf<acc_t>* M,
                                                                  VecOf<acc_t>* AA, VecOf<acc_t> dy, VecOf<acc_t>* PC) {
  using V = VecOf<acc_t>;
  const V* A = st.A.data();
  V y1 = splat<V>(acc_t(0));  // two partial sums halve the latency chain of y through the states
#pragma GCC unroll 16
  for (int64_t n = 0; n < N; ++n) {
    const V a = decay(dt, A[n]);
    const V bn = kBFixed ? st.Bf[n] : splat<V>(Bt[n]);
    const V cn = kCFixed ? st.Cf[n] : splat<V>(Ct[n]);
    if (kRecord) {
      const V m = a * h[n];
      h[n] = fmadd(dtu, bn, m);
      M[n] = m;
      AA[n] = a;
      PC[n] = fmadd(h[n], dy, PC[n]);
    } else {
      h[n] = fmadd(a, h[n], dtu * bn);
    }
    if (n & 1) y1 = fmadd(h[n], cn, y1);
    else y = fmadd(h[n], cn, y);
  }
  return y + y1;
}

// Steps [t0, t0 + T) of one slab from state h (updated in place), the chunk staged in buf: y before the
// gate into buf.Y; with kRecord (the backward's recompute), each step's a_t h_{t-1} and a_t into buf.M /
// buf.AA, and h_t dL/dy_t (buf.DO) added to the step's dC lanes (buf.PC, or st.dCf for a fixed C).
// Per-sequence final states are stored at sequence ends when store_last.
template <typename acc_t, bool kBFixed, bool kCFixed, int kN, bool kRecord>
void scan_steps(const Scan<acc_t>& p, SlabState<acc_t>& st, int64_t t0, int64_t T, Buffers<acc_t>& buf,
                VecOf<acc_t>* h, bool store_last, RowPrefetcher* prefetch = nullptr) {
  using V = VecOf<acc_t>;
  const int64_t N = kN > 0 ? kN : p.nstate;
  const Slab& s = st.s;
  // With kN fixed the state is carried in `local` (registers) and synced with `h` only around the rare
  // sequence-boundary loads / stores; `local` is indexed by constants only, so it never needs memory.
  V local[kN > 0 ? kN : 1];
  V* hs = h;
  if constexpr (kN > 0) {
    for (int n = 0; n < kN; ++n) local[n] = h[n];
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t tt = t0 + t;
    if (prefetch != nullptr) prefetch->step();
    if (tt > 0 && p.seq_idx != nullptr && p.is_start(s.b, tt)) {
      load_state(p.init, p.state_row(s.b, tt, false), p, s, h);
      if constexpr (kN > 0) {
        for (int n = 0; n < kN; ++n) local[n] = h[n];
      }
    }
    // without D no D u term at all: 0 * inf would turn an infinite u's output NaN
    const V dt = buf.DT[t], dtu = buf.DTU[t], y0 = p.Dskip != nullptr ? st.D_v * buf.U[t] : V{};
    const acc_t* Bt = buf.Bs.data() + t * N;
    const acc_t* Ct = buf.Cs.data() + t * N;
    V* M = kRecord ? buf.M.data() + t * N : nullptr;
    V* AA = kRecord ? buf.AA.data() + t * N : nullptr;
    V* PC = !kRecord ? nullptr : kCFixed ? st.dCf.data() : buf.PC.data() + t * N;
    const V dy = kRecord ? buf.DO[t] : V{};
    if constexpr (kN > 0) {
      buf.Y[t] = scan_one_step<acc_t, kBFixed, kCFixed, kN, kRecord>(st, kN, dt, dtu, y0, Bt, Ct, local, M, AA, dy, PC);
    } else {
      buf.Y[t] = scan_one_step<acc_t, kBFixed, kCFixed, kN, kRecord>(st, N, dt, dtu, y0, Bt, Ct, hs, M, AA, dy, PC);
    }
    if (store_last && p.per_seq && p.is_end(s.b, tt)) {
      if constexpr (kN > 0) {
        for (int n = 0; n < kN; ++n) h[n] = local[n];
      }
      store_state(p.last, p.state_row(s.b, tt, true), p, s, h);
    }
  }
  if constexpr (kN > 0) {
    for (int n = 0; n < kN; ++n) h[n] = local[n];
  }
}

// The saved state of channel d before chunk c: chunk_states[b][d][c][:].
template <typename acc_t>
acc_t* chunk_state(const Scan<acc_t>& p, int64_t b, int64_t d, int64_t c) {
  return p.chunk_states + ((b * p.dim + d) * p.nchunks + c) * p.nstate;
}

// ---------------------------------------------------------------- forward

// Queue the rows of slab s's chunk [t0, t0 + T) for prefetching: the inputs (u, delta, z; dout in the
// backward) for reading, the outputs (out; du, ddelta, dz) for writing.
template <typename acc_t>
void plan_prefetch(const Scan<acc_t>& p, const Slab& s, int64_t t0, int64_t T, bool backward, RowPrefetcher& pf) {
  pf.reset(T * static_cast<int64_t>(p.io_size));
  for (const char* base : {p.u, p.delta, p.z, backward ? p.dout : nullptr})
    if (base != nullptr)
      for (int l = 0; l < s.nl; ++l) pf.add(p.row(base, s.b, s.d0 + l, t0));
  const char* outputs[4] = {backward ? nullptr : p.out, backward ? p.du : nullptr, backward ? p.ddelta : nullptr,
                            backward ? p.dz : nullptr};
  for (const char* base : outputs)
    if (base != nullptr)
      for (int l = 0; l < s.nl; ++l) pf.add(p.row(base, s.b, s.d0 + l, t0), true);
}

// One chunk of one slab: the state goes from `st.h` (before the chunk) to after it; outputs written.
// kN: the state size when fixed at compile time (the inner loops unroll, the states stay in registers),
// 0 for any N.
template <typename acc_t, bool kBFixed, bool kCFixed, int kN>
void forward_chunk(const Scan<acc_t>& p, SlabState<acc_t>& st, int64_t t0, int64_t T, Buffers<acc_t>& buf,
                   RowPrefetcher* prefetch) {
  using V = VecOf<acc_t>;
  constexpr int W = Lanes<acc_t>::W;
  const Slab& s = st.s;
  V* h = st.h.data();
  for (int l = 0; l < s.nl; ++l) {  // the state before this chunk, for the backward
    acc_t* dst = chunk_state(p, s.b, s.d0 + l, t0 / p.chunk);
    for (int64_t n = 0; n < p.nstate; ++n) dst[n] = h[n][l];
  }
  stage_chunk(p, s, t0, T, buf, st.bias_v, false);
  if (prefetch != nullptr) prefetch->plan(T);
  scan_steps<acc_t, kBFixed, kCFixed, kN, false>(p, st, t0, T, buf, h, true, prefetch);
  char* rows[W];
  for (int l = 0; l < s.nl; ++l) rows[l] = p.row(p.out, s.b, s.d0 + l, t0);
  const char* zrows[W];
  if constexpr (kGateInRows<acc_t>) {
    for (int l = 0; l < s.nl; ++l) zrows[l] = p.z != nullptr ? p.row(p.z, s.b, s.d0 + l, t0) : nullptr;
  } else if (p.z != nullptr) {
    for (int64_t t = 0; t < T; ++t) buf.Y[t] = buf.Y[t] * (buf.Z[t] * vsigmoid(buf.Z[t]));
  }
  store_tile<acc_t>(rows, s.nl, p.io, p.io_size, T, reinterpret_cast<const acc_t*>(buf.Y.data()),
                    kGateInRows<acc_t> && p.z != nullptr ? zrows : nullptr);
}

template <typename acc_t, bool kBFixed, bool kCFixed, int kN>
void forward_task(const Scan<acc_t>& p, const Slab* slabs, int count, Buffers<acc_t>& buf,
                  std::vector<SlabState<acc_t>>& states) {
  states.resize(count);
  for (int j = 0; j < count; ++j) {
    states[j].init(p, slabs[j], false);
    load_state(p.init, p.len > 0 ? p.state_row(slabs[j].b, 0, true) : -1, p, slabs[j], states[j].h.data());
  }
  RowPrefetcher prefetch;
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t t0 = c * p.chunk, T = std::min(p.chunk, p.len - t0);
    stage_bc(p, slabs[0].b, slabs[0].g, t0, T, buf);
    for (int j = 0; j < count; ++j) {
      // while this slab-chunk computes, fetch the next one's inputs (next slab, or the first of the next chunk)
      const bool last_slab = j + 1 == count;
      const int64_t nt0 = last_slab ? t0 + p.chunk : t0;
      if (nt0 < p.len) {
        plan_prefetch(p, slabs[last_slab ? 0 : j + 1], nt0, std::min(p.chunk, p.len - nt0), false, prefetch);
      } else {
        prefetch.reset(0);
      }
      forward_chunk<acc_t, kBFixed, kCFixed, kN>(p, states[j], t0, T, buf, &prefetch);
    }
  }
  if (!p.per_seq)
    for (int j = 0; j < count; ++j) store_state(p.last, slabs[j].b, p, slabs[j], states[j].h.data());
}

// ---------------------------------------------------------------- backward

// One step of the adjoint over the N states (the loop of backward_chunk, inlined and, with a fixed N,
// unrolled so that g stays in registers): g becomes g_t a_t; d(dt) and gB accumulate.
template <typename acc_t, bool kBFixed, bool kCFixed>
inline __attribute__((always_inline)) void adjoint_one_step(SlabState<acc_t>& st, int64_t N, VecOf<acc_t> dt,
                                                            VecOf<acc_t> dtu, VecOf<acc_t> dy, const acc_t* Bt,
                                                            const acc_t* Ct, const VecOf<acc_t>* M,
                                                            const VecOf<acc_t>* AA, VecOf<acc_t>* PB,
                                                            VecOf<acc_t>* g, VecOf<acc_t>& gB,
                                                            VecOf<acc_t>& ddt) {
  using V = VecOf<acc_t>;
  const V* A = st.A.data();
  // two partial sums each for d(dt) and gB: halves their latency chains through the states
  V ddt1 = splat<V>(acc_t(0)), gB1 = splat<V>(acc_t(0));
#pragma GCC unroll 16
  for (int64_t n = 0; n < N; ++n) {
    const V bn = kBFixed ? st.Bf[n] : splat<V>(Bt[n]);
    const V cn = kCFixed ? st.Cf[n] : splat<V>(Ct[n]);
    const V gn = fmadd(cn, dy, g[n]);  // dL/dh_t
    const V ghA = gn * M[n];           // gn a_t h_{t-1}
    if (n & 1) {
      ddt1 = fmadd(ghA, A[n], ddt1);  // times 1 / a_scale below
      gB1 = fmadd(gn, bn, gB1);
    } else {
      ddt = fmadd(ghA, A[n], ddt);
      gB = fmadd(gn, bn, gB);
    }
    st.dA[n] = fmadd(ghA, dt, st.dA[n]);
    if (kBFixed) st.dBf[n] = fmadd(gn, dtu, st.dBf[n]);
    else PB[n] = fmadd(gn, dtu, PB[n]);
    g[n] = gn * AA[n];  // carried to step t - 1
  }
  ddt += ddt1;
  gB += gB1;
}

// One chunk of one slab, backwards: recompute the chunk's states from the saved one, then the adjoint
// g (st.h holds g_{t0+T} a_{t0+T} on entry, g_{t0} a_{t0} on exit). Per-step dB / dC go to the task's
// lane vectors PB / PC ([t][n], summed over the task's slabs; the lanes are added once per task).
template <typename acc_t, bool kBFixed, bool kCFixed, int kN>
void backward_chunk(const Scan<acc_t>& p, SlabState<acc_t>& st, int64_t t0, int64_t T, Buffers<acc_t>& buf,
                    std::vector<VecOf<acc_t>>& hbuf, RowPrefetcher* prefetch) {
  using V = VecOf<acc_t>;
  constexpr int W = Lanes<acc_t>::W;
  const int64_t N = kN > 0 ? kN : p.nstate, L = p.len;
  const Slab& s = st.s;
  const V zero = splat<V>(acc_t(0));
  stage_chunk(p, s, t0, T, buf, st.bias_v, true);
  // The gate's backward for the whole chunk, and dD: DO becomes dL/dy = dout silu(z) (the recompute needs it
  // for dC) and DZ dout silu'(z), times y once the recompute has it. A loop of independent steps, so that the
  // sigmoid's exp and division are on no recurrence's critical path.
  for (int64_t t = 0; t < T; ++t) {
    V dy = buf.DO[t];
    if (p.z != nullptr) {
      const V z = buf.Z[t];
      const V sg = vsigmoid(z);
      buf.DZ[t] = dy * (sg * (1 + z * (1 - sg)));
      dy = dy * (z * sg);
      buf.DO[t] = dy;
    }
    st.dD = fmadd(dy, buf.U[t], st.dD);
  }
  // Recompute: a_t h_{t-1} (M) and a_t (AA) of every step, y before the gate; dC.
  V* h = hbuf.data();
  for (int l = 0; l < W; ++l) {
    const acc_t* src = l < s.nl ? chunk_state(p, s.b, s.d0 + l, t0 / p.chunk) : nullptr;
    for (int64_t n = 0; n < N; ++n) h[n][l] = src != nullptr ? src[n] : acc_t(0);
  }
  if (prefetch != nullptr) prefetch->plan(T);
  scan_steps<acc_t, kBFixed, kCFixed, kN, true>(p, st, t0, T, buf, h, false, prefetch);
  if (p.z != nullptr)
    for (int64_t t = 0; t < T; ++t) buf.DZ[t] = buf.DZ[t] * buf.Y[t];
  // The adjoint g: in `local` (registers) when kN is fixed, as the forward's state in scan_steps.
  V* g = st.h.data();
  V local[kN > 0 ? kN : 1];
  if constexpr (kN > 0) {
    for (int n = 0; n < kN; ++n) local[n] = g[n];
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t tt = t0 + t;
    if (p.dlast != nullptr && p.is_end(s.b, tt)) {
      const int64_t r = p.state_row(s.b, tt, tt == L - 1);
      if (r >= 0) {
        load_state(p.dlast, r, p, s, h);  // h is free now: borrow it
        if constexpr (kN > 0) {
          for (int n = 0; n < kN; ++n) local[n] += h[n];
        } else {
          for (int64_t n = 0; n < N; ++n) g[n] += h[n];
        }
      }
    }
    const V dy = buf.DO[t];
    const V u = buf.U[t], dt = buf.DT[t], dtu = buf.DTU[t];
    const acc_t* Bt = buf.Bs.data() + t * N;
    const acc_t* Ct = buf.Cs.data() + t * N;
    const V* M = buf.M.data() + t * N;
    const V* AA = buf.AA.data() + t * N;
    V* PB = buf.PB.data() + t * N;
    V gB = zero, ddt = zero;
    if constexpr (kN > 0) {
      adjoint_one_step<acc_t, kBFixed, kCFixed>(st, kN, dt, dtu, dy, Bt, Ct, M, AA, PB, local, gB, ddt);
    } else {
      adjoint_one_step<acc_t, kBFixed, kCFixed>(st, N, dt, dtu, dy, Bt, Ct, M, AA, PB, g, gB, ddt);
    }
    if (p.is_start(s.b, tt)) {
      // The state before this step was the segment's start state: its gradient is g (already times
      // a_t); nothing flows into the previous segment.
      const int64_t r = p.state_row(s.b, tt, tt == 0);
      if constexpr (kN > 0) {
        for (int n = 0; n < kN; ++n) g[n] = local[n];
      }
      if (p.dinit != nullptr && r >= 0) store_state(p.dinit, r, p, s, g);
      for (int64_t n = 0; n < N; ++n) g[n] = zero;
      if constexpr (kN > 0) {
        for (int n = 0; n < kN; ++n) local[n] = zero;
      }
    }
    ddt = fmadd(gB, u, ddt * (acc_t(1) / a_scale<acc_t>()));
    buf.DU[t] = p.Dskip != nullptr ? fmadd(gB, dt, dy * st.D_v) : gB * dt;
    if (p.softplus) ddt = ddt * buf.DSP[t];
    st.dbias += ddt;
    buf.DDT[t] = ddt;
  }
  if constexpr (kN > 0) {
    for (int n = 0; n < kN; ++n) g[n] = local[n];
  }
  char* rows[W];
  auto tile = [&](char* base, const std::vector<V>& src) {
    for (int l = 0; l < s.nl; ++l) rows[l] = p.row(base, s.b, s.d0 + l, t0);
    store_tile<acc_t>(rows, s.nl, p.io, p.io_size, T, reinterpret_cast<const acc_t*>(src.data()));
  };
  tile(p.du, buf.DU);
  tile(p.ddelta, buf.DDT);
  if (p.z != nullptr) tile(p.dz, buf.DZ);
}

#ifdef FASTNN_SCAN_TILES
// Lane k of the result: the sum of v[k]'s 16 lanes. A tree that halves the vectors at each level, pairing
// 128-bit blocks, then floats within blocks (2 shuffles and an add per pair: 30 shuffles, 15 adds, 1 final
// permute, against 64 shuffles for a full transpose).
inline __m512 sum_lanes16(__m512 (&v)[16]) {
  for (int i = 0; i < 8; ++i)  // w_i = [v_2i: blocks 0+2, 1+3 | v_2i+1: blocks 0+2, 1+3]
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // q_i: block j = 4 partial sums of v_4i+j
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // r_i: block j = 2 partials of v_8i+j, then 2 of v_8i+4+j
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4 j + i: the sum of v_4i+j
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, f);
}
#endif

// dst[n * L + t] = the sum of the lanes of P[t * N + n], for t < T and every n. With AVX-512 and fp32, 16
// steps at a time through sum_lanes16 (a scalar sum of 16 lanes is a chain of 15 dependent adds).
template <typename acc_t>
void lane_sums(const VecOf<acc_t>* P, int64_t T, int64_t N, int64_t L, acc_t* dst) {
#ifdef FASTNN_SCAN_TILES
  if constexpr (std::is_same<acc_t, float>::value) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int64_t m = std::min<int64_t>(16, T - t0);
        __m512 r[16];
        for (int k = 0; k < 16; ++k) r[k] = k < m ? (__m512)P[(t0 + k) * N + n] : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(dst + n * L + t0, tail_mask(m), sum_lanes16(r));
      }
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) dst[n * L + t] = hsum(P[t * N + n]);
}

template <typename acc_t, bool kBFixed, bool kCFixed, int kN>
void backward_task(const Scan<acc_t>& p, const Slab* slabs, int count, int64_t task, Buffers<acc_t>& buf,
                   std::vector<SlabState<acc_t>>& states) {
  using V = VecOf<acc_t>;
  const int64_t N = p.nstate, L = p.len;
  const V zero = splat<V>(acc_t(0));
  states.resize(count);
  for (int j = 0; j < count; ++j) states[j].init(p, slabs[j], true);  // h holds the adjoint g: 0
  std::vector<V> hbuf(N);
  acc_t* dBstep = kBFixed ? nullptr : p.dBstep_part + task * N * L;
  acc_t* dCstep = kCFixed ? nullptr : p.dCstep_part + task * N * L;
  RowPrefetcher prefetch;
  for (int64_t c = p.nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * p.chunk, T = std::min(p.chunk, L - t0);
    stage_bc(p, slabs[0].b, slabs[0].g, t0, T, buf);
    if (!kBFixed) std::fill(buf.PB.begin(), buf.PB.begin() + T * N, zero);
    if (!kCFixed) std::fill(buf.PC.begin(), buf.PC.begin() + T * N, zero);
    for (int j = 0; j < count; ++j) {
      // the next slab-chunk's inputs: the next slab, or the first slab of the previous chunk
      const bool last_slab = j + 1 == count;
      if (!last_slab || c > 0) {
        const int64_t nt0 = last_slab ? t0 - p.chunk : t0;
        plan_prefetch(p, slabs[last_slab ? 0 : j + 1], nt0, std::min(p.chunk, L - nt0), true, prefetch);
      } else {
        prefetch.reset(0);
      }
      backward_chunk<acc_t, kBFixed, kCFixed, kN>(p, states[j], t0, T, buf, hbuf, &prefetch);
    }
    if (!kBFixed) lane_sums(buf.PB.data(), T, N, L, dBstep + t0);
    if (!kCFixed) lane_sums(buf.PC.data(), T, N, L, dCstep + t0);
  }
  for (int j = 0; j < count; ++j) {  // per-row partials of the batch-summed parameters
    const SlabState<acc_t>& st = states[j];
    for (int l = 0; l < st.s.nl; ++l) {
      const int64_t d = st.s.d0 + l;
      for (int64_t n = 0; n < N; ++n) {
        p.dA_part[(st.s.b * p.dim + d) * N + n] = st.dA[n][l];
        if (kBFixed) p.dBfix_part[(st.s.b * p.dim + d) * N + n] = st.dBf[n][l];
        if (kCFixed) p.dCfix_part[(st.s.b * p.dim + d) * N + n] = st.dCf[n][l];
      }
      p.dD_part[st.s.b * p.dim + d] = st.dD[l];
      p.dbias_part[st.s.b * p.dim + d] = st.dbias[l];
    }
  }
}

// ---------------------------------------------------------------- tasks

// Slabs per task: a fixed partition (so the dB / dC partial sums, and the result, do not depend on the
// thread count). The task's slabs share B / C staging, and the backward adds the lanes of its dB / dC
// vectors once per task instead of once per slab.
constexpr int64_t kSlabsPerTask = 8;

struct TaskPlan {
  int64_t slabs_per_group, tasks_per_group, tasks;
};

template <typename acc_t>
TaskPlan plan(const Scan<acc_t>& p) {
  TaskPlan t;
  t.slabs_per_group = p.slabs_per_group(Lanes<acc_t>::W);
  t.tasks_per_group = (t.slabs_per_group + kSlabsPerTask - 1) / kSlabsPerTask;
  t.tasks = p.batch * p.ngroups * t.tasks_per_group;
  return t;
}

template <typename acc_t>
Slab slab_of(const Scan<acc_t>& p, int64_t b, int64_t g, int64_t j) {
  constexpr int W = Lanes<acc_t>::W;
  const int64_t gs = p.group_size();
  Slab s;
  s.b = b;
  s.g = g;
  s.d0 = g * gs + j * W;
  s.nl = static_cast<int>(std::min<int64_t>(W, gs - j * W));
  return s;
}

// f(task, slabs, count, buffers, states) for every task, in parallel; buffers live per worker range.
template <typename acc_t, typename F>
void for_each_task(const Scan<acc_t>& p, bool backward, F&& f) {
  const TaskPlan tp = plan(p);
  at::parallel_for(0, tp.tasks, 1, [&](int64_t begin, int64_t end) {
    Buffers<acc_t> buf(p.chunk, p.nstate, backward);
    std::vector<SlabState<acc_t>> states;
    Slab slabs[kSlabsPerTask];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.ngroups * tp.tasks_per_group);
      const int64_t g = (task / tp.tasks_per_group) % p.ngroups;
      const int64_t k = task % tp.tasks_per_group;
      const int64_t j_end = std::min(tp.slabs_per_group, (k + 1) * kSlabsPerTask);
      int count = 0;
      for (int64_t j = k * kSlabsPerTask; j < j_end; ++j) slabs[count++] = slab_of(p, b, g, j);
      f(task, slabs, count, buf, states);
    }
  });
}

template <typename acc_t, bool kBFixed, bool kCFixed, int kN>
void run_forward(const Scan<acc_t>& p) {
  for_each_task(p, false, [&](int64_t, const Slab* slabs, int count, Buffers<acc_t>& buf,
                              std::vector<SlabState<acc_t>>& states) {
    forward_task<acc_t, kBFixed, kCFixed, kN>(p, slabs, count, buf, states);
  });
}

template <typename acc_t, bool kBFixed, bool kCFixed, int kN>
void run_backward(const Scan<acc_t>& p) {
  for_each_task(p, true, [&](int64_t task, const Slab* slabs, int count, Buffers<acc_t>& buf,
                             std::vector<SlabState<acc_t>>& states) {
    backward_task<acc_t, kBFixed, kCFixed, kN>(p, slabs, count, task, buf, states);
  });
}

// Mamba's N = 16 (fp32 lanes) gets its own unrolled instantiation; everything else runs the generic one.
template <typename acc_t, bool kBFixed, bool kCFixed>
void dispatch_n(const Scan<acc_t>& p, bool backward) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (p.nstate == 16) {
      backward ? run_backward<acc_t, kBFixed, kCFixed, 16>(p) : run_forward<acc_t, kBFixed, kCFixed, 16>(p);
      return;
    }
  }
  backward ? run_backward<acc_t, kBFixed, kCFixed, 0>(p) : run_forward<acc_t, kBFixed, kCFixed, 0>(p);
}

template <typename acc_t>
void dispatch(const Scan<acc_t>& p, bool backward) {
  if (p.b_fixed && p.c_fixed) dispatch_n<acc_t, true, true>(p, backward);
  else if (p.b_fixed) dispatch_n<acc_t, true, false>(p, backward);
  else if (p.c_fixed) dispatch_n<acc_t, false, true>(p, backward);
  else dispatch_n<acc_t, false, false>(p, backward);
}

// ---------------------------------------------------------------- argument plumbing

template <typename T>
const T* opt_ptr(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                  const c10::optional<Tensor>& z, const c10::optional<Tensor>& seq_idx, bool per_seq,
                  int64_t chunk_size) {
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "selective_scan (cpu): u and delta must be (B, D, L)");
  TORCH_CHECK(u.is_contiguous() && delta.is_contiguous(), "selective_scan (cpu): u, delta must be contiguous");
  TORCH_CHECK(delta.scalar_type() == u.scalar_type(), "selective_scan (cpu): delta must have u's dtype");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "selective_scan (cpu): A must be (D, N)");
  for (const Tensor* m : {&Bm, &Cm})
    TORCH_CHECK((m->dim() == 2 && m->sizes() == A.sizes()) ||
                    (m->dim() == 4 && m->size(0) == u.size(0) && m->size(2) == A.size(1) &&
                     m->size(3) == u.size(2) && u.size(1) % m->size(1) == 0),
                "selective_scan (cpu): B and C must be (D, N) or (B, G, N, L)");
  if (z.has_value() && z->defined())
    TORCH_CHECK(z->sizes() == u.sizes() && z->is_contiguous() && z->scalar_type() == u.scalar_type(),
                "selective_scan (cpu): z must be a contiguous (B, D, L) tensor of u's dtype");
  if (seq_idx.has_value() && seq_idx->defined())
    TORCH_CHECK(seq_idx->scalar_type() == at::kInt && seq_idx->dim() == 2 && seq_idx->size(0) == u.size(0) &&
                    seq_idx->size(1) == u.size(2) && seq_idx->is_contiguous(),
                "selective_scan (cpu): seq_idx must be a contiguous int32 (B, L) tensor");
  TORCH_CHECK(!per_seq || (seq_idx.has_value() && seq_idx->defined() && u.size(0) == 1),
              "selective_scan (cpu): per-sequence states need seq_idx and B == 1");
  TORCH_CHECK(chunk_size >= 1, "selective_scan (cpu): chunk_size must be positive");
  TORCH_CHECK(A.is_contiguous() && Bm.is_contiguous() && Cm.is_contiguous(),
              "selective_scan (cpu): A, B and C must be contiguous");
}

// The optional per-channel and state inputs, which the kernels index without bounds: a raw call of the op
// (torch.ops.fastnn.*) with a short one would read past its end. Returns the number of state rows.
int64_t check_state_inputs(const Tensor& u, const Tensor& A, const c10::optional<Tensor>& D_skip,
                           const c10::optional<Tensor>& delta_bias, const c10::optional<Tensor>& initial_state,
                           const c10::optional<Tensor>& seq_idx, bool per_seq) {
  const int64_t Dm = u.size(1), N = A.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const c10::optional<Tensor>*>{"D", &D_skip},
                                {"delta_bias", &delta_bias}})
    if (t->has_value() && (*t)->defined())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == Dm && (*t)->is_contiguous(), "selective_scan (cpu): ", name,
                  " must be a contiguous (", Dm, ",) tensor, got ", (*t)->sizes());
  const bool has_init = initial_state.has_value() && initial_state->defined();
  if (has_init)
    TORCH_CHECK(initial_state->dim() == 3 && (per_seq || initial_state->size(0) == u.size(0)) &&
                    initial_state->size(1) == Dm && initial_state->size(2) == N && initial_state->is_contiguous(),
                "selective_scan (cpu): initial_state must be a contiguous (", per_seq ? "S" : std::to_string(u.size(0)),
                ", ", Dm, ", ", N, ") tensor, got ", initial_state->sizes());
  if (!per_seq) return u.size(0);
  if (u.size(2) == 0) return has_init ? initial_state->size(0) : 0;
  // per-sequence states are indexed by the sequence id: every id must name a state row
  const auto [lo, hi] = at::aminmax(*seq_idx);
  const int64_t low = lo.item<int32_t>(), high = hi.item<int32_t>();
  const int64_t rows = has_init ? initial_state->size(0) : high + 1;
  TORCH_CHECK(low >= 0 && high < rows, "selective_scan (cpu): with per-sequence states seq_idx must be in [0, ", rows,
              ") (the number of states), got [", low, ", ", high, "]");
  return rows;
}

template <typename acc_t>
Scan<acc_t> describe(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                     const c10::optional<Tensor>& D_skip, const c10::optional<Tensor>& z,
                     const c10::optional<Tensor>& delta_bias, bool delta_softplus,
                     const c10::optional<Tensor>& initial_state, const c10::optional<Tensor>& seq_idx,
                     bool per_seq, int64_t chunk_size) {
  Scan<acc_t> p{};
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.len = u.size(2);
  p.nstate = A.size(1);
  p.b_fixed = Bm.dim() == 2;
  p.c_fixed = Cm.dim() == 2;
  p.ngroups = !p.b_fixed ? Bm.size(1) : (!p.c_fixed ? Cm.size(1) : 1);
  TORCH_CHECK(p.b_fixed || p.c_fixed || Bm.size(1) == Cm.size(1),
              "selective_scan (cpu): per-step B and C must have the same number of groups");
  p.chunk = chunk_size;
  p.nchunks = (p.len + chunk_size - 1) / chunk_size;
  p.io = u.scalar_type();
  p.io_size = u.element_size();
  p.u = static_cast<const char*>(u.data_ptr());
  p.delta = static_cast<const char*>(delta.data_ptr());
  p.z = z.has_value() && z->defined() ? static_cast<const char*>(z->data_ptr()) : nullptr;
  p.A = A.data_ptr<acc_t>();
  p.Bm = Bm.data_ptr<acc_t>();
  p.Cm = Cm.data_ptr<acc_t>();
  p.Dskip = opt_ptr<acc_t>(D_skip);
  p.dbias = opt_ptr<acc_t>(delta_bias);
  p.init = opt_ptr<acc_t>(initial_state);
  p.softplus = delta_softplus;
  p.per_seq = per_seq;
  p.seq_idx = opt_ptr<int32_t>(seq_idx);
  return p;
}

// Sum of a contiguous tensor over `dim`, adding the slices in index order (deterministic for any thread
// count, unlike a parallel reduction).
Tensor ordered_sum(const Tensor& part, int64_t dim) {
  auto sizes = part.sizes().vec();
  const int64_t R = sizes[dim];
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= sizes[i];
  for (size_t i = dim + 1; i < sizes.size(); ++i) inner *= sizes[i];
  sizes.erase(sizes.begin() + dim);
  Tensor out = at::zeros(sizes, part.options());
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "ordered_sum", [&] {
    const scalar_t* src = part.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    // blocks of consecutive outputs, each slice r added over the whole block in turn: contiguous reads that
    // vectorise, and for every output the same order r = 0, 1, ... as a scalar loop
    constexpr int64_t kBlock = 1024;
    const int64_t blocks = (inner + kBlock - 1) / kBlock;
    at::parallel_for(0, outer * blocks, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t o = i / blocks, k0 = (i % blocks) * kBlock, n = std::min(kBlock, inner - k0);
        scalar_t* d = dst + o * inner + k0;
        for (int64_t r = 0; r < R; ++r) {
          const scalar_t* s = src + (o * R + r) * inner + k0;
          for (int64_t k = 0; k < n; ++k) d[k] += s[k];
        }
      }
    });
  });
  return out;
}

at::ScalarType acc_type(const Tensor& u) { return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::vector<Tensor> selective_scan_forward(FASTNN_SCAN_FWD_ARGS) {
  check_inputs(u, delta, A, Bm, Cm, z, seq_idx, per_sequence_states, chunk_size);
  const auto at_ = acc_type(u);
  const int64_t Bsz = u.size(0), Dm = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t nchunks = (L + chunk_size - 1) / chunk_size;
  const int64_t R = check_state_inputs(u, A, D_skip, delta_bias, initial_state, seq_idx, per_sequence_states);
  Tensor out = new_output(u.sizes(), u.options());
  Tensor last = new_output({R, Dm, N}, u.options().dtype(at_));
  Tensor chunks = new_output({Bsz, Dm, nchunks, N}, u.options().dtype(at_));
  if (u.numel() == 0) {
    if (initial_state.has_value() && initial_state->defined() && !per_sequence_states) last.copy_(*initial_state);
    else last.zero_();
    return {out, last, chunks};
  }
  AT_DISPATCH_FLOATING_TYPES(at_, "selective_scan_forward_cpu", [&] {
    auto p = describe<scalar_t>(u, delta, A, Bm, Cm, D_skip, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                per_sequence_states, chunk_size);
    p.out = static_cast<char*>(out.data_ptr());
    p.last = last.data_ptr<scalar_t>();
    p.chunk_states = chunks.data_ptr<scalar_t>();
    dispatch(p, false);
  });
  return {out, last, chunks};
}

std::vector<Tensor> selective_scan_backward(FASTNN_SCAN_BWD_ARGS) {
  (void)deterministic;  // always deterministic here
  check_inputs(u, delta, A, Bm, Cm, z, seq_idx, per_sequence_states, chunk_size);
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.is_contiguous() && dout.scalar_type() == u.scalar_type(),
              "selective_scan_backward (cpu): dout must be a contiguous (B, D, L) tensor of u's dtype");
  const int64_t R = check_state_inputs(u, A, D_skip, delta_bias, initial_state, seq_idx, per_sequence_states);
  const auto at_ = acc_type(u);
  const int64_t Bsz = u.size(0), Dm = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t nchunks = (L + chunk_size - 1) / chunk_size;
  TORCH_CHECK(chunk_states.dim() == 4 && chunk_states.size(0) == Bsz && chunk_states.size(1) == Dm &&
                  chunk_states.size(2) == nchunks && chunk_states.size(3) == N && chunk_states.is_contiguous(),
              "selective_scan_backward (cpu): chunk_states must be a contiguous (", Bsz, ", ", Dm, ", ", nchunks, ", ",
              N, ") tensor (chunk_size ", chunk_size, "), got ", chunk_states.sizes());
  if (dlast_state.has_value() && dlast_state->defined())
    TORCH_CHECK(dlast_state->dim() == 3 && dlast_state->size(0) == R && dlast_state->size(1) == Dm &&
                    dlast_state->size(2) == N && dlast_state->is_contiguous(),
                "selective_scan_backward (cpu): dlast_state must be a contiguous (", R, ", ", Dm, ", ", N,
                ") tensor, got ", dlast_state->sizes());
  const bool has_z = z.has_value() && z->defined();
  const bool has_init = initial_state.has_value() && initial_state->defined();
  Tensor du = new_output(u.sizes(), u.options());
  Tensor ddelta = new_output(u.sizes(), u.options());
  Tensor dz = has_z ? new_output(u.sizes(), u.options()) : Tensor();
  auto facc = u.options().dtype(at_);
  Tensor dinit = has_init ? at::zeros(initial_state->sizes(), facc) : Tensor();
  const bool b_fixed = Bm.dim() == 2, c_fixed = Cm.dim() == 2;
  Tensor dA_part = at::zeros({Bsz, Dm, N}, facc), dD_part = at::zeros({Bsz, Dm}, facc);
  Tensor dbias_part = at::zeros({Bsz, Dm}, facc);
  Tensor dBfix_part = b_fixed ? at::zeros({Bsz, Dm, N}, facc) : Tensor();
  Tensor dCfix_part = c_fixed ? at::zeros({Bsz, Dm, N}, facc) : Tensor();
  const int64_t G = !b_fixed ? Bm.size(1) : (!c_fixed ? Cm.size(1) : 1);
  const int W = at_ == at::kDouble ? Lanes<double>::W : Lanes<float>::W;
  const int64_t slabs = ((Dm / G) + W - 1) / W;
  const int64_t tasks_per_group = (slabs + kSlabsPerTask - 1) / kSlabsPerTask;  // as plan()
  // every element of the per-task partials is written (lane_sums covers each task's N x L)
  Tensor dB_part = b_fixed ? Tensor() : at::empty({Bsz, G, tasks_per_group, N, L}, facc);
  Tensor dC_part = c_fixed ? Tensor() : at::empty({Bsz, G, tasks_per_group, N, L}, facc);
  if (u.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(at_, "selective_scan_backward_cpu", [&] {
      auto p = describe<scalar_t>(u, delta, A, Bm, Cm, D_skip, z, delta_bias, delta_softplus, initial_state,
                                  seq_idx, per_sequence_states, chunk_size);
      p.chunk_states = const_cast<scalar_t*>(chunk_states.data_ptr<scalar_t>());
      p.dout = static_cast<const char*>(dout.data_ptr());
      p.dlast = opt_ptr<scalar_t>(dlast_state);
      p.du = static_cast<char*>(du.data_ptr());
      p.ddelta = static_cast<char*>(ddelta.data_ptr());
      p.dz = has_z ? static_cast<char*>(dz.data_ptr()) : nullptr;
      p.dA_part = dA_part.data_ptr<scalar_t>();
      p.dD_part = dD_part.data_ptr<scalar_t>();
      p.dbias_part = dbias_part.data_ptr<scalar_t>();
      p.dBfix_part = b_fixed ? dBfix_part.data_ptr<scalar_t>() : nullptr;
      p.dCfix_part = c_fixed ? dCfix_part.data_ptr<scalar_t>() : nullptr;
      p.dBstep_part = b_fixed ? nullptr : dB_part.data_ptr<scalar_t>();
      p.dCstep_part = c_fixed ? nullptr : dC_part.data_ptr<scalar_t>();
      p.dinit = has_init ? dinit.data_ptr<scalar_t>() : nullptr;
      dispatch(p, true);
    });
  } else {
    du.zero_();
    ddelta.zero_();
    if (has_z) dz.zero_();
    if (has_init && dlast_state.has_value() && dlast_state->defined() && !per_sequence_states)
      dinit.copy_(*dlast_state);
  }
  // Ordered sums over the batch (and over tasks for per-step B / C): deterministic.
  Tensor dA = ordered_sum(dA_part, 0);
  Tensor dB = b_fixed ? ordered_sum(dBfix_part, 0) : ordered_sum(dB_part, 2);
  Tensor dC = c_fixed ? ordered_sum(dCfix_part, 0) : ordered_sum(dC_part, 2);
  Tensor dD = D_skip.has_value() && D_skip->defined() ? ordered_sum(dD_part, 0) : Tensor();
  Tensor dbias = delta_bias.has_value() && delta_bias->defined() ? ordered_sum(dbias_part, 0) : Tensor();
  return {du, ddelta, dz, dA, dB, dC, dD, dbias, dinit};
}

void exp2_throughput(const at::Tensor& x, at::Tensor& y, int64_t reps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && x.is_contiguous() &&
                  y.is_contiguous() && !x.is_cuda() && !y.is_cuda(),
              "fastnn exp2_throughput: x and y must be contiguous float32 CPU tensors");
  TORCH_CHECK(x.numel() == y.numel() && x.numel() % 16 == 0, "fastnn exp2_throughput: x and y must have the same "
              "size, a multiple of 16; got ", x.numel(), " and ", y.numel());
  TORCH_CHECK(reps >= 1, "fastnn exp2_throughput: reps must be >= 1, got ", reps);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < reps; ++r) {
      for (int64_t i = begin; i < end; ++i) {  // independent vectors: the exps overlap as in the scan's states
        VF v;
        std::memcpy(&v, xp + 16 * i, sizeof v);
        v = vexp2(v);
        std::memcpy(yp + 16 * i, &v, sizeof v);
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastnn
