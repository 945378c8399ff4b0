// The persistent LSTM / GRU forward and backward of csrc/cuda/rnn_persistent_kernels.cuh run on the CPU:
// their per-thread bodies (weights, staging, partial dots, cells), one loop iteration per CUDA thread, phase
// by phase in the kernels' order, blocks one after another within a step (the grid barrier), around the
// same glue as the CUDA launchers (csrc/cuda/rnn_persistent_plan.h). For the tests on machines without a
// GPU: the plan, the index math, the slice order of the sums and the cells are checked against the
// reference and the CPU kernels. Not a production path.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../cuda/rnn_persistent_plan.h"
#include "../families/rnn.h"

namespace fastnn::cpu {
namespace {

namespace rp = fastnn::rnn_persistent;

// What the kernels keep across phases: every thread's KPT weight registers (loaded once by
// load(block, tid, w)) and one block's shared memory, which run_pass uses one block at a time.
template <int KPT>
struct Machine {
  const rp::Plan& pl;
  std::vector<float> regs, smem;
  template <typename Load>
  Machine(const rp::Plan& plan, Load&& load)
      : pl(plan), regs(static_cast<size_t>(plan.blocks) * rp::kThreads * KPT), smem(plan.smem / sizeof(float)) {
    for (int blk = 0; blk < pl.blocks; ++blk) {
      for (int tid = 0; tid < rp::kThreads; ++tid) {
        float w[KPT];
        load(blk, tid, w);
        std::copy(w, w + KPT, regs.begin() + (static_cast<size_t>(blk) * rp::kThreads + tid) * KPT);
      }
    }
  }
  float* hs() { return smem.data(); }
  float* red() { return smem.data() + pl.pass_rows * pl.ldh; }
  // Block blk stages nb rows from src (shared memory NaN first: a read of anything unstaged shows up),
  // then every thread writes its partial dot products.
  template <typename T>
  void run_pass(int blk, const T* src, int nb) {
    std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
    for (int b = 0; b < nb; ++b)
      for (int q = 0; q < pl.slices * KPT; ++q) rp::stage_row<T, KPT>(pl, src, b, q, hs());
    for (int tid = 0; tid < rp::kThreads; ++tid) {
      float w[KPT];
      const float* from = regs.data() + (static_cast<size_t>(blk) * rp::kThreads + tid) * KPT;
      std::copy(from, from + KPT, w);
      rp::dot_partials<KPT>(pl, tid, w, hs(), nb, red());
    }
  }
};

template <typename T, int G, int KPT>
void emulate(rp::Buffers& b, const rp::Plan& pl) {
  const rp::Params<T> a = rp::params_of<T>(b);
  Machine<KPT> m(pl, [&](int blk, int tid, float(&w)[KPT]) { rp::load_weights<T, KPT>(a, pl, blk, tid, w); });
  for (int k = 0; k < a.T_steps; ++k) {
    const rp::StepView<T> v = rp::step_view(a, k);
    for (int blk = 0; blk < pl.blocks; ++blk) {
      for (int b0 = 0; b0 < v.bs; b0 += pl.pass_rows) {
        const int nb = std::min(pl.pass_rows, v.bs - b0);
        m.run_pass(blk, v.h_prev + static_cast<int64_t>(b0) * pl.H, nb);
        for (int i = 0; i < nb * pl.units; ++i) rp::cell<T, G>(a, pl, blk, v.t, b0, i, m.red(), v.h_next);
      }
    }
  }
}

template <typename T, int G, int KPT>
void emulate(rp::BwdBuffers& b, const rp::Plan& pl) {
  const rp::BwdParams<T> a = rp::bwd_params_of<T>(b);
  Machine<KPT> m(pl,
                 [&](int blk, int tid, float(&w)[KPT]) { rp::load_weights_backward<T, KPT>(a, pl, blk, tid, w); });
  for (int kb = 0; kb <= a.T_steps; ++kb) {
    const rp::BwdStepView v = rp::bwd_step_view(a, kb);
    const int rows = std::max(v.n_cur, v.n_done);
    for (int blk = 0; blk < pl.blocks; ++blk) {
      for (int b0 = 0; b0 < rows; b0 += pl.pass_rows) {
        const int nb = std::min(pl.pass_rows, rows - b0);
        const int nd = std::max(0, std::min(nb, v.n_done - b0));
        if (nd > 0) m.run_pass(blk, a.dgh + (v.off_done + b0) * int64_t(pl.len), nd);
        for (int i = 0; i < nb * pl.units; ++i) rp::cell_backward<T, G>(a, pl, blk, v, b0, nd, i, m.red());
      }
    }
  }
}

template <typename T, int G, typename Buf>
void emulate_kpt(Buf& b, const rp::Plan& pl) {
  switch (pl.kpt) {
    case 8: return emulate<T, G, 8>(b, pl);
    case 16: return emulate<T, G, 16>(b, pl);
    case 32: return emulate<T, G, 32>(b, pl);
    case 64: return emulate<T, G, 64>(b, pl);
    case 128: return emulate<T, G, 128>(b, pl);
    default: TORCH_CHECK(false, "rnn_layer_forward_persistent_emulated: no kernel for ", pl.kpt, " weights per thread");
  }
}

template <typename T, typename Buf>
void emulate_mode(Buf& b, const rp::Plan& pl) {
  if (b.lstm) {
    emulate_kpt<T, 4>(b, pl);
  } else {
    emulate_kpt<T, 3>(b, pl);
  }
}

template <typename Buf>
void emulate_dtype(const char* fn, at::ScalarType dt, Buf& b, const rp::Plan& pl) {
  switch (dt) {
    case at::kFloat: emulate_mode<float>(b, pl); break;
    case at::kHalf: emulate_mode<at::Half>(b, pl); break;
    case at::kBFloat16: emulate_mode<at::BFloat16>(b, pl); break;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", dt);
  }
}

}  // namespace

std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> rnn_persistent_plan(const std::string& mode,
                                                                                           int64_t hidden_size,
                                                                                           int64_t batch,
                                                                                           int64_t sms,
                                                                                           bool backward) {
  TORCH_CHECK(mode == "lstm" || mode == "gru", "rnn_persistent_plan: mode must be 'lstm' or 'gru'");
  const rp::Plan p = rp::make_plan(mode == "lstm" ? 4 : 3, static_cast<int>(hidden_size), static_cast<int>(batch),
                                   static_cast<int>(sms), backward);
  return {p.fits, p.units, p.blocks, p.slices, p.kpt, p.pass_rows, static_cast<int64_t>(p.smem)};
}

std::vector<at::Tensor> rnn_layer_forward_persistent_emulated(
    const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& h0, const c10::optional<at::Tensor>& c0, bool reverse, bool train, int64_t sms) {
  const char* fn = "rnn_layer_forward_persistent_emulated";
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor");
  TORCH_CHECK(sms >= 1, fn, ": sms must be >= 1, got ", sms);
  rp::Buffers b = rp::prepare(fn, mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, train);
  const rp::Plan pl = rp::make_plan(b.G, b.H, b.B, static_cast<int>(sms));
  TORCH_CHECK(pl.fits, fn, ": H = ", b.H, " does not fit the persistent kernel on ", sms, " multiprocessors");
  emulate_dtype(fn, x.scalar_type(), b, pl);
  return rp::finish(b);
}

std::vector<at::Tensor> rnn_layer_backward_persistent_emulated(
    const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& batch_sizes, const at::Tensor& w_hh, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const at::Tensor& y, const at::Tensor& gates, const at::Tensor& aux, bool reverse, int64_t sms) {
  const char* fn = "rnn_layer_backward_persistent_emulated";
  TORCH_CHECK(w_hh.device().is_cpu(), fn, ": w_hh must be a CPU tensor");
  TORCH_CHECK(sms >= 1, fn, ": sms must be >= 1, got ", sms);
  rp::BwdBuffers b = rp::prepare_backward(fn, mode, dy, dh_n, dc_n, batch_sizes, w_hh, h0, c0, y, gates, aux, reverse);
  const rp::Plan pl = rp::make_plan(b.G, b.H, b.B, static_cast<int>(sms), /*backward=*/true);
  TORCH_CHECK(pl.fits, fn, ": H = ", b.H, " does not fit the persistent kernel on ", sms, " multiprocessors");
  emulate_dtype(fn, w_hh.scalar_type(), b, pl);
  return rp::finish_backward(b);
}

}  // namespace fastnn::cpu
