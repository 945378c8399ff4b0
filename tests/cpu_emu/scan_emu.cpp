// CPU emulation of the CUDA selective-scan kernels (csrc/cuda/selective_scan_kernels.cuh), so their index
// math, scans, carries and reductions run on a machine without a GPU. Every CUDA thread of a block is a
// std::thread; __syncthreads is a block barrier, __syncwarp a warp barrier, warp shuffles go through a per-warp buffer between two
// warp barriers, atomics take a lock. Blocks run one after another, so static "__shared__" variables are
// the block's shared memory. Dynamic shared memory starts as NaN, so a read before a write shows up.
//
// Usage: scan_emu DIR [scratch_floats]
//   DIR/meta.txt: B D L N G B_var C_var has_z has_D has_bias softplus has_init has_seq per_seq S has_dlast
//                 deterministic dtype(0 float32, 1 float16, 2 bfloat16)
//   DIR/<name>.bin: float32 inputs (u delta z A B C D bias init dout dlast), int32 seq
//   writes DIR/<name>.out.bin (float32): out last chunks du ddelta dz dA dB dC dD dbias dinit
// The host side repeats what the launchers do (grid, threads, windows, reductions); scratch_floats caps the
// deterministic dB / dC scratch to force windows of channels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local EmuDim3 threadIdx, blockIdx, blockDim;

namespace emu {
struct Warp {
  std::unique_ptr<std::barrier<>> bar;
  float buf[32];
};
float* smem = nullptr;
std::barrier<>* block_bar = nullptr;
std::vector<Warp>* warps = nullptr;
std::mutex atomic_lock;

template <typename F>
float shuffle(float v, F src_of) {
  Warp& w = (*warps)[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.buf[lane] = v;
  w.bar->arrive_and_wait();
  const int src = src_of(lane);
  const float r = src >= 0 && src < 32 ? w.buf[src] : v;
  w.bar->arrive_and_wait();
  return r;
}

void launch(unsigned gx, unsigned gy, unsigned gz, int threads, size_t smem_bytes, const std::function<void()>& body) {
  std::vector<float> shared(smem_bytes / sizeof(float) + 1, std::numeric_limits<float>::quiet_NaN());
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
        smem = shared.data();
        std::barrier<> bar(threads);
        std::vector<Warp> ws(threads / 32);
        for (auto& w : ws) w.bar = std::make_unique<std::barrier<>>(32);
        block_bar = &bar;
        warps = &ws;
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            blockIdx = {x, y, z};
            blockDim = {static_cast<unsigned>(threads), 1, 1};
            body();
          });
        for (auto& t : ts) t.join();
      }
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { (*emu::warps)[threadIdx.x / 32].bar->arrive_and_wait(); }
inline float __shfl_up_sync(unsigned, float v, int d) {
  return emu::shuffle(v, [d](int l) { return l >= d ? l - d : l; });
}
inline float __shfl_down_sync(unsigned, float v, int d) {
  return emu::shuffle(v, [d](int l) { return l + d < 32 ? l + d : l; });
}
inline float __shfl_xor_sync(unsigned, float v, int m) {
  return emu::shuffle(v, [m](int l) { return l ^ m; });
}
inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> g(emu::atomic_lock);
  const float old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
using std::max;
using std::min;

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define FASTNN_SCAN_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::smem)

#include "cuda/selective_scan_kernels.cuh"

using namespace fastnn::cuda;

static std::string dir;

static std::vector<float> readf(const std::string& name, size_t n) {
  std::vector<float> v(n);
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  if (!f) return {};
  f.read(reinterpret_cast<char*>(v.data()), n * sizeof(float));
  return v;
}

static void writef(const std::string& name, const std::vector<float>& v) {
  std::ofstream f(dir + "/" + name + ".out.bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

template <typename T>
static std::vector<T> to_t(const std::vector<float>& v) {
  std::vector<T> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) r[i] = v[i];
    else if constexpr (std::is_same_v<T, __half>) r[i] = __float2half_rn(v[i]);
    else r[i] = __float2bfloat16_rn(v[i]);
  }
  return r;
}

template <typename T>
static std::vector<float> from_t(const std::vector<T>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) r[i] = v[i];
    else if constexpr (std::is_same_v<T, __half>) r[i] = __half2float(v[i]);
    else r[i] = __bfloat162float(v[i]);
  }
  return r;
}

template <typename T>
static int run(const std::vector<int64_t>& m, int64_t scratch_cap) {
  const int B = m[0], D = m[1], L = m[2], N = m[3], G = m[4];
  const bool B_var = m[5], C_var = m[6], has_z = m[7], has_D = m[8], has_bias = m[9], softplus = m[10];
  const bool has_init = m[11], has_seq = m[12], per_seq = m[13] && has_seq, has_dlast = m[15], det = m[16];
  const int S = per_seq ? m[14] : B;
  const size_t BDL = size_t(B) * D * L;
  const size_t coef = size_t(B) * G * N * L;
  auto u = to_t<T>(readf("u", BDL)), delta = to_t<T>(readf("delta", BDL)), dout = to_t<T>(readf("dout", BDL));
  std::vector<T> z = has_z ? to_t<T>(readf("z", BDL)) : std::vector<T>();
  auto A = readf("A", size_t(D) * N);
  auto Bm = readf("B", B_var ? coef : size_t(D) * N), Cm = readf("C", C_var ? coef : size_t(D) * N);
  auto Dv = has_D ? readf("D", D) : std::vector<float>();
  auto bias = has_bias ? readf("bias", D) : std::vector<float>();
  auto init = has_init ? readf("init", size_t(S) * D * N) : std::vector<float>();
  auto dlast = has_dlast ? readf("dlast", size_t(S) * D * N) : std::vector<float>();
  std::vector<int> seq;
  if (has_seq) {
    seq.resize(size_t(B) * L);
    std::ifstream f(dir + "/seq.bin", std::ios::binary);
    f.read(reinterpret_cast<char*>(seq.data()), seq.size() * sizeof(int));
  }
  const int nchunks = (L + kScanChunk - 1) / kScanChunk;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<T> out(BDL, from_f<T>(nan));
  std::vector<float> last(size_t(S) * D * N, nan), chunks(size_t(B) * D * nchunks * N, nan);

  ScanFwdParams p{};
  p.u = u.data();
  p.delta = delta.data();
  p.z = has_z ? z.data() : nullptr;
  p.out = out.data();
  p.A = A.data();
  p.Bm = Bm.data();
  p.Cm = Cm.data();
  p.D_skip = has_D ? Dv.data() : nullptr;
  p.delta_bias = has_bias ? bias.data() : nullptr;
  p.init = has_init ? init.data() : nullptr;
  p.seq_idx = has_seq ? seq.data() : nullptr;
  p.last_state = last.data();
  p.chunk_states = chunks.data();
  p.batch = B;
  p.dim = D;
  p.seqlen = L;
  p.dstate = N;
  p.groups = (B_var || C_var) ? G : 1;
  p.nchunks = nchunks;
  p.B_var = B_var;
  p.C_var = C_var;
  p.softplus = softplus;
  p.per_seq = per_seq;
  {
    const int threads = scan_threads(L, kFwdItems, kFwdMaxThreads);
    emu::launch(D, B, 1, threads, 2 * N * sizeof(float), [&] {
      if (has_z) selective_scan_fwd_kernel<T, true>(p);
      else selective_scan_fwd_kernel<T, false>(p);
    });
  }
  writef("out", from_t(out));
  writef("last", last);
  writef("chunks", chunks);

  // backward, as selective_scan_bwd.cu does it
  std::vector<T> du(BDL, from_f<T>(nan)), ddelta(BDL, from_f<T>(nan)), dz(has_z ? BDL : 0, from_f<T>(nan));
  std::vector<float> dA(size_t(D) * N), dB(Bm.size(), 0.0f), dC(Cm.size(), 0.0f), dD(D), dbias(D);
  std::vector<float> dinit(has_init ? init.size() : 0, per_seq ? 0.0f : nan);
  std::vector<float> pA(size_t(B) * D * N, nan), pB(size_t(B) * D * N, nan), pC(size_t(B) * D * N, nan);
  std::vector<float> pD(size_t(B) * D, nan), pbias(size_t(B) * D, nan);
  ScanBwdParams q{};
  q.f = p;
  q.dout = dout.data();
  q.dlast = has_dlast ? dlast.data() : nullptr;
  q.chunk_states = chunks.data();
  q.du = du.data();
  q.ddelta = ddelta.data();
  q.dz = has_z ? dz.data() : nullptr;
  q.dinit = has_init ? dinit.data() : nullptr;
  q.part_dA = pA.data();
  q.part_dB = B_var ? nullptr : pB.data();
  q.part_dC = C_var ? nullptr : pC.data();
  q.part_dD = has_D ? pD.data() : nullptr;
  q.part_dbias = has_bias ? pbias.data() : nullptr;
  const int threads = scan_threads(L, kBwdItems, kBwdMaxThreads);
  const size_t shared = size_t(4 + 3 * (threads / 32)) * N * sizeof(float);
  auto launch = [&](int rows) {
    emu::launch(q.dcount, rows, 1, threads, shared, [&] {
      if (has_z) selective_scan_bwd_kernel<T, true>(q);
      else selective_scan_bwd_kernel<T, false>(q);
    });
  };
  const int64_t planes_per_channel = int64_t(B_var) + int64_t(C_var);
  if (planes_per_channel == 0 || !det) {
    q.atomic_var = true;
    q.dB_var = B_var ? dB.data() : nullptr;
    q.dC_var = C_var ? dC.data() : nullptr;
    q.b0 = q.d0 = 0;
    q.dcount = D;
    launch(B);
  } else {
    const int64_t plane = int64_t(N) * L, per_row = int64_t(D) * plane * planes_per_channel;
    const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(B, scratch_cap / per_row));
    const int64_t chans_per = rows_per > 1 || per_row <= scratch_cap
                                  ? D : std::max<int64_t>(1, scratch_cap / (plane * planes_per_channel));
    std::vector<float> sB(rows_per * chans_per * plane, nan), sC(rows_per * chans_per * plane, nan);
    q.atomic_var = false;
    q.dB_var = B_var ? sB.data() : nullptr;
    q.dC_var = C_var ? sC.data() : nullptr;
    for (int64_t b0 = 0; b0 < B; b0 += rows_per) {
      const int rows = int(std::min<int64_t>(rows_per, B - b0));
      for (int64_t d0 = 0; d0 < D; d0 += chans_per) {
        q.b0 = int(b0);
        q.d0 = int(d0);
        q.dcount = int(std::min<int64_t>(chans_per, D - d0));
        launch(rows);
        const unsigned gx = unsigned((plane + 255) / 256);
        if (B_var)
          emu::launch(gx, G, rows, 256, 0, [&] {
            scan_reduce_group_kernel<256>(sB.data(), q.b0, q.d0, q.dcount, G, D, plane, dB.data());
          });
        if (C_var)
          emu::launch(gx, G, rows, 256, 0, [&] {
            scan_reduce_group_kernel<256>(sC.data(), q.b0, q.d0, q.dcount, G, D, plane, dC.data());
          });
      }
    }
  }
  auto sum_rows = [&](const std::vector<float>& part, std::vector<float>& o) {
    const int64_t M = o.size();
    emu::launch(unsigned((M + 255) / 256), 1, 1, 256, 0, [&] { scan_sum_rows_kernel<256>(part.data(), B, M, o.data()); });
  };
  sum_rows(pA, dA);
  if (!B_var) sum_rows(pB, dB);
  if (!C_var) sum_rows(pC, dC);
  if (has_D) sum_rows(pD, dD);
  if (has_bias) sum_rows(pbias, dbias);
  writef("du", from_t(du));
  writef("ddelta", from_t(ddelta));
  if (has_z) writef("dz", from_t(dz));
  writef("dA", dA);
  writef("dB", dB);
  writef("dC", dC);
  if (has_D) writef("dD", dD);
  if (has_bias) writef("dbias", dbias);
  if (has_init) writef("dinit", dinit);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  dir = argv[1];
  const int64_t scratch_cap = argc > 2 ? std::atoll(argv[2]) : (int64_t(64) << 20);
  std::ifstream f(dir + "/meta.txt");
  std::vector<int64_t> m(18);
  for (auto& x : m) f >> x;
  if (!f) return 3;
  switch (m[17]) {
    case 0: return run<float>(m, scratch_cap);
    case 1: return run<__half>(m, scratch_cap);
    default: return run<__nv_bfloat16>(m, scratch_cap);
  }
}
