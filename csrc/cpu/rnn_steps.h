// Pieces shared by the recurrent CPU kernels (rnn_cpu.cpp, rnn_ln_cpu.cpp): how a row's units are visited
// (16-float vectors, then scalars), the row-parallel loop, the step geometry of a time-major packed batch,
// and the per-step GEMM with a weight packed once.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/rnn_math.h"
#include "cpu/vec_math.h"

namespace fastnn {
namespace cpu {
namespace rnn_steps {

using at::Tensor;

struct VecMath {
  static VF sigmoid(VF x) { return vsigmoid(x); }
  static VF tanh(VF x) { return vtanh(x); }
  template <typename V>
  static V one() {
    return splat<V>(1.0f);
  }
};

// How a row's units are visited: 16 floats at a time, then scalars for the tail (doubles: scalars only).
struct VecLanes {
  using V = VF;
  using M = VecMath;
  static VF load(const float* p) {
    VF v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
  static VF splat(float x) { return cpu::splat<VF>(x); }
};
template <typename T>
struct ScalarLanes {
  using V = T;
  using M = rnn::ScalarMath;
  static T load(const T* p) { return *p; }
  static void store(T* p, T v) { *p = v; }
  static T splat(T x) { return x; }
};

template <typename T, typename F>
inline void for_lanes(int64_t n, F&& body) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 16 <= n; j += 16) body(j, VecLanes{});
  }
  for (; j < n; ++j) body(j, ScalarLanes<T>{});
}

// f(b) for every row b < rows, in parallel chunks of at least ~8k elements (smaller ones cost more to
// hand out than to compute).
template <typename F>
inline void parallel_rows(int64_t rows, int64_t width, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// Each named tensor (null: absent) has exactly the given sizes and is contiguous: the recurrent kernels read
// them through raw pointers as dense row-major arrays with these extents.
inline void check_dense(const char* who,
                        std::initializer_list<std::tuple<const char*, const Tensor*, std::vector<int64_t>>> list) {
  for (const auto& [name, t, sizes] : list) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->sizes() == at::IntArrayRef(sizes), who, ": ", name, " must be ", at::IntArrayRef(sizes), ", got ",
                t->sizes());
    TORCH_CHECK(t->is_contiguous(), who, ": ", name, " must be contiguous");
  }
}

// The steps of one direction over a time-major packed batch: step t holds the first bs[t] sequences
// (non-increasing), its rows start at off[t].
struct PackedSteps {
  bool reverse;
  int64_t B, T, rows;
  std::vector<int64_t> bs, off;

  PackedSteps(const char* who, const Tensor& batch_sizes, int64_t rows_, int64_t B_, bool reverse_)
      : reverse(reverse_), B(B_), T(batch_sizes.size(0)), rows(rows_) {
    TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1 &&
                    batch_sizes.is_contiguous(),
                who, ": batch_sizes must be a contiguous 1-D int64 CPU tensor");
    const int64_t* p = batch_sizes.data_ptr<int64_t>();
    int64_t acc = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p[t] >= 1 && p[t] <= B && (t == 0 || p[t] <= p[t - 1]), who,
                  ": batch_sizes must be non-increasing, within [1, B]");
      bs.push_back(p[t]);
      off.push_back(acc);
      acc += p[t];
    }
    TORCH_CHECK(acc == rows, who, ": batch_sizes sum to ", acc, " but x has ", rows, " rows");
  }
  // the k-th step in the forward walk
  int64_t step(int64_t k) const { return reverse ? T - 1 - k : k; }
  // the step walked just before t (whose h and c are t's h_prev, c_prev), or -1
  int64_t prev_step(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return (p < 0 || p >= T) ? -1 : p;
  }
  // how many of step t's rows continue from prev_step(t); the others start from h0 / c0
  int64_t rows_with_prev(int64_t t) const {
    const int64_t p = prev_step(t);
    return p < 0 ? 0 : std::min(bs[t], bs[p]);
  }
  // h_prev of every row (rows, P): the previous step's output where a sequence continues, else h0; gathered
  // once so that dW_hh is one GEMM
  Tensor gather_h_prev(const Tensor& y, const Tensor& h0) const {
    Tensor h_prev = at::empty({rows, h0.size(1)}, y.options());
    if (T > 0) gather_h_prev_into(y, h0, 0, T - 1, h_prev, 0);
    return h_prev;
  }
  // the same for the steps from t_a to t_b (either order), row r at r - r0 of out
  void gather_h_prev_into(const Tensor& y, const Tensor& h0, int64_t t_a, int64_t t_b, Tensor& out, int64_t r0) const {
    for (int64_t t = std::min(t_a, t_b); t <= std::max(t_a, t_b); ++t) {
      const int64_t n_prev = rows_with_prev(t), o = off[t] - r0;
      if (n_prev > 0) out.narrow(0, o, n_prev).copy_(y.narrow(0, off[prev_step(t)], n_prev));
      if (bs[t] > n_prev) out.narrow(0, o + n_prev, bs[t] - n_prev).copy_(h0.narrow(0, n_prev, bs[t] - n_prev));
    }
  }
};

// a @ w^T for one weight w (N, K) over many steps. When torch has MKL's packed GEMM, w is packed once for
// `m` rows and steps with m rows run on it: at B=32, H=512 that is 365 us a step against 446 us for
// at::mm, which packs w again on every call (measured here). Other row counts (the tail steps of a packed
// batch; MKL's packed GEMM is ~7x slower there) and float64 use at::mm on a contiguous w^T.
// uses: how many products the caller will run. With one (a one-step layer: a cell) neither the packing nor
// the copy of w^T pays for itself: a plain at::mm on w as it is.
class StepGemm {
 public:
  StepGemm(const Tensor& w, int64_t m, int64_t uses) : w_(w), m_(m) {
    if (uses <= 1) {
      w_t_ = w.t();
      return;
    }
    if (w.scalar_type() == at::kFloat && m > 0) {
      static const auto reorder = c10::Dispatcher::singleton().findSchema({"mkl::_mkl_reorder_linear_weight", ""});
      static const auto linear = c10::Dispatcher::singleton().findSchema({"mkl::_mkl_linear", ""});
      if (reorder && linear) {
        linear_ = *linear;
        packed_ = reorder->typed<Tensor(const Tensor&, int64_t)>().call(w, m);
      }
    }
    w_t_ = w.t().contiguous();  // (K, N): at::mm's faster layout for w^T (151 vs 87 GFLOP/s at the size above)
  }
  // a (rows, K) -> a @ w^T (rows, N), written to `out` (rows, N) or returned as a new tensor
  Tensor run(const Tensor& a, Tensor& out) const {
    if (packed_.defined() && a.size(0) == m_) {
      return linear_->typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                   int64_t)>()
          .call(a, packed_, w_, c10::nullopt, m_);
    }
    at::mm_out(out, a, w_t_);
    return out;
  }
  // the same, always into `out`
  void run_into(const Tensor& a, Tensor& out) const {
    const Tensor got = run(a, out);
    if (!got.is_same(out)) out.copy_(got);
  }

 private:
  Tensor w_, w_t_, packed_;
  int64_t m_;
  c10::optional<c10::OperatorHandle> linear_;
};

// A tensor's data as a dense row-major array (the launchers check each argument's shape and contiguity with
// its name first; this is the last line against a strided one read as dense).
template <typename T>
T* ptr(const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.is_contiguous(), "rnn kernel: a strided tensor of shape ", t.sizes(), " where a dense one is read");
  return t.data_ptr<T>();
}

}  // namespace rnn_steps
}  // namespace cpu
}  // namespace fastnn
