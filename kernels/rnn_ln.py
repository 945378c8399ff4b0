"""Triton cells for one LayerNormLSTM layer and direction over a packed batch, and their launchers.

Semantics: fastnn/reference/rnn.py (layer_norm_lstm_layer); contract: csrc/families/rnn_ln.h, which the
launchers layer_norm_lstm_forward / layer_norm_lstm_backward follow argument for argument and output for
output, workspace included (gates, x_proj, h_proj, cells, stats), so either backward reads either forward's.
The structure is the C++ kernel's (csrc/cpu/rnn_ln_cpu.cpp) with kernels/rnn.py's per-step launches:
  forward   x W_ih^T for every step as one GEMM, its layer norm (+ bias) as one row kernel; then per step one
            GEMM of the live rows' h with W_hh (torch.mm) and one launch of the fused cell, a program per row:
            the recurrent layer norm, the gates, c', the cell's layer norm, h and zoneout.
  backward  per step in reverse one launch of the fused cell backward (zoneout, the cell's layer norm, the
            gates, the recurrent layer norm's backward from the saved statistics) and one GEMM for dh; then
            the gain / bias gradients as column sums (torch reductions: deterministic), the input layer
            norm's backward as one row kernel and the weight gradients as one GEMM each.
Dtypes: float32 only (fastnn/ops/rnn_ln.py runs fp16 / bf16 in float32, as on the CPU).

A row's layer norm needs its whole width, so a program owns a row and walks it in chunks of BLOCK units
(any H, one compiled configuration). Sums are per-lane partials over the chunks reduced once at the end,
in a fixed order: the same bits on every run. Where a pass reads what an earlier pass of the same program
wrote (the forward's c', the backward's gate gradients), both walk the same offsets with the same layout,
and a CTA barrier separates them.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from fastnn import _alloc

from .rnn import _Layer, _fp32_placeholder, _h_prev_rows, _sigmoid, _tanh

# Units per chunk and warps per program. The step is bound by launch latency (a few rows of at most a few
# thousand units each), so the choice only needs coalesced loads and few registers: 512 fp32 lanes on 4 warps
# is 4 per thread per vector.
BLOCK = 512
NUM_WARPS = 4
STATS = 6   # per row: mean and rstd of x_proj, h_proj and c' (csrc/families/rnn_ln.h)
# what the kernels read of them (a jitted function sees only constexpr globals)
_EPS = tl.constexpr(1e-5)  # every layer norm's, as in torch.nn.LayerNorm
_STATS = tl.constexpr(STATS)


# ---------------------------------------------------------------- row layer norms (the input part)

@triton.jit
def _rstd_about(v, mean, N, BLOCK: tl.constexpr):
    # 1 / sqrt(biased variance + eps) of v[0..N) about its mean, from the deviations (a pass of its own: no
    # cancellation when the mean is large against the spread); rounded sqrt and division (the GPU's default
    # ones are approximate), as the CPU kernel: once per row
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < N
        d = tl.where(m, tl.load(v + j, mask=m, other=0.0) - mean, 0.0)
        acc += d * d
    return tl.div_rn(1.0, tl.sqrt_rn(tl.sum(acc, axis=0) / N + _EPS))


@triton.jit
def _mean_rstd(v, N, BLOCK: tl.constexpr):
    # mean and 1 / sqrt(biased variance + eps) of v[0..N)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        acc += tl.load(v + j, mask=j < N, other=0.0)
    mean = tl.sum(acc, axis=0) / N
    return mean, _rstd_about(v, mean, N, BLOCK)


@triton.jit
def _ln_rows_fwd_kernel(
    v_ptr,                 # (rows, N) fp32: x W_ih^T
    w_ptr, b_ptr,          # (N,) the layer norm's gain and bias
    bias_ptr,              # (N,) the layer's bias (read when HAS_BIAS)
    out_ptr,               # (rows, N) out: LN(v) w + b (+ bias)
    stats_ptr,             # (rows, STATS) out: mean, rstd at columns 0, 1
    N,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    v = v_ptr + r * N
    mean, rstd = _mean_rstd(v, N, BLOCK)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < N
        out = (tl.load(v + j, mask=m) - mean) * rstd * tl.load(w_ptr + j, mask=m) + tl.load(b_ptr + j, mask=m)
        if HAS_BIAS:
            out += tl.load(bias_ptr + j, mask=m)
        tl.store(out_ptr + r * N + j, out, mask=m)
    tl.store(stats_ptr + r * _STATS, mean)
    tl.store(stats_ptr + r * _STATS + 1, rstd)


@triton.jit
def _ln_rows_bwd_kernel(
    v_ptr,                 # (rows, N) the layer norm's input (x W_ih^T)
    stats_ptr,             # (rows, STATS): its mean, rstd at columns 0, 1
    w_ptr,                 # (N,) its gain
    d_ptr,                 # (rows, N) in: gradient of its output; out (in place): gradient of its input
    N,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    v = v_ptr + r * N
    d = d_ptr + r * N
    mean = tl.load(stats_ptr + r * _STATS)
    rstd = tl.load(stats_ptr + r * _STATS + 1)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < N
        xhat = (tl.load(v + j, mask=m, other=0.0) - mean) * rstd
        dxhat = tl.load(d + j, mask=m, other=0.0) * tl.load(w_ptr + j, mask=m, other=0.0)
        s1 += dxhat
        s2 += dxhat * xhat
    m1 = tl.sum(s1, axis=0) / N
    m2 = tl.sum(s2, axis=0) / N
    for j0 in range(0, N, BLOCK):  # each lane reads its own d before overwriting it
        j = j0 + tl.arange(0, BLOCK)
        m = j < N
        xhat = (tl.load(v + j, mask=m) - mean) * rstd
        dxhat = tl.load(d + j, mask=m) * tl.load(w_ptr + j, mask=m)
        tl.store(d + j, rstd * (dxhat - m1 - xhat * m2), mask=m)


# ---------------------------------------------------------------- the step cells

@triton.jit
def _ln_lstm_fwd_kernel(
    g_ptr,                 # (rows, 4H): in, LN_ih(x W_ih^T) + bias; out, this step's rows: activated i f g o
    hp_ptr,                # (*, 4H) h_prev W_hh^T of this step's rows, row hp_off + b
    hh_w_ptr, hh_b_ptr,    # (4H,) LN_hh's gain and bias
    cell_w_ptr, cell_b_ptr,  # (H,) LN_cell's gain and bias
    c_ptr,                 # (B, H) running c: c_prev read, c' written (row b)
    cells_ptr,             # (rows, H) out: c' of every step (written when TRAIN)
    h_ptr,                 # (B, H) running h: h_prev read (zoneout), h' written (row b); the next GEMM's input
    y_ptr,                 # (rows, H) out: h'
    keep_ptr,              # (rows, H) zoneout mask, 1 keeps the previous h (read when MASKED)
    zoneout,               # the kept fraction of the previous h when ZONED and not MASKED
    stats_ptr,             # (rows, STATS) out: mean, rstd of h_proj at 2, 3 and of c' at 4, 5
    off,                   # first row of this step in the packed layout
    hp_off,                # row of hp_ptr holding batch row 0
    H,
    TRAIN: tl.constexpr,
    ZONED: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = off + b                          # int64: rows * 4H may pass 2^31
    G4 = 4 * H
    hp = hp_ptr + (hp_off + b) * G4
    g = g_ptr + row * G4
    c = c_ptr + b * H
    mean_h, rstd_h = _mean_rstd(hp, G4, BLOCK)  # of the recurrent projection, over its 4H values
    # gates = input part + LN_hh(h_proj); activations; c' = f c + i g
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, H, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < H
        pre_i = (tl.load(g + j, mask=m, other=0.0)
                 + (tl.load(hp + j, mask=m, other=0.0) - mean_h) * rstd_h * tl.load(hh_w_ptr + j, mask=m, other=0.0)
                 + tl.load(hh_b_ptr + j, mask=m, other=0.0))
        pre_f = (tl.load(g + H + j, mask=m, other=0.0)
                 + (tl.load(hp + H + j, mask=m, other=0.0) - mean_h) * rstd_h
                 * tl.load(hh_w_ptr + H + j, mask=m, other=0.0)
                 + tl.load(hh_b_ptr + H + j, mask=m, other=0.0))
        pre_g = (tl.load(g + 2 * H + j, mask=m, other=0.0)
                 + (tl.load(hp + 2 * H + j, mask=m, other=0.0) - mean_h) * rstd_h
                 * tl.load(hh_w_ptr + 2 * H + j, mask=m, other=0.0)
                 + tl.load(hh_b_ptr + 2 * H + j, mask=m, other=0.0))
        pre_o = (tl.load(g + 3 * H + j, mask=m, other=0.0)
                 + (tl.load(hp + 3 * H + j, mask=m, other=0.0) - mean_h) * rstd_h
                 * tl.load(hh_w_ptr + 3 * H + j, mask=m, other=0.0)
                 + tl.load(hh_b_ptr + 3 * H + j, mask=m, other=0.0))
        i = _sigmoid(pre_i)
        f = _sigmoid(pre_f)
        gg = _tanh(pre_g)
        o = _sigmoid(pre_o)
        cn = f * tl.load(c + j, mask=m, other=0.0) + i * gg
        tl.store(c + j, cn, mask=m)
        tl.store(g + j, i, mask=m)
        tl.store(g + H + j, f, mask=m)
        tl.store(g + 2 * H + j, gg, mask=m)
        tl.store(g + 3 * H + j, o, mask=m)
        if TRAIN:
            tl.store(cells_ptr + row * H + j, cn, mask=m)
        acc += tl.where(m, cn, 0.0)
    mean_c = tl.sum(acc, axis=0) / H
    tl.debug_barrier()  # c' and o are read back below
    rstd_c = _rstd_about(c, mean_c, H, BLOCK)
    # h_new = o tanh(LN_cell(c')), then zoneout against the previous h (this row's state before the write)
    for j0 in range(0, H, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < H
        cell_norm = ((tl.load(c + j, mask=m, other=0.0) - mean_c) * rstd_c * tl.load(cell_w_ptr + j, mask=m, other=0.0)
                     + tl.load(cell_b_ptr + j, mask=m, other=0.0))
        hv = tl.load(g + 3 * H + j, mask=m, other=0.0) * _tanh(cell_norm)
        if ZONED:
            if MASKED:
                keep = tl.load(keep_ptr + row * H + j, mask=m, other=0.0)
            else:
                keep = zoneout
            hv = keep * tl.load(h_ptr + b * H + j, mask=m, other=0.0) + (1.0 - keep) * hv
        tl.store(h_ptr + b * H + j, hv, mask=m)
        tl.store(y_ptr + row * H + j, hv, mask=m)
    st = stats_ptr + row * _STATS
    tl.store(st + 2, mean_h)
    tl.store(st + 3, rstd_h)
    tl.store(st + 4, mean_c)
    tl.store(st + 5, rstd_c)


@triton.jit
def _hh_terms(hp, hh_w_ptr, u, m, d, mean_h, rstd_h):
    # one gate's terms of LN_hh's backward sums: dxhat = d w and dxhat xhat at offsets u
    xh = (tl.load(hp + u, mask=m, other=0.0) - mean_h) * rstd_h
    dx = d * tl.load(hh_w_ptr + u, mask=m, other=0.0)
    return dx, dx * xh


@triton.jit
def _cell_out_terms(dh, dy, keep_row, zoneout, cell, o_row, cell_w_ptr, cell_b_ptr, mean_c, rstd_c, j, m,
                    ZONED: tl.constexpr, MASKED: tl.constexpr):
    # at units j of a row: dh + dy, the zoneout keep weight, the share reaching h_new, LN_cell's gain, its
    # normalised input xhat, tanh of its output, and o
    dh_total = tl.load(dh + j, mask=m, other=0.0) + tl.load(dy + j, mask=m, other=0.0)
    keep = 0.0
    dh_new = dh_total
    if ZONED:
        if MASKED:
            keep = tl.load(keep_row + j, mask=m, other=0.0)
        else:
            keep = zoneout
        dh_new = (1.0 - keep) * dh_total
    cw = tl.load(cell_w_ptr + j, mask=m, other=0.0)
    xhat = (tl.load(cell + j, mask=m, other=0.0) - mean_c) * rstd_c
    tc = _tanh(xhat * cw + tl.load(cell_b_ptr + j, mask=m, other=0.0))
    o = tl.load(o_row + j, mask=m, other=0.0)
    return dh_total, keep, dh_new, cw, xhat, tc, o


@triton.jit
def _ln_lstm_bwd_kernel(
    gates_ptr,             # (rows, 4H) activated i f g o of every step
    hp_ptr,                # (rows, 4H) h_prev W_hh^T of every step
    cells_ptr,             # (rows, H) c' of every step
    c0_ptr,                # (B, H): c_prev of the rows that start at this step
    stats_ptr,             # (rows, STATS) the forward's statistics
    dy_ptr,                # (rows, H) gradient of y
    dh_ptr,                # (B, H) gradient reaching h' from later steps; ZONED: overwritten with its direct share
    dc_ptr,                # (B, H) running dc: read (from later steps), overwritten with dc_prev
    keep_ptr,              # (rows, H) zoneout mask (read when MASKED)
    zoneout,               # the kept fraction when ZONED and not MASKED
    hh_w_ptr,              # (4H,) LN_hh's gain
    cell_w_ptr, cell_b_ptr,  # (H,) LN_cell's gain and bias
    dp_ptr,                # (rows, 4H) out: gradients of the gate pre-activations
    dhp_ptr,               # (rows, 4H) out: gradient of h_prev W_hh^T
    dcn_ptr,               # (rows, H) out: gradient of LN_cell's output
    off,                   # first row of this step
    off_prev,              # first row of the step walked before this one in the forward (its c' is c_prev)
    n_prev,                # rows b < n_prev continue from that step; the others start from c0
    H,
    ZONED: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = off + b
    G4 = 4 * H
    gt = gates_ptr + row * G4
    hp = hp_ptr + row * G4
    cell = cells_ptr + row * H
    st = stats_ptr + row * _STATS
    mean_h = tl.load(st + 2)
    rstd_h = tl.load(st + 3)
    mean_c = tl.load(st + 4)
    rstd_c = tl.load(st + 5)
    # 1. h' = keep h + (1 - keep) h_new, h_new = o tanh(LN_cell(c')): the sums of LN_cell's backward
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, H, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < H
        _, _, dh_new, cw, xhat, tc, o = _cell_out_terms(dh_ptr + b * H, dy_ptr + row * H, keep_ptr + row * H,
                                                        zoneout, cell, gt + 3 * H, cell_w_ptr, cell_b_ptr, mean_c,
                                                        rstd_c, j, m, ZONED, MASKED)
        dxhat = dh_new * o * (1.0 - tc * tc) * cw
        s1 += dxhat
        s2 += dxhat * xhat
    cell_m1 = tl.sum(s1, axis=0) / H
    cell_m2 = tl.sum(s2, axis=0) / H
    # 2. through LN_cell into c' (plus what reaches c' from the next step), then c' = f c + i g; the sums of
    # LN_hh's backward
    t1 = tl.zeros([BLOCK], dtype=tl.float32)
    t2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, H, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < H
        dh_total, keep, dh_new, cw, xhat, tc, o = _cell_out_terms(dh_ptr + b * H, dy_ptr + row * H,
                                                                  keep_ptr + row * H, zoneout, cell, gt + 3 * H,
                                                                  cell_w_ptr, cell_b_ptr, mean_c, rstd_c, j, m,
                                                                  ZONED, MASKED)
        if ZONED:
            tl.store(dh_ptr + b * H + j, keep * dh_total, mask=m)  # the previous h's direct share
        d_o = dh_new * tc * (o * (1.0 - o))
        d_norm = dh_new * o * (1.0 - tc * tc)
        dc = tl.load(dc_ptr + b * H + j, mask=m, other=0.0) + rstd_c * (d_norm * cw - cell_m1 - xhat * cell_m2)
        i = tl.load(gt + j, mask=m, other=0.0)
        f = tl.load(gt + H + j, mask=m, other=0.0)
        gg = tl.load(gt + 2 * H + j, mask=m, other=0.0)
        # c_prev: one of the two loads is masked off entirely (b is the program's row)
        c_prev = (tl.load(cells_ptr + (off_prev + b) * H + j, mask=m & (b < n_prev), other=0.0)
                  + tl.load(c0_ptr + b * H + j, mask=m & (b >= n_prev), other=0.0))
        d_i = dc * gg * (i * (1.0 - i))
        d_f = dc * c_prev * (f * (1.0 - f))
        d_g = dc * i * (1.0 - gg * gg)
        dp = dp_ptr + row * G4
        tl.store(dp + j, d_i, mask=m)
        tl.store(dp + H + j, d_f, mask=m)
        tl.store(dp + 2 * H + j, d_g, mask=m)
        tl.store(dp + 3 * H + j, d_o, mask=m)
        tl.store(dcn_ptr + row * H + j, d_norm, mask=m)
        tl.store(dc_ptr + b * H + j, dc * f, mask=m)
        a1, a2 = _hh_terms(hp, hh_w_ptr, j, m, d_i, mean_h, rstd_h)
        t1 += a1
        t2 += a2
        a1, a2 = _hh_terms(hp, hh_w_ptr, H + j, m, d_f, mean_h, rstd_h)
        t1 += a1
        t2 += a2
        a1, a2 = _hh_terms(hp, hh_w_ptr, 2 * H + j, m, d_g, mean_h, rstd_h)
        t1 += a1
        t2 += a2
        a1, a2 = _hh_terms(hp, hh_w_ptr, 3 * H + j, m, d_o, mean_h, rstd_h)
        t1 += a1
        t2 += a2
    hh_m1 = tl.sum(t1, axis=0) / G4
    hh_m2 = tl.sum(t2, axis=0) / G4
    tl.debug_barrier()  # the gate gradients are read back below
    # 3. LN_hh's backward: the gradient of h_prev W_hh^T
    for j0 in range(0, H, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < H
        for q in tl.static_range(4):
            u = q * H + j
            xh = (tl.load(hp + u, mask=m, other=0.0) - mean_h) * rstd_h
            dx = tl.load(dp_ptr + row * G4 + u, mask=m, other=0.0) * tl.load(hh_w_ptr + u, mask=m, other=0.0)
            tl.store(dhp_ptr + row * G4 + u, rstd_h * (dx - hh_m1 - xh * hh_m2), mask=m)


# ---------------------------------------------------------------- launchers

def _check_float32(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise TypeError(f"layer_norm_lstm (Triton): {name} must be a contiguous float32 tensor "
                            f"(got {t.dtype}{'' if t.is_contiguous() else ', strided'})")


def _zoneout_flags(zoneout_mask: Optional[torch.Tensor], zoneout: float, device):
    """(ZONED, MASKED, keep_ptr, zoneout) of the cells' launches."""
    masked = zoneout_mask is not None
    return masked or zoneout != 0.0, masked, zoneout_mask if masked else _fp32_placeholder(device), float(zoneout)


def layer_norm_lstm_forward(x, batch_sizes, w_ih, w_hh, bias: Optional[torch.Tensor], ln_ih_weight, ln_ih_bias,
                            ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, h0, c0,
                            zoneout_mask: Optional[torch.Tensor], zoneout: float, reverse: bool,
                            train: bool) -> List[torch.Tensor]:
    """One LayerNormLSTM layer and direction over a packed batch -> [y (rows, H), h_n, c_n (B, H), gates,
    x_proj, h_proj (rows, 4H), cells (rows, H), stats (rows, 6)] as csrc/families/rnn_ln.h's
    layer_norm_lstm_forward, for contiguous float32 inputs; the workspace (the last five) only with train,
    else empty (0,) tensors. zoneout_mask (rows, H) (training) or None, then zoneout is the constant kept
    fraction (0: none)."""
    _check_float32(x=x, w_ih=w_ih, w_hh=w_hh, bias=bias, h0=h0, c0=c0, zoneout_mask=zoneout_mask)
    L = _Layer("lstm", x, batch_sizes, w_hh, None, h0, reverse)
    H, B, rows, dev = L.H, L.B, L.rows, x.device
    G4 = 4 * H
    zoned, masked, keep, z = _zoneout_flags(zoneout_mask, zoneout, dev)
    # the input part of every step: one GEMM, then its layer norm (+ bias) into `gates`, whose rows each
    # step's cell then overwrites with the activated gates
    x_proj = torch.mm(x, w_ih.t())
    gates = _alloc.empty((rows, G4), torch.float32, dev)
    stats = _alloc.empty((rows, STATS), torch.float32, dev)
    if rows:
        _ln_rows_fwd_kernel[(rows,)](x_proj, ln_ih_weight, ln_ih_bias, bias if bias is not None else x_proj, gates,
                                     stats, G4, HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    y = _alloc.empty((rows, H), torch.float32, dev)
    h, c = h0.clone(), c0.clone()
    # training keeps every step's recurrent projection and cell for the backward; inference one step's
    h_proj = _alloc.empty((rows, G4) if train else (B, G4), torch.float32, dev)
    cells = _alloc.empty((rows, H), torch.float32, dev) if train else _fp32_placeholder(dev)
    w_hh_t = w_hh.t()
    for k in range(L.T):
        t = L.step(k)
        bs, off = L.bs[t], L.off[t]
        hp_off = off if train else 0
        torch.mm(h[:bs], w_hh_t, out=h_proj[hp_off:hp_off + bs])
        _ln_lstm_fwd_kernel[(bs,)](gates, h_proj, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, c, cells, h,
                                   y, keep, z, stats, off, hp_off, H, TRAIN=train, ZONED=zoned, MASKED=masked,
                                   BLOCK=BLOCK, num_warps=NUM_WARPS)
    if not train:
        return [y, h, c] + [torch.empty(0, dtype=torch.float32, device=dev) for _ in range(5)]
    return [y, h, c, gates, x_proj, h_proj, cells, stats]


def _gain_bias_grads(d_out, v, mean, rstd):
    """(d_gain, d_bias) of one layer norm: column sums of d_out xhat and of d_out, xhat = (v - mean) rstd
    recomputed as the forward formed it; summed in float64 (torch's reductions: the same bits every run)."""
    xhat = (v - mean.unsqueeze(1)) * rstd.unsqueeze(1)
    return ((d_out * xhat).sum(0, dtype=torch.float64).to(torch.float32),
            d_out.sum(0, dtype=torch.float64).to(torch.float32))


def layer_norm_lstm_backward(dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, bias: Optional[torch.Tensor], ln_ih_weight,
                             ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias, h0, c0,
                             zoneout_mask: Optional[torch.Tensor], zoneout: float, y, gates, x_proj, h_proj, cells,
                             stats, reverse: bool, want_dx: bool, want_dweights: bool) -> List[torch.Tensor]:
    """Backward through time of layer_norm_lstm_forward -> [dx, dw_ih, dw_hh, dbias, d_ln_ih_weight,
    d_ln_ih_bias, d_ln_hh_weight, d_ln_hh_bias, d_ln_cell_weight, d_ln_cell_bias, dh0, dc0] as
    csrc/families/rnn_ln.h's layer_norm_lstm_backward: empty (0,) tensors where not wanted or absent."""
    _check_float32(dy=dy, dh_n=dh_n, dc_n=dc_n, x=x, w_ih=w_ih, w_hh=w_hh, h0=h0, c0=c0, y=y, gates=gates,
                   x_proj=x_proj, h_proj=h_proj, cells=cells, stats=stats)
    L = _Layer("lstm", x, batch_sizes, w_hh, None, h0, reverse)
    H, rows, dev = L.H, L.rows, x.device
    G4 = 4 * H
    if (gates.numel() != rows * G4 or x_proj.numel() != rows * G4 or h_proj.numel() != rows * G4
            or cells.numel() != rows * H or stats.numel() != rows * STATS):
        raise ValueError("layer_norm_lstm_backward: the workspace does not match (was the forward run with "
                         "train=true?)")
    zoned, masked, keep, z = _zoneout_flags(zoneout_mask, zoneout, dev)
    # gradients of the gate pre-activations (= of LN_ih's and LN_hh's outputs and of bias), of h_prev W_hh^T
    # (through LN_hh), and of LN_cell's output
    d_pre = _alloc.empty((rows, G4), torch.float32, dev)
    d_h_proj = _alloc.empty((rows, G4), torch.float32, dev)
    d_cell_norm = _alloc.empty((rows, H), torch.float32, dev)
    dh, dc = dh_n.clone(), dc_n.clone()  # the gradients reaching the state of the step being walked
    for k in range(L.T - 1, -1, -1):
        t = L.step(k)
        bs, off = L.bs[t], L.off[t]
        n_prev = L.rows_with_prev(t)
        off_prev = L.off[L.prev_step(t)] if n_prev > 0 else 0
        _ln_lstm_bwd_kernel[(bs,)](gates, h_proj, cells, c0, stats, dy, dh, dc, keep, z, ln_hh_weight, ln_cell_weight,
                                   ln_cell_bias, d_pre, d_h_proj, d_cell_norm, off, off_prev, n_prev, H, ZONED=zoned,
                                   MASKED=masked, BLOCK=BLOCK, num_warps=NUM_WARPS)
        # dh_prev = d_h_proj W_hh (+ the zoneout share the cell left in dh)
        if zoned:
            dh[:bs].addmm_(d_h_proj[off:off + bs], w_hh)
        else:
            torch.mm(d_h_proj[off:off + bs], w_hh, out=dh[:bs])
    none = lambda: torch.empty(0, dtype=torch.float32, device=dev)  # noqa: E731  (fresh: no aliases)
    dx, dw_ih, dw_hh, dbias = none(), none(), none(), none()
    ln_grads = [none() for _ in range(6)]
    if want_dweights:
        # the gain / bias sums read d_pre before the input layer norm's backward overwrites it below
        ln_grads = [*_gain_bias_grads(d_pre, x_proj, stats[:, 0], stats[:, 1]),
                    *_gain_bias_grads(d_pre, h_proj, stats[:, 2], stats[:, 3]),
                    *_gain_bias_grads(d_cell_norm, cells, stats[:, 4], stats[:, 5])]
        if bias is not None:  # bias, ln_ih_bias and ln_hh_bias all add to the pre-activations
            dbias = ln_grads[1].clone()
    if (want_dx or want_dweights) and rows:
        # LN_ih's backward for every row, in place: d_pre becomes the gradient of x W_ih^T
        _ln_rows_bwd_kernel[(rows,)](x_proj, stats, ln_ih_weight, d_pre, G4, BLOCK=BLOCK, num_warps=NUM_WARPS)
    if want_dx:
        dx = torch.mm(d_pre, w_ih)
    if want_dweights:
        dw_ih = torch.mm(d_pre.t(), x)
        dw_hh = torch.mm(d_h_proj.t(), _h_prev_rows(L, y, h0))
    return [dx, dw_ih, dw_hh, dbias, *ln_grads, dh, dc]


# ---------------------------------------------------------------- ahead-of-time specs

def aot_specs():
    """Every kernel configuration the launchers use on a GPU, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps); each flag both ways (MASKED only with ZONED)."""
    ptr = "*fp32"
    specs = []
    for has_bias in (False, True):
        specs.append((_ln_rows_fwd_kernel,
                      {"v_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "stats_ptr": ptr,
                       "N": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"},
                      {"HAS_BIAS": has_bias, "BLOCK": BLOCK}, NUM_WARPS))
    specs.append((_ln_rows_bwd_kernel,
                  {"v_ptr": ptr, "stats_ptr": ptr, "w_ptr": ptr, "d_ptr": ptr, "N": "i32", "BLOCK": "constexpr"},
                  {"BLOCK": BLOCK}, NUM_WARPS))
    for zoned, masked in ((False, False), (True, False), (True, True)):
        for train in (False, True):
            specs.append((_ln_lstm_fwd_kernel,
                          {"g_ptr": ptr, "hp_ptr": ptr, "hh_w_ptr": ptr, "hh_b_ptr": ptr, "cell_w_ptr": ptr,
                           "cell_b_ptr": ptr, "c_ptr": ptr, "cells_ptr": ptr, "h_ptr": ptr, "y_ptr": ptr,
                           "keep_ptr": ptr, "zoneout": "fp32", "stats_ptr": ptr, "off": "i32", "hp_off": "i32",
                           "H": "i32", "TRAIN": "constexpr", "ZONED": "constexpr", "MASKED": "constexpr",
                           "BLOCK": "constexpr"},
                          {"TRAIN": train, "ZONED": zoned, "MASKED": masked, "BLOCK": BLOCK}, NUM_WARPS))
        specs.append((_ln_lstm_bwd_kernel,
                      {"gates_ptr": ptr, "hp_ptr": ptr, "cells_ptr": ptr, "c0_ptr": ptr, "stats_ptr": ptr,
                       "dy_ptr": ptr, "dh_ptr": ptr, "dc_ptr": ptr, "keep_ptr": ptr, "zoneout": "fp32",
                       "hh_w_ptr": ptr, "cell_w_ptr": ptr, "cell_b_ptr": ptr, "dp_ptr": ptr, "dhp_ptr": ptr,
                       "dcn_ptr": ptr, "off": "i32", "off_prev": "i32", "n_prev": "i32", "H": "i32",
                       "ZONED": "constexpr", "MASKED": "constexpr", "BLOCK": "constexpr"},
                      {"ZONED": zoned, "MASKED": masked, "BLOCK": BLOCK}, NUM_WARPS))
    return specs
