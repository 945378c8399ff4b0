"""Attention oracle: the exact semantics every attention kernel (C++, Triton) must reproduce.

All kernels share one internal calling convention, `attention_forward` below, over 4-D views:

  q (B, Lq, H, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv), any strides with the last one 1 (an SDPA
  (B, H, L, D) tensor is passed transposed, for free). Varlen: B = 1, the tokens of all sequences packed
  along dim 1, and cu_seqlens_q / cu_seqlens_k (int32, (nseq + 1,)) give each sequence's span.
  Returns out (B, Lq, H, Dv) in q's dtype and lse (B, H, Lq): natural-log log-sum-exp of each row's scores,
  float32 (float64 for float64 inputs), -inf for a row with no visible key (its output is 0).

Semantics, per sequence b with query length Lq_b and key length Lk_b (seqused_k[b] when given, which
hides the keys past it: the KV-cache case):
  s[h, i, j] = scale * q[i, h] . k[j, h // (H // Hkv)]          (grouped-query attention)
  s = softcap * tanh(s / softcap)                                 when softcap > 0
  s = s + bias[b, h, i, j]                                        float bias (broadcast to (B, H, Lq, Lk))
  visible(i, j) = bias[b, h, i, j] (boolean mask: True takes part)
                  and j >= i + off - window_left  (window_left >= 0)
                  and j <= i + off + window_right (window_right >= 0; causal is window_right = 0)
     with off = Lk_b - Lq_b when bottom_right (flash-attention's alignment: the last query sees the last
     key) and off = 0 otherwise (torch SDPA's is_causal: top-left).
  p = softmax over visible j (0 for a row with none visible)
  p = p * keep[h, i, j] / (1 - dropout_p)                         when dropout_p > 0
  out[i, h] = sum_j p[h, i, j] v[j, h // (H // Hkv)]

Dropout mask: a counter-based hash, the same bits on every backend and in the backward. For query token
t (global index: the sequence's start in the packed or padded layout plus i; padded: b * Lq + i) in head
h, row = (h * total_q + t) mod 2^32 with total_q = B * Lq (padded) or the packed length (varlen);
col = j. With seed split into seed_lo, seed_hi (low, high 32 bits):
    x = fmix32((fmix32(row ^ seed_lo) + fmix32((col + seed_hi) mod 2^32)) mod 2^32)
    keep = (x >> 8) >= dropout_threshold(dropout_p)            (24-bit resolution)
fmix32 is MurmurHash3's finaliser.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_C2)
    return x ^ (x >> 16)


def dropout_threshold(dropout_p: float) -> int:
    """Integer threshold on 24 hash bits: an element is kept when (hash >> 8) >= threshold."""
    return min(1 << 24, int(round(dropout_p * (1 << 24))))


def split_seed(seed) -> tuple:
    """(seed_lo, seed_hi): the low and high 32 bits of a 64-bit seed, an int or an int64 tensor in [0, 2^63)
    (as _draw_seed gives; a tensor stays one, so that a seed drawn under torch.vmap can differ per entry)."""
    if not isinstance(seed, Tensor):
        seed &= (1 << 64) - 1
    return seed & _M32, (seed >> 32) & _M32


def dropout_keep(seed, dropout_p: float, rows: Tensor, cols: Tensor) -> Tensor:
    """Keep mask (bool) of the counter-based dropout for broadcastable int64 row and col indices; seed as
    split_seed takes it."""
    lo, hi = split_seed(seed)
    rh = fmix32((rows & _M32) ^ lo)
    ch = fmix32((cols + hi) & _M32)
    x = fmix32((rh + ch) & _M32)
    return (x >> 8) >= dropout_threshold(dropout_p)


def _seq_spans(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k):
    """[(batch index into the 4-D views, q start, q len, k start, k len, global q start)] per sequence."""
    spans = []
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        used = seqused_k.tolist() if seqused_k is not None else None
        for b in range(len(cq) - 1):
            lk = ck[b + 1] - ck[b] if used is None else used[b]
            spans.append((0, cq[b], cq[b + 1] - cq[b], ck[b], lk, cq[b]))
    else:
        B, Lq = q.shape[0], q.shape[1]
        used = seqused_k.tolist() if seqused_k is not None else None
        for b in range(B):
            spans.append((b, 0, Lq, 0, k.shape[1] if used is None else used[b], b * Lq))
    return spans


def visible_mask(lq: int, lk: int, window_left: int, window_right: int, bottom_right: bool,
                 device=None) -> Tensor:
    """(lq, lk) bool: which keys each query may see under the causal / sliding-window rule."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    off = lk - lq if bottom_right else 0
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i + off - window_left
    if window_right >= 0:
        ok &= j <= i + off + window_right
    return ok


def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor] = None,
                      cu_seqlens_k: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
                      max_seqlen_q: int = 0, max_seqlen_k: int = 0, bias: Optional[Tensor] = None,
                      scale: float = 1.0, softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
                      bottom_right: bool = True, dropout_p: float = 0.0, seed: int = 0):
    """(out, lse) of attention in the kernels' calling convention (module docstring). Computes in the
    inputs' dtype: run it on float64 copies for the oracle, in float16 for the low-precision baseline.
    bias: None, a float tensor or a bool mask, already broadcast (expanded) to (B, H, Lq, Lk); not with
    cu_seqlens. max_seqlen_* are the kernels' grid hints and are ignored here."""
    B, Lq_all, H, _ = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    group = H // Hkv
    out = torch.zeros(B, Lq_all, H, Dv, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((B, H, Lq_all), -math.inf, dtype=lse_dtype, device=q.device)
    total_q = Lq_all * B
    for bi, qs, lq, ks, lk, tq in _seq_spans(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k):
        if lq == 0:
            continue
        qb = q[bi, qs:qs + lq]
        kb = k[bi, ks:ks + lk].repeat_interleave(group, dim=1)
        vb = v[bi, ks:ks + lk].repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        ok = visible_mask(lq, lk, window_left, window_right, bottom_right, q.device).expand(H, lq, lk)
        if bias is not None:
            bb = bias[bi, :, qs:qs + lq, ks:ks + lk]
            if bb.dtype == torch.bool:
                ok = ok & bb
            else:
                s = s + bb.to(s.dtype)
        s = s.masked_fill(~ok, -math.inf)
        row_lse = torch.logsumexp(s.to(lse_dtype), dim=-1) if lk > 0 else torch.full(
            (H, lq), -math.inf, dtype=lse_dtype, device=q.device)
        # p from the row max, not exp(s - lse): where |s| is huge (a row under a finite mask of
        # finfo.min) lse cannot hold log(sum) beside it, and exp(s - lse) would be 1 for every equal score
        m = s.amax(-1, keepdim=True) if lk > 0 else torch.zeros((H, lq, 1), dtype=s.dtype, device=q.device)
        empty = m == -math.inf
        e = torch.exp(s - torch.where(empty, torch.zeros_like(m), m))
        p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        p = torch.where(empty, torch.zeros((), dtype=p.dtype, device=p.device), p)
        if dropout_p > 0:
            rows = (torch.arange(H, device=q.device)[:, None, None] * total_q + tq
                    + torch.arange(lq, device=q.device)[None, :, None])
            cols = torch.arange(lk, device=q.device)[None, None, :]
            keep = dropout_keep(seed, dropout_p, rows, cols)
            p = p * keep.to(p.dtype) * (1.0 / (1.0 - dropout_p))
        out[bi, qs:qs + lq] = torch.einsum("hij,jhd->ihd", p, vb)
        lse[bi, :, qs:qs + lq] = row_lse
    return out, lse


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=0, max_seqlen_k=0,
                       bias=None, bias_requires_grad: bool = False, scale=1.0, softcap=0.0, window_left=-1,
                       window_right=-1, bottom_right=True, dropout_p=0.0, seed=0):
    """(dq, dk, dv, dbias) of attention_forward by autograd (torch.func.vjp, so it also works inside a
    custom op body). dbias is the gradient of the full (B, H, Lq, Lk) float bias (None unless
    bias_requires_grad); out and lse are unused (the kernels recompute from them)."""
    float_bias = bias is not None and bias.dtype != torch.bool
    want_dbias = float_bias and bias_requires_grad

    def f(q_, k_, v_, b_):
        return attention_forward(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                 b_, scale, softcap, window_left, window_right, bottom_right, dropout_p, seed)[0]

    b_in = bias.to(q.dtype) if want_dbias else bias
    if want_dbias:
        _, vjp = torch.func.vjp(f, q, k, v, b_in)
        dq, dk, dv, db = vjp(dout)
        return dq, dk, dv, db
    _, vjp = torch.func.vjp(lambda a, b, c: f(a, b, c, b_in), q, k, v)
    dq, dk, dv = vjp(dout)
    return dq, dk, dv, None


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, seed: int = 0) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's math, written independently (tier-1 oracle for the
    SDPA mapping), with fastnn's dropout mask and zeros for fully masked rows. Inputs (..., H, L, E)."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    s = query @ key.transpose(-2, -1) * scale
    ok = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        ok = ok.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            ok = ok & attn_mask
        else:
            s = s + attn_mask
    s = s.masked_fill(~ok, -math.inf)
    m = s.amax(-1, keepdim=True)
    empty = m == -math.inf
    p = torch.exp(s - torch.where(empty, torch.zeros_like(m), m))
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    p = torch.where(empty, torch.zeros_like(p), p)
    if dropout_p > 0:
        shape = p.shape
        Bf = math.prod(shape[:-3]) if len(shape) > 3 else 1
        H = shape[-3] if len(shape) >= 3 else 1
        b = torch.arange(Bf, device=p.device).view(*shape[:-3], 1, 1, 1) if len(shape) > 3 else 0
        h = torch.arange(H, device=p.device).view(H, 1, 1)
        i = torch.arange(L, device=p.device).view(L, 1)
        rows = h * (Bf * L) + b * L + i
        cols = torch.arange(S, device=p.device)
        p = p * dropout_keep(seed, dropout_p, rows, cols).to(p.dtype) / (1.0 - dropout_p)
    return p @ value
