"""Selective state-space (Mamba) oracle: the exact semantics every scan, conv and decode kernel reproduces.

Selective scan (mamba_ssm's selective_scan_fn), per batch b, channel d, state n, step t:
    dt[b, d, t]  = delta[b, d, t] + delta_bias[d]          (then softplus, threshold 20, when delta_softplus)
    h[b, d, n]   = exp(dt * A[d, n]) * h[b, d, n] + dt * B[.., n, t] * u[b, d, t]
    y[b, d, t]   = sum_n h[b, d, n] * C[.., n, t]  +  D[d] * u[b, d, t]
    out          = y * silu(z[b, d, t])                      when z is given
  B and C are either (D, N) (one value per channel and state) or per step (B, G, N, L): channel d reads
  group d // (D / G). u, delta, z: (B, D, L). The state and every sum are float32 (float64 for float64 u);
  out has u's dtype. The state before step 0 is `initial_state` (zeros when absent).

Variable length (packed sequences): `seq_idx` (B, L) int32 marks the sequence of every step; the state
is reset where seq_idx changes, so no state crosses a boundary. Two ways to number the states:
  per row      (per_sequence_states=False): initial_state (B, D, N) starts row b's first segment and
               last_state (B, D, N) is the state after row b's last step.
  per sequence (per_sequence_states=True, from cu_seqlens): B == 1, seq_idx holds 0..S-1 in order;
               initial_state (S, D, N) starts sequence s and last_state (S, D, N) is its final state.
A reset step reads, as its previous state, the row's initial state (row mode: only at t = 0; per
sequence: at every sequence start) or zeros.

Kernel calling convention (every backend): selective_scan_forward(u, delta, A, B, C, D, z, delta_bias,
delta_softplus, initial_state, seq_idx, per_sequence_states, chunk_size) -> (out, last_state,
chunk_states): chunk_states (B, D, ceil(L / chunk_size), N) float32 holds the state *before* the first
step of each chunk (after nothing of that chunk), which the backward recomputes from.

Causal conv1d (causal-conv1d's causal_conv1d_fn), depthwise, kernel width W:
    out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k]
  where x at negative times is initial_states[b, d, W - 1 + t'] (zeros when absent), terms whose step
  lies in another sequence than t (seq_idx) are dropped, and activation "silu" / "swish" applies silu.
  final_states (B, D, W - 1) are the last W - 1 inputs of each row (older ones from initial_states),
  zeroed where they belong to another sequence than the row's last step (with L = 0: the initial states).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

SOFTPLUS_THRESHOLD = 20.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the precision of the state and of every sum."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def delta_transform(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """dt = delta + delta_bias[:, None], then softplus (torch's, threshold 20) when delta_softplus."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta, threshold=SOFTPLUS_THRESHOLD)
    return delta


def _per_step(X: Tensor, D: int, ct: torch.dtype) -> Tuple[Tensor, str]:
    """B or C as (D, N), (B, N, L) (per step, one group) or (B, D, N, L) (groups expanded), and its einsum
    letters; one group stays unexpanded, as in mamba's selective_scan_ref."""
    X = X.to(ct)
    if X.dim() == 2:
        return X, "dn"
    if X.dim() == 4 and X.shape[1] == 1:
        X = X[:, 0]
    if X.dim() == 3:
        return X, "bnl"
    G = X.shape[1]
    return X.repeat_interleave(D // G, dim=1), "bdnl"


def reset_mask(seq_idx: Optional[Tensor], B: int, L: int, device) -> Optional[Tensor]:
    """(B, L) bool: True where a new sequence starts (t == 0 included), or None without seq_idx."""
    if seq_idx is None:
        return None
    starts = torch.ones(B, L, dtype=torch.bool, device=device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                   per_sequence_states: bool = False, chunk_size: Optional[int] = None):
    """The selective scan by its definition (module docstring): a loop over the steps, differentiable by
    autograd. Returns (out (B, D, L) in u's dtype, last_state: (B, D, N), or (S, D, N) per sequence), and
    chunk_states (B, D, ceil(L / chunk_size), N) as a third output when chunk_size is given."""
    ct = compute_dtype(u.dtype)
    Bsz, Dm, L = u.shape
    N = A.shape[-1]
    uf, Af = u.to(ct), A.to(ct)
    dt = delta_transform(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    Bx, b_sub = _per_step(B, Dm, ct)
    Cx, c_sub = _per_step(C, Dm, ct)
    # The same materialise-then-loop structure as mamba's selective_scan_ref, so its timing is comparable.
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", dt, Af))
    deltaB_u = torch.einsum(f"bdl,{b_sub},bdl->bdln", dt, Bx, uf)
    starts = reset_mask(seq_idx, Bsz, L, u.device)
    if per_sequence_states and seq_idx is not None:
        S = int(seq_idx.max().item()) + 1 if L > 0 else 0
        seq_of = seq_idx[0].tolist()
        ends = {t for t in range(L) if t == L - 1 or seq_of[t + 1] != seq_of[t]}
    else:
        S, seq_of, ends = Bsz, None, set()
    zeros = u.new_zeros((Bsz, Dm, N), dtype=ct)
    if initial_state is None:
        h = zeros
    elif per_sequence_states and seq_of is not None:
        h = initial_state[seq_of[0]].to(ct).unsqueeze(0) if L > 0 else zeros
    else:
        h = initial_state.to(ct)
    finals: List[Tuple[int, Tensor]] = []
    ys = []
    saved = []
    for t in range(L):
        if chunk_size is not None and t % chunk_size == 0:
            saved.append(h.expand(Bsz, Dm, N))
        if starts is not None and t > 0:
            if seq_of is not None:  # per sequence: B == 1
                if seq_of[t] != seq_of[t - 1]:
                    h = (initial_state[seq_of[t]].to(ct).unsqueeze(0) if initial_state is not None else zeros)
            else:
                h = torch.where(starts[:, t, None, None], zeros, h)
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append(torch.einsum(f"bdn,{c_sub[:-1]}->bd", h, Cx[..., t]) if c_sub != "dn" else
                  torch.einsum("bdn,dn->bd", h, Cx))
        if t in ends:
            finals.append((seq_of[t], h[0]))
    y = torch.stack(ys, dim=2) if L > 0 else uf.new_zeros((Bsz, Dm, 0))
    out = y if D is None else y + uf * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    if seq_of is not None:
        last = torch.stack([h for _, h in sorted(finals, key=lambda p: p[0])]) if finals else zeros[:0]
        if initial_state is not None and last.shape[0] < initial_state.shape[0]:  # sequences of length 0
            raise ValueError("per-sequence states need every sequence to be non-empty")
    else:
        last = h
    if chunk_size is None:
        return out.to(u.dtype), last
    chunks = torch.stack(saved, dim=2) if saved else zeros.new_zeros(Bsz, Dm, 0, N)
    return out.to(u.dtype), last, chunks


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, seq_idx=None, per_sequence_states=False):
    """An independent, scalar formulation of the same scan (plain Python over every element, float64): the
    tier-1 check of `selective_scan`. Small shapes only."""
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    uu, dd, AA = u.double().tolist(), delta.double().tolist(), A.double().tolist()
    Bl, Cl = B.double().tolist(), C.double().tolist()
    DD = None if D is None else D.double().tolist()
    zz = None if z is None else z.double().tolist()
    db = None if delta_bias is None else delta_bias.double().tolist()
    si = None if seq_idx is None else seq_idx.tolist()
    init = None if initial_state is None else initial_state.double().tolist()

    def coef(X, spec, b, d, n, t):
        if spec.dim() == 2:  # (D, N)
            return X[d][n]
        if spec.dim() == 3:  # (B, N, L)
            return X[b][n][t]
        return X[b][d // (Dm // spec.shape[1])][n][t]  # (B, G, N, L)

    out = [[[0.0] * L for _ in range(Dm)] for _ in range(Bsz)]
    finals = {}
    for b in range(Bsz):
        for d in range(Dm):
            h = [0.0] * N
            for t in range(L):
                start = t == 0 or (si is not None and si[b][t] != si[b][t - 1])
                if start:
                    if init is None:
                        h = [0.0] * N
                    elif per_sequence_states:
                        h = list(init[si[b][t]][d])
                    elif t == 0:
                        h = list(init[b][d])
                    else:
                        h = [0.0] * N
                x = dd[b][d][t] + (db[d] if db is not None else 0.0)
                if delta_softplus and x <= SOFTPLUS_THRESHOLD:
                    x = math.log1p(math.exp(x))
                y = 0.0
                for n in range(N):
                    h[n] = math.exp(x * AA[d][n]) * h[n] + x * coef(Bl, B, b, d, n, t) * uu[b][d][t]
                    y += h[n] * coef(Cl, C, b, d, n, t)
                if DD is not None:
                    y += DD[d] * uu[b][d][t]
                if zz is not None:
                    zv = zz[b][d][t]
                    y *= zv / (1.0 + math.exp(-zv))
                out[b][d][t] = y
                end = t == L - 1 or (si is not None and si[b][t + 1] != si[b][t])
                if end:
                    key = si[b][t] if per_sequence_states else b
                    if per_sequence_states or t == L - 1:
                        finals.setdefault(key, {})[d] = list(h)
    rows = sorted(finals)
    last = torch.tensor([[finals[r][d] for d in range(Dm)] for r in rows], dtype=torch.float64)
    return torch.tensor(out, dtype=torch.float64), last


# ---------------------------------------------------------------- single decode step

def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                           state_batch_indices: Optional[Tensor] = None) -> Tensor:
    """One recurrent step (mamba's selective_state_update), updating `state` in place.

    Head form: state (batch_cache, H, P, N), x / dt / z (batch, H, P), A (H, P, N), B / C (batch, G, N),
    D / dt_bias (H, P); channel (h, p) reads group h // (H / G). The 3-D form (mamba 1: state
    (batch_cache, D, N), x (batch, D), A (D, N), B / C (batch, N)) is the head form with H = 1.
    state_batch_indices (batch,) picks the state row of each input row (default: row i). Math in float32
    (float64 for a float64 state); the state keeps its dtype. Returns out shaped like x, in x's dtype.
    """
    three_d = state.dim() == 3
    if three_d:
        state_v, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        z = None if z is None else z.unsqueeze(1)
        D = None if D is None else D.unsqueeze(0)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    else:
        state_v = state
    ct = compute_dtype(state.dtype)
    H, G = x.shape[1], B.shape[1]
    rows = (torch.arange(x.shape[0], device=x.device) if state_batch_indices is None
            else state_batch_indices.long())
    s = state_v[rows].to(ct)
    dtv = dt.to(ct)
    if dt_bias is not None:
        dtv = dtv + dt_bias.to(ct)
    if dt_softplus:
        dtv = F.softplus(dtv, threshold=SOFTPLUS_THRESHOLD)
    Bg = B.to(ct).repeat_interleave(H // G, dim=1)  # (batch, H, N)
    Cg = C.to(ct).repeat_interleave(H // G, dim=1)
    dA = torch.exp(A.to(ct) * dtv[..., None])
    s = s * dA + (Bg[:, :, None, :] * dtv[..., None]) * x.to(ct)[..., None]
    out = (s * Cg[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.to(ct) * D.to(ct)
    if z is not None:
        out = out * F.silu(z.to(ct))
    state_v[rows] = s.to(state.dtype)
    out = out.to(x.dtype)
    return out.squeeze(1) if three_d else out


# ---------------------------------------------------------------- causal depthwise conv1d

def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                  initial_states: Optional[Tensor] = None, return_final_states: bool = False,
                  activation: Optional[str] = None):
    """causal-conv1d's causal_conv1d_fn by its definition (module docstring): x (B, D, L), weight (D, W),
    bias (D,), seq_idx (B, L), initial_states (B, D, W - 1). Returns out (B, D, L) in x's dtype, and
    final_states (B, D, W - 1) when return_final_states."""
    ct = compute_dtype(x.dtype)
    Bsz, Dm, L = x.shape
    W = weight.shape[1]
    xf = x.to(ct)
    pre = (initial_states.to(ct) if initial_states is not None else xf.new_zeros(Bsz, Dm, W - 1))
    xc = torch.cat([pre, xf], dim=2)  # (B, D, W - 1 + L): index W - 1 + t is step t
    if L == 0:  # no steps: nothing to convolve (conv1d rejects an input shorter than the kernel)
        out = xf.new_zeros(Bsz, Dm, 0)
        return (out.to(x.dtype), pre.to(x.dtype)) if return_final_states else out.to(x.dtype)
    if seq_idx is None:
        out = F.conv1d(xc, weight.to(ct).unsqueeze(1), None if bias is None else bias.to(ct), groups=Dm)
    else:
        # steps before 0 belong to the row's first sequence
        sc = torch.cat([seq_idx[:, :1].expand(Bsz, W - 1), seq_idx], dim=1)
        out = xf.new_zeros(Bsz, Dm, L) + (0 if bias is None else bias.to(ct)[:, None])
        for k in range(W):
            src = xc[:, :, k:k + L]
            same = (sc[:, k:k + L] == seq_idx)[:, None, :]
            out = out + torch.where(same, src, torch.zeros((), dtype=ct)) * weight.to(ct)[:, k, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = xc[:, :, L:]  # the last W - 1 entries of the concatenation
    if seq_idx is not None and W > 1:
        sc = torch.cat([seq_idx[:, :1].expand(Bsz, W - 1), seq_idx], dim=1)
        same = (sc[:, L:] == seq_idx[:, -1:])[:, None, :]
        final = torch.where(same, final, torch.zeros((), dtype=ct))
    return out, final.to(x.dtype)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None,
                         conv_state_indices: Optional[Tensor] = None,
                         cache_seqlens: Optional[Tensor] = None) -> Tensor:
    """causal-conv1d's causal_conv1d_update: x (B, D) or (B, D, T) new steps, conv_state (B_cache, D, S)
    with S >= W - 1. conv_state_indices (B,) picks each row's state (default: row i). Returns out shaped
    like x.
    Without cache_seqlens the state holds the last S inputs, oldest first, and is shifted in place by T (the
    new inputs at the end). With cache_seqlens (B,) (>= 0) it is a circular buffer: row b's inputs so far sit
    at positions p mod S, the next one at cache_seqlens[b] mod S; the window before the new steps is read
    from positions cache_seqlens[b] - (W - 1) .. cache_seqlens[b] - 1 (mod S), and the new steps are
    written at cache_seqlens[b] .. cache_seqlens[b] + T - 1 (mod S; of more than S new steps the last S
    stay). cache_seqlens itself is not advanced."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    ct = compute_dtype(x.dtype)
    Bsz, Dm, T = x.shape
    W = weight.shape[1]
    S = conv_state.shape[2]
    rows = (torch.arange(Bsz, device=x.device) if conv_state_indices is None else conv_state_indices.long())
    st = conv_state[rows].to(ct)
    if cache_seqlens is None:
        xc = torch.cat([st, x.to(ct)], dim=2)  # (B, D, S + T)
        win = xc[:, :, S - (W - 1):]
    else:
        pos = cache_seqlens.long().to(x.device)[:, None]
        before = torch.remainder(pos + torch.arange(-(W - 1), 0, device=x.device), S)  # (B, W - 1)
        win = torch.cat([st.gather(2, before[:, None, :].expand(Bsz, Dm, W - 1)), x.to(ct)], dim=2)
    out = F.conv1d(win, weight.to(ct).unsqueeze(1), None if bias is None else bias.to(ct), groups=Dm)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    if cache_seqlens is None:
        conv_state[rows] = xc[:, :, -S:].to(conv_state.dtype)
    else:
        keep = min(T, S)  # distinct positions: of more than S new steps only the last S are written
        where = torch.remainder(pos + torch.arange(T - keep, T, device=x.device), S)  # (B, keep)
        st = st.scatter(2, where[:, None, :].expand(Bsz, Dm, keep), x[:, :, T - keep:].to(ct))
        conv_state[rows] = st.to(conv_state.dtype)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


# ---------------------------------------------------------------- the Mamba block

def mamba_forward(block, hidden_states: Tensor, seq_idx: Optional[Tensor] = None,
                  per_sequence_states: bool = False) -> Tensor:
    """mamba_ssm.Mamba's forward (mamba_simple, no cache) from a block's parameters (in_proj, conv1d,
    x_proj, dt_proj, A_log, D, out_proj; duck-typed, so this module imports nothing from fastnn.nn):
    the plain-PyTorch oracle of fastnn.nn.Mamba, with F.conv1d and the reference scan."""
    _, L, _ = hidden_states.shape
    xz = F.linear(hidden_states, block.in_proj.weight, block.in_proj.bias).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    w = block.conv1d.weight
    if seq_idx is None:
        x = F.conv1d(x, w, block.conv1d.bias, padding=w.shape[-1] - 1, groups=w.shape[0])[..., :L]
        x = F.silu(x)
    else:
        x = causal_conv1d(x, w.squeeze(1), block.conv1d.bias, seq_idx=seq_idx, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), block.x_proj.weight)
    N = block.A_log.shape[1]
    dt, B, C = torch.split(x_dbl, [x_dbl.shape[-1] - 2 * N, N, N], dim=-1)
    dt = F.linear(dt, block.dt_proj.weight).transpose(1, 2)
    A = -torch.exp(block.A_log.float())
    y, _ = selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), block.D.float(), z,
                          block.dt_proj.bias.float(), True, None, seq_idx, per_sequence_states)
    return F.linear(y.transpose(1, 2), block.out_proj.weight, block.out_proj.bias)
