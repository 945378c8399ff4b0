"""Triton cells for one LSTM / GRU layer and direction over a packed batch, and their launchers.

Semantics: fastnn/reference/rnn.py (rnn_layer); contract: csrc/families/rnn.h, which the launchers
rnn_layer_forward / rnn_layer_backward follow argument for argument and output for output. The layer is the
non-persistent variant: the input projection of every step is one GEMM, then each step is one GEMM of the
live rows' h with W_hh (torch.mm: cuBLAS on the GPU, fp32 accumulation) followed by one Triton launch of the
fused pointwise cell over those rows. The backward walks the steps in reverse (cell backward, then one GEMM
of the gate gradients with W_hh); the weight gradients are one GEMM each after the recurrence. The per-step
loop runs in Python (no CUDA graph yet): a step costs 2-4 launches.

Dtypes: x, the weights, h0, c0, dy, dh_n, dc_n in one of float16, bfloat16, float32 (the op layer sends
float64 to the C++ kernel). Every cell computes in fp32. What differs from the C++ kernel, whose tensors all
have x's dtype:
  - the recurrences' carried state is fp32 inside the launchers: the LSTM's c and dc, the GRU's h (for its
    direct path h = n + z (h_prev - n)) and the direct part dh z of its dh (c_n, h_n, dc0, dh0 come out in
    x's dtype). Rounding what a step carries to the next one to fp16 / bf16 on every step would add up
    where f or z stay near 1;
  - the workspace `aux` (the LSTM's per-step c, the GRU's h W_hn^T + b_hn) is float32 for every input
    dtype: the backward's tanh(c) and c_prev come from it, and a half-precision cell state would round the
    quantity the recurrence accumulates. `gates` and `r` have x's dtype (gates is the input GEMM's output,
    overwritten in place; r feeds the projection GEMMs). rnn_layer_backward takes aux as float32 (another
    dtype is converted);
  - the biases are added inside the cells in fp32 (the C++ kernel folds them into the input GEMM), so a
    half-precision b_ih + b_hh is never rounded.
The GEMM operands stay in x's dtype: h (the GEMM's copy), y, r, the gate gradients, the GEMM part of dh.

Kernels (one program per (row of the step, block of BLOCK_H hidden units))
  _lstm_fwd_kernel   i f g o = act(gx + rec + b), c = f c_prev + i g, r = o tanh(c); writes c, r (to y and h,
                     or to the projection's input), and with TRAIN the activated gates over gx and c per step.
  _lstm_bwd_kernel   from dr (dh + dy, or the projection's dr) and dc: the four gate gradients, dc_prev.
  _gru_fwd_kernel    r z n from the input part (+ b_ih) and the recurrent part (+ b_hh), h = n + z (h_prev - n);
                     with TRAIN writes r z n over gx and h W_hn^T + b_hn per step.
  _gru_bwd_kernel    from dh + dy: the input part's gate gradients (r z n), the recurrent part's (r z and
                     r * d_pre_n), and the direct part dh z of dh_prev (the launcher's next GEMM gives
                     the rest, dgates_h @ W_hh, which the next step's cell adds).

Math: pure tl.* (the interpreter runs it): sigmoid = 1 / (1 + exp(-x)); tanh by _tanh below.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from fastnn import _alloc

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Hidden units per program, warps per program. The cell is a pointwise pass over (rows, G H) that moves a
# few MB per step at most (B = 64, H = 1024 fp16: ~2 MB, ~1 us at 3 TB/s), so a step is bound by launch
# latency, not bandwidth: the choice only needs coalesced loads, low registers and enough programs to spread
# over the SMs: B * ceil(H / 256) (B = 64, H = 1024: 256 CTAs on 132 SMs). Compiled for sm_90 / sm_80 with
# and without the JIT's alignment specialisation (16-byte aligned pointers, H % 16 == 0) and FMA fusion:
# 256 units at 4 warps (2 per thread per gate) takes at most 42 registers, no spills; at 2 warps (4 per
# thread) the GRU forward (fp32, aligned, sm_90) spilled 8 bytes and the LSTM forward took up to 84
# registers. Not timed on a GPU yet.
BLOCK_H = 256
NUM_WARPS = 4

# tanh below this |x| by the polynomial, above it by 1 - 2 / (exp(2|x|) + 1).
_TANH_SMALL = tl.constexpr(0.75)


# ---------------------------------------------------------------- device math

@triton.jit
def _ld(ptrs, m):
    # masked load widened to fp32 (every cell computes in fp32 whatever the storage dtype)
    return tl.load(ptrs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _sigmoid(v):
    # exp(-v) = inf for v < -88 gives 0, not NaN; the relative error is exp's (no cancellation)
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    # |v| < 0.75: tanh(a) = a + a^3 Q(a^2), Q a degree-5 polynomial fitted here (minimax in tanh's relative
    # error, Lawson iterations, float64): 1.6e-9 relative before fp32 rounding. Above, 1 - 2 / (e^{2a} + 1)
    # loses at most ~1.6x to cancellation from a = 0.75 on (tanh(0.75) = 0.64); e^{2a} = inf gives 1, NaN
    # stays NaN. Evaluated in fp32 (numpy's exp, as the interpreter runs it) against mpmath over [-12, 12]
    # and |x| in 1e-30..20: 1.1e-7 relative at most; the GPU's exp (ex2.approx) adds ~2 ulps on that branch.
    a = tl.abs(v)
    u = a * a
    q = 1.736943954889638e-3
    q = q * u - 7.657267754103651e-3
    q = q * u + 2.145204126830265e-2
    q = q * u - 5.389272604505934e-2
    q = q * u + 1.333269409954555e-1
    q = q * u - 3.333331512421898e-1
    small = a + (a * u) * q
    large = 1.0 - 2.0 / (tl.exp(a + a) + 1.0)
    t = tl.where(a < _TANH_SMALL, small, large)
    return tl.where(v < 0, -t, t)


# ---------------------------------------------------------------- LSTM

@triton.jit
def _lstm_fwd_kernel(
    gx_ptr,                # (rows, 4H) x W_ih^T of every step, x's dtype; TRAIN: this step's rows get i f g o
    rec_ptr,               # (>= bs, 4H) h_prev W_hh^T of this step's rows, x's dtype (row b = batch row b)
    b_ih_ptr,              # (4H,) x's dtype (read when HAS_BIAS)
    b_hh_ptr,              # (4H,) x's dtype (read when HAS_BIAS)
    c_ptr,                 # (B, H) fp32 running cell: c_prev read, c written (row b)
    r_ptr,                 # (*, H) x's dtype: where r = o tanh(c) goes, row r_off + b (y, or the projection input)
    h_ptr,                 # (B, H) x's dtype: h buffer of the next step's GEMM, row b (written when WRITE_H)
    aux_ptr,               # (rows, H) fp32: c of every step, row off + b (written when TRAIN)
    off,                   # first row of this step in the packed layout (gx, aux)
    r_off,                 # row of r_ptr that batch row 0 goes to
    H,                     # hidden size
    HAS_BIAS: tl.constexpr,
    TRAIN: tl.constexpr,   # save the activated gates and c for the backward
    WRITE_H: tl.constexpr,  # no projection: h = r, written to h_ptr as well
    BLOCK_H: tl.constexpr,  # hidden units per program
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = j < H
    row = off + b                                  # int64: rows * 4H may pass 2^31
    gx = gx_ptr + row * 4 * H + j
    rc = rec_ptr + b * 4 * H + j
    pi = _ld(gx, m) + _ld(rc, m)
    pf = _ld(gx + H, m) + _ld(rc + H, m)
    pg = _ld(gx + 2 * H, m) + _ld(rc + 2 * H, m)
    po = _ld(gx + 3 * H, m) + _ld(rc + 3 * H, m)
    if HAS_BIAS:
        pi += _ld(b_ih_ptr + j, m) + _ld(b_hh_ptr + j, m)
        pf += _ld(b_ih_ptr + H + j, m) + _ld(b_hh_ptr + H + j, m)
        pg += _ld(b_ih_ptr + 2 * H + j, m) + _ld(b_hh_ptr + 2 * H + j, m)
        po += _ld(b_ih_ptr + 3 * H + j, m) + _ld(b_hh_ptr + 3 * H + j, m)
    i = _sigmoid(pi)
    f = _sigmoid(pf)
    g = _tanh(pg)
    o = _sigmoid(po)
    cs = c_ptr + b * H + j
    c = f * _ld(cs, m) + i * g
    r = o * _tanh(c)
    tl.store(cs, c, mask=m)
    tl.store(r_ptr + (r_off + b) * H + j, r.to(r_ptr.dtype.element_ty), mask=m)
    if WRITE_H:
        tl.store(h_ptr + b * H + j, r.to(h_ptr.dtype.element_ty), mask=m)
    if TRAIN:
        et = gx_ptr.dtype.element_ty
        tl.store(gx, i.to(et), mask=m)
        tl.store(gx + H, f.to(et), mask=m)
        tl.store(gx + 2 * H, g.to(et), mask=m)
        tl.store(gx + 3 * H, o.to(et), mask=m)
        tl.store(aux_ptr + row * H + j, c, mask=m)


@triton.jit
def _lstm_bwd_kernel(
    gates_ptr,             # (rows, 4H) activated i f g o of every step, x's dtype
    aux_ptr,               # (rows, H) fp32 c of every step
    c0_ptr,                # (B, H) c0, x's dtype: c_prev of the rows that start at this step
    dh_ptr,                # (B, P = H) x's dtype: gradient reaching h from later steps (read unless HAS_PROJ)
    dy_ptr,                # (rows, P = H) x's dtype: gradient of y (read unless HAS_PROJ)
    dr_ptr,                # (>= bs, H) x's dtype: (dh + dy) W_hr, the gradient reaching r (read when HAS_PROJ)
    dc_ptr,                # (B, H) fp32 running dc: read (from later steps), overwritten with dc_prev
    dg_ptr,                # out (rows, 4H) x's dtype: gradients of the pre-activations i f g o
    off,                   # first row of this step
    off_prev,              # first row of the step walked before this one in the forward (its c is c_prev)
    n_prev,                # rows b < n_prev continue from that step; the others start from c0
    H,
    HAS_PROJ: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = j < H
    row = off + b
    gt = gates_ptr + row * 4 * H + j
    i = _ld(gt, m)
    f = _ld(gt + H, m)
    g = _ld(gt + 2 * H, m)
    o = _ld(gt + 3 * H, m)
    c = _ld(aux_ptr + row * H + j, m)
    # c_prev: one of the two loads is masked off entirely (b is the program's row)
    c_prev = _ld(aux_ptr + (off_prev + b) * H + j, m & (b < n_prev)) + _ld(c0_ptr + b * H + j, m & (b >= n_prev))
    if HAS_PROJ:
        dr = _ld(dr_ptr + b * H + j, m)
    else:
        dr = _ld(dh_ptr + b * H + j, m) + _ld(dy_ptr + row * H + j, m)
    dcs = dc_ptr + b * H + j
    tc = _tanh(c)
    dc = _ld(dcs, m) + dr * o * (1.0 - tc * tc)
    et = dg_ptr.dtype.element_ty
    dg = dg_ptr + row * 4 * H + j
    tl.store(dg, (dc * g * (i * (1.0 - i))).to(et), mask=m)
    tl.store(dg + H, (dc * c_prev * (f * (1.0 - f))).to(et), mask=m)
    tl.store(dg + 2 * H, (dc * i * (1.0 - g * g)).to(et), mask=m)
    tl.store(dg + 3 * H, (dr * tc * (o * (1.0 - o))).to(et), mask=m)
    tl.store(dcs, dc * f, mask=m)


# ---------------------------------------------------------------- GRU

@triton.jit
def _gru_fwd_kernel(
    gx_ptr,                # (rows, 3H) x W_ih^T of every step, x's dtype; TRAIN: this step's rows get r z n
    rec_ptr,               # (>= bs, 3H) h_prev W_hh^T of this step's rows, x's dtype
    b_ih_ptr,              # (3H,) x's dtype (read when HAS_BIAS)
    b_hh_ptr,              # (3H,) x's dtype (read when HAS_BIAS)
    hf_ptr,                # (B, H) fp32 running h: h_prev read, h written (row b)
    h_ptr,                 # (B, H) x's dtype: copy of h for the next step's GEMM (may be hf_ptr itself in fp32)
    y_ptr,                 # (rows, H) x's dtype: h written to row off + b
    aux_ptr,               # (rows, H) fp32: h W_hn^T + b_hn of every step (written when TRAIN)
    off,                   # first row of this step
    H,
    HAS_BIAS: tl.constexpr,
    TRAIN: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = j < H
    row = off + b
    gx = gx_ptr + row * 3 * H + j
    rc = rec_ptr + b * 3 * H + j
    xr = _ld(gx, m)
    xz = _ld(gx + H, m)
    xn = _ld(gx + 2 * H, m)
    hr = _ld(rc, m)
    hz = _ld(rc + H, m)
    hn = _ld(rc + 2 * H, m)
    if HAS_BIAS:
        xr += _ld(b_ih_ptr + j, m)
        xz += _ld(b_ih_ptr + H + j, m)
        xn += _ld(b_ih_ptr + 2 * H + j, m)
        hr += _ld(b_hh_ptr + j, m)
        hz += _ld(b_hh_ptr + H + j, m)
        hn += _ld(b_hh_ptr + 2 * H + j, m)
    r = _sigmoid(xr + hr)
    z = _sigmoid(xz + hz)
    n = _tanh(xn + r * hn)
    # h_prev from the fp32 state: where z ~ 1, h carries over many steps, and rounding it to x's dtype on
    # every step would add up
    hs = hf_ptr + b * H + j
    h = n + z * (_ld(hs, m) - n)
    tl.store(hs, h, mask=m)
    tl.store(h_ptr + b * H + j, h.to(h_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + row * H + j, h.to(y_ptr.dtype.element_ty), mask=m)
    if TRAIN:
        et = gx_ptr.dtype.element_ty
        tl.store(gx, r.to(et), mask=m)
        tl.store(gx + H, z.to(et), mask=m)
        tl.store(gx + 2 * H, n.to(et), mask=m)
        tl.store(aux_ptr + row * H + j, hn, mask=m)


@triton.jit
def _gru_bwd_kernel(
    gates_ptr,             # (rows, 3H) r z n of every step, x's dtype
    aux_ptr,               # (rows, H) fp32 h W_hn^T + b_hn of every step
    y_ptr,                 # (rows, H) x's dtype: h of every step (h_prev of the next)
    h0_ptr,                # (B, H) x's dtype: h_prev of the rows that start at this step
    dhd_ptr,               # (B, H) fp32 direct part of the gradient reaching h from later steps (row b): read,
                           # overwritten with dh z, the direct part of dh_prev
    dhr_ptr,               # (B, H) x's dtype recurrent part of that gradient (the launcher's dgh @ W_hh of the
                           # later step, zeros before a row's first one): dh = direct + recurrent + dy
    dy_ptr,                # (rows, H) x's dtype: gradient of y
    dgx_ptr,               # out (rows, 3H) x's dtype: gradients of the input part's pre-activations r z n
    dgh_ptr,               # out (rows, 3H) x's dtype: gradients of the recurrent part: r, z, and n scaled by r
    off,                   # first row of this step
    off_prev,              # first row of the step walked before this one in the forward (its h is h_prev)
    n_prev,                # rows b < n_prev continue from that step; the others start from h0
    H,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = j < H
    row = off + b
    gt = gates_ptr + row * 3 * H + j
    r = _ld(gt, m)
    z = _ld(gt + H, m)
    n = _ld(gt + 2 * H, m)
    hn = _ld(aux_ptr + row * H + j, m)
    # h_prev: one of the two loads is masked off entirely
    h_prev = _ld(y_ptr + (off_prev + b) * H + j, m & (b < n_prev)) + _ld(h0_ptr + b * H + j, m & (b >= n_prev))
    dhs = dhd_ptr + b * H + j
    dh = _ld(dhs, m) + _ld(dhr_ptr + b * H + j, m) + _ld(dy_ptr + row * H + j, m)
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h_prev - n) * (z * (1.0 - z))
    d_r = d_n * hn * (r * (1.0 - r))
    et = dgx_ptr.dtype.element_ty
    dgx = dgx_ptr + row * 3 * H + j
    dgh = dgh_ptr + row * 3 * H + j
    tl.store(dgx, d_r.to(et), mask=m)
    tl.store(dgx + H, d_z.to(et), mask=m)
    tl.store(dgx + 2 * H, d_n.to(et), mask=m)
    tl.store(dgh, d_r.to(et), mask=m)
    tl.store(dgh + H, d_z.to(et), mask=m)
    tl.store(dgh + 2 * H, (d_n * r).to(et), mask=m)
    tl.store(dhs, dh * z, mask=m)


# ---------------------------------------------------------------- launchers

class _Layer:
    """Geometry of one layer and direction over a packed batch (the C++ kernel's Layer)."""

    def __init__(self, mode: str, x, batch_sizes, w_hh, w_hr, h0, reverse: bool):
        if mode not in ("lstm", "gru"):
            raise ValueError(f"rnn_layer: mode must be 'lstm' or 'gru', got {mode!r}")
        if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1:
            raise ValueError("rnn_layer: batch_sizes must be a 1-D int64 CPU tensor")
        if x.dtype not in _DTYPES:
            raise TypeError(f"rnn_layer (Triton): float16, bfloat16 or float32 expected, got {x.dtype}")
        self.lstm = mode == "lstm"
        self.proj = w_hr is not None
        self.reverse = reverse
        self.G = 4 if self.lstm else 3
        self.H = w_hh.shape[0] // self.G
        self.P = w_hh.shape[1]
        self.B = h0.shape[0]
        self.bs: List[int] = batch_sizes.tolist()
        self.T = len(self.bs)
        self.rows = x.shape[0]
        self.off: List[int] = []
        acc = 0
        for t, n in enumerate(self.bs):
            if not (1 <= n <= self.B) or (t > 0 and n > self.bs[t - 1]):
                raise ValueError("rnn_layer: batch_sizes must be non-increasing, within [1, B]")
            self.off.append(acc)
            acc += n
        if acc != self.rows:
            raise ValueError(f"rnn_layer: batch_sizes sum to {acc} but x has {self.rows} rows")

    def step(self, k: int) -> int:
        """The k-th step of the forward walk."""
        return self.T - 1 - k if self.reverse else k

    def prev_step(self, t: int) -> int:
        """The step walked just before t (its h, c are t's h_prev, c_prev), or -1."""
        p = t + 1 if self.reverse else t - 1
        return p if 0 <= p < self.T else -1

    def rows_with_prev(self, t: int) -> int:
        """How many of step t's rows continue from prev_step(t); the others start from h0 / c0."""
        p = self.prev_step(t)
        return 0 if p < 0 else min(self.bs[t], self.bs[p])


_PLACEHOLDER = {}


def _fp32_placeholder(device) -> torch.Tensor:
    """A 1-element fp32 tensor for an fp32 pointer argument a launch does not read or write (typed as the
    AOT specs are, so the JIT compiles the same specialisation)."""
    if device not in _PLACEHOLDER:
        _PLACEHOLDER[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _PLACEHOLDER[device]


def _grid(bs: int, H: int):
    return (bs, triton.cdiv(H, BLOCK_H))


def rnn_layer_forward(mode: str, x, batch_sizes, w_ih, w_hh, b_ih: Optional[torch.Tensor],
                      b_hh: Optional[torch.Tensor], w_hr: Optional[torch.Tensor], h0, c0: Optional[torch.Tensor],
                      reverse: bool, train: bool) -> List[torch.Tensor]:
    """One LSTM / GRU layer and direction over a packed batch -> [y (rows, P), h_n (B, P), c_n (B, H) or
    empty, gates, aux, r] as csrc/families/rnn.h's rnn_layer_forward, for float16 / bfloat16 / float32
    contiguous inputs in one dtype. With train: gates (rows, G H) activated, x's dtype; aux (rows, H)
    float32 (LSTM: c of each step; GRU: h W_hn^T + b_hn); r (rows, H) x's dtype when projecting. Empty
    tensors are (0,) of x's dtype."""
    L = _Layer(mode, x, batch_sizes, w_hh, w_hr, h0, reverse)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("rnn_layer: b_ih and b_hh must be both given or both absent")
    if L.lstm and c0 is None:
        raise ValueError("rnn_layer: the LSTM needs c0")
    dt, dev = x.dtype, x.device
    H, P, B, GH = L.H, L.P, L.B, L.G * L.H
    bias = b_ih is not None
    # input projection of all steps, biases left to the cells (added there in fp32); in training the cells
    # overwrite each step's rows with the activated gates, which makes this the `gates` workspace
    gx = torch.mm(x, w_ih.t())
    y = _alloc.empty((L.rows, P), dt, dev)
    h = h0.clone()
    c = c0.to(torch.float32, copy=True) if L.lstm else None
    # the GRU's running h in fp32 (h itself when x is fp32); h keeps the GEMM operand in x's dtype
    hf = (h if dt == torch.float32 else h0.to(torch.float32)) if not L.lstm else None
    rec = torch.empty((B, GH), dtype=dt, device=dev)
    aux = _alloc.empty((L.rows, H), torch.float32, dev) if train else None
    rbuf = _alloc.empty((L.rows if train else B, H), dt, dev) if L.proj else None
    w_hh_t = w_hh.t()
    b1, b2 = (b_ih, b_hh) if bias else (gx, gx)  # placeholders of x's dtype, never read
    aux_arg = aux if train else _fp32_placeholder(dev)
    for k in range(L.T):
        t = L.step(k)
        bs, off = L.bs[t], L.off[t]
        rec_t = rec[:bs]
        torch.mm(h[:bs], w_hh_t, out=rec_t)
        if L.lstm:
            r_dst, r_off = (rbuf, off if train else 0) if L.proj else (y, off)
            _lstm_fwd_kernel[_grid(bs, H)](gx, rec_t, b1, b2, c, r_dst, h, aux_arg, off, r_off, H,
                                           HAS_BIAS=bias, TRAIN=train, WRITE_H=not L.proj, BLOCK_H=BLOCK_H,
                                           num_warps=NUM_WARPS)
            if L.proj:
                y_t = y[off:off + bs]
                torch.mm(rbuf[r_off:r_off + bs], w_hr.t(), out=y_t)
                h[:bs].copy_(y_t)
        else:
            _gru_fwd_kernel[_grid(bs, H)](gx, rec_t, b1, b2, hf, h, y, aux_arg, off, H, HAS_BIAS=bias, TRAIN=train,
                                          BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
    none = torch.empty(0, dtype=dt, device=dev)
    return [y, h, c.to(dt) if L.lstm else none, gx if train else none, aux if train else none,
            rbuf if (L.proj and train) else none]


def _h_prev_rows(L: _Layer, y, h0) -> torch.Tensor:
    """(rows, P): the h_prev of every packed row (from y, or h0 for rows that start at their step),
    gathered with one index_select so dW_hh is one GEMM."""
    bs = torch.tensor(L.bs, dtype=torch.int64)
    off = torch.tensor(L.off, dtype=torch.int64)
    step = torch.repeat_interleave(torch.arange(L.T), bs)
    b = torch.arange(L.rows) - off[step]
    prev = step + 1 if L.reverse else step - 1
    valid = (prev >= 0) & (prev < L.T)
    prev_c = prev.clamp(0, max(L.T - 1, 0))
    has_prev = valid & (b < bs[prev_c])
    idx = torch.where(has_prev, off[prev_c] + b, L.rows + b)  # rows >= L.rows index h0
    return torch.cat([y, h0]).index_select(0, idx.to(y.device))


def rnn_layer_backward(mode: str, dy, dh_n, dc_n: Optional[torch.Tensor], x, batch_sizes, w_ih, w_hh,
                       b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor], w_hr: Optional[torch.Tensor], h0,
                       c0: Optional[torch.Tensor], y, gates, aux, r, reverse: bool, want_dx: bool,
                       want_dweights: bool) -> List[torch.Tensor]:
    """Backward through time of rnn_layer_forward -> [dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0], as
    csrc/families/rnn.h's rnn_layer_backward: empty (0,) tensors of x's dtype where not wanted or absent.
    gates, aux, r: the forward's training workspace (aux float32; another dtype is converted)."""
    L = _Layer(mode, x, batch_sizes, w_hh, w_hr, h0, reverse)
    if L.lstm and (c0 is None or dc_n is None):
        raise ValueError("rnn_layer_backward: the LSTM needs c0 and dc_n")
    if gates.numel() != L.rows * L.G * L.H or aux.numel() != L.rows * L.H:
        raise ValueError("rnn_layer_backward: the workspace does not match (was the forward run with train=true?)")
    dt, dev = x.dtype, x.device
    H, P, B, GH = L.H, L.P, L.B, L.G * L.H
    bias = b_ih is not None
    aux = aux.to(torch.float32)
    # gate gradients of every step; the LSTM's input and recurrent parts share them, the GRU's differ in n
    dgx = _alloc.empty((L.rows, GH), dt, dev)
    dgh = dgx if L.lstm else _alloc.empty((L.rows, GH), dt, dev)
    # the LSTM's dh is the recurrent GEMM's output (dh_n before a row's first step); the GRU's is split
    # into an fp32 direct part (dh z, carried from step to step) and the GEMM's part
    dh = dh_n.clone() if L.lstm else torch.zeros_like(dh_n)
    dhd = None if L.lstm else dh_n.to(torch.float32, copy=True)
    dc = dc_n.to(torch.float32, copy=True) if L.lstm else None
    dh_steps = _alloc.empty((L.rows, P), dt, dev) if L.proj else None  # gradient reaching each step's h
    dr = torch.empty((B, H), dtype=dt, device=dev) if L.proj else None
    for k in range(L.T - 1, -1, -1):
        t = L.step(k)
        bs, off = L.bs[t], L.off[t]
        n_prev = L.rows_with_prev(t)
        off_prev = L.off[L.prev_step(t)] if n_prev > 0 else 0
        if L.lstm:
            dr_t = dr[:bs] if L.proj else dh  # the kernel reads dr only with a projection; dh stands in
            if L.proj:
                dh_t = dh_steps[off:off + bs]
                torch.add(dh[:bs], dy[off:off + bs], out=dh_t)
                torch.mm(dh_t, w_hr, out=dr_t)
            _lstm_bwd_kernel[_grid(bs, H)](gates, aux, c0, dh, dy, dr_t, dc, dgx, off, off_prev, n_prev, H,
                                           HAS_PROJ=L.proj, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
            torch.mm(dgx[off:off + bs], w_hh, out=dh[:bs])
        else:
            _gru_bwd_kernel[_grid(bs, H)](gates, aux, y, h0, dhd, dh, dy, dgx, dgh, off, off_prev, n_prev, H,
                                          BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
            torch.mm(dgh[off:off + bs], w_hh, out=dh[:bs])
    if not L.lstm:
        dh = (dhd + dh).to(dt)
    # dh, dc now hold the gradients of h0, c0
    grads = _grads_from_gates(L, dgx, dgh, x, y, h0, w_ih, bias, want_dx, want_dweights)
    if L.proj and want_dweights:
        grads[5] = torch.mm(dh_steps.t(), r)
    return grads + [dh, dc.to(dt) if L.lstm else torch.empty(0, dtype=dt, device=dev)]


def _grads_from_gates(L: _Layer, dgx, dgh, x, y, h0, w_ih, bias: bool, want_dx: bool, want_dweights: bool):
    """[dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr (empty)] from every step's gate gradients: one GEMM each."""
    dt, dev = x.dtype, x.device
    none = torch.empty(0, dtype=dt, device=dev)
    dx = torch.mm(dgx, w_ih) if want_dx else none
    dw_ih = dw_hh = db_ih = db_hh = none
    if want_dweights:
        dw_ih = torch.mm(dgx.t(), x)
        dw_hh = torch.mm(dgh.t(), _h_prev_rows(L, y, h0))
        if bias:
            db_ih = dgx.sum(0, dtype=torch.float32).to(dt)
            db_hh = db_ih.clone() if L.lstm else dgh.sum(0, dtype=torch.float32).to(dt)
    return [dx, dw_ih, dw_hh, db_ih, db_hh, none]


def rnn_layer_backward_from_gates(mode: str, recurrence: List[torch.Tensor], x, batch_sizes, w_ih, w_hh,
                                  b_ih: Optional[torch.Tensor], h0, y, reverse: bool, want_dx: bool,
                                  want_dweights: bool) -> List[torch.Tensor]:
    """rnn_layer_backward's outputs from a recurrence computed elsewhere (the persistent CUDA backward):
    recurrence = [dgx, dgh (GRU; empty for the LSTM, whose are dgx), dh0, dc0 (LSTM; else empty)]. No
    projection."""
    L = _Layer(mode, x, batch_sizes, w_hh, None, h0, reverse)
    dgx, dgh, dh0, dc0 = recurrence
    grads = _grads_from_gates(L, dgx, dgx if L.lstm else dgh, x, y, h0, w_ih, b_ih is not None, want_dx,
                              want_dweights)
    return grads + [dh0, dc0]


# ---------------------------------------------------------------- ahead-of-time specs

def aot_specs():
    """Every kernel configuration the launchers use on a GPU, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps). Per dtype: the plain variant and the superset of the
    constexpr flags (every flag on), as in kernels/ssm.py; _lstm_bwd_kernel's one flag both ways."""
    specs = []
    for dt in _DTYPES.values():
        for on in (False, True):
            specs.append((_lstm_fwd_kernel,
                          {"gx_ptr": f"*{dt}", "rec_ptr": f"*{dt}", "b_ih_ptr": f"*{dt}", "b_hh_ptr": f"*{dt}",
                           "c_ptr": "*fp32", "r_ptr": f"*{dt}", "h_ptr": f"*{dt}", "aux_ptr": "*fp32",
                           "off": "i32", "r_off": "i32", "H": "i32", "HAS_BIAS": "constexpr",
                           "TRAIN": "constexpr", "WRITE_H": "constexpr", "BLOCK_H": "constexpr"},
                          {"HAS_BIAS": on, "TRAIN": on, "WRITE_H": on, "BLOCK_H": BLOCK_H}, NUM_WARPS))
            specs.append((_lstm_bwd_kernel,
                          {"gates_ptr": f"*{dt}", "aux_ptr": "*fp32", "c0_ptr": f"*{dt}", "dh_ptr": f"*{dt}",
                           "dy_ptr": f"*{dt}", "dr_ptr": f"*{dt}", "dc_ptr": "*fp32", "dg_ptr": f"*{dt}",
                           "off": "i32", "off_prev": "i32", "n_prev": "i32", "H": "i32",
                           "HAS_PROJ": "constexpr", "BLOCK_H": "constexpr"},
                          {"HAS_PROJ": on, "BLOCK_H": BLOCK_H}, NUM_WARPS))
            specs.append((_gru_fwd_kernel,
                          {"gx_ptr": f"*{dt}", "rec_ptr": f"*{dt}", "b_ih_ptr": f"*{dt}", "b_hh_ptr": f"*{dt}",
                           "hf_ptr": "*fp32", "h_ptr": f"*{dt}", "y_ptr": f"*{dt}", "aux_ptr": "*fp32", "off": "i32",
                           "H": "i32",
                           "HAS_BIAS": "constexpr", "TRAIN": "constexpr", "BLOCK_H": "constexpr"},
                          {"HAS_BIAS": on, "TRAIN": on, "BLOCK_H": BLOCK_H}, NUM_WARPS))
        specs.append((_gru_bwd_kernel,
                      {"gates_ptr": f"*{dt}", "aux_ptr": "*fp32", "y_ptr": f"*{dt}", "h0_ptr": f"*{dt}",
                       "dhd_ptr": "*fp32", "dhr_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dgx_ptr": f"*{dt}", "dgh_ptr": f"*{dt}",
                       "off": "i32", "off_prev": "i32", "n_prev": "i32", "H": "i32", "BLOCK_H": "constexpr"},
                      {"BLOCK_H": BLOCK_H}, NUM_WARPS))
    return specs
