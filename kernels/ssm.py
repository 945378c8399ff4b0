"""Triton kernels for the Mamba family's depthwise causal conv1d and single-step decode, and their launchers.

Semantics and calling convention: fastnn/reference/ssm.py (causal_conv1d, causal_conv1d_update,
selective_state_update). The op layer (fastnn/ops/ssm_conv.py) validates and makes every tensor contiguous,
and passes weight / bias / A / D / dt_bias in the compute dtype (float32, float64 for float64 inputs): the
kernels take their math precision from those tensors, so one kernel body serves every input dtype.

Kernels
  _conv_fwd_kernel     one program per (batch row, channel block, time block): W shifted loads of the x tile
                       (the W - 1 halo before the block comes from x or initial_states, served by L1/L2),
                       seq_idx masking, silu; the last time block also writes final_states.
  _conv_bwd_kernel     same grid: g = dout * silu'(pre) recomputed at the W shifts the block needs, then
                       dx (plus dfinal_states), per-(batch row, time block) partial dweight / dbias (summed
                       afterwards by the launcher: deterministic, no atomics); the first time block also
                       writes dinitial_states.
  _conv_update_kernel  one program per (batch row, channel block): outputs of T new steps from the state
                       window, then the state shifted in place (barriers order the reads before the writes).
  _ssu_kernel          selective_state_update: one program per (batch row, head, block of head dims): state
                       tile (BLOCK_P, N) read, updated, written back in place; y = <state, C>.

Feature flags (silu, seq_idx, states, D, z, ...) are constexpr: they change the tile math. AOT specs list,
per (kernel, dtypes, width / state size), the plain variant and the superset of the flags (every flag on),
which bounds the registers of every combination in between (the convention of kernels/attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnn import _alloc

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

# Conv tiles, sized by registers (AOT, sm_90 / sm_80, superset of the flags, W = 4). Forward: 16 channels x
# 64 steps at 4 warps = 8 elements per thread, 104 / 113 registers fp32, 138 / 142 fp64 (16 x 128 took 146
# fp32). Backward: it recomputes the pre-activation at W shifts (W^2 shifted loads, served by L1), so it needs
# ~4 elements per thread: 16 x 128 at 16 warps takes 114 / 128 registers (fp32; 8 warps spilled on sm_80) and
# keeps the dweight / dbias partials at one row per 128 steps; fp64 spills there (ptxas caps 512-thread
# blocks at 128 registers) and uses 16 x 32 at 4 warps (216 / 220). A time-loop of 4 x 32-step tiles per
# program was tried for fewer partials: it spilled (168 registers + 16 bytes fp32 on sm_90).
CONV_BLOCK_D, CONV_BLOCK_L, CONV_WARPS = 16, 64, 4
CONV_BWD_CFG = {False: (16, 128, 16), True: (16, 32, 4)}  # by IS_FP64: (BLOCK_D, BLOCK_L, warps)
# dinitial_states / final_states: W - 1 <= 3 positions, padded to 4.
_HALO = tl.constexpr(4)
# Update: 64 channels x 4 steps (T = 1 decode uses a quarter of the lanes; it is latency-bound anyway).
UPD_BLOCK_D, UPD_BLOCK_T, UPD_BLOCK_S, UPD_WARPS = 64, 4, 4, 2
# selective_state_update: about 512 state elements per program at 4 warps (4 per thread) keeps the grid
# large at batch 1 (mamba-1, D = 3072, N = 16: 96 programs) and the registers low at N = 256.
SSU_WARPS = 4
SSU_ELEMS = 512
SSU_BLOCK_NS = (16, 32, 64, 128, 256)


def ssu_blocks(N: int):
    """(BLOCK_P, BLOCK_N) of the selective_state_update kernel for state size N (<= 256)."""
    bn = max(16, triton.next_power_of_2(N))
    return max(1, SSU_ELEMS // bn), bn


# ---------------------------------------------------------------- device helpers

@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _log1p(y):
    # log(1 + y) accurate for tiny y without libdevice: log(u) * y / (u - 1) with u = 1 + y rounded
    # (Goldberg's trick); u == 1 means y is below half an ulp of 1 and log1p(y) = y to working precision.
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * y / (u - 1.0))


@triton.jit
def _seq_at(seq_row, s, L):
    # sequence ids at times s (any integers): times before 0 belong to the row's first sequence, times
    # past the end read the last step (callers mask them out)
    return tl.load(seq_row + tl.minimum(tl.maximum(s, 0), L - 1))


@triton.jit
def _load_xc(x_row, init_row, s, L, dmask, W: tl.constexpr, HAS_INIT: tl.constexpr):
    # (BLOCK_D, len(s)) tile of the extended input at times s: x for 0 <= s < L, initial_states[W - 1 + s]
    # for -(W - 1) <= s < 0 (zeros without initial states), zeros elsewhere
    in_x = (s >= 0) & (s < L)
    v = tl.load(x_row + s[None, :], mask=dmask[:, None] & in_x[None, :], other=0.0)
    if HAS_INIT:
        in_i = (s < 0) & (s >= -(W - 1))
        vi = tl.load(init_row + (s + (W - 1))[None, :], mask=dmask[:, None] & in_i[None, :], other=0.0)
        v = tl.where(in_i[None, :], vi, v)
    return v


@triton.jit
def _preact(x_row, init_row, seq_row, w_ptr, bias, d, dmask, u, L, W: tl.constexpr, HAS_INIT: tl.constexpr,
            HAS_SEQ: tl.constexpr):
    # bias + sum_k w[k] * xc[u - (W - 1) + k] at times u, terms of another sequence dropped; in bias's dtype
    acc = tl.zeros([bias.shape[0], u.shape[0]], dtype=bias.dtype) + bias[:, None]
    if HAS_SEQ:
        seq_u = _seq_at(seq_row, u, L)
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d * W + k, mask=dmask, other=0.0)
        s = u - (W - 1) + k
        v = _load_xc(x_row, init_row, s, L, dmask, W, HAS_INIT).to(bias.dtype)
        if HAS_SEQ:
            v = tl.where((_seq_at(seq_row, s, L) == seq_u)[None, :], v, 0.0)
        acc += wk[:, None] * v
    return acc


@triton.jit
def _grad_pre(x_row, init_row, seq_row, dout_row, w_ptr, bias, d, dmask, u, L, W: tl.constexpr,
              SILU: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    # gradient w.r.t. the pre-activation at times u: dout * silu'(pre), zero outside [0, L)
    um = (u >= 0) & (u < L)
    m = dmask[:, None] & um[None, :]
    g = tl.load(dout_row + u[None, :], mask=m, other=0.0).to(bias.dtype)
    if SILU:
        pre = _preact(x_row, init_row, seq_row, w_ptr, bias, d, dmask, u, L, W, HAS_INIT, HAS_SEQ)
        sg = _sigmoid(pre)
        # where, not a product with the mask: pre outside [0, L) is partial and may be non-finite
        g = tl.where(m, g * (sg * (1.0 + pre * (1.0 - sg))), 0.0)
    return g


@triton.jit
def _dxc(x_row, init_row, seq_row, dout_row, dfinal_row, w_ptr, bias, d, dmask, t, L, W: tl.constexpr,
         SILU: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr):
    # gradient w.r.t. the extended input at times t (t < 0: initial states): step t feeds the outputs
    # t + j (j = 0..W-1) through w[W - 1 - j], and final_states[t - (L - (W - 1))] when that is in 0..W-2
    acc = tl.zeros([bias.shape[0], t.shape[0]], dtype=bias.dtype)
    if HAS_SEQ:
        seq_t = _seq_at(seq_row, t, L)
    for j in tl.static_range(W):
        g = _grad_pre(x_row, init_row, seq_row, dout_row, w_ptr, bias, d, dmask, t + j, L, W, SILU, HAS_INIT,
                      HAS_SEQ)
        if HAS_SEQ:
            g = tl.where((_seq_at(seq_row, t + j, L) == seq_t)[None, :], g, 0.0)
        wk = tl.load(w_ptr + d * W + (W - 1 - j), mask=dmask, other=0.0)
        acc += wk[:, None] * g
    if HAS_DFINAL:
        jf = t - (L - (W - 1))
        fm = (jf >= 0) & (jf < W - 1) & (t >= -(W - 1))
        gf = tl.load(dfinal_row + jf[None, :], mask=dmask[:, None] & fm[None, :], other=0.0).to(bias.dtype)
        if HAS_SEQ:
            gf = tl.where((seq_t == _seq_at(seq_row, L - 1, L))[None, :], gf, 0.0)
        acc += gf
    return acc


# ---------------------------------------------------------------- causal conv1d

@triton.jit
def _conv_fwd_kernel(
    x_ptr,                    # (B, D, L) input, contiguous, fp16/bf16/fp32/fp64
    w_ptr,                    # (D, W) weight in the compute dtype (fp32; fp64 for fp64 x): the math precision
    bias_ptr,                 # (D,) bias in the compute dtype (zeros when the op has none)
    seq_ptr,                  # (B, L) int32 sequence ids (read when HAS_SEQ)
    init_ptr,                 # (B, D, W - 1) initial states, x's dtype (read when HAS_INIT)
    out_ptr,                  # out (B, D, L), x's dtype
    final_ptr,                # out (B, D, W - 1) final states, x's dtype (written when HAS_FINAL)
    D, L,                     # channels, steps (L >= 1)
    W: tl.constexpr,          # kernel width, 2..4
    SILU: tl.constexpr,       # apply silu to the output
    HAS_SEQ: tl.constexpr,    # seq_idx given: drop terms from another sequence
    HAS_INIT: tl.constexpr,   # initial_states given (else zeros before step 0)
    HAS_FINAL: tl.constexpr,  # write final_states
    BLOCK_D: tl.constexpr,    # channels per program
    BLOCK_L: tl.constexpr,    # steps per program
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    dmask = d < D
    row = b * D + d.to(tl.int64)            # int64: B * D * L may pass 2^31
    x_row = x_ptr + row[:, None] * L
    init_row = init_ptr + row[:, None] * (W - 1)
    seq_row = seq_ptr + b * L
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    acc = _preact(x_row, init_row, seq_row, w_ptr, bias, d, dmask, t, L, W, HAS_INIT, HAS_SEQ)
    if SILU:
        acc = acc * _sigmoid(acc)
    tl.store(out_ptr + row[:, None] * L + t[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=dmask[:, None] & (t < L)[None, :])
    if HAS_FINAL:
        if tl.program_id(2) == tl.num_programs(2) - 1:
            # final_states[j] = the extended input at step L - (W - 1) + j
            j = tl.arange(0, _HALO)
            s = L - (W - 1) + j
            v = _load_xc(x_row, init_row, s, L, dmask, W, HAS_INIT)
            if HAS_SEQ:
                v = tl.where((_seq_at(seq_row, s, L) == _seq_at(seq_row, L - 1, L))[None, :], v, 0.0)
            tl.store(final_ptr + row[:, None] * (W - 1) + j[None, :], v.to(final_ptr.dtype.element_ty),
                     mask=dmask[:, None] & (j < W - 1)[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr,                     # (B, D, L) forward input
    w_ptr,                     # (D, W) weight, compute dtype
    bias_ptr,                  # (D,) bias, compute dtype (zeros when absent)
    seq_ptr,                   # (B, L) int32 (read when HAS_SEQ)
    init_ptr,                  # (B, D, W - 1) initial states (read when HAS_INIT)
    dout_ptr,                  # (B, D, L) gradient of the output, x's dtype
    dfinal_ptr,                # (B, D, W - 1) gradient of final_states (read when HAS_DFINAL)
    dx_ptr,                    # out (B, D, L), x's dtype
    dinit_ptr,                 # out (B, D, W - 1), x's dtype (written when WANT_DINIT)
    dw_part_ptr,               # out (B * num time blocks, D, W) partial dweight, compute dtype
    db_part_ptr,               # out (B * num time blocks, D) partial dbias, compute dtype
    D, L,
    W: tl.constexpr,
    SILU: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    WANT_DINIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    row = b * D + d.to(tl.int64)
    x_row = x_ptr + row[:, None] * L
    init_row = init_ptr + row[:, None] * (W - 1)
    dout_row = dout_ptr + row[:, None] * L
    dfinal_row = dfinal_ptr + row[:, None] * (W - 1)
    seq_row = seq_ptr + b * L
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    t = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    dx = _dxc(x_row, init_row, seq_row, dout_row, dfinal_row, w_ptr, bias, d, dmask, t, L, W, SILU, HAS_INIT,
              HAS_SEQ, HAS_DFINAL)
    tl.store(dx_ptr + row[:, None] * L + t[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=dmask[:, None] & (t < L)[None, :])
    # dweight[k] = sum_t g[t] * xc[t - (W - 1) + k] (same sequence), dbias = sum_t g[t]: this block's part
    g = _grad_pre(x_row, init_row, seq_row, dout_row, w_ptr, bias, d, dmask, t, L, W, SILU, HAS_INIT, HAS_SEQ)
    part = (b * tl.num_programs(2) + lb) * D + d.to(tl.int64)
    tl.store(db_part_ptr + part, tl.sum(g, axis=1), mask=dmask)
    if HAS_SEQ:
        seq_t = _seq_at(seq_row, t, L)
    for k in tl.static_range(W):
        s = t - (W - 1) + k
        v = _load_xc(x_row, init_row, s, L, dmask, W, HAS_INIT).to(bias.dtype)
        if HAS_SEQ:
            v = tl.where((_seq_at(seq_row, s, L) == seq_t)[None, :], v, 0.0)
        tl.store(dw_part_ptr + part * W + k, tl.sum(g * v, axis=1), mask=dmask)
    if WANT_DINIT:
        if lb == 0:
            th = tl.arange(0, _HALO) - (W - 1)   # times -(W-1)..-1 (and padding at >= 0)
            di = _dxc(x_row, init_row, seq_row, dout_row, dfinal_row, w_ptr, bias, d, dmask, th, L, W, SILU,
                      HAS_INIT, HAS_SEQ, HAS_DFINAL)
            tl.store(dinit_ptr + row[:, None] * (W - 1) + (th + (W - 1))[None, :], di.to(dinit_ptr.dtype.element_ty),
                     mask=dmask[:, None] & (th < 0)[None, :])


# ---------------------------------------------------------------- decode: conv state update

@triton.jit
def _load_window(state_row, x_row, i, S, T, dmask):
    # (BLOCK_D, len(i)) entries i of the concatenation [state (S steps), x (T steps)]
    in_s = i < S
    in_x = (i >= S) & (i < S + T)
    v = tl.load(state_row + i[None, :], mask=dmask[:, None] & in_s[None, :], other=0.0)
    vx = tl.load(x_row + (i - S)[None, :], mask=dmask[:, None] & in_x[None, :], other=0.0)
    return tl.where(in_s[None, :], v, vx.to(v.dtype))


@triton.jit
def _load_window_circ(state_row, x_row, j, p, S, T, dmask):
    # (BLOCK_D, len(j)) window entries j relative to the first new step, the state a circular buffer whose
    # next position is p (0 <= p < S): j < 0 reads state[(p + j) mod S] (j >= -(W - 1) >= -S), j >= 0 x[j]
    in_s = j < 0
    in_x = (j >= 0) & (j < T)
    at = p + j  # in [-S, S) where read: one conditional wrap, no vector modulo
    at = tl.where(at < 0, at + S, at)
    v = tl.load(state_row + at[None, :], mask=dmask[:, None] & in_s[None, :], other=0.0)
    vx = tl.load(x_row + j[None, :], mask=dmask[:, None] & in_x[None, :], other=0.0)
    return tl.where(in_s[None, :], v, vx.to(v.dtype))


@triton.jit
def _conv_update_kernel(
    x_ptr,                     # (B, D, T) new steps
    state_ptr,                 # (B_cache, D, S) conv state, x's dtype, updated in place
    w_ptr,                     # (D, W) weight, compute dtype
    bias_ptr,                  # (D,) bias, compute dtype (zeros when absent)
    idx_ptr,                   # (B,) int32 state row of each batch row (read when HAS_IDX)
    seqlens_ptr,               # (B,) int32 >= 0, next circular-buffer position (read when CIRCULAR)
    out_ptr,                   # out (B, D, T), x's dtype
    D, T, S,                   # channels, new steps, state length (S >= W - 1)
    n_cache,                   # conv_state's rows: an index outside [0, n_cache) touches no state, out NaN
    W: tl.constexpr,
    SILU: tl.constexpr,
    HAS_IDX: tl.constexpr,     # conv_state_indices given (else row b)
    CIRCULAR: tl.constexpr,    # cache_seqlens given: the state is a circular buffer (else shifted)
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,     # steps per loop iteration for the outputs
    BLOCK_S: tl.constexpr,     # state entries per loop iteration for the shift
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    x_row = x_ptr + (b * D + d.to(tl.int64))[:, None] * T
    out_row = out_ptr + (b * D + d.to(tl.int64))[:, None] * T
    if HAS_IDX:
        # indices are not checked on the host for CUDA tensors (a sync per decode step): a row whose index
        # names no cache row reads and writes no state and returns NaN, rather than touching foreign memory.
        # Its loops below run no iteration (runtime bounds: masks would cost registers in every iteration).
        srow_b = tl.load(idx_ptr + b).to(tl.int64)
        valid = (srow_b >= 0) & (srow_b < n_cache)
        srow_b = tl.where(valid, srow_b, 0)
        t_end = tl.where(valid, T, 0)
        s_end = tl.where(valid, S, 0)
        for t0 in range(0, T - t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            nan = tl.full([BLOCK_D, BLOCK_T], float("nan"), tl.float32)
            tl.store(out_row + t[None, :], nan.to(out_ptr.dtype.element_ty), mask=dmask[:, None] & (t < T)[None, :])
    else:
        srow_b = b
        t_end = T
        s_end = S
    state_row = state_ptr + (srow_b * D + d.to(tl.int64))[:, None] * S
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    if CIRCULAR:
        pos = tl.load(seqlens_ptr + b) % S
        pos = tl.where(pos < 0, pos + S, pos)  # a negative length (unchecked on the GPU) wraps, never escapes
    # 1. outputs: out[t] = bias + sum_k w[k] * cat[S - (W - 1) + t + k]
    for t0 in range(0, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=bias.dtype) + bias[:, None]
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + d * W + k, mask=dmask, other=0.0)
            if CIRCULAR:
                win = _load_window_circ(state_row, x_row, t + k - (W - 1), pos, S, T, dmask)
            else:
                win = _load_window(state_row, x_row, S - (W - 1) + t + k, S, T, dmask)
            acc += wk[:, None] * win.to(bias.dtype)
        if SILU:
            acc = acc * _sigmoid(acc)
        tl.store(out_row + t[None, :], acc.to(out_ptr.dtype.element_ty), mask=dmask[:, None] & (t < T)[None, :])
    # every thread's state reads happen before any state write (the CTA's threads share state rows)
    tl.debug_barrier()
    if CIRCULAR:
        # 2'. the new steps go to positions pos + t (mod S); of more than S only the last S (distinct positions)
        first = tl.maximum(T - S, 0)
        base = (pos + first) % S  # position of step `first`; steps first.. are < S apart: one wrap at most
        for t0 in range(first, t_end, BLOCK_S):
            t = t0 + tl.arange(0, BLOCK_S)
            ok = dmask[:, None] & (t < T)[None, :]
            v = tl.load(x_row + t[None, :], mask=ok, other=0.0)
            at = base + (t - first)
            at = tl.where(at >= S, at - S, at)
            tl.store(state_row + at[None, :], v.to(state_ptr.dtype.element_ty), mask=ok)
    else:
        # 2. shift: state[s] = cat[s + T], in increasing s: a block reads entries >= its start + T, which no
        # earlier block wrote; within a block the barrier orders the reads before the writes
        for s0 in range(0, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            v = _load_window(state_row, x_row, s + T, S, T, dmask)
            tl.debug_barrier()
            tl.store(state_row + s[None, :], v, mask=dmask[:, None] & (s < S)[None, :])


# ---------------------------------------------------------------- decode: selective state update

@triton.jit
def _ssu_kernel(
    state_ptr,                  # (B_cache, H, P, N) state, fp16/bf16/fp32/fp64, updated in place
    x_ptr,                      # (B, H, P) input
    dt_ptr,                     # (B, H, P) time step, x's dtype
    A_ptr,                      # (H, P, N) compute dtype (fp32; fp64 with a fp64 state): the math precision
    B_ptr,                      # (B, G, N) x's dtype
    C_ptr,                      # (B, G, N) x's dtype
    D_ptr,                      # (H, P) skip, compute dtype (read when HAS_D)
    z_ptr,                      # (B, H, P) gate, x's dtype (read when HAS_Z)
    dt_bias_ptr,                # (H, P) compute dtype (read when HAS_DT_BIAS)
    idx_ptr,                    # (B,) int32 state row per batch row (read when HAS_IDX)
    out_ptr,                    # out (B, H, P), x's dtype
    H, P, N, G,                 # heads, head dim, state size, groups (H % G == 0)
    n_cache,                    # state's rows: an index outside [0, n_cache) touches no state, out NaN
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,  # dt = softplus(dt) (threshold 20)
    HAS_IDX: tl.constexpr,      # state_batch_indices given
    BLOCK_P: tl.constexpr,      # head dims per program
    BLOCK_N: tl.constexpr,      # next power of two >= N
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm, nm = p < P, n < N
    if HAS_IDX:  # unchecked on the host for CUDA tensors: see _conv_update_kernel
        srow = tl.load(idx_ptr + b).to(tl.int64)
        valid = (srow >= 0) & (srow < n_cache)
        srow = tl.where(valid, srow, 0)
        pm = pm & valid  # an invalid row loads and stores nothing but its NaN output (below)
    else:
        srow = b
    m2 = pm[:, None] & nm[None, :]
    g = h // (H // G)
    hp = h * P + p.to(tl.int64)                       # (h, p) in (H, P)
    bhp = b * H * P + hp                              # (b, h, p) in (B, H, P)
    st_ptrs = state_ptr + ((srow * H * P + hp) * N)[:, None] + n[None, :]
    A = tl.load(A_ptr + (hp * N)[:, None] + n[None, :], mask=m2, other=0.0)
    ct = A.dtype
    s = tl.load(st_ptrs, mask=m2, other=0.0).to(ct)
    xv = tl.load(x_ptr + bhp, mask=pm, other=0.0).to(ct)
    dt = tl.load(dt_ptr + bhp, mask=pm, other=0.0).to(ct)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + hp, mask=pm, other=0.0)
    if DT_SOFTPLUS:
        dt = tl.where(dt <= SOFTPLUS_THRESHOLD, _log1p(tl.exp(dt)), dt)
    bg = (b * G + g) * N
    Bv = tl.load(B_ptr + bg + n, mask=nm, other=0.0).to(ct)
    Cv = tl.load(C_ptr + bg + n, mask=nm, other=0.0).to(ct)
    dA = tl.exp(A * dt[:, None])
    s = s * dA + (Bv[None, :] * dt[:, None]) * xv[:, None]
    tl.store(st_ptrs, s.to(state_ptr.dtype.element_ty), mask=m2)
    out = tl.sum(tl.where(m2, s * Cv[None, :], 0.0), axis=1)
    if HAS_D:
        out += xv * tl.load(D_ptr + hp, mask=pm, other=0.0)
    if HAS_Z:
        zv = tl.load(z_ptr + bhp, mask=pm, other=0.0).to(ct)
        out = out * (zv * _sigmoid(zv))
    if HAS_IDX:
        out = tl.where(valid, out, float("nan"))
    tl.store(out_ptr + bhp, out.to(out_ptr.dtype.element_ty), mask=p < P)


# ---------------------------------------------------------------- launchers

def _zeros_bias(bias, weight):
    return bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


_NO_INDEX = {}


def _no_index(device):
    """An int32 placeholder for an absent seq_idx / index pointer (never read; typed as the AOT specs are)."""
    if device not in _NO_INDEX:
        _NO_INDEX[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _NO_INDEX[device]


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, return_final_states: bool, silu: bool):
    """x (B, D, L) with L >= 1, weight (D, W) and bias (D,) in the compute dtype, seq_idx (B, L) int32,
    initial_states (B, D, W - 1) in x's dtype, all contiguous. Returns (out, final_states or None)."""
    Bsz, D, L = x.shape
    W = weight.shape[1]
    out = _alloc.empty((Bsz, D, L), x.dtype, x.device)
    final = _alloc.empty((Bsz, D, W - 1), x.dtype, x.device) if return_final_states else None
    grid = (Bsz, triton.cdiv(D, CONV_BLOCK_D), triton.cdiv(L, CONV_BLOCK_L))
    _conv_fwd_kernel[grid](x, weight, _zeros_bias(bias, weight), seq_idx if seq_idx is not None else _no_index(x.device),
                           initial_states if initial_states is not None else x, out,
                           final if final is not None else out, D, L, W=W, SILU=silu, HAS_SEQ=seq_idx is not None,
                           HAS_INIT=initial_states is not None, HAS_FINAL=final is not None, BLOCK_D=CONV_BLOCK_D,
                           BLOCK_L=CONV_BLOCK_L, num_warps=CONV_WARPS)
    return out, final


def causal_conv1d_bwd(dout, dfinal, x, weight, bias, seq_idx, initial_states, silu: bool, want_dinit: bool):
    """Gradients of causal_conv1d_fwd (L >= 1): (dx, dweight, dbias, dinitial_states or None); dweight and
    dbias in the compute dtype, summed over (batch, time block) partials in a fixed order."""
    Bsz, D, L = x.shape
    W = weight.shape[1]
    block_d, block_l, warps = CONV_BWD_CFG[x.dtype == torch.float64]
    nlb = triton.cdiv(L, block_l)
    dx = _alloc.empty((Bsz, D, L), x.dtype, x.device)
    dinit = _alloc.empty((Bsz, D, W - 1), x.dtype, x.device) if want_dinit else None
    dw_part = _alloc.empty((Bsz * nlb, D, W), weight.dtype, x.device)
    db_part = _alloc.empty((Bsz * nlb, D), weight.dtype, x.device)
    grid = (Bsz, triton.cdiv(D, block_d), nlb)
    _conv_bwd_kernel[grid](x, weight, _zeros_bias(bias, weight), seq_idx if seq_idx is not None else _no_index(x.device),
                           initial_states if initial_states is not None else x, dout,
                           dfinal if dfinal is not None else dout, dx, dinit if dinit is not None else dx, dw_part,
                           db_part, D, L, W=W, SILU=silu, HAS_SEQ=seq_idx is not None,
                           HAS_INIT=initial_states is not None, HAS_DFINAL=dfinal is not None,
                           WANT_DINIT=want_dinit, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps)
    return dx, dw_part.sum(0), db_part.sum(0), dinit


def causal_conv1d_update(x, conv_state, weight, bias, silu: bool, conv_state_indices, cache_seqlens=None):
    """x (B, D, T), conv_state (B_cache, D, S) in x's dtype (updated in place), weight / bias in the compute
    dtype, conv_state_indices (B,) int32 or None, cache_seqlens (B,) int32 >= 0 or None (then the state is
    a circular buffer, as reference.causal_conv1d_update). Returns out (B, D, T)."""
    Bsz, D, T = x.shape
    S = conv_state.shape[2]
    W = weight.shape[1]
    out = _alloc.empty((Bsz, D, T), x.dtype, x.device)
    grid = (Bsz, triton.cdiv(D, UPD_BLOCK_D))
    _conv_update_kernel[grid](x, conv_state, weight, _zeros_bias(bias, weight),
                              conv_state_indices if conv_state_indices is not None else _no_index(x.device),
                              cache_seqlens if cache_seqlens is not None else _no_index(x.device), out, D, T, S,
                              conv_state.shape[0], W=W,
                              SILU=silu, HAS_IDX=conv_state_indices is not None,
                              CIRCULAR=cache_seqlens is not None, BLOCK_D=UPD_BLOCK_D,
                              BLOCK_T=UPD_BLOCK_T, BLOCK_S=UPD_BLOCK_S, num_warps=UPD_WARPS)
    return out


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool, state_batch_indices):
    """Head form (state (B_cache, H, P, N), x / dt / z (B, H, P), A (H, P, N), B / C (B, G, N), D / dt_bias
    (H, P)), or mamba 1's form, the head form with H = 1 (state (B_cache, D, N), x / dt / z (B, D), A (D, N),
    B / C (B, N), D / dt_bias (D,)); A, D, dt_bias in the compute dtype; contiguous; state updated in place.
    Returns out shaped like x."""
    Bsz, H, P = x.shape if x.dim() == 3 else (x.shape[0], 1, x.shape[1])
    N, G = A.shape[-1], B.shape[1] if B.dim() == 3 else 1
    out = _alloc.empty(tuple(x.shape), x.dtype, x.device)
    block_p, block_n = ssu_blocks(N)
    grid = (Bsz, H, triton.cdiv(P, block_p))
    _ssu_kernel[grid](state, x, dt, A, B, C, D if D is not None else A, z if z is not None else x,
                      dt_bias if dt_bias is not None else A,
                      state_batch_indices if state_batch_indices is not None else _no_index(x.device), out, H, P, N, G,
                      state.shape[0],
                      HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
                      DT_SOFTPLUS=dt_softplus, HAS_IDX=state_batch_indices is not None, BLOCK_P=block_p,
                      BLOCK_N=block_n, num_warps=SSU_WARPS)
    return out


# ---------------------------------------------------------------- ahead-of-time specs

def _ct(dt: str) -> str:
    return "fp64" if dt == "fp64" else "fp32"


def aot_specs():
    """Every kernel configuration the launchers use on a GPU, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps). Per dtype and width / state size: the plain variant and the
    superset of the constexpr flags (see the module docstring)."""
    specs = []
    for dt in _DTYPES.values():
        ct = _ct(dt)
        bwd_d, bwd_l, bwd_warps = CONV_BWD_CFG[dt == "fp64"]
        for W in (2, 3, 4):
            for on in (False, True):
                specs.append((_conv_fwd_kernel,
                              {"x_ptr": f"*{dt}", "w_ptr": f"*{ct}", "bias_ptr": f"*{ct}", "seq_ptr": "*i32",
                               "init_ptr": f"*{dt}", "out_ptr": f"*{dt}", "final_ptr": f"*{dt}", "D": "i32",
                               "L": "i32", "W": "constexpr", "SILU": "constexpr", "HAS_SEQ": "constexpr",
                               "HAS_INIT": "constexpr", "HAS_FINAL": "constexpr", "BLOCK_D": "constexpr",
                               "BLOCK_L": "constexpr"},
                              {"W": W, "SILU": on, "HAS_SEQ": on, "HAS_INIT": on, "HAS_FINAL": on,
                               "BLOCK_D": CONV_BLOCK_D, "BLOCK_L": CONV_BLOCK_L}, CONV_WARPS))
                specs.append((_conv_bwd_kernel,
                              {"x_ptr": f"*{dt}", "w_ptr": f"*{ct}", "bias_ptr": f"*{ct}", "seq_ptr": "*i32",
                               "init_ptr": f"*{dt}", "dout_ptr": f"*{dt}", "dfinal_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                               "dinit_ptr": f"*{dt}", "dw_part_ptr": f"*{ct}", "db_part_ptr": f"*{ct}", "D": "i32",
                               "L": "i32", "W": "constexpr", "SILU": "constexpr", "HAS_SEQ": "constexpr",
                               "HAS_INIT": "constexpr", "HAS_DFINAL": "constexpr", "WANT_DINIT": "constexpr",
                               "BLOCK_D": "constexpr", "BLOCK_L": "constexpr"},
                              {"W": W, "SILU": on, "HAS_SEQ": on, "HAS_INIT": on, "HAS_DFINAL": on, "WANT_DINIT": on,
                               "BLOCK_D": bwd_d, "BLOCK_L": bwd_l}, bwd_warps))
                specs.extend((_conv_update_kernel,
                              {"x_ptr": f"*{dt}", "state_ptr": f"*{dt}", "w_ptr": f"*{ct}", "bias_ptr": f"*{ct}",
                               "idx_ptr": "*i32", "seqlens_ptr": "*i32", "out_ptr": f"*{dt}", "D": "i32",
                               "T": "i32", "S": "i32", "n_cache": "i32", "W": "constexpr", "SILU": "constexpr",
                               "HAS_IDX": "constexpr", "CIRCULAR": "constexpr", "BLOCK_D": "constexpr",
                               "BLOCK_T": "constexpr", "BLOCK_S": "constexpr"},
                              {"W": W, "SILU": on, "HAS_IDX": on, "CIRCULAR": circ, "BLOCK_D": UPD_BLOCK_D,
                               "BLOCK_T": UPD_BLOCK_T, "BLOCK_S": UPD_BLOCK_S}, UPD_WARPS)
                             for circ in (False, True))
    # selective_state_update: (x dtype, state dtype) pairs the op accepts: the state in x's dtype or fp32
    pairs = [(dt, dt) for dt in _DTYPES.values()] + [("fp16", "fp32"), ("bf16", "fp32")]
    for xdt, sdt in pairs:
        ct = _ct(sdt)
        for bn in SSU_BLOCK_NS:
            bp = max(1, SSU_ELEMS // bn)
            for on in (False, True):
                specs.append((_ssu_kernel,
                              {"state_ptr": f"*{sdt}", "x_ptr": f"*{xdt}", "dt_ptr": f"*{xdt}", "A_ptr": f"*{ct}",
                               "B_ptr": f"*{xdt}", "C_ptr": f"*{xdt}", "D_ptr": f"*{ct}", "z_ptr": f"*{xdt}",
                               "dt_bias_ptr": f"*{ct}", "idx_ptr": "*i32", "out_ptr": f"*{xdt}", "H": "i32",
                               "P": "i32", "N": "i32", "G": "i32", "n_cache": "i32", "HAS_D": "constexpr", "HAS_Z": "constexpr",
                               "HAS_DT_BIAS": "constexpr", "DT_SOFTPLUS": "constexpr", "HAS_IDX": "constexpr",
                               "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"},
                              {"HAS_D": on, "HAS_Z": on, "HAS_DT_BIAS": on, "DT_SOFTPLUS": on, "HAS_IDX": on,
                               "BLOCK_P": bp, "BLOCK_N": bn}, SSU_WARPS))
    return specs
