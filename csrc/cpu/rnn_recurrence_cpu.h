// Fused, persistent float32 recurrence of one LSTM / GRU layer and direction without projection (the
// per-step part of csrc/cpu/rnn_cpu.cpp's forward): h_{t-1} W_hh^T and the gate math of every step in one
// parallel region. Threads own blocks of 16 hidden units and compute all G gates of their units for the
// live rows, straight from the accumulator registers; h is double-buffered, one barrier per step.
// Each unit's dot product is computed by one thread in a fixed order: results do not depend on the thread
// count.
#pragma once

#include <cstdint>
#include <functional>

namespace fastnn {
namespace cpu {

// One layer and direction over a time-major packed batch (csrc/families/rnn.h), float32, P = H.
struct RecurrenceForward {
  bool lstm = true, reverse = false, train = false;
  int64_t H = 0, B = 0, T = 0;
  const int64_t* bs = nullptr;   // (T,) rows of each step, non-increasing
  const int64_t* off = nullptr;  // (T,) first row of each step
  const float* w_hh = nullptr;   // (G H, H)
  const float* b_hh = nullptr;   // (G H,) for the GRU (the LSTM's is folded into gates), or null
  float* gates = nullptr;        // (rows, G H): input projection in; activated gates out when train
  // Without train the input projection may instead come in chunks of steps: input(k0, k1, r0, r1) writes
  // that of walk steps [k0, k1) (rows [r0, r1)) to `gates` at row r - r0, chunk_steps steps at a time.
  std::function<void(int64_t k0, int64_t k1, int64_t r0, int64_t r1)> input;
  int64_t chunk_steps = 0;
  float* y = nullptr;            // (rows, H) out
  float* h = nullptr;            // (B, H): h0 in, h_n out
  float* c = nullptr;            // (B, H): c0 in, c_n out (LSTM)
  float* aux = nullptr;          // (rows, H) when train: c (LSTM) or h W_hn^T + b_hn (GRU) of each step
};

// Whether this build has the fused recurrence (it needs AVX-512).
bool recurrence_forward_available();
// Runs the recurrence on up to `threads` threads.
void recurrence_forward(const RecurrenceForward& a, int threads);

}  // namespace cpu
}  // namespace fastnn
