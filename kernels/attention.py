"""Triton attention kernels (FlashAttention-2 style) and their launchers.

Semantics and calling convention: fastnn/reference/attention.py (the oracle). Tensors are 4-D views
q (B, Lq, H, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv) with any strides whose last one is 1; varlen packs
the sequences along dim 1 (B = 1) and gives cu_seqlens_q / cu_seqlens_k (int32).

Kernels
  _attn_fwd_kernel        one program per (query block, sequence * head): online softmax in base 2 over the
                          key blocks of the causal / window band, fp32 accumulators, writes out and lse.
  _attn_bwd_preprocess    delta = rowsum(dout * out) in fp32.
  _attn_bwd_dkdv_kernel   one program per (key block, sequence * kv head): loops over the group's query
                          heads and the query blocks of the band, recomputing P from lse; writes dk, dv
                          (and dbias = dS, the gradient w.r.t. the post-softcap scores). No atomics.
  _attn_bwd_dq_kernel     one program per (query block, sequence * head) looping over key blocks; dq.
  _attn_decode_kernel     split-KV decode: one program per (packed rows block, batch * kv head, split); the
                          rows are the group's query heads x new tokens, so each KV block is read once per
                          group; writes fp32 partial (out, lse).
  _attn_decode_combine    merges the splits' partials into out (q dtype) and lse.

Variants: each kernel but the small ones exists per (head dim, dtype); fwd / dkdv / dq also per the
compile-time features BIAS (0 none, 1 float bias in fp32 or q's dtype, 2 bool mask), DROPOUT and SOFTCAP (all
off: PLAIN, the fast path). Features that change the tile math are constexpr: as runtime branches inside the
key loop they cost ~100-140 registers and forced small, spilling tiles. Causal, windows, varlen and seqused_k
are runtime arguments: they only move loop bounds and the masking of the boundary blocks. Key blocks fully
inside the band (and the sequence) run without any masking; the boundary blocks run masked.

Configurations: per architecture (sm_90 tables for compute capability >= 9, sm_80 tables otherwise, one small
config under the interpreter), see the tables at the end; every configuration is compiled ahead of time for
the architectures it is launched on by tests/test_triton_aot.py (no spills).

Windows: unbounded sides (-1) are passed as _UNBOUNDED (2^29), which is exact for sequences shorter than
that. Dropout reproduces the reference's counter-based hash in uint32 arithmetic (wrapping).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastnn import _alloc
from fastnn.reference.attention import dropout_threshold, split_seed

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_UNBOUNDED = 1 << 29
_NUM_SMS = 132  # H100 SXM

_LOG2E = tl.constexpr(1.4426950408889634)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_LN2 = tl.constexpr(0.6931471805599453)
_TWO_LOG2E = tl.constexpr(2.8853900817779268)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------- shared device helpers

@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exp2 overflow gives 1, underflow gives -1, never NaN.
    return 1.0 - 2.0 / (tl.exp2(x * _TWO_LOG2E) + 1.0)


@triton.jit
def _fmix32(x):
    # MurmurHash3 finaliser on uint32 (multiplications wrap mod 2^32).
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x85EBCA6B, tl.uint32)
    x = x ^ (x >> 13)
    x = x * tl.full(x.shape, 0xC2B2AE35, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _keep(row_hash, col_hash, drop_thresh):
    # (rows, cols) keep mask from per-row fmix32(row ^ seed_lo) and per-col fmix32(col + seed_hi).
    x = _fmix32(row_hash[:, None] + col_hash[None, :])
    return (x >> 8).to(tl.int32) >= drop_thresh


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # fp32 inputs: FMA dots (exact fp32). 3-pass tf32 ("tf32x3") was tried: it needs more registers than
    # FMA (sm_90 fwd 64x32 D=64 REG 254; D=256 spills 1-2 KB at 32x32) for a path that is not the target.
    if F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, F32: tl.constexpr):
    if F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_rows(ptrs, rmask, dmask, MASK_R: tl.constexpr, MASK_D: tl.constexpr):
    # (rows, BLOCK_D) tile; masks only where the compile-time flags say they are needed.
    if MASK_R:
        if MASK_D:
            return tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if MASK_D:
            return tl.load(ptrs, mask=dmask[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _tile_ptrs(P, off, rows, stride, offs_d):
    """Pointers P + off + rows * stride + d of a (rows, BLOCK_D) tile. The launchers guarantee 16-byte aligned
    tensors and strides that are multiples of 16 elements (_aligned): these hints let Triton vectorise and
    pipeline the loads (without them an sm_90 forward tile falls back to 2-byte loads and spills).
    `off` must not be a compile-time 0 (the hint would land on a bare argument, where Triton drops it)."""
    base = tl.multiple_of(P + off, 16)
    return base + tl.multiple_of(rows[:, None] * stride, [16, 1]) + offs_d[None, :]


@triton.jit
def _seq_bounds(b, CuQ, CuK, SeqUsed, Lq, Lk, is_varlen, use_seqused):
    """(view batch, q start, q len, k start, k span, visible k len) of sequence b."""
    zero = tl.full([], 0, tl.int32)
    if is_varlen != 0:
        bv = zero
        q_start = tl.load(CuQ + b)
        lq = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        kspan = tl.load(CuK + b + 1) - k_start
    else:
        bv = zero + b
        q_start = zero
        lq = zero + Lq
        k_start = zero
        kspan = zero + Lk
    lk = kspan
    if use_seqused != 0:
        lk = tl.minimum(tl.load(SeqUsed + b), kspan)
    return bv, q_start, lq, k_start, kspan, lk


@triton.jit
def _key_ranges(m0, m_last, lk, off, wl, wr, BLOCK_N: tl.constexpr):
    """Key blocks for query rows m0..m_last: (interior lo, interior hi, first block, masked-loop count of
    left blocks, of right blocks). Interior blocks [ilo, ihi) need no masking; the masked loop visits
    [start, ilo) then [ihi, hi)."""
    lo = tl.maximum(m0 + off - wl, 0)
    hi = tl.minimum(m_last + off + wr + 1, lk)
    full_lo = tl.maximum(m_last + off - wl, 0)
    full_hi = tl.maximum(tl.minimum(m0 + off + wr + 1, lk), 0)
    start = (lo // BLOCK_N) * BLOCK_N
    ilo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    ihi = (full_hi // BLOCK_N) * BLOCK_N
    empty = ihi <= ilo
    ilo = tl.where(empty, start, ilo)
    ihi = tl.where(empty, start, ihi)
    n_left = (ilo - start) // BLOCK_N
    n_right = (tl.maximum(hi - ihi, 0) + BLOCK_N - 1) // BLOCK_N
    return ilo, ihi, start, n_left, n_right


@triton.jit
def _query_ranges(n0, n_last, lq, lk_full, off, wl, wr, BLOCK_M: tl.constexpr):
    """Query blocks for key columns n0..n_last (see _key_ranges); lk_full: whether the key block lies
    entirely below the visible key length (else every query block is masked)."""
    lo = tl.maximum(n0 - off - wr, 0)
    hi = tl.minimum(n_last - off + wl + 1, lq)
    full_lo = tl.maximum(n_last - off - wr, 0)
    full_hi = tl.maximum(tl.minimum(n0 - off + wl + 1, lq), 0)
    full_hi = tl.where(lk_full, full_hi, 0)
    start = (lo // BLOCK_M) * BLOCK_M
    ilo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    ihi = (full_hi // BLOCK_M) * BLOCK_M
    empty = ihi <= ilo
    ilo = tl.where(empty, start, ilo)
    ihi = tl.where(empty, start, ihi)
    n_left = (ilo - start) // BLOCK_M
    n_right = (tl.maximum(hi - ihi, 0) + BLOCK_M - 1) // BLOCK_M
    return ilo, ihi, start, n_left, n_right


@triton.jit
def _scores(qk, ri, ci, lq, lk, off, wl, wr, scale, softcap, bofs_r, bofs_c, Bias,
            MASKED: tl.constexpr, BIAS: tl.constexpr, SOFTCAP: tl.constexpr, KEEP_HUGE_BIAS: tl.constexpr = False):
    """Base-2 scores log2(e) * (softcap(scale * qk) + bias) of a tile, -inf where hidden. ri / ci: query
    row and key column indices shaped to broadcast against the tile ([M, 1] and [1, N], or transposed for
    the keys x queries tiles of the dK/dV kernel); bofs_r / bofs_c: int64 bias offsets shaped likewise.
    BIAS: 0 none, 1 float bias (Bias: fp32 or q dtype), 2 bool mask (Bias: uint8). KEEP_HUGE_BIAS (the
    forward): a finite bias past FLT_MAX / log2(e), such as torch.finfo.min padding, would overflow to -inf
    (read as masked: zeros) or +inf (NaN); it is kept finite, as torch's softmax sees it. Not in the backward
    kernels: there it spilled on sm_80, and p = exp2(s - lse) of such a row is not exact anyway (fastnn/ops/
    attention.py, _LSE_EXACT_LIMIT)."""
    if SOFTCAP:
        s = _tanh(qk * (scale / softcap)) * (softcap * _LOG2E)
    else:
        s = qk * (scale * _LOG2E)
    if BIAS != 0:
        bofs = bofs_r + bofs_c
        bmask = (ri < lq) & (ci < lk)
        if BIAS == 1:
            b = tl.load(Bias + bofs, mask=bmask, other=0.0).to(tl.float32)
            bl = b * _LOG2E
            if KEEP_HUGE_BIAS:
                bl = tl.where((bl == float("-inf")) & (b > float("-inf")), -_FLT_MAX, bl)
                bl = tl.where((bl == float("inf")) & (b < float("inf")), _FLT_MAX, bl)
            s += bl
        else:
            s = tl.where(tl.load(Bias + bofs, mask=bmask, other=0) != 0, s, float("-inf"))
    if MASKED:
        rel = ci - ri - off
        ok = (ci < lk) & (rel >= -wl) & (rel <= wr)
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _softcap_grad(qk, scale, softcap):
    # d softcap*tanh(scale*qk/softcap) / d(scale*qk) = 1 - tanh^2
    t = _tanh(qk * (scale / softcap))
    return 1.0 - t * t


# ---------------------------------------------------------------- forward

@triton.jit
def _fwd_block(acc, m_i, l_i, q, K_base, V_base, n0, rows, offs_n, offs_d, lq, lk, off, wl, wr,
               stride_kn, stride_vn, scale, softcap, bias_rows, stride_bn, Bias, row_hash, seed_hi, drop_thresh,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, BIAS: tl.constexpr,
               DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, F32: tl.constexpr):
    cols = n0 + offs_n
    col_ok = cols < lk
    d_ok = offs_d < HEAD_DIM
    n64 = tl.cast(n0, tl.int64)
    k = _load_rows(_tile_ptrs(K_base, n64 * stride_kn, offs_n, stride_kn, offs_d), col_ok, d_ok,
                   MASKED, BLOCK_D != HEAD_DIM)
    qk = _dot(q, tl.trans(k), F32)
    s = _scores(qk, rows[:, None], cols[None, :], lq, lk, off, wl, wr, scale, softcap,
                bias_rows[:, None], (cols.to(tl.int64) * stride_bn)[None, :], Bias, MASKED, BIAS, SOFTCAP, True)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: p = 0, no NaN
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(_tile_ptrs(V_base, n64 * stride_vn, offs_n, stride_vn, offs_d), col_ok, d_ok,
                   MASKED, BLOCK_D != HEAD_DIM)
    if DROPOUT:
        col_hash = _fmix32(cols.to(tl.uint32) + seed_hi)
        p = tl.where(_keep(row_hash, col_hash, drop_thresh), p, 0.0)
    acc = _dot_acc(p.to(v.dtype), v, acc, F32)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,                       # (B, Lq, H, D), (B, Lk, Hkv, D), (B, Lk, Hkv, Dv) views, last stride 1
    Out,                           # out (B, Lq, H, Dv), q dtype
    Lse,                           # out (B, H, Lq) float32, natural log, -inf for rows with nothing visible
    Bias,                          # float bias (fp32 or q dtype) / bool mask as uint8 / dummy, per BIAS
    CuQ, CuK, SeqUsed,             # int32 cu_seqlens_q, cu_seqlens_k, seqused_k (dummies if unused)
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_bb, stride_bh, stride_bm, stride_bn,  # bias / mask strides (0 on broadcast dims)
    H, GROUP,                      # query heads, query heads per kv head
    Lq, Lk,                        # view lengths (dim 1 of q and k)
    total_q,                       # B * Lq: dropout row counter stride per head
    scale, softcap,                # fp32 softmax scale; softcap (used when SOFTCAP)
    wl, wr,                        # window left / right, _UNBOUNDED for -1
    bottom_right, is_varlen, use_seqused,  # 0/1
    drop_thresh, seed_lo, seed_hi, drop_scale,  # dropout (drop_scale is 1 without dropout)
    HEAD_DIM: tl.constexpr,        # D (== Dv)
    BLOCK_D: tl.constexpr,         # D padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr,            # 0 none, 1 float bias, 2 bool mask
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    F32: tl.constexpr = Q.dtype.element_ty == tl.float32
    # Longest query blocks (last ones, under a causal band) first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    bv, q_start, lq, k_start, kspan, lk = _seq_bounds(b, CuQ, CuK, SeqUsed, Lq, Lk, is_varlen, use_seqused)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    off = (lk - lq) * bottom_right
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < lq
    d_ok = offs_d < HEAD_DIM
    bv64 = bv.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_rows = (q_start + rows).to(tl.int64)
    q = _load_rows(_tile_ptrs(Q, bv64 * stride_qb + h64 * stride_qh, q_rows, stride_qm, offs_d),
                   row_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    K_base = K + bv64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk64 * stride_kh
    V_base = V + bv64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk64 * stride_vh
    bias_rows = bv64 * stride_bb + h64 * stride_bh + rows.to(tl.int64) * stride_bm
    tq = (h64 * total_q + bv64 * Lq + q_rows).to(tl.uint32)
    row_hash = _fmix32(tq ^ seed_lo.to(tl.uint32))
    seed_hi_u = seed_hi.to(tl.uint32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    ilo, ihi, start, n_left, n_right = _key_ranges(m0, m_last, lk, off, wl, wr, BLOCK_N)
    # Interior key blocks: every (row < lq, col) pair visible, no masking.
    for n0 in range(ilo, ihi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K_base, V_base, n0, rows, offs_n, offs_d, lq, lk, off,
                                   wl, wr, stride_kn, stride_vn, scale, softcap, bias_rows, stride_bn, Bias,
                                   row_hash, seed_hi_u, drop_thresh, HEAD_DIM, BLOCK_D, False, BIAS, DROPOUT,
                                   SOFTCAP, F32)
    # Boundary blocks of the band and the sequence end: masked.
    for t in range(0, n_left + n_right):
        n0 = tl.where(t < n_left, start + t * BLOCK_N, ihi + (t - n_left) * BLOCK_N)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K_base, V_base, n0, rows, offs_n, offs_d, lq, lk, off,
                                   wl, wr, stride_kn, stride_vn, scale, softcap, bias_rows, stride_bn, Bias,
                                   row_hash, seed_hi_u, drop_thresh, HEAD_DIM, BLOCK_D, True, BIAS, DROPOUT,
                                   SOFTCAP, F32)

    empty = l_i == 0.0
    inv = drop_scale / tl.where(empty, 1.0, l_i)
    out = acc * inv[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    o_ptrs = _tile_ptrs(Out, bv64 * stride_ob + h64 * stride_oh, q_rows, stride_om, offs_d)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + (bv64 * H + h64) * Lq + q_rows, lse, mask=row_ok)


# ---------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_preprocess(
    Out, DOut,                     # (B, Lq, H, Dv) views, last stride 1
    Delta,                         # out (B, H, Lq) float32: rowsum(dout * out)
    stride_ob, stride_om, stride_oh,
    stride_db, stride_dm, stride_dh,
    H, Lq, Dv,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,         # chunk of the head dim per step
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    r64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, Dv, BLOCK_D):
        msk = row_ok[:, None] & ((d0 + offs_d) < Dv)[None, :]
        o_ptrs = _tile_ptrs(Out, b * stride_ob + h * stride_oh + d0, r64, stride_om, offs_d)
        do_ptrs = _tile_ptrs(DOut, b * stride_db + h * stride_dh + d0, r64, stride_dm, offs_d)
        o = tl.load(o_ptrs, mask=msk, other=0.0).to(tl.float32)
        do = tl.load(do_ptrs, mask=msk, other=0.0).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(Delta + (b * H + h) * Lq + r64, acc, mask=row_ok)


@triton.jit
def _bwd_kv_block(dk, dv, k, v, col_hash, Q_base, DO_base, Lse_base, Delta_base, m0, offs_m, cols, offs_d,
                  lq, lk, off, wl, wr, stride_qm, stride_dom, scale, softcap, bias_base, stride_bm,
                  stride_bn, Bias, DBias_base, Lk, want_dbias, row_base, seed_lo, drop_thresh, drop_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, BIAS: tl.constexpr,
                  DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, F32: tl.constexpr):
    # Transposed tiles (keys x queries) of one query block against the program's key block.
    rows = m0 + offs_m
    row_ok = rows < lq
    d_ok = offs_d < HEAD_DIM
    r64 = rows.to(tl.int64)
    m64 = tl.cast(m0, tl.int64)
    q = _load_rows(_tile_ptrs(Q_base, m64 * stride_qm, offs_m, stride_qm, offs_d), row_ok, d_ok, MASKED,
                   BLOCK_D != HEAD_DIM)
    do = _load_rows(_tile_ptrs(DO_base, m64 * stride_dom, offs_m, stride_dom, offs_d), row_ok, d_ok, MASKED,
                    BLOCK_D != HEAD_DIM)
    if MASKED:
        lse = tl.load(Lse_base + r64, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta_base + r64, mask=row_ok, other=0.0)
    else:
        lse = tl.load(Lse_base + r64)
        delta = tl.load(Delta_base + r64)
    # Rows with nothing visible have lse = -inf: use +inf so that P = exp2(s - lse) = 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    qkT = _dot(k, tl.trans(q), F32)                                   # (keys, queries)
    sT = _scores(qkT, rows[None, :], cols[:, None], lq, lk, off, wl, wr, scale, softcap,
                 (bias_base + r64 * stride_bm)[None, :], (cols.to(tl.int64) * stride_bn)[:, None], Bias,
                 MASKED, BIAS, SOFTCAP)
    pT = tl.exp2(sT - lse2[None, :])
    dpT = _dot(v, tl.trans(do), F32)
    if DROPOUT:
        row_hash = _fmix32((row_base + r64).to(tl.uint32) ^ seed_lo)
        keepT = _keep(col_hash, row_hash, drop_thresh)                 # (keys, queries)
        pdT = tl.where(keepT, pT, 0.0)
        dpT = tl.where(keepT, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    dv = _dot_acc(pdT.to(do.dtype), do, dv, F32)
    dsT = pT * (dpT - delta[None, :])
    if BIAS == 1:
        if want_dbias != 0:
            db_ptrs = DBias_base + r64[None, :] * Lk + cols.to(tl.int64)[:, None]
            tl.store(db_ptrs, dsT, mask=row_ok[None, :] & (cols < lk)[:, None])
    if SOFTCAP:
        dsT = dsT * _softcap_grad(qkT, scale, softcap)
    dk = _dot_acc(dsT.to(q.dtype), q, dk, F32)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,                   # views as in the forward; DO (B, Lq, H, Dv)
    Lse, Delta,                    # (B, H, Lq) float32
    DK, DV,                        # out (B, Lk, Hkv, D / Dv), contiguous, k / v dtype
    DBias,                         # out (B, H, Lq, Lk) float32 zero-filled (dummy unless want_dbias)
    Bias,
    CuQ, CuK, SeqUsed,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, Lq, Lk, total_q,
    scale, softcap, wl, wr, bottom_right, is_varlen, use_seqused,
    want_dbias, drop_thresh, seed_lo, seed_hi, drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,         # query block (inner loop)
    BLOCK_N: tl.constexpr,         # key block (per program)
    BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    F32: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    bv, q_start, lq, k_start, kspan, lk = _seq_bounds(b, CuQ, CuK, SeqUsed, Lq, Lk, is_varlen, use_seqused)
    n0 = pid_n * BLOCK_N
    if n0 >= kspan:
        return
    off = (lk - lq) * bottom_right
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n
    col_ok = cols < lk
    d_ok = offs_d < HEAD_DIM
    bv64 = bv.to(tl.int64)
    hk64 = hk.to(tl.int64)
    k_rows = (k_start + cols).to(tl.int64)
    k = _load_rows(_tile_ptrs(K, bv64 * stride_kb + hk64 * stride_kh, k_rows, stride_kn, offs_d),
                   col_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    v = _load_rows(_tile_ptrs(V, bv64 * stride_vb + hk64 * stride_vh, k_rows, stride_vn, offs_d),
                   col_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    col_hash = _fmix32(cols.to(tl.uint32) + seed_hi.to(tl.uint32))
    seed_lo_u = seed_lo.to(tl.uint32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    n_last = tl.minimum(n0 + BLOCK_N, lk) - 1
    ilo, ihi, start, n_left, n_right = _query_ranges(n0, n_last, lq, n0 + BLOCK_N <= lk, off, wl, wr, BLOCK_M)
    n_right = tl.where(n0 < lk, n_right, 0)  # a block past the visible keys gets zeros
    end = ihi + n_right * BLOCK_M
    q_row0 = q_start.to(tl.int64)
    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        Q_base = Q + bv64 * stride_qb + h64 * stride_qh + q_row0 * stride_qm
        DO_base = DO + bv64 * stride_dob + h64 * stride_doh + q_row0 * stride_dom
        Lse_base = Lse + (bv64 * H + h64) * Lq + q_row0
        Delta_base = Delta + (bv64 * H + h64) * Lq + q_row0
        bias_base = bv64 * stride_bb + h64 * stride_bh
        DBias_base = DBias + (bv64 * H + h64) * Lq * Lk
        row_base = h64 * total_q + bv64 * Lq + q_row0
        # One masked loop over the band's query blocks: a second, unmasked loop for the interior blocks (as in
        # the forward) costs ~40 registers here (sm_90, D=128: 252 vs 213) and forces smaller tiles.
        for m0 in range(start, end, BLOCK_M):
            dk, dv = _bwd_kv_block(dk, dv, k, v, col_hash, Q_base, DO_base, Lse_base, Delta_base, m0, offs_m,
                                   cols, offs_d, lq, lk, off, wl, wr, stride_qm, stride_dom, scale, softcap,
                                   bias_base, stride_bm, stride_bn, Bias, DBias_base, Lk, want_dbias, row_base,
                                   seed_lo_u, drop_thresh, drop_scale, HEAD_DIM, BLOCK_D, True, BIAS, DROPOUT,
                                   SOFTCAP, F32)
    # dK = scale * sum dS^T q; dV already holds sum P_dropped^T dO (the 1/(1-p) is folded into dpT).
    if DROPOUT:
        dv = dv * drop_scale
    dk = dk * scale
    out_ok = (cols < kspan)[:, None] & d_ok[None, :]
    # DK / DV are contiguous (B, Lk, Hkv, D): row stride Hkv * D.
    o_rows = bv64 * Lk + k_rows
    tl.store(_tile_ptrs(DK, hk64 * HEAD_DIM, o_rows, Hkv * HEAD_DIM, offs_d), dk.to(DK.dtype.element_ty),
             mask=out_ok)
    tl.store(_tile_ptrs(DV, hk64 * HEAD_DIM, o_rows, Hkv * HEAD_DIM, offs_d), dv.to(DV.dtype.element_ty),
             mask=out_ok)


@triton.jit
def _bwd_q_block(dq, q, do, lse2, delta, row_hash, K_base, V_base, n0, rows, offs_n, offs_d, lq, lk, off, wl, wr,
                 stride_kn, stride_vn, scale, softcap, bias_rows, stride_bn, Bias, seed_hi, drop_thresh, drop_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, BIAS: tl.constexpr,
                 DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, F32: tl.constexpr):
    cols = n0 + offs_n
    col_ok = cols < lk
    d_ok = offs_d < HEAD_DIM
    n64 = tl.cast(n0, tl.int64)
    k = _load_rows(_tile_ptrs(K_base, n64 * stride_kn, offs_n, stride_kn, offs_d), col_ok, d_ok,
                   MASKED, BLOCK_D != HEAD_DIM)
    v = _load_rows(_tile_ptrs(V_base, n64 * stride_vn, offs_n, stride_vn, offs_d), col_ok, d_ok,
                   MASKED, BLOCK_D != HEAD_DIM)
    qk = _dot(q, tl.trans(k), F32)
    s = _scores(qk, rows[:, None], cols[None, :], lq, lk, off, wl, wr, scale, softcap,
                bias_rows[:, None], (cols.to(tl.int64) * stride_bn)[None, :], Bias, MASKED, BIAS, SOFTCAP)
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), F32)
    if DROPOUT:
        col_hash = _fmix32(cols.to(tl.uint32) + seed_hi)
        dp = tl.where(_keep(row_hash, col_hash, drop_thresh), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * _softcap_grad(qk, scale, softcap)
    return _dot_acc(ds.to(k.dtype), k, dq, F32)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta,
    DQ,                            # out (B, Lq, H, D) contiguous, q dtype
    Bias,
    CuQ, CuK, SeqUsed,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, Lq, Lk, total_q,
    scale, softcap, wl, wr, bottom_right, is_varlen, use_seqused,
    drop_thresh, seed_lo, seed_hi, drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    F32: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    bv, q_start, lq, k_start, kspan, lk = _seq_bounds(b, CuQ, CuK, SeqUsed, Lq, Lk, is_varlen, use_seqused)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    off = (lk - lq) * bottom_right
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < lq
    d_ok = offs_d < HEAD_DIM
    bv64 = bv.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_rows = (q_start + rows).to(tl.int64)
    q = _load_rows(_tile_ptrs(Q, bv64 * stride_qb + h64 * stride_qh, q_rows, stride_qm, offs_d),
                   row_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    do = _load_rows(_tile_ptrs(DO, bv64 * stride_dob + h64 * stride_doh, q_rows, stride_dom, offs_d),
                    row_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    lse = tl.load(Lse + (bv64 * H + h64) * Lq + q_rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(Delta + (bv64 * H + h64) * Lq + q_rows, mask=row_ok, other=0.0)
    K_base = K + bv64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk64 * stride_kh
    V_base = V + bv64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk64 * stride_vh
    bias_rows = bv64 * stride_bb + h64 * stride_bh + rows.to(tl.int64) * stride_bm
    tq = (h64 * total_q + bv64 * Lq + q_rows).to(tl.uint32)
    row_hash = _fmix32(tq ^ seed_lo.to(tl.uint32))
    seed_hi_u = seed_hi.to(tl.uint32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    ilo, ihi, start, n_left, n_right = _key_ranges(m0, m_last, lk, off, wl, wr, BLOCK_N)
    # One masked loop (see the dK/dV kernel).
    for n0 in range(start, ihi + n_right * BLOCK_N, BLOCK_N):
        dq = _bwd_q_block(dq, q, do, lse2, delta, row_hash, K_base, V_base, n0, rows, offs_n, offs_d, lq, lk, off,
                          wl, wr, stride_kn, stride_vn, scale, softcap, bias_rows, stride_bn, Bias,
                          seed_hi_u, drop_thresh, drop_scale, HEAD_DIM, BLOCK_D, True, BIAS, DROPOUT, SOFTCAP, F32)
    dq = dq * scale
    # DQ is contiguous (B, Lq, H, D).
    tl.store(_tile_ptrs(DQ, h64 * HEAD_DIM, bv64 * Lq + q_rows, H * HEAD_DIM, offs_d), dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------- decode (split-KV)

@triton.jit
def _attn_decode_kernel(
    Q,                             # (B, Lnew, H, D), last stride 1
    K, V,                          # caches (B, Lk_max, Hkv, D / Dv), last stride 1
    SeqLens,                       # (B,) int32 valid cache length per batch (the new tokens included)
    OPart, LPart,                  # out (S, B, H, Lnew, Dv) / (S, B, H, Lnew) float32 partials
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    B, H, GROUP, Lnew, Lk_max,
    keys_per_split,                # multiple of BLOCK_N
    scale, softcap, wl, wr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,         # packed (query head of the group, new token) rows per program
    BLOCK_N: tl.constexpr,
):
    F32: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    split = tl.program_id(2)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < GROUP * Lnew
    g = r // Lnew
    t = r % Lnew
    h = hk * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_off = t.to(tl.int64) * stride_qm + h.to(tl.int64) * stride_qh
    q_ptrs = tl.multiple_of(Q + b64 * stride_qb, 16) + tl.multiple_of(q_off[:, None], [16, 1]) + offs_d[None, :]
    q = _load_rows(q_ptrs, r_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    lk = tl.minimum(tl.load(SeqLens + b), Lk_max)
    off = lk - Lnew
    # This split's keys, narrowed to the band of the packed rows (tokens 0..Lnew-1).
    lo = tl.maximum(split * keys_per_split, off - wl)
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(tl.minimum((split + 1) * keys_per_split, lk), Lnew - 1 + off + wr + 1)
    K_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < lk
        n64 = tl.cast(n0, tl.int64)
        k = _load_rows(_tile_ptrs(K_base, n64 * stride_kn, offs_n, stride_kn, offs_d), col_ok, d_ok,
                       True, BLOCK_D != HEAD_DIM)
        qk = _dot(q, tl.trans(k), F32)
        if softcap > 0:
            s = _tanh(qk * (scale / softcap)) * (softcap * _LOG2E)
        else:
            s = qk * (scale * _LOG2E)
        rel = cols[None, :] - t[:, None] - off
        ok = col_ok[None, :] & (rel >= -wl) & (rel <= wr)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(_tile_ptrs(V_base, n64 * stride_vn, offs_n, stride_vn, offs_d), col_ok, d_ok,
                       True, BLOCK_D != HEAD_DIM)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], F32)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    prow = (b64 * H + h.to(tl.int64)) * Lnew + t.to(tl.int64)
    split_rows = split.to(tl.int64) * B * H * Lnew
    tl.store(_tile_ptrs(OPart, split_rows * HEAD_DIM, prow, HEAD_DIM, offs_d), out,
             mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LPart + split_rows + prow, lse, mask=r_ok)


@triton.jit
def _attn_decode_combine(
    OPart, LPart,                  # (S, R, Dv) / (S, R) float32 partials, R = B * H * Lnew rows (b, h, t)
    Out,                           # out (B, Lnew, H, Dv) contiguous, q dtype
    Lse,                           # out (B, H, Lnew) float32
    S, R, H, Lnew, Dv,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,         # Dv padded to a power of two
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    r64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    msk = row_ok[:, None] & (offs_d < Dv)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, S):
        p = s * R + r64
        ls = tl.load(LPart + p, mask=row_ok, other=float("-inf")) * _LOG2E
        m_new = tl.maximum(m, ls)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(ls - m_use)
        o = tl.load(_tile_ptrs(OPart, s * R * Dv, r64, Dv, offs_d), mask=msk, other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * o
        l = l * alpha + w
        m = m_new
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) * _LN2)
    t = r64 % Lnew
    h = (r64 // Lnew) % H
    b = r64 // (Lnew * H)
    o_rows = (b * Lnew + t) * H + h
    tl.store(Out + o_rows[:, None] * Dv + offs_d[None, :], out.to(Out.dtype.element_ty), mask=msk)
    tl.store(Lse + r64, lse, mask=row_ok)


# ---------------------------------------------------------------- configurations

def _tables(sm90: dict, sm80_changes: dict) -> dict:
    return {90: sm90, 80: {**sm90, **sm80_changes}}


def _lowp(plain: dict, general: dict) -> dict:
    return {**{("lowp", D, False): c for D, c in plain.items()}, **{("lowp", D, True): c for D, c in general.items()}}


# fp32 (FMA dots, both architectures): operand layouts hold whole K slices per thread, so tiles are small.
# With a bias, dropout or softcap only D <= 64 is taken (see unsupported()): at D >= 96 those tiles spilled
# 0.7-4 KB (dK/dV) on sm_80 and sm_90 at every 16 x 16 / 4-8 warp candidate.
_FP32_FWD_CFG = {("fp32", 32, False): (32, 32, 4, None), ("fp32", 64, False): (32, 16, 4, None),
                 ("fp32", 96, False): (16, 16, 8, None), ("fp32", 128, False): (16, 16, 8, None),
                 ("fp32", 192, False): (16, 16, 4, None), ("fp32", 256, False): (16, 16, 4, None),
                 ("fp32", 32, True): (16, 16, 8, None), ("fp32", 64, True): (32, 16, 4, None)}
_FP32_DKDV_CFG = {("fp32", 32, False): (16, 32, 4, None), ("fp32", 64, False): (16, 16, 8, None),
                  ("fp32", 96, False): (16, 16, 8, None), ("fp32", 128, False): (16, 16, 8, None),
                  ("fp32", 192, False): (16, 16, 8, None), ("fp32", 256, False): (16, 32, 8, None),
                  # general D=64 16x16/4 (sm_90 REG 144; 8 warps spill)
                  ("fp32", 32, True): (16, 16, 8, None), ("fp32", 64, True): (16, 16, 4, None)}
_FP32_DQ_CFG = {("fp32", 32, False): (32, 16, 4, None), ("fp32", 64, False): (32, 16, 4, None),
                ("fp32", 96, False): (32, 16, 4, None), ("fp32", 128, False): (32, 16, 4, None),
                ("fp32", 192, False): (16, 16, 4, None), ("fp32", 256, False): (16, 16, 4, None),
                ("fp32", 32, True): (32, 16, 4, None), ("fp32", 64, True): (16, 16, 8, None)}
# Entries (BLOCK_M, BLOCK_N, num_warps, num_stages; None = Triton's default, 3); keys (kind, D, general), kind
# "lowp" (fp16 / bf16) or "fp32", general = any of bias / dropout / softcap (every feature combination shares
# the config; the AOT test compiles the superset: float32 bias + dropout + softcap).
# Numbers are the AOT compile (REG per thread, STACK = spilled bytes, shared KB incl. dynamic) of bf16; fp16
# is within a few registers (it is compiled and checked too). sm_90 tables favour big wgmma tiles; registers
# are the limit everywhere (the fp32 accumulators, the (M x N) score tiles and the operands).
_FWD_CFG = _tables(
    {**_lowp(
        # PLAIN sm_90: D<=64 128x128/8 warps (REG 167 / 207, 57 / 113 KB); D 96/128 128x64/8 (REG 238 / 237,
        # 129 KB; 128x128 spills 136 B at 2 or 3 stages; 4 stages REG 254, 161 KB); D 192/256 128x32/8 (REG 250,
        # 161 KB; 128x64 spills 104 B even at 2 stages).
        {32: (128, 128, 8, 3), 64: (128, 128, 8, 3), 96: (128, 64, 8, 3), 128: (128, 64, 8, 3),
         192: (128, 32, 8, 3), 256: (128, 32, 8, 3)},
        # GENERAL sm_90: 128x64/8 for D<=64 (REG 241 / 174), 64x32/8 for D 96/128 (D=128: superset REG 174,
        # bool mask alone 218, mask + dropout + softcap 227; 64x64 fits the superset (243) but the bool mask
        # alone spills: the superset is not always the worst combination), 64x16/8 for D 192/256 (REG 197;
        # 64x32 spills 16 B).
        {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 96: (64, 32, 8, 3), 128: (64, 32, 8, 3),
         192: (64, 16, 8, 3), 256: (64, 16, 8, 3)}),
     **_FP32_FWD_CFG},
    {**_lowp(
        # sm_80 (mma.sync, operands in registers): PLAIN D<=64 128x128/8, D 96/128 128x32/8, D 192/256 64x32/8;
        # GENERAL 64x32/8 for D<=64; D 96/128 64x16/4 (REG 168-255, no spill; at 8 warps dropout alone spills
        # 8 B; 64x32 spills with softcap alone); 64x16/8 for D 192/256.
        {32: (128, 128, 8, None), 64: (128, 128, 8, None), 96: (128, 32, 8, None), 128: (128, 32, 8, None),
         192: (64, 32, 8, None), 256: (64, 32, 8, None)},
        {32: (64, 32, 8, None), 64: (64, 32, 8, None), 96: (64, 16, 4, None), 128: (64, 16, 4, None),
         192: (64, 16, 8, None), 256: (64, 16, 8, None)})})
# dK/dV: (query block of the inner loop, key block per program, warps, stages). The two fp32 (BLOCK_N x D)
# accumulators dominate.
_DKDV_CFG = _tables(
    {**_lowp(
        # PLAIN sm_90: D=32 64x128/8 (REG 208), D=64 32x128/8 (REG 200; 64x128 REG 251), D 96/128 32x128/8
        # (REG 254 / 252, 113 KB; 64x128 spills 136 B), D 192/256 32x32/8 (REG 174, 99 KB, mma.sync: every
        # 16/32 x 64 candidate spills 56-168 B).
        {32: (64, 128, 8, 3), 64: (32, 128, 8, 3), 96: (32, 128, 8, 3), 128: (32, 128, 8, 3),
         192: (32, 32, 8, 3), 256: (32, 32, 8, 3)},
        # GENERAL sm_90: D<=64 16x64/8 (REG 228 / 242), D 96/128 16x32/8 (REG 210; 16x64 spills 16 B),
        # D 192/256 16x16/8 (REG 158; 16x32/8 REG 232 at D=256).
        {32: (16, 64, 8, 3), 64: (16, 64, 8, 3), 96: (16, 32, 8, 3), 128: (16, 32, 8, 3),
         192: (16, 16, 8, 3), 256: (16, 16, 8, 3)}),
     **_FP32_DKDV_CFG},
    {**_lowp(
        {32: (64, 128, 8, None), 64: (32, 128, 8, None), 96: (32, 64, 8, None), 128: (32, 64, 8, None),
         192: (16, 16, 4, None), 256: (16, 16, 4, None)},
        {32: (16, 64, 8, None), 64: (16, 32, 8, None), 96: (16, 32, 8, None), 128: (16, 32, 8, None),
         192: (16, 16, 8, None), 256: (16, 16, 8, None)}),
     # fp32 general D=64 on sm_80: 16x16 at 8 warps (REG 230; the sm_90 choice, 4 warps, spills 152 B here)
     ("fp32", 64, True): (16, 16, 8, None)})
_DQ_CFG = _tables(
    {**_lowp(
        # PLAIN sm_90: 128x64/8 for D<=128 (REG 153 / 190 / 248 / 255, 161 KB at D=128; 128x128 spills at
        # D>=64), 64x32/8 at 2 stages for D 192/256 (REG 230, 129 KB).
        {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 96: (128, 64, 8, 3), 128: (128, 64, 8, 3),
         192: (64, 32, 8, 2), 256: (64, 32, 8, 2)},
        # GENERAL sm_90: 64x64/8 for D<=64 (REG 254 / 210), 64x32/8 for D 96/128 (REG 186 / 198; 64x64 spills
        # 16 B at D=96), 64x16/8 for D 192/256 (REG 212).
        {32: (64, 64, 8, 3), 64: (64, 64, 8, 3), 96: (64, 32, 8, 3), 128: (64, 32, 8, 3),
         192: (64, 16, 8, 3), 256: (64, 16, 8, 3)}),
     **_FP32_DQ_CFG},
    {**_lowp(
        {32: (128, 64, 8, None), 64: (128, 64, 8, None), 96: (128, 32, 8, None), 128: (128, 32, 8, None),
         192: (64, 32, 8, None), 256: (64, 32, 8, None)},
        {32: (64, 32, 8, None), 64: (64, 16, 8, None), 96: (64, 16, 8, None), 128: (64, 16, 8, None),
         192: (64, 16, 8, None), 256: (64, 16, 8, None)})})
# Decode (memory bound): 16 packed rows (a GQA group x new tokens), 128 keys per block, 4 warps (64 keys for
# D 192/256); fp32 64 / 32 / 16 keys (D 192/256: REG 206, 82 KB; 64 keys spill 904 B). Same on both archs.
_DEC_CFG = _tables({**{("lowp", D): (16, 128 if D <= 128 else 64, 4, None) for D in HEAD_DIMS},
                    **{("fp32", D): (16, {32: 64, 64: 64, 96: 32, 128: 32}.get(D, 16), 4, None)
                       for D in HEAD_DIMS}}, {})
# Interpreter: 16 x 16 tiles (the smallest tl.dot accepts) keep CPU tests quick and exercise many blocks.
_INTERP_CFG = (16, 16, 4)
# delta = rowsum(dout * out): 64 rows x 64-column chunks; 8 warps (4 warps spill 48 B on sm_80).
_PRE_BLOCK_M, _PRE_BLOCK_D, _PRE_WARPS = 64, 64, 8
_COMB_BLOCK_R, _COMB_WARPS = 16, 4


def _kind(dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def _arch(device) -> int:
    """90 for Hopper and newer (the sm_90 tables), 80 otherwise."""
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _cfg(tables, D, dtype, general, device):
    """(BLOCK_M, BLOCK_N, launch options {num_warps[, num_stages]}) for the device's architecture."""
    if _interpreting():
        bm, bn, warps = _INTERP_CFG
        return bm, bn, {"num_warps": warps}
    bm, bn, warps, stages = tables[_arch(device)][(_kind(dtype), D, general)]
    opts = {"num_warps": warps}
    if stages is not None:
        opts["num_stages"] = stages
    return bm, bn, opts


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def unsupported(dtype, D: int, Dv: int, general: bool):
    """Why these kernels do not take inputs of this dtype and these head dims (None when they do); general:
    a bias, dropout or softcap is used. float32 with any of those at D > 64 is left out: its FMA-dot tiles
    spill on sm_90 / sm_80 at every size tried (the op layer runs the reference instead)."""
    if D not in HEAD_DIMS or Dv != D:
        return f"head dims {D}/{Dv} (need D == Dv in {HEAD_DIMS})"
    if dtype not in _DTYPES:
        return f"dtype {dtype} (need float16, bfloat16 or float32)"
    if dtype == torch.float32 and general and D > 64:
        return "float32 with a bias, dropout or softcap at head dim > 64"
    return None


def _check(q, k, v, general: bool = False):
    why = unsupported(q.dtype, q.shape[-1], v.shape[-1], general)
    if why is None and k.shape[-1] != q.shape[-1]:
        why = f"key head dim {k.shape[-1]} != query head dim {q.shape[-1]}"
    if why is None and (k.dtype != q.dtype or v.dtype != q.dtype):
        why = f"dtypes {q.dtype}, {k.dtype}, {v.dtype} differ"
    if why is not None:
        raise ValueError(f"attention (triton): unsupported inputs: {why}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention (triton): {name} must be a 4-D view")


def _aligned(t):
    """t itself when the kernels' alignment hints hold for it (16-byte aligned data, last stride 1, other
    strides of non-trivial dims multiples of 16 elements: every contiguous layout of the supported head dims,
    and the usual transposed / packed views), else a contiguous copy."""
    ok = t.stride(-1) == 1 or t.shape[-1] <= 1
    ok = ok and t.data_ptr() % 16 == 0
    ok = ok and all(st % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _i32(x: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel arguments are i32)."""
    return x - (1 << 32) if x >= (1 << 31) else x


def _window(w: int) -> int:
    return _UNBOUNDED if w < 0 else min(int(w), _UNBOUNDED)


def _bias_args(bias, q):
    """(BIAS, Bias pointer, strides): BIAS 0 none (a float32 dummy), 1 float bias (float32 or q's dtype),
    2 bool mask (viewed as uint8)."""
    if bias is None:
        return 0, torch.empty(1, dtype=torch.float32, device=q.device), (0, 0, 0, 0)
    if bias.dim() != 4:
        raise ValueError("attention (triton): bias must be expanded to (B, H, Lq, Lk)")
    strides = tuple(bias.stride())
    if bias.dtype == torch.bool:
        return 2, bias.view(torch.uint8), strides
    if bias.dtype in (torch.float32, q.dtype):
        return 1, bias, strides
    raise ValueError(f"attention (triton): bias dtype {bias.dtype} unsupported (bool, float32 or q's dtype)")


def _seq_args(q, cu_seqlens_q, cu_seqlens_k, seqused_k):
    dev = q.device
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    varlen = cu_seqlens_q is not None
    cu_q = cu_seqlens_q if varlen else dummy
    cu_k = cu_seqlens_k if varlen else dummy
    used = seqused_k if seqused_k is not None else dummy
    nseq = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    return varlen, nseq, cu_q, cu_k, used


def _dropout_args(dropout_p: float, seed: int):
    if dropout_p > 0:
        lo, hi = split_seed(int(seed))
        return 1, dropout_threshold(dropout_p), _i32(lo), _i32(hi), 1.0 / (1.0 - dropout_p)
    return 0, 0, 0, 0, 1.0


# ---------------------------------------------------------------- launchers

def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias, scale, softcap,
            window_left, window_right, bottom_right, dropout_p, seed):
    """(out (B, Lq, H, Dv) in q's dtype, lse (B, H, Lq) float32) of reference.attention_forward."""
    _check(q, k, v, bias is not None or dropout_p > 0 or softcap > 0)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    out = _alloc.empty((B, Lq, H, D), q.dtype, q.device)
    lse = _alloc.empty((B, H, Lq), torch.float32, q.device)
    varlen, nseq, cu_q, cu_k, used = _seq_args(q, cu_seqlens_q, cu_seqlens_k, seqused_k)
    mq = int(max_seqlen_q) if varlen else Lq
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if nseq == 0 or mq == 0:
        return out, lse
    bias_kind, bias_t, bstr = _bias_args(bias, q)
    has_drop, thresh, seed_lo, seed_hi, drop_scale = _dropout_args(dropout_p, seed)
    flags = dict(BIAS=bias_kind, DROPOUT=bool(has_drop), SOFTCAP=softcap > 0)
    bm, bn, opts = _cfg(_FWD_CFG, D, q.dtype, any(flags.values()), q.device)
    grid = (triton.cdiv(mq, bm), nseq * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, bias_t, cu_q, cu_k, used,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *bstr,
        H, H // Hkv, Lq, Lk, B * Lq, float(scale), float(softcap), _window(window_left), _window(window_right),
        int(bool(bottom_right)), int(varlen), int(seqused_k is not None), thresh, seed_lo, seed_hi,
        float(drop_scale), HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn, **flags, **opts)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias,
             bias_requires_grad, scale, softcap, window_left, window_right, bottom_right, dropout_p, seed):
    """(dq, dk, dv, dbias or None) of reference.attention_backward; dq/dk/dv contiguous in the inputs'
    dtypes, dbias the full (B, H, Lq, Lk) float32 gradient of a float bias when bias_requires_grad."""
    _check(q, k, v, bias is not None or dropout_p > 0 or softcap > 0)
    q, k, v, dout, out = _aligned(q), _aligned(k), _aligned(v), _aligned(dout), _aligned(out)
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    dev = q.device
    dq = _alloc.empty(q.shape, q.dtype, dev)
    dk = _alloc.empty(k.shape, k.dtype, dev)
    dv = _alloc.empty(v.shape, v.dtype, dev)
    float_bias = bias is not None and bias.dtype != torch.bool
    want_dbias = bool(float_bias and bias_requires_grad)
    # dS is written only inside the band; the rest of the gradient is zero.
    dbias = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=dev) if want_dbias else None
    varlen, nseq, cu_q, cu_k, used = _seq_args(q, cu_seqlens_q, cu_seqlens_k, seqused_k)
    mq = int(max_seqlen_q) if varlen else Lq
    mk = int(max_seqlen_k) if varlen else Lk
    if nseq == 0 or H == 0 or D == 0:
        return dq, dk, dv, dbias
    bias_kind, bias_t, bstr = _bias_args(bias, q)
    has_drop, thresh, seed_lo, seed_hi, drop_scale = _dropout_args(dropout_p, seed)
    flags = dict(BIAS=bias_kind, DROPOUT=bool(has_drop), SOFTCAP=softcap > 0)
    general = any(flags.values())
    common = (H, H // Hkv, Lq, Lk, B * Lq, float(scale), float(softcap), _window(window_left),
              _window(window_right), int(bool(bottom_right)), int(varlen), int(seqused_k is not None))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), *bstr)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    if Lq and B:
        _attn_bwd_preprocess[(triton.cdiv(Lq, _PRE_BLOCK_M), B * H)](
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), H, Lq, D, BLOCK_M=_PRE_BLOCK_M, BLOCK_D=_PRE_BLOCK_D, num_warps=_PRE_WARPS)
    dbias_arg = dbias if want_dbias else torch.empty(1, dtype=torch.float32, device=dev)
    if mk > 0 and Lk > 0:
        bm, bn, opts = _cfg(_DKDV_CFG, D, q.dtype, general, dev)
        _attn_bwd_dkdv_kernel[(triton.cdiv(mk, bn), nseq * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, dbias_arg, bias_t, cu_q, cu_k, used, *strides,
            *common, int(want_dbias), thresh, seed_lo, seed_hi, float(drop_scale),
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn, **flags, **opts)
    if mq > 0 and Lq > 0:
        bm, bn, opts = _cfg(_DQ_CFG, D, q.dtype, general, dev)
        _attn_bwd_dq_kernel[(triton.cdiv(mq, bm), nseq * H)](
            q, k, v, dout, lse, delta, dq, bias_t, cu_q, cu_k, used, *strides,
            *common, thresh, seed_lo, seed_hi, float(drop_scale),
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn, **flags, **opts)
    return dq, dk, dv, dbias


def _decode_splits(programs: int, key_blocks: int) -> int:
    """Splits along the keys so that about one wave of programs fills the H100's 132 SMs, each split
    keeping at least 4 key blocks (fewer splits are not worth the combine)."""
    if programs >= _NUM_SMS * 0.8:
        return 1
    return max(1, min(triton.cdiv(_NUM_SMS, programs), key_blocks // 4, 64))


def decode(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right, num_splits):
    """(out (B, Lnew, H, Dv) in q's dtype, lse (B, H, Lnew) float32): attention of a few new tokens against a
    KV cache, = reference.attention_forward(q, k_cache, v_cache, seqused_k=cache_seqlens, bottom_right=True).
    num_splits <= 0 chooses the number of key splits from the shape."""
    _check(q, k_cache, v_cache)
    q, k_cache, v_cache = _aligned(q), _aligned(k_cache), _aligned(v_cache)
    B, Lnew, H, D = q.shape
    Lk, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    dev = q.device
    out = _alloc.empty((B, Lnew, H, D), q.dtype, dev)
    lse = _alloc.empty((B, H, Lnew), torch.float32, dev)
    if out.numel() == 0:
        return out, lse
    if _interpreting():
        bm, bn, warps = _INTERP_CFG
        opts = {"num_warps": warps}
    else:
        bm, bn, warps, stages = _DEC_CFG[_arch(dev)][(_kind(q.dtype), D)]
        opts = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    m_blocks = triton.cdiv(group * Lnew, bm)
    key_blocks = max(1, triton.cdiv(Lk, bn))
    if num_splits <= 0:
        num_splits = _decode_splits(B * Hkv * m_blocks, key_blocks)
    per_split = triton.cdiv(key_blocks, max(1, min(int(num_splits), key_blocks)))
    splits = triton.cdiv(key_blocks, per_split)
    opart = torch.empty((splits, B, H, Lnew, D), dtype=torch.float32, device=dev)
    lpart = torch.empty((splits, B, H, Lnew), dtype=torch.float32, device=dev)
    _attn_decode_kernel[(m_blocks, B * Hkv, splits)](
        q, k_cache, v_cache, cache_seqlens, opart, lpart,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        B, H, group, Lnew, Lk, per_split * bn, float(scale), float(softcap), _window(window_left),
        _window(window_right),
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn, **opts)
    rows = B * H * Lnew
    _attn_decode_combine[(triton.cdiv(rows, _COMB_BLOCK_R),)](
        opart, lpart, out, lse, splits, rows, H, Lnew, D,
        BLOCK_R=_COMB_BLOCK_R, BLOCK_D=_block_d(D), num_warps=_COMB_WARPS)
    return out, lse


# ---------------------------------------------------------------- ahead-of-time compile specs

_PTR_FP32 = {"Lse", "Delta", "DBias", "OPart", "LPart"}
_PTR_I32 = {"CuQ", "CuK", "SeqUsed", "SeqLens"}
_PTR_Q = {"Q", "K", "V", "Out", "DO", "DOut", "DK", "DV", "DQ"}
_FLOATS = {"scale", "softcap", "drop_scale"}


def _signature(kernel, dt: str, constexprs: dict, bias_dt: str = "fp32") -> dict:
    """Triton signature of a kernel: tensors of the q dtype `dt` unless listed above, i32 scalars; Bias is
    uint8 for a bool mask (BIAS=2), else `bias_dt` (the dummy is float32 when BIAS=0)."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "Bias":
            sig[name] = "*u8" if constexprs.get("BIAS") == 2 else f"*{bias_dt}"
        elif name in _PTR_FP32:
            sig[name] = "*fp32"
        elif name in _PTR_I32:
            sig[name] = "*i32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name in _PTR_Q:
            sig[name] = f"*{dt}"
        else:
            sig[name] = "i32"
    return sig


def _spec(kernel, dt, constexprs, warps, stages=None, archs=(90, 80), bias_dt="fp32"):
    return (kernel, _signature(kernel, dt, constexprs, bias_dt), constexprs, warps,
            {"num_stages": stages, "archs": tuple(archs)})


def _per_arch(tables, key):
    """[(config, archs)] for a table key: one entry when sm_90 and sm_80 use the same config."""
    out = []
    for arch in (90, 80):
        cfg = tables[arch][key]
        for i, (c, archs) in enumerate(out):
            if c == cfg:
                out[i] = (c, archs + (arch,))
                break
        else:
            out.append((cfg, (arch,)))
    return out


# Feature combinations compiled ahead of time for the GENERAL configs: every combination shares the config
# of its (kernel, dtype, D), and the AOT test compiles the superset (float32 bias + dropout + softcap, with the
# dbias store); for bf16 D=128 (the target shape) also each feature alone and the bool mask.
_GENERAL_AOT = (dict(BIAS=1, DROPOUT=True, SOFTCAP=True),)
_GENERAL_AOT_BF16_D128 = (dict(BIAS=1, DROPOUT=False, SOFTCAP=False), dict(BIAS=2, DROPOUT=False, SOFTCAP=False),
                          dict(BIAS=0, DROPOUT=True, SOFTCAP=False), dict(BIAS=0, DROPOUT=False, SOFTCAP=True))
_PLAIN = dict(BIAS=0, DROPOUT=False, SOFTCAP=False)


def aot_specs():
    """Every kernel configuration the launchers use on a GPU, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps, {"num_stages", "archs"})."""
    specs = []
    for torch_dt, dt in _DTYPES.items():
        kind = _kind(torch_dt)
        for D in HEAD_DIMS:
            for general in (False, True):
                if unsupported(torch_dt, D, D, general):
                    continue
                combos = [_PLAIN]
                if general:
                    combos = list(_GENERAL_AOT)
                    if dt == "bf16" and D == 128:
                        combos += list(_GENERAL_AOT_BF16_D128)
                for tables, kernel in ((_FWD_CFG, _attn_fwd_kernel), (_DKDV_CFG, _attn_bwd_dkdv_kernel),
                                       (_DQ_CFG, _attn_bwd_dq_kernel)):
                    for (bm, bn, warps, stages), archs in _per_arch(tables, (kind, D, general)):
                        for flags in combos:
                            specs.append(_spec(kernel, dt, {"HEAD_DIM": D, "BLOCK_D": _block_d(D), "BLOCK_M": bm,
                                                            "BLOCK_N": bn, **flags}, warps, stages, archs))
            for (bm, bn, warps, stages), archs in _per_arch(_DEC_CFG, (kind, D)):
                specs.append(_spec(_attn_decode_kernel, dt, {"HEAD_DIM": D, "BLOCK_D": _block_d(D), "BLOCK_M": bm,
                                                             "BLOCK_N": bn}, warps, stages, archs))
        for bd in sorted({_block_d(D) for D in HEAD_DIMS}):
            specs.append(_spec(_attn_decode_combine, dt, {"BLOCK_R": _COMB_BLOCK_R, "BLOCK_D": bd}, _COMB_WARPS))
        specs.append(_spec(_attn_bwd_preprocess, dt, {"BLOCK_M": _PRE_BLOCK_M, "BLOCK_D": _PRE_BLOCK_D},
                           _PRE_WARPS))
    return specs
