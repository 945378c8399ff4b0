// Fused, persistent float32 recurrence of one LSTM / GRU layer and direction without projection (the
// per-step part of csrc/cpu/rnn_cpu.cpp's forward): h_{t-1} W_hh^T and the gate math of every step in one
// parallel region. Threads own blocks of 16 hidden units and compute all G gates of their units for the
// live rows, straight from the accumulator registers; h is double-buffered, one barrier per step.
// Each unit's dot product is computed by one thread in a fixed order: results do not depend on the thread
// count.
#pragma once

#include <cstdint>
#include <functional>

#include <c10/util/BFloat16.h>

namespace fastnn {
namespace cpu {

// One layer and direction over a time-major packed batch (csrc/families/rnn.h), float32, P = H.
struct RecurrenceForward {
  bool lstm = true, reverse = false, train = false;
  int64_t H = 0, B = 0, T = 0;
  const int64_t* bs = nullptr;   // (T,) rows of each step, non-increasing
  const int64_t* off = nullptr;  // (T,) first row of each step
  const float* w_hh = nullptr;   // (G H, H)
  const float* b_hh = nullptr;   // (G H,) for the GRU (the LSTM's is part of its input bias), or null
  // (G H,) or null: a bias of the input part that `gates` does not hold yet, added by the gate math (the
  // LSTM's b_ih + b_hh, the GRU's b_ih)
  const float* b_in = nullptr;
  float* gates = nullptr;        // (rows, G H): input projection in; activated gates out when train
  // Without train the input projection may instead come in chunks of steps: input(k0, k1, r0, r1) writes
  // that of walk steps [k0, k1) (rows [r0, r1)) to `gates` at row r - r0, as many whole steps at a time as
  // fit in chunk_rows rows (at least one).
  std::function<void(int64_t k0, int64_t k1, int64_t r0, int64_t r1)> input;
  int64_t chunk_rows = 0;
  float* y = nullptr;            // (rows, H) out
  float* h = nullptr;            // (B, H): h0 in, h_n out
  float* c = nullptr;            // (B, H): c0 in, c_n out (LSTM)
  float* aux = nullptr;          // (rows, H) when train: c (LSTM) or h W_hn^T + b_hn (GRU) of each step
  // bfloat16 layers: W_hh (G H, H) in bf16, used instead of w_hh. The dot products then take h_{t-1}
  // rounded to bf16 (the layer's output in its dtype) with float32 sums, as torch's bf16 LSTM does; the
  // input part, the gate math, c and the outputs stay float32.
  const c10::BFloat16* w_hh_bf16 = nullptr;
};

// The backward's recurrence of the same layer (the per-step part of rnn_cpu.cpp's backward): per step the
// cell backward of every unit, fed by the later step's gate gradients times W_hh, in one parallel region.
// Threads own groups of 16-unit blocks (columns of W_hh, packed once per call) with one barrier per step, or,
// in iterations with enough rows, ranges of batch rows without barriers between them; T + 1 iterations (the
// last computes dh0 of the rows live at the first step). The weight gradients are left to the caller (one
// GEMM each over dgx / dgh).
struct RecurrenceBackward {
  bool lstm = true, reverse = false;
  int64_t H = 0, B = 0, T = 0;
  const int64_t* bs = nullptr;   // as RecurrenceForward
  const int64_t* off = nullptr;
  const float* w_hh = nullptr;   // (G H, H)
  const float* gates = nullptr;  // (rows, G H): the training forward's activated gates
  const float* aux = nullptr;    // (rows, H): its c (LSTM) or h W_hn^T + b_hn (GRU) of each step
  const float* y = nullptr;      // (rows, H): its outputs (the GRU's h_prev)
  const float* h0 = nullptr;     // (B, H)
  const float* c0 = nullptr;     // (B, H) (LSTM)
  const float* dy = nullptr;     // (rows, H)
  float* dgx = nullptr;          // (rows, G H) out: gradients of the gates' pre-activations (input part)
  float* dgh = nullptr;          // (rows, G H) out, GRU: those of the recurrent part (n scaled by r)
  // Or they come in chunks of walk steps, from the last: consume(k0, k1, r0, r1) is called once walk steps
  // [k0, k1) (rows [r0, r1)) are done, with row r's gradients at row r - r0 of dgx / dgh, which then hold
  // as many whole steps as fit in chunk_rows rows (at least one).
  std::function<void(int64_t k0, int64_t k1, int64_t r0, int64_t r1)> consume;
  int64_t chunk_rows = 0;
  float* dh = nullptr;           // (B, H): dh_n in, dh0 out
  float* dc = nullptr;           // (B, H): dc_n in, dc0 out (LSTM)
  // bfloat16 layers: W_hh in bf16 instead of w_hh. The gate gradients of every row then go to dgx16 /
  // dgh16 in bf16, row r at r ld16 (ld16 = G H rounded up to even; the pad column must hold zeros), and
  // dgx, dgh and consume are not used; the recurrent products take dgh16 (the LSTM's: dgx16) with float32
  // sums.
  const c10::BFloat16* w_hh_bf16 = nullptr;
  c10::BFloat16* dgx16 = nullptr;
  c10::BFloat16* dgh16 = nullptr;  // the GRU's recurrent part; the LSTM's is dgx16
  int64_t ld16 = 0;
  // and, when set, float32 sums of those gate gradients over all rows (G H each, zeroed by the caller),
  // in a fixed order: the bias gradients, from the gradients before their rounding to bf16
  float* db_x = nullptr;
  float* db_h = nullptr;  // the GRU's recurrent part
};

// Whether this build has the fused recurrence (it needs AVX-512).
bool recurrence_forward_available();
// Whether the bf16 kernels (w_hh_bf16, bf16 brgemm tiles) run here: AVX512-BF16 and torch's bf16 brgemm,
// checked once against a float computation.
bool bf16_recurrence_available();
// w (N, K) bf16 row-major, K even -> B of A w^T in dst (ceil(N / 64) 64 K elements): column panels of 64 in
// brgemm's VNNI-2 layout, panel j being K / 2 rows of 64 column pairs, (k2, n, e) holding w[64 j + n][2 k2 + e]
// (0 past N).
void bf16_pack_panels(const c10::BFloat16* w, int64_t N, int64_t K, c10::BFloat16* dst, int threads);
// Runs the recurrence on up to `threads` threads.
void recurrence_forward(const RecurrenceForward& a, int threads);
// Runs the backward's recurrence on up to `threads` threads; results do not depend on the thread count.
void recurrence_backward(const RecurrenceBackward& a, int threads);

}  // namespace cpu
}  // namespace fastnn
