// CUDA selective scan (mamba's selective_scan_fn), forward and backward kernels. No ATen here; the
// launchers are selective_scan_fwd.cu / selective_scan_bwd.cu. Semantics: fastnn/reference/ssm.py.
//
// Layout of the work
//   One CTA per (channel d, batch row b): blockIdx.x = d (so neighbouring CTAs share the per-step B/C rows
//   of a group in L2), blockIdx.y = b. The sequence is cut into chunks of kScanChunk = 2048 steps, walked
//   in order (forward) or in reverse (backward) with the state carried between chunks in shared memory.
//   Inside a chunk, thread i owns kItems consecutive steps (vectorised 16-byte loads and stores), and for
//   every state n the CTA runs one scan of the affine pairs (a, b) of ssm_math.h: a sequential pass over
//   the thread's items, a warp scan by shuffles, then the warp totals through shared memory (one
//   __syncthreads per state: the warp-total buffers alternate between even and odd n).
//   Forward: 128 threads x 16 items = one chunk; backward: 256 threads x 8 items (half the items keep the
//   per-item arrays of the backward in registers). When the sequence fits in one chunk, fewer threads run
//   (a power of two >= 32), so short sequences do not leave most threads idle.
//
// Resets (seq_idx) are folded into the scan elements (ssm::step_element), so a segmented scan is a plain
// one. Step 0 is never a reset: the incoming carry already is the row's (or first sequence's) initial state.
//
// Backward, per chunk from the last: the forward states are recomputed from chunk_states (the state before
// the chunk's first step, saved by the forward), then a reverse scan gives the adjoint. With
//   g_t = dL/dh_t (h_t the state after step t) and w_t = a_t * g_t (what step t hands back to h_{t-1}),
//   w_t = a_t * w_{t+1} + a_t * C_t * dy_t, g_t = C_t * dy_t + w_{t+1}
// so the reverse scan runs over the affine pairs (a_t, a_t C_t dy_t), each from its own step only. A reset
// step t hands back no gradient through the state; its element becomes the constant (0, dlast of the
// sequence ending at t - 1), which is how the per-sequence final-state gradients enter.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/ssm_math.h"

// The dynamic shared memory of a kernel; tests/cpu_emu (the CPU emulation of these kernels) redefines it.
#ifndef FASTNN_SCAN_DYNAMIC_SHARED
#define FASTNN_SCAN_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace fastnn::cuda {

constexpr int kScanChunk = 2048;        // steps per chunk; the value chunk_size must have
constexpr int kFwdItems = 16;           // forward: steps per thread
constexpr int kFwdMaxThreads = 128;     // forward: kFwdMaxThreads * kFwdItems == kScanChunk
constexpr int kBwdItems = 8;            // backward: steps per thread
constexpr int kBwdMaxThreads = 256;     // backward: kBwdMaxThreads * kBwdItems == kScanChunk
constexpr int kMaxScanState = 256;      // largest N
// CTAs per SM the register allocation must allow (__launch_bounds__): 128 registers per thread for both,
// 16 warps per SM, enough to hide the shuffle / shared-memory latency of the per-state scans. sm_80's
// forward allows 2 CTAs (175 registers): at 4, ptxas keeps 8 bytes on the stack there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kFwdMinBlocks = 2;
#else
constexpr int kFwdMinBlocks = 4;
#endif
constexpr int kBwdMinBlocks = 2;
static_assert(kFwdMaxThreads * kFwdItems == kScanChunk, "forward tile must be one chunk");
static_assert(kBwdMaxThreads * kBwdItems == kScanChunk, "backward tile must be one chunk");

// Threads per CTA for a sequence of length L: the full tile when L spans several chunks, else the smallest
// power of two >= 32 whose tile covers L (then the one chunk is the one tile).
inline int scan_threads(int64_t L, int items, int max_threads) {
  int threads = 32;
  while (threads < max_threads && static_cast<int64_t>(threads) * items < L) threads *= 2;
  return threads;
}

struct ScanFwdParams {
  const void* u;             // (B, D, L) input dtype
  const void* delta;         // (B, D, L)
  const void* z;             // (B, D, L) or null
  void* out;                 // (B, D, L)
  const float* A;            // (D, N)
  const float* Bm;           // (D, N) or (B, G, N, L)
  const float* Cm;           // (D, N) or (B, G, N, L)
  const float* D_skip;       // (D,) or null
  const float* delta_bias;   // (D,) or null
  const float* init;         // (R, D, N) or null
  const int* seq_idx;        // (B, L) or null
  float* last_state;         // (R, D, N)
  float* chunk_states;       // (B, D, nchunks, N)
  int batch, dim, seqlen, dstate, groups, nchunks;
  bool B_var, C_var, softplus, per_seq;  // per_seq: states numbered by seq_idx value (batch == 1)
};

struct ScanBwdParams {
  ScanFwdParams f;           // the forward's inputs (out, last_state, chunk_states there are unused)
  const void* dout;          // (B, D, L)
  const float* dlast;        // (R, D, N) or null
  const float* chunk_states; // (B, D, nchunks, N), from the forward
  void* du;                  // (B, D, L)
  void* ddelta;              // (B, D, L)
  void* dz;                  // (B, D, L) or null
  float* dinit;              // (R, D, N), or null when there is no initial state
  // Sums over time per (b, d), reduced over b in order by the launcher: (B, D, N) and (B, D).
  float* part_dA;
  float* part_dB;            // fixed B only
  float* part_dC;            // fixed C only
  float* part_dD;
  float* part_dbias;
  // Per-step B / C gradients. atomic: red.add into dB / dC (B, G, N, L). Otherwise one plane per
  // channel, scratch[((b - b0) * dcount + (d - d0)) * N + n][t], summed over the group's channels in
  // order by a second kernel.
  float* dB_var;
  float* dC_var;
  bool atomic_var;
  int b0, d0, dcount;        // this launch covers rows b0 + blockIdx.y, channels d0 + blockIdx.x
};

// ------------------------------------------------------------------------------------------------ helpers

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16-bit element <-> float through the bits of a 32-bit word (no local arrays: they cost stack on sm_80).
__device__ __forceinline__ float half_bits_to_f(unsigned short x, __half*) { return __half2float(__ushort_as_half(x)); }
__device__ __forceinline__ float half_bits_to_f(unsigned short x, __nv_bfloat16*) {
  return __bfloat162float(__ushort_as_bfloat16(x));
}
__device__ __forceinline__ unsigned short f_to_half_bits(float x, __half*) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ unsigned short f_to_half_bits(float x, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// K consecutive elements from row[p..p+K), zeros past L: 16-byte loads when the whole run is in range and
// aligned (always, when L * sizeof(T) is a multiple of 16), else element by element.
template <int K, typename T>
__device__ __forceinline__ void load_items(const T* __restrict__ row, int p, int L, float (&v)[K]) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(K % kVec == 0, "items must fill whole 16-byte words");
  const T* src = row + p;
  if (p + K <= L && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
#pragma unroll
    for (int j = 0; j < K / kVec; ++j) {
      if constexpr (sizeof(T) == 4) {
        const float4 f = __ldg(reinterpret_cast<const float4*>(src) + j);
        v[4 * j] = f.x, v[4 * j + 1] = f.y, v[4 * j + 2] = f.z, v[4 * j + 3] = f.w;
      } else {
        const uint4 r = __ldg(reinterpret_cast<const uint4*>(src) + j);
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          v[8 * j + 2 * k] = half_bits_to_f(static_cast<unsigned short>(w[k] & 0xffffu), static_cast<T*>(nullptr));
          v[8 * j + 2 * k + 1] = half_bits_to_f(static_cast<unsigned short>(w[k] >> 16), static_cast<T*>(nullptr));
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = p + i < L ? to_f(src[i]) : 0.0f;
  }
}

template <int K, typename T>
__device__ __forceinline__ void store_items(T* __restrict__ row, int p, int L, const float (&v)[K]) {
  constexpr int kVec = 16 / sizeof(T);
  T* dst = row + p;
  if (p + K <= L && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
#pragma unroll
    for (int j = 0; j < K / kVec; ++j) {
      if constexpr (sizeof(T) == 4) {
        reinterpret_cast<float4*>(dst)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
          w[k] = static_cast<uint32_t>(f_to_half_bits(v[8 * j + 2 * k], static_cast<T*>(nullptr))) |
                 (static_cast<uint32_t>(f_to_half_bits(v[8 * j + 2 * k + 1], static_cast<T*>(nullptr))) << 16);
        reinterpret_cast<uint4*>(dst)[j] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (p + i < L) dst[i] = from_f<T>(v[i]);
  }
}

// B or C for state n at the thread's K steps: a per-step row (B, G, N, L), or one value per channel.
template <int K>
__device__ __forceinline__ void load_coef(const float* __restrict__ base, bool var, int n, int N, int L, int p,
                                          float (&v)[K]) {
  if (var) {
    load_items<K>(base + static_cast<int64_t>(n) * L, p, L, v);
  } else {
    const float c = __ldg(base + n);
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = c;
  }
}

// Per-step dB / dC values of a warp's 32 x K steps (lane l holds steps warp_pos + l K .. + K - 1): red.add
// into the group's row (atomic), or stores into the channel's own plane (summed in order later). The values
// go through the warp's slice of shared memory first, so each instruction touches 32 consecutive floats
// (4 sectors) instead of one float in each of 32 sectors: every channel of a group adds into the same row,
// and the L2 handles red.add by the sector. The row stride K + 1 keeps the lanes' writes off each other's
// banks. Every lane of the warp must call it (two __syncwarp).
template <int K>
__device__ __forceinline__ void put_step_grads(float* __restrict__ row, int warp_pos, int L, bool atomic,
                                               const float (&v)[K], float* __restrict__ warp_buf, int lane) {
  __syncwarp();  // the previous call's reads of warp_buf are done
#pragma unroll
  for (int i = 0; i < K; ++i) warp_buf[lane * (K + 1) + i] = v[i];
  __syncwarp();
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int e = j * 32 + lane;  // the warp's e-th step: lane e / K's item e % K
    const int t = warp_pos + e;
    if (t < L) {
      const float x = warp_buf[(e / K) * (K + 1) + e % K];
      if (atomic) {
        atomicAdd(row + t, x);
      } else {
        row[t] = x;
      }
    }
  }
}

using Aff = ssm::Affine<float>;

// exp(dt * A) as exp2(dt * (A log2 e)): a multiply and the SFU's ex2, where expf's accurate range reduction
// costs about 8 instructions for every state element. The extra error, |dt A| 2^-24 relative plus exp2f's
// 2 ulp, is far inside the scan's tolerances; mamba computes it the same way.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float exp_scaled(float dt, float A_log2) { return exp2f(dt * A_log2); }

__device__ __forceinline__ Aff shfl_up_aff(Aff x, int delta) {
  return {__shfl_up_sync(0xffffffffu, x.a, delta), __shfl_up_sync(0xffffffffu, x.b, delta)};
}
__device__ __forceinline__ Aff shfl_down_aff(Aff x, int delta) {
  return {__shfl_down_sync(0xffffffffu, x.a, delta), __shfl_down_sync(0xffffffffu, x.b, delta)};
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Reset and end-of-sequence bits of the thread's K steps (bit i: step p + i). A reset is a step t > 0 whose
// seq_idx differs from step t - 1's; an end is the last step, or a step followed by a reset.
template <int K>
__device__ __forceinline__ void seq_flags(const int* __restrict__ seq, int p, int L, uint32_t& resets,
                                          uint32_t& ends) {
  resets = 0;
  ends = 0;
  if (p >= L) return;
  int prev = p > 0 ? __ldg(seq + p - 1) : 0;
#pragma unroll
  for (int i = 0; i <= K; ++i) {
    const int t = p + i;
    if (t >= L) {
      if (i > 0 && t == L) ends |= 1u << (i - 1);
      break;
    }
    const int s = __ldg(seq + t);
    if (t > 0 && s != prev) {
      if (i < K) resets |= 1u << i;
      if (i > 0) ends |= 1u << (i - 1);
    }
    prev = s;
  }
}

// Rows of the initial / last state for the state carried into step 0: the batch row, or the first sequence.
__device__ __forceinline__ int first_state_row(const ScanFwdParams& p, int b) {
  return p.per_seq ? __ldg(p.seq_idx) : b;
}

// ------------------------------------------------------------------------------------------------ forward

// grid (D, B), block scan_threads(L, kFwdItems, kFwdMaxThreads), dynamic shared memory 2 * N floats: the
// carry [2][N].
template <typename T, bool kHasZ>
__global__ void __launch_bounds__(kFwdMaxThreads, kFwdMinBlocks) selective_scan_fwd_kernel(ScanFwdParams p) {
  constexpr int K = kFwdItems;
  FASTNN_SCAN_DYNAMIC_SHARED(float, fwd_carry);        // [2][N]: the state entering chunk c is in (c & 1)
  __shared__ Aff warp_total[2][kFwdMaxThreads / 32];   // [n & 1][warp]

  const int d = blockIdx.x, b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int L = p.seqlen, N = p.dstate, Dm = p.dim;
  const int64_t row = (static_cast<int64_t>(b) * Dm + d) * L;
  const T* u_row = static_cast<const T*>(p.u) + row;
  const T* delta_row = static_cast<const T*>(p.delta) + row;
  const int g = d / (Dm / p.groups);
  const float* Bbase = p.B_var ? p.Bm + (static_cast<int64_t>(b) * p.groups + g) * N * L : p.Bm + static_cast<int64_t>(d) * N;
  const float* Cbase = p.C_var ? p.Cm + (static_cast<int64_t>(b) * p.groups + g) * N * L : p.Cm + static_cast<int64_t>(d) * N;
  const int* seq = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * L : nullptr;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
  const float Dd = p.D_skip ? p.D_skip[d] : 0.0f;

  if (p.init) {
    const float* h0 = p.init + (static_cast<int64_t>(first_state_row(p, b)) * Dm + d) * N;
    for (int n = tid; n < N; n += blockDim.x) fwd_carry[n] = h0[n];
  } else {
    for (int n = tid; n < N; n += blockDim.x) fwd_carry[n] = 0.0f;
  }

  for (int c = 0; c < p.nchunks; ++c) {
    float* cin = fwd_carry + (c & 1) * N;
    float* cout = fwd_carry + ((c + 1) & 1) * N;
    __syncthreads();  // the carry written by thread 0 in the previous chunk is visible
    float* saved = p.chunk_states + ((static_cast<int64_t>(b) * Dm + d) * p.nchunks + c) * N;
    for (int n = tid; n < N; n += blockDim.x) saved[n] = cin[n];

    const int pos = c * kScanChunk + tid * K;
    // acc starts as the skip term D u, and u becomes dt u, all the n loop needs of it (one multiply less
    // per state element, and no u left live across the loop)
    float dtu[K], dt[K], acc[K];
    load_items<K>(u_row, pos, L, dtu);
    load_items<K>(delta_row, pos, L, dt);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      dt[i] += bias;
      if (p.softplus) dt[i] = ssm::softplus(dt[i]);
      acc[i] = Dd * dtu[i];
      dtu[i] *= dt[i];
    }
    // no D u term without D (Dd = 0 there): 0 * inf would make an infinite u's output NaN
    if (!p.D_skip) {
#pragma unroll
      for (int i = 0; i < K; ++i) acc[i] = 0.0f;
    }
    uint32_t resets = 0, ends = 0;
    if (seq) seq_flags<K>(seq, pos, L, resets, ends);

    for (int n = 0; n < N; ++n) {
      const float An2 = p.A[static_cast<int64_t>(d) * N + n] * kLog2e;
      float Bv[K];
      load_coef<K>(Bbase, p.B_var, n, N, L, pos, Bv);
      Aff el[K];
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const float a = exp_scaled(dt[i], An2);
        const float bb = dtu[i] * Bv[i];
        float hs = 0.0f;  // the state a reset starts from: the sequence's initial state (per sequence) or 0
        if (((resets >> i) & 1u) && p.per_seq && p.init)
          hs = p.init[(static_cast<int64_t>(__ldg(seq + pos + i)) * Dm + d) * N + n];
        el[i] = pos + i < L ? ssm::step_element(a, bb, ((resets >> i) & 1u) != 0, hs) : Aff{1.0f, 0.0f};
      }
      // C only now that B is dead (B and C together over the element loop spill on sm_90); the scan below
      // and the barrier cover its latency
      float Cv[K];
      load_coef<K>(Cbase, p.C_var, n, N, L, pos, Cv);
      Aff agg = el[0];
#pragma unroll
      for (int i = 1; i < K; ++i) agg = ssm::combine(agg, el[i]);
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const Aff other = shfl_up_aff(agg, o);
        if (lane >= o) agg = ssm::combine(other, agg);
      }
      Aff excl = shfl_up_aff(agg, 1);
      if (lane == 0) excl = Aff{1.0f, 0.0f};
      if (lane == 31) warp_total[n & 1][warp] = agg;
      __syncthreads();
      float h = cin[n];
      for (int w = 0; w < warp; ++w) h = ssm::apply(warp_total[n & 1][w], h);
      if (tid == 0) {  // the state after this chunk, for the next one
        float hc = h;
        for (int w = 0; w < nwarps; ++w) hc = ssm::apply(warp_total[n & 1][w], hc);
        cout[n] = hc;
      }
      h = ssm::apply(excl, h);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        h = ssm::apply(el[i], h);
        acc[i] = ssm::madd(h, Cv[i], acc[i]);
        if (p.per_seq && ((ends >> i) & 1u))
          p.last_state[(static_cast<int64_t>(__ldg(seq + pos + i)) * Dm + d) * N + n] = h;
      }
    }

    if (kHasZ) {
      float zv[K];
      load_items<K>(static_cast<const T*>(p.z) + row, pos, L, zv);
#pragma unroll
      for (int i = 0; i < K; ++i) acc[i] *= ssm::silu(zv[i]);
    }
    store_items<K>(static_cast<T*>(p.out) + row, pos, L, acc);
  }

  __syncthreads();   // unconditional: a barrier under a branch makes ptxas keep values on the stack
  if (!p.per_seq) {  // the row's final state (per sequence, the ends wrote it)
    const float* fin = fwd_carry + (p.nchunks & 1) * N;
    float* last = p.last_state + (static_cast<int64_t>(b) * Dm + d) * N;
    for (int n = tid; n < N; n += blockDim.x) last[n] = fin[n];
  }
}

// ------------------------------------------------------------------------------------------------ backward

// grid (dcount, rows of this launch), block scan_threads(L, kBwdItems, kBwdMaxThreads), dynamic shared
// memory (4 + 3 * warps) * N floats: the reverse carry [2][N], A[d, :], the chunk's saved state, and
// per-warp sums over time of dA, dB, dC for each state ([3][N][warps], each slot only ever updated by its own warp, so the order is fixed).
template <typename T, bool kHasZ>
__global__ void __launch_bounds__(kBwdMaxThreads, kBwdMinBlocks) selective_scan_bwd_kernel(ScanBwdParams q) {
  constexpr int K = kBwdItems;
  constexpr int kMaxWarps = kBwdMaxThreads / 32;
  FASTNN_SCAN_DYNAMIC_SHARED(float, bwd_smem);
  __shared__ Aff fwd_total[2][kMaxWarps];  // [n & 1][warp]
  __shared__ Aff rev_total[2][kMaxWarps];
  __shared__ float final_sum[2][kMaxWarps];
  __shared__ float step_grad_buf[kMaxWarps][32 * (K + 1)];  // put_step_grads' per-warp transpose

  const ScanFwdParams& p = q.f;
  const int d = q.d0 + blockIdx.x, b = q.b0 + blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int L = p.seqlen, N = p.dstate, Dm = p.dim;
  float* rev_carry = bwd_smem;           // [2][N]: w entering chunk c from its right in ((nchunks-1-c) & 1)
  float* A_row = bwd_smem + 2 * N;       // [N]: A[d, :]
  float* h_chunk = A_row + N;            // [N]: the state before this chunk (chunk_states)
  float* sum_dA = h_chunk + N;           // [N][nwarps]
  float* sum_dB = sum_dA + N * nwarps;
  float* sum_dC = sum_dB + N * nwarps;

  const int64_t row = (static_cast<int64_t>(b) * Dm + d) * L;
  const T* u_row = static_cast<const T*>(p.u) + row;
  const T* delta_row = static_cast<const T*>(p.delta) + row;
  const T* dout_row = static_cast<const T*>(q.dout) + row;
  const int g = d / (Dm / p.groups);
  const int64_t bg = (static_cast<int64_t>(b) * p.groups + g) * N * L;
  const float* Bbase = p.B_var ? p.Bm + bg : p.Bm + static_cast<int64_t>(d) * N;
  const float* Cbase = p.C_var ? p.Cm + bg : p.Cm + static_cast<int64_t>(d) * N;
  // per-step gradient planes of this (b, d): a channel's own plane, or the group's plane (atomics)
  const int64_t plane = q.atomic_var ? bg : ((static_cast<int64_t>(b - q.b0) * q.dcount + (d - q.d0)) * N * L);
  float* dBrow = p.B_var ? q.dB_var + plane : nullptr;
  float* dCrow = p.C_var ? q.dC_var + plane : nullptr;
  const int* seq = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * L : nullptr;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
  const float Dd = p.D_skip ? p.D_skip[d] : 0.0f;
  const int64_t bd_state = (static_cast<int64_t>(b) * Dm + d) * N;  // (b, d) in (B, D, N)

  // The adjoint entering the last step from the right: the gradient of the final state.
  for (int n = tid; n < N; n += blockDim.x) {
    float w = 0.0f;
    if (q.dlast) {
      const int r = p.per_seq ? __ldg(seq + L - 1) : b;
      w = q.dlast[(static_cast<int64_t>(r) * Dm + d) * N + n];
    }
    rev_carry[n] = w;
    A_row[n] = p.A[static_cast<int64_t>(d) * N + n];
  }
  for (int k = tid; k < 3 * N * nwarps; k += blockDim.x) sum_dA[k] = 0.0f;
  if (tid < 2 * kMaxWarps) final_sum[tid / kMaxWarps][tid % kMaxWarps] = 0.0f;

  for (int c = p.nchunks - 1; c >= 0; --c) {
    const int it = p.nchunks - 1 - c;
    float* rin = rev_carry + (it & 1) * N;
    float* rout = rev_carry + ((it + 1) & 1) * N;
    __syncthreads();  // carries and sums of the previous chunk are visible
    // Row pointers of the n loop live in shared memory: keeps the loop within 128 registers, no spills.
    const float* hsaved = q.chunk_states + ((static_cast<int64_t>(b) * Dm + d) * p.nchunks + c) * N;
    for (int n = tid; n < N; n += blockDim.x) h_chunk[n] = hsaved[n];

    const int pos = c * kScanChunk + tid * K;
    const int warp_pos = pos - lane * K;
    float u[K], dt[K], dy[K], du[K], ddt[K], y[K];
    load_items<K>(u_row, pos, L, u);
    load_items<K>(delta_row, pos, L, dt);
    load_items<K>(dout_row, pos, L, dy);
    if (kHasZ) {
      float zv[K];
      load_items<K>(static_cast<const T*>(p.z) + row, pos, L, zv);
#pragma unroll
      for (int i = 0; i < K; ++i) dy[i] *= ssm::silu(zv[i]);  // dL/dy before gating
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      dt[i] += bias;
      if (p.softplus) dt[i] = ssm::softplus(dt[i]);
      du[i] = 0.0f;
      ddt[i] = 0.0f;
      y[i] = 0.0f;
    }
    uint32_t resets = 0, ends = 0;
    if (seq) seq_flags<K>(seq, pos, L, resets, ends);
    const bool sums_B = !p.B_var, sums_C = !p.C_var;

    for (int n = 0; n < N; ++n) {
      const float An = A_row[n];
      float Bv[K], Cv[K], a[K], prev[K];
      load_coef<K>(Bbase, p.B_var, n, N, L, pos, Bv);
      load_coef<K>(Cbase, p.C_var, n, N, L, pos, Cv);
      // Forward elements (prev[] holds the reset start state for now) and reverse elements.
      Aff fagg{1.0f, 0.0f}, ragg{1.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < K; ++i) {
        // exp2 as in exp_scaled, but from A itself: A log2 e kept live beside A (which ddt needs) spills
        // the sm_80 backward
        a[i] = exp2f(dt[i] * An * kLog2e);
        const bool reset = (resets >> i) & 1u;
        prev[i] = 0.0f;
        if (reset && p.per_seq && p.init)
          prev[i] = p.init[(static_cast<int64_t>(__ldg(seq + pos + i)) * Dm + d) * N + n];
        if (pos + i < L)
          fagg = ssm::combine(fagg, ssm::step_element(a[i], dt[i] * Bv[i] * u[i], reset, prev[i]));
      }
#pragma unroll
      for (int i = K - 1; i >= 0; --i) {
        if (pos + i >= L) continue;
        Aff r{a[i], a[i] * Cv[i] * dy[i]};
        if ((resets >> i) & 1u) {  // hands back only the final-state gradient of the previous sequence
          float wl = 0.0f;
          if (p.per_seq && q.dlast)
            wl = q.dlast[(static_cast<int64_t>(__ldg(seq + pos + i - 1)) * Dm + d) * N + n];
          r = Aff{0.0f, wl};
        }
        ragg = ssm::combine(ragg, r);  // later steps first
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const Aff fo = shfl_up_aff(fagg, o);
        const Aff ro = shfl_down_aff(ragg, o);
        if (lane >= o) fagg = ssm::combine(fo, fagg);
        if (lane + o < 32) ragg = ssm::combine(ro, ragg);
      }
      Aff fexcl = shfl_up_aff(fagg, 1), rexcl = shfl_down_aff(ragg, 1);
      if (lane == 0) fexcl = Aff{1.0f, 0.0f};
      if (lane == 31) {
        rexcl = Aff{1.0f, 0.0f};
        fwd_total[n & 1][warp] = fagg;
      }
      if (lane == 0) rev_total[n & 1][warp] = ragg;
      __syncthreads();
      float h = h_chunk[n];
      for (int w = 0; w < warp; ++w) h = ssm::apply(fwd_total[n & 1][w], h);
      h = ssm::apply(fexcl, h);
      float wr = rin[n];
      for (int w = nwarps - 1; w > warp; --w) wr = ssm::apply(rev_total[n & 1][w], wr);
      if (tid == 0)  // w at this chunk's first step, for the chunk before it (warp 0's total last)
        rout[n] = ssm::apply(rev_total[n & 1][0], wr);
      wr = ssm::apply(rexcl, wr);
      // States before each step (the reset start state at a reset) and after it: y (for dz) and dC need
      // only the latter, so they are done here; Cv becomes C * dy, all the reverse pass needs of it.
      float sA = 0.0f, sB = 0.0f, sC = 0.0f;
      {
        float gC[K];
#pragma unroll
        for (int i = 0; i < K; ++i) {
          if (!((resets >> i) & 1u)) prev[i] = h;
          h = ssm::madd(a[i], prev[i], dt[i] * Bv[i] * u[i]);
          gC[i] = dy[i] * h;
          if (pos + i < L) {
            if (kHasZ) y[i] = ssm::madd(h, Cv[i], y[i]);
            sC += gC[i];
          }
          Cv[i] *= dy[i];
        }
        if (p.C_var)
          put_step_grads<K>(dCrow + static_cast<int64_t>(n) * L, warp_pos, L, q.atomic_var, gC, step_grad_buf[warp],
                            lane);
      }
      // Adjoint, from the last step back, and the other gradients of this state; Bv becomes dB's values.
#pragma unroll
      for (int i = K - 1; i >= 0; --i) {
        if (pos + i >= L) continue;
        const float gi = Cv[i] + wr;  // dL/dh after step i
        const float ga = gi * a[i];   // dL/dh before step i (= w_i when no reset)
        const float gap = ga * prev[i];
        du[i] = ssm::madd(gi, dt[i] * Bv[i], du[i]);
        ddt[i] = ssm::madd(gap, An, ssm::madd(gi * Bv[i], u[i], ddt[i]));
        sA = ssm::madd(gap, dt[i], sA);
        Bv[i] = gi * dt[i] * u[i];
        sB += Bv[i];
        if ((resets >> i) & 1u) {
          if (p.per_seq && q.dinit)  // the sequence's initial state fed this step
            q.dinit[(static_cast<int64_t>(__ldg(seq + pos + i)) * Dm + d) * N + n] = ga;
          float wl = 0.0f;
          if (p.per_seq && q.dlast)
            wl = q.dlast[(static_cast<int64_t>(__ldg(seq + pos + i - 1)) * Dm + d) * N + n];
          wr = wl;
        } else {
          wr = ga;
        }
      }
      if (p.B_var)
        put_step_grads<K>(dBrow + static_cast<int64_t>(n) * L, warp_pos, L, q.atomic_var, Bv, step_grad_buf[warp],
                          lane);
      sA = warp_sum(sA);
      if (sums_B) sB = warp_sum(sB);
      if (sums_C) sC = warp_sum(sC);
      if (lane == 0) {
        sum_dA[n * nwarps + warp] += sA;
        if (sums_B) sum_dB[n * nwarps + warp] += sB;
        if (sums_C) sum_dC[n * nwarps + warp] += sC;
      }
    }

    // Per-step outputs of the chunk.
    float dz[K];
    if (kHasZ) {
      float zv[K], dout[K];
      load_items<K>(static_cast<const T*>(p.z) + row, pos, L, zv);
      load_items<K>(dout_row, pos, L, dout);
#pragma unroll
      for (int i = 0; i < K; ++i) dz[i] = dout[i] * (p.D_skip ? y[i] + Dd * u[i] : y[i]) * ssm::silu_grad(zv[i]);
    }
    if (p.softplus) {  // delta again (an L1 / L2 hit) rather than 8 more live registers
      float x[K];
      load_items<K>(delta_row, pos, L, x);
#pragma unroll
      for (int i = 0; i < K; ++i) ddt[i] *= ssm::softplus_grad(x[i] + bias);
    }
    float dD_acc = 0.0f, dbias_acc = 0.0f;  // this chunk's; per-warp running sums in shared memory
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (p.D_skip) du[i] += Dd * dy[i];
      if (pos + i < L) {
        dD_acc += dy[i] * u[i];
        dbias_acc += ddt[i];
      }
    }
    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (lane == 0) {
      final_sum[0][warp] += dD_acc;
      final_sum[1][warp] += dbias_acc;
    }
    store_items<K>(static_cast<T*>(q.du) + row, pos, L, du);
    store_items<K>(static_cast<T*>(q.ddelta) + row, pos, L, ddt);
    if (kHasZ) store_items<K>(static_cast<T*>(q.dz) + row, pos, L, dz);
  }

  // Sums over time of this (b, d), in a fixed order.
  __syncthreads();  // also: the last chunk's carries and per-warp sums are complete
  if (tid == 0) {
    float sD = 0.0f, sb = 0.0f;
    for (int w = 0; w < nwarps; ++w) {
      sD += final_sum[0][w];
      sb += final_sum[1][w];
    }
    if (q.part_dD) q.part_dD[static_cast<int64_t>(b) * Dm + d] = sD;
    if (q.part_dbias) q.part_dbias[static_cast<int64_t>(b) * Dm + d] = sb;
  }
  const float* w0 = rev_carry + (p.nchunks & 1) * N;  // w at step 0: the gradient of the incoming state
  float* dinit0 = q.dinit ? q.dinit + (static_cast<int64_t>(first_state_row(p, b)) * Dm + d) * N : nullptr;
  for (int n = tid; n < N; n += blockDim.x) {
    float sA = 0.0f, sB = 0.0f, sC = 0.0f;
    for (int w = 0; w < nwarps; ++w) {
      sA += sum_dA[n * nwarps + w];
      sB += sum_dB[n * nwarps + w];
      sC += sum_dC[n * nwarps + w];
    }
    q.part_dA[bd_state + n] = sA;
    if (!p.B_var) q.part_dB[bd_state + n] = sB;
    if (!p.C_var) q.part_dC[bd_state + n] = sC;
    if (dinit0) dinit0[n] = w0[n];
  }
}

// ------------------------------------------------------------------------------------------------ reductions

// The reduction kernels are templates on their block size so that the header can be included by several
// translation units (a plain __global__ function defined here would be defined in each of them).
constexpr int kReduceThreads = 256;

// out[i] = sum over r = 0..rows-1 of in[r * M + i], in order (the batch sums of the backward).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) scan_sum_rows_kernel(const float* __restrict__ in, int rows, int64_t M, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  float s = 0.0f;
  for (int r = 0; r < rows; ++r) s += in[r * M + i];
  out[i] = s;
}

// Per-step B / C gradients of one backward launch (rows b0.., channels d0..d0+dcount): for every
// (b, g, n, t), dX[b, g, n, t] += the group's channels in this launch, summed in channel order.
// grid (ceil(N * L / kThreads), groups, rows), block kThreads.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) scan_reduce_group_kernel(const float* __restrict__ planes, int b0, int d0, int dcount, int groups,
                                         int dim, int64_t NL, float* __restrict__ dX) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int g = blockIdx.y, bl = blockIdx.z;
  if (i >= NL) return;
  const int per = dim / groups;
  const int lo = max(g * per, d0), hi = min((g + 1) * per, d0 + dcount);
  if (lo >= hi) return;
  const float* src = planes + (static_cast<int64_t>(bl) * dcount + (lo - d0)) * NL + i;
  float s = 0.0f;
  for (int d = lo; d < hi; ++d, src += NL) s += *src;
  dX[(static_cast<int64_t>(b0 + bl) * groups + g) * NL + i] += s;
}

}  // namespace fastnn::cuda
