// The device-independent glue of the persistent LSTM / GRU forward and backward (ATen calls only): input
// checks, the buffers the kernels read and write, their parameters, and the outputs (the forward's in
// csrc/families/rnn.h's form). The CUDA launchers (rnn_persistent_cuda.cu) and the CPU emulation used by
// the tests (csrc/cpu/rnn_persistent_emulated.cpp) both run it around the per-thread bodies of
// rnn_persistent_kernels.cuh.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "rnn_persistent_kernels.cuh"

namespace fastnn::rnn_persistent {

struct Buffers {
  int G, H, B, T;
  bool lstm, reverse, train, has_bias;
  at::Tensor gx, y, h0buf, h1buf, state, aux, w_hh, b_ih, b_hh;
  at::Tensor meta;  // on x's device: batch_sizes (T), offsets (T), the packed row of each batch row's h_n (B)
};

// batch_sizes with the offsets after them (2 T int64), checked as the kernels assume.
inline std::vector<int64_t> step_meta(const char* fn, const at::Tensor& batch_sizes, int64_t B, int64_t rows) {
  FASTNN_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1 &&
                   batch_sizes.size(0) >= 1,
               fn, ": batch_sizes must be a non-empty 1-D int64 CPU tensor");
  const at::Tensor bs = batch_sizes.contiguous();
  const int64_t* bsp = bs.data_ptr<int64_t>();
  const int64_t T = bs.size(0);
  std::vector<int64_t> meta(2 * T);
  int64_t acc = 0;
  for (int64_t t = 0; t < T; ++t) {
    FASTNN_CHECK(bsp[t] >= 1 && bsp[t] <= B && (t == 0 || bsp[t] <= bsp[t - 1]), fn,
                 ": batch_sizes must be non-increasing, within [1, B]");
    meta[t] = bsp[t];
    meta[T + t] = acc;
    acc += bsp[t];
  }
  FASTNN_CHECK(acc == rows, fn, ": batch_sizes sum to ", acc, " but there are ", rows, " rows");
  FASTNN_CHECK(bsp[0] == B, fn, ": batch_sizes[0] must equal the batch size ", B);
  return meta;
}

// One host-to-device copy of the step metadata; on CUDA from pinned memory without blocking the host (a
// pageable copy would wait for the work already queued on the stream).
inline at::Tensor upload(const std::vector<int64_t>& v, const at::Device& device) {
  at::Tensor host = at::tensor(v, at::kLong);
  if (device.is_cpu()) return host;
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

// Checks what the kernel assumes (fastnn/ops/rnn.py has validated the user's arguments already) and sets
// up its buffers: gx = x W_ih^T of every step (the input projection as one GEMM), y, the two h buffers and
// the fp32 state from h0 / c0, the training workspace, and batch_sizes / offsets on x's device.
inline Buffers prepare(const char* fn, const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                       const c10::optional<at::Tensor>& c0, bool reverse, bool train) {
  FASTNN_CHECK(mode == "lstm" || mode == "gru", fn, ": mode must be 'lstm' or 'gru', got '", mode, "'");
  Buffers b;
  b.lstm = mode == "lstm";
  b.G = b.lstm ? 4 : 3;
  const auto dt = x.scalar_type();
  FASTNN_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
               ": x must be float32, float16 or bfloat16, got ", dt);
  FASTNN_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous (rows, I) tensor");
  FASTNN_CHECK(w_hh.dim() == 2 && w_hh.size(0) % b.G == 0 && w_hh.size(1) == w_hh.size(0) / b.G, fn,
               ": w_hh must be (", b.G, " H, H) (no projection), got ", w_hh.sizes());
  b.H = static_cast<int>(w_hh.size(1));
  FASTNN_CHECK(w_ih.dim() == 2 && w_ih.size(0) == b.G * b.H && w_ih.size(1) == x.size(1), fn, ": w_ih must be (",
               b.G * b.H, ", ", x.size(1), "), got ", w_ih.sizes());
  FASTNN_CHECK(h0.dim() == 2 && h0.size(1) == b.H && h0.size(0) >= 1, fn, ": h0 must be (B, ", b.H, ")");
  b.B = static_cast<int>(h0.size(0));
  FASTNN_CHECK(b_ih.has_value() == b_hh.has_value(), fn, ": b_ih and b_hh must be both given or both absent");
  FASTNN_CHECK(!b.lstm || c0.has_value(), fn, ": the LSTM needs c0");
  for (const at::Tensor* t : {&w_ih, &w_hh, &h0}) {
    FASTNN_CHECK(t->scalar_type() == dt && t->device() == x.device() && t->is_contiguous(), fn,
                 ": weights and states must be contiguous, on x's device, with x's dtype");
  }
  b.has_bias = b_ih.has_value();
  if (b.has_bias) {
    for (const at::Tensor* t : {&*b_ih, &*b_hh}) {
      FASTNN_CHECK(t->scalar_type() == dt && t->device() == x.device() && t->is_contiguous() && t->dim() == 1 &&
                       t->size(0) == b.G * b.H,
                   fn, ": b_ih / b_hh must be contiguous (", b.G * b.H, ",) with x's dtype on x's device");
    }
  }
  if (b.lstm) {
    FASTNN_CHECK(c0->scalar_type() == dt && c0->device() == x.device() && c0->sizes() == h0.sizes(), fn,
                 ": c0 must be (", b.B, ", ", b.H, ") with x's dtype on x's device");
  }
  std::vector<int64_t> meta = step_meta(fn, batch_sizes, b.B, x.size(0));
  b.T = static_cast<int>(batch_sizes.size(0));
  // each row's h_n is its output at the last step it is live in: forward, the last t with bs[t] > b;
  // reverse, step 0
  for (int64_t r = 0, t = b.T - 1; r < b.B; ++r) {
    if (reverse) {
      meta.push_back(r);
    } else {
      while (meta[t] <= r) --t;
      meta.push_back(meta[b.T + t] + r);
    }
  }
  b.meta = upload(meta, x.device());
  b.reverse = reverse;
  b.train = train;
  b.gx = at::mm(x, w_ih.t());
  b.y = new_output({x.size(0), b.H}, x.options());
  b.h0buf = h0.clone();
  b.h1buf = h0.clone();
  b.state = (b.lstm ? *c0 : h0).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  b.aux = train ? new_output({x.size(0), b.H}, x.options().dtype(at::kFloat)) : at::Tensor();
  b.w_hh = w_hh;
  if (b.has_bias) b.b_ih = *b_ih, b.b_hh = *b_hh;
  return b;
}

// The kernel's parameters over the buffers; T is the device-side element type of x's dtype.
template <typename T>
Params<T> params_of(Buffers& b) {
  Params<T> a{};
  a.T_steps = b.T;
  a.reverse = b.reverse;
  a.train = b.train;
  a.has_bias = b.has_bias;
  a.lstm = b.lstm;
  a.batch_sizes = b.meta.data_ptr<int64_t>();
  a.offsets = a.batch_sizes + b.T;
  a.gx = reinterpret_cast<T*>(b.gx.data_ptr());
  a.w_hh = reinterpret_cast<const T*>(b.w_hh.data_ptr());
  a.b_ih = b.has_bias ? reinterpret_cast<const T*>(b.b_ih.data_ptr()) : nullptr;
  a.b_hh = b.has_bias ? reinterpret_cast<const T*>(b.b_hh.data_ptr()) : nullptr;
  a.hbuf[0] = reinterpret_cast<T*>(b.h0buf.data_ptr());
  a.hbuf[1] = reinterpret_cast<T*>(b.h1buf.data_ptr());
  a.state = b.state.data_ptr<float>();
  a.y = reinterpret_cast<T*>(b.y.data_ptr());
  a.aux = b.train ? b.aux.data_ptr<float>() : nullptr;
  return a;
}

// [y, h_n, c_n or empty, gates, aux, r] as rnn_layer_forward returns them (r is empty: no projection).
inline std::vector<at::Tensor> finish(Buffers& b) {
  const at::Tensor rows = b.meta.narrow(0, 2 * static_cast<int64_t>(b.T), b.B);
  const at::Tensor none = at::empty({0}, b.y.options());
  at::Tensor h_n = b.y.index_select(0, rows);
  at::Tensor c_n = b.lstm ? b.state.to(b.y.scalar_type()) : none.clone();
  return {b.y, h_n, c_n, b.train ? b.gx : none.clone(), b.train ? b.aux : none.clone(), none.clone()};
}

// ---------------------------------------------------------------- backward

struct BwdBuffers {
  int G, H, B, T;
  bool lstm, reverse;
  at::Tensor meta, w_hh, gates, aux, y, h0, c0, dy, dh_n, dstate, dgx, dgh, dh0;
};

// The backward's checks and buffers: the gate gradients (the GRU's recurrent ones apart), dh0, and the
// carried fp32 state (LSTM dc from dc_n, GRU dh z from dh_n).
inline BwdBuffers prepare_backward(const char* fn, const std::string& mode, const at::Tensor& dy,
                                   const at::Tensor& dh_n, const c10::optional<at::Tensor>& dc_n,
                                   const at::Tensor& batch_sizes, const at::Tensor& w_hh, const at::Tensor& h0,
                                   const c10::optional<at::Tensor>& c0, const at::Tensor& y, const at::Tensor& gates,
                                   const at::Tensor& aux, bool reverse) {
  FASTNN_CHECK(mode == "lstm" || mode == "gru", fn, ": mode must be 'lstm' or 'gru', got '", mode, "'");
  BwdBuffers b;
  b.lstm = mode == "lstm";
  b.G = b.lstm ? 4 : 3;
  b.reverse = reverse;
  const auto dt = w_hh.scalar_type();
  FASTNN_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
               ": float32, float16 or bfloat16 expected, got ", dt);
  FASTNN_CHECK(w_hh.dim() == 2 && w_hh.size(0) % b.G == 0 && w_hh.size(1) == w_hh.size(0) / b.G, fn,
               ": w_hh must be (", b.G, " H, H) (no projection), got ", w_hh.sizes());
  b.H = static_cast<int>(w_hh.size(1));
  FASTNN_CHECK(h0.dim() == 2 && h0.size(1) == b.H && h0.size(0) >= 1, fn, ": h0 must be (B, ", b.H, ")");
  b.B = static_cast<int>(h0.size(0));
  FASTNN_CHECK(!b.lstm || (c0.has_value() && dc_n.has_value()), fn, ": the LSTM needs c0 and dc_n");
  const int64_t rows = y.dim() == 2 ? y.size(0) : -1;
  auto check = [&](const at::Tensor& t, const char* name, at::ScalarType want, at::IntArrayRef shape) {
    FASTNN_CHECK(t.scalar_type() == want && t.device() == w_hh.device() && t.is_contiguous() && t.sizes() == shape,
                 fn, ": ", name, " must be a contiguous ", want, " tensor of shape ", shape, " on ", w_hh.device(),
                 " (got ", t.scalar_type(), " ", t.sizes(), ")");
  };
  check(w_hh, "w_hh", dt, w_hh.sizes());
  check(h0, "h0", dt, {b.B, b.H});
  check(y, "y", dt, {rows, b.H});
  check(dy, "dy", dt, {rows, b.H});
  check(dh_n, "dh_n", dt, {b.B, b.H});
  check(gates, "gates", dt, {rows, b.G * b.H});
  check(aux, "aux", at::kFloat, {rows, b.H});
  if (b.lstm) {
    check(*c0, "c0", dt, {b.B, b.H});
    check(*dc_n, "dc_n", dt, {b.B, b.H});
  }
  b.meta = upload(step_meta(fn, batch_sizes, b.B, rows), w_hh.device());
  b.T = static_cast<int>(batch_sizes.size(0));
  b.w_hh = w_hh, b.gates = gates, b.aux = aux, b.y = y, b.h0 = h0, b.dy = dy, b.dh_n = dh_n;
  if (b.lstm) b.c0 = *c0;
  b.dstate = (b.lstm ? *dc_n : dh_n).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  b.dgx = new_output({rows, b.G * b.H}, w_hh.options());
  b.dgh = b.lstm ? b.dgx : new_output({rows, b.G * b.H}, w_hh.options());
  b.dh0 = new_output({b.B, b.H}, w_hh.options());
  return b;
}

template <typename T>
BwdParams<T> bwd_params_of(BwdBuffers& b) {
  BwdParams<T> a{};
  a.T_steps = b.T;
  a.reverse = b.reverse;
  a.batch_sizes = b.meta.data_ptr<int64_t>();
  a.offsets = a.batch_sizes + b.T;
  a.w_hh = reinterpret_cast<const T*>(b.w_hh.data_ptr());
  a.gates = reinterpret_cast<const T*>(b.gates.data_ptr());
  a.aux = b.aux.data_ptr<float>();
  a.y = reinterpret_cast<const T*>(b.y.data_ptr());
  a.h0 = reinterpret_cast<const T*>(b.h0.data_ptr());
  a.c0 = b.lstm ? reinterpret_cast<const T*>(b.c0.data_ptr()) : nullptr;
  a.dy = reinterpret_cast<const T*>(b.dy.data_ptr());
  a.dh_n = reinterpret_cast<const T*>(b.dh_n.data_ptr());
  a.dstate = b.dstate.data_ptr<float>();
  a.dgx = reinterpret_cast<T*>(b.dgx.data_ptr());
  a.dgh = reinterpret_cast<T*>(b.dgh.data_ptr());
  a.dh0 = reinterpret_cast<T*>(b.dh0.data_ptr());
  return a;
}

// [dgx, dgh (the GRU's; empty for the LSTM, whose are dgx), dh0, dc0 (the LSTM's; else empty)].
inline std::vector<at::Tensor> finish_backward(BwdBuffers& b) {
  const at::Tensor none = at::empty({0}, b.dgx.options());
  return {b.dgx, b.lstm ? none.clone() : b.dgh, b.dh0, b.lstm ? b.dstate.to(b.dgx.scalar_type()) : none.clone()};
}

}  // namespace fastnn::rnn_persistent
