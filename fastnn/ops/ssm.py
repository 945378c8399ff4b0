"""Selective scan (Mamba): selective_scan_fn, drop-in for mamba_ssm's, plus initial / final states with
gradients and packed variable-length batches.

Custom ops (``torch.ops.fastnn.*``): selective_scan_forward, selective_scan_backward (its autograd). Both
use the kernels' calling convention of fastnn/reference/ssm.py (contiguous (B, D, L) u / delta / z; A, D,
delta_bias, initial state and B / C in the compute dtype; B / C as (D, N) or (B, G, N, L)).
Kernels:
  CPU   C++ (csrc/cpu/selective_scan_cpu.cpp): channels in the vector lanes, the N states in registers,
        chunked; the backward recomputes each chunk's states from the state saved before it.
  CUDA  CUDA C++ (csrc/cuda/selective_scan_*.cu): block-parallel chunked scan per (batch, channel).
The backward keeps only the chunk-boundary states (B, D, L / chunk, N), never the (B, D, L, N) states.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import _C, dense_copies, pick
from ..reference import ssm as ref
from . import _checks, _direct

_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda",)}
SCAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_STATE = 256


def chunk_size_for(device_type: str, nstate: int) -> int:
    """Steps per saved state. CPU: the backward keeps a chunk's states and decays (2 x chunk x N lane
    vectors) in L2, so chunk x N = 2048 (256 KiB per thread in fp32). CUDA: the kernel's block length."""
    if device_type == "cuda":
        return 2048
    return max(8, min(256, 2048 // max(nstate, 1)))


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---------------------------------------------------------------- kernel entry points per backend

def _forward_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, per_seq,
                       chunk_size):
    with torch.no_grad():
        out, last, chunks = ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                               seq_idx, per_seq, chunk_size)
    last, chunks = dense_copies([last, chunks])  # L = 0 would return the initial state itself (an alias)
    return out, last, chunks


def _backward_reference(dout, dlast, chunk_states, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        initial_state, seq_idx, per_seq, chunk_size, deterministic):
    """Gradients of the reference by torch.func.vjp (which, unlike torch.autograd.grad, also works inside a
    custom op's body, below the autograd dispatch key)."""
    names = ("u", "delta", "z", "A", "B", "C", "D", "delta_bias", "initial_state")
    given = {"u": u, "delta": delta, "z": z, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias,
             "initial_state": initial_state}
    keys = [k for k in names if given[k] is not None]

    def scan(*xs):
        a = dict(zip(keys, xs))
        return ref.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a.get("D"), a.get("z"),
                                  a.get("delta_bias"), delta_softplus, a.get("initial_state"), seq_idx, per_seq)

    (out, last), vjp = torch.func.vjp(scan, *[given[k] for k in keys])
    grads = dict(zip(keys, vjp((dout, torch.zeros_like(last) if dlast is None else dlast))))
    return dense_copies([grads.get(k) for k in names])


def _forward_cpp(*args):
    return _C.selective_scan_forward_cpu(*args)


def _backward_cpp(*args):
    return _C.selective_scan_backward_cpu(*args)


def _forward_cuda(*args):
    return _C.selective_scan_forward_cuda(*args)


def _backward_cuda(*args):
    return _C.selective_scan_backward_cuda(*args)


_FORWARD_IMPLS = {"reference": _forward_reference, "cpp": _forward_cpp}
_BACKWARD_IMPLS = {"reference": _backward_reference, "cpp": _backward_cpp}
if _C is not None and hasattr(_C, "selective_scan_forward_cuda"):
    _FORWARD_IMPLS["cuda"] = _forward_cuda
    _BACKWARD_IMPLS["cuda"] = _backward_cuda


def _pick(op: str, u: Tensor, impls: dict):
    if u.dtype == torch.float64 and u.device.type == "cuda":
        impls = {k: v for k, v in impls.items() if k != "cuda"}  # the CUDA kernels are fp16/bf16/fp32
    return pick(op, u.device, impls, _PREFERENCE.get(u.device.type, ()))


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fastnn::selective_scan_forward", mutates_args=())
def _scan_forward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                     initial_state: Optional[Tensor], seq_idx: Optional[Tensor], per_sequence_states: bool,
                     num_states: int, chunk_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, last_state (num_states, D, N), chunk_states (B, D * ceil(L / chunk_size) * N): the states
    before each chunk, (D, chunks, N) row-major per batch row). The chunk count is not a dimension of its own:
    it is 1 for every L up to chunk_size, and torch.export / dynamic shapes would guard on that 1 and bound L."""
    impl = _pick("selective_scan", u, _FORWARD_IMPLS)
    out, last, chunks = impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                             per_sequence_states, chunk_size)
    return out, last, chunks.flatten(1)


@_scan_forward_op.register_fake
def _scan_forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                       per_sequence_states, num_states, chunk_size):
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    return u.new_empty(u.shape), A.new_empty(num_states, Dm, N), A.new_empty(Bsz, Dm * -(-L // chunk_size) * N)


@torch.library.custom_op("fastnn::selective_scan_backward", mutates_args=())
def _scan_backward_op(dout: Tensor, dlast_state: Optional[Tensor], chunk_states: Tensor, u: Tensor, delta: Tensor,
                      A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                      delta_bias: Optional[Tensor], delta_softplus: bool, initial_state: Optional[Tensor],
                      seq_idx: Optional[Tensor], per_sequence_states: bool, chunk_size: int,
                      deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                    Tensor, Tensor]:
    """(du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinitial_state); an empty tensor where the input is
    absent."""
    if u.dim() != 3 or A.dim() != 2 or chunk_size <= 0:
        raise RuntimeError(f"selective_scan_backward: u must be (B, D, L), A (D, N) and chunk_size positive; got "
                           f"{tuple(u.shape)}, {tuple(A.shape)} and {chunk_size}")
    Bsz, Dm, L = u.shape
    boundary = (Bsz, Dm, -(-L // chunk_size), A.shape[1])
    per_row = Dm * boundary[2] * boundary[3]
    if tuple(chunk_states.shape) != (Bsz, per_row) or not chunk_states.is_contiguous():
        raise RuntimeError(f"selective_scan_backward: chunk_states must be a contiguous ({Bsz}, {per_row}) "
                           f"(D x chunks x N per batch row), got {tuple(chunk_states.shape)}")
    impl = _pick("selective_scan_backward", u, _BACKWARD_IMPLS)
    got = impl(dout, dlast_state, chunk_states.view(boundary), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
               initial_state, seq_idx, per_sequence_states, chunk_size, deterministic)
    return tuple(_empty(u) if g is None else g for g in got)


@_scan_backward_op.register_fake
def _scan_backward_fake(dout, dlast_state, chunk_states, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        initial_state, seq_idx, per_sequence_states, chunk_size, deterministic):
    # dense row-major, as every backend returns them
    maybe = lambda t: _empty(u) if t is None else t.new_empty(t.shape)  # noqa: E731
    return (u.new_empty(u.shape), u.new_empty(u.shape), maybe(z), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), maybe(D), maybe(delta_bias), maybe(initial_state))


_FORWARD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state",
                 "seq_idx", "per_sequence_states", "num_states", "chunk_size")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FORWARD_ARGS, inputs))
    ctx.save_for_backward(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                          a["initial_state"], a["seq_idx"], output[2])
    ctx.flags = (a["delta_softplus"], a["per_sequence_states"], a["chunk_size"])


def _backward(ctx, dout, dlast, dchunks):
    u, delta, A, B, C, D, z, delta_bias, init, seq_idx, chunks = ctx.saved_tensors
    softplus, per_seq, chunk = ctx.flags
    if dout is None:
        dout = torch.zeros_like(u)
    grads = _direct.run_op(
        torch.ops.fastnn.selective_scan_backward, dout.contiguous(), None if dlast is None else dlast.contiguous(),
        chunks, u, delta, A, B, C, D, z, delta_bias, softplus, init, seq_idx, per_seq, chunk,
        torch.are_deterministic_algorithms_enabled())
    du, ddelta, dz, dA, dB, dC, dD, dbias, dinit = grads
    present = lambda g, t: g if t is not None else None  # noqa: E731
    return (du, ddelta, dA, dB, dC, present(dD, D), present(dz, z), present(dbias, delta_bias), None,
            present(dinit, init), None, None, None, None)


_direct.register_autograd(_scan_forward_op, _backward, _setup_context)
_direct.register_backward_op(_scan_backward_op)


# ---------------------------------------------------------------- public function

def _check_per_channel(t: Optional[Tensor], name: str, u: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    _checks.tensor(t, name, dtypes=SCAN_DTYPES, shape=(u.shape[1],))
    _checks.same_device("u", u, **{name: t})
    return t


def _check_bc(X: Tensor, name: str, u: Tensor, N: int) -> Tensor:
    """B or C as (D, N) or (B, G, N, L) (a 3-D (B, N, L) gets G = 1)."""
    _checks.tensor(X, name, dtypes=SCAN_DTYPES)
    _checks.same_device("u", u, **{name: X})
    Bsz, Dm, L = u.shape
    if X.dim() == 2:
        if tuple(X.shape) != (Dm, N):
            raise ValueError(f"{name} must be (D, N) = ({Dm}, {N}) or per step (B, G, N, L); got {tuple(X.shape)}")
        return X
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() != 4 or X.shape[0] != Bsz or X.shape[2] != N or X.shape[3] != L:
        raise ValueError(f"{name} must be (D, N) = ({Dm}, {N}) or per step (B, G, N, L) with B={Bsz}, N={N}, "
                         f"L={L} (or (B, N, L)); got {tuple(X.shape)}")
    G = X.shape[1]
    if G == 0 or Dm % G != 0:
        raise ValueError(f"{name}: the number of groups ({G}) must divide the number of channels D={Dm}")
    return X


def check_cu_seqlens(cu_seqlens: Tensor, total: int, reference_name: str, reference: Tensor) -> None:
    """cu_seqlens (S + 1,) integer on reference's device, starting at 0, strictly increasing (no empty
    sequence) and ending at total. Its values are read on the host (a wrong table would index out of bounds);
    under torch.compile the value check runs in the graph."""
    _checks.tensor(cu_seqlens, "cu_seqlens", integer=True)
    _checks.same_device(reference_name, reference, cu_seqlens=cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries; got shape {tuple(cu_seqlens.shape)}")
    _checks.values((cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens.diff() > 0).all(),
                   lambda: f"cu_seqlens must start at 0, increase strictly (no empty sequence) and end at "
                           f"{_checks.size_text(total, 'L')} "
                           f"(the packed length); got {_checks.shown(cu_seqlens)}")


def cu_seqlens_to_seq_idx(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) int32 sequence index of every packed step, from cu_seqlens (S + 1,)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32),
                                  lengths, output_size=total)
    return idx.unsqueeze(0)


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                      z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False, *, initial_state: Optional[Tensor] = None,
                      seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None):
    """Mamba's selective scan, drop-in for ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    For every batch b, channel d and state n, along the steps t (fastnn/reference/ssm.py has the exact
    formulas)::

        dt = softplus(delta + delta_bias) (softplus only when delta_softplus)
        h  = exp(dt * A[d, n]) * h + dt * B[n, t] * u[b, d, t]
        out[b, d, t] = (sum_n h * C[n, t] + D[d] * u[b, d, t]) * silu(z[b, d, t])

    Args:
        u, delta: (B, D, L), float16 / bfloat16 / float32 / float64, one dtype.
        A: (D, N) real, N <= 256 (float32 as in Mamba; any float dtype is accepted).
        B, C: (D, N) shared by every step, or per step (B, G, N, L) with G groups of D / G channels (a 3-D
            (B, N, L) is one group).
        D, delta_bias: (D,) or None. z: (B, D, L) gate, u's dtype, or None.
        delta_softplus: apply softplus (torch's, threshold 20) to delta + delta_bias.
        return_last_state: also return the final state (B, D, N), float32 (float64 for float64 u).
        initial_state: (B, D, N) state before step 0 (zeros when None); with cu_seqlens, (S, D, N), one per
            sequence. Its gradient is computed.
        seq_idx: (B, L) int32 sequence index of every step: the state is reset to zero where it changes
            (packed sequences); initial_state starts each row's first sequence, the last state is that
            of each row's last sequence.
        cu_seqlens: (S + 1,) int32 / int64 boundaries of S sequences packed along L (B must be 1), an
            alternative to seq_idx with one initial and one final state per sequence.

    Returns:
        out (B, D, L) in u's dtype, and last_state ((B, D, N), or (S, D, N) with cu_seqlens) when
        return_last_state. Gradients flow to u, delta, A, B, C, D, z, delta_bias, initial_state and from
        last_state. The state and every sum are float32 (float64 for float64 inputs).
    """
    _checks.tensor(u, "u", dtypes=SCAN_DTYPES)
    if u.dim() != 3:
        raise ValueError(f"u must be (B, D, L); got shape {tuple(u.shape)}")
    _checks.tensor(delta, "delta", dtypes=SCAN_DTYPES, shape=tuple(u.shape))
    if delta.dtype != u.dtype:
        raise TypeError(f"delta must have u's dtype ({u.dtype}); got {delta.dtype}")
    _checks.tensor(A, "A", dtypes=SCAN_DTYPES)
    _checks.same_device("u", u, delta=delta, A=A)
    Bsz, Dm, L = u.shape
    if A.dim() != 2 or A.shape[0] != Dm:
        raise ValueError(f"A must be (D, N) with D={Dm}; got shape {tuple(A.shape)}")
    N = A.shape[1]
    if not 1 <= N <= MAX_STATE:
        raise ValueError(f"A: the state size N must be in 1..{MAX_STATE}; got {N}")
    B = _check_bc(B, "B", u, N)
    C = _check_bc(C, "C", u, N)
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {B.shape[1]} and {C.shape[1]}")
    D = _check_per_channel(D, "D", u)
    delta_bias = _check_per_channel(delta_bias, "delta_bias", u)
    if z is not None:
        _checks.tensor(z, "z", dtypes=SCAN_DTYPES, shape=tuple(u.shape))
        _checks.same_device("u", u, z=z)
        if z.dtype != u.dtype:
            raise TypeError(f"z must have u's dtype ({u.dtype}); got {z.dtype}")
    if not isinstance(delta_softplus, bool):
        raise TypeError(f"delta_softplus must be a bool; got {type(delta_softplus).__name__}")
    per_seq = cu_seqlens is not None
    if per_seq:
        if seq_idx is not None:
            raise ValueError("pass either seq_idx or cu_seqlens, not both")
        check_cu_seqlens(cu_seqlens, L, "u", u)
        if Bsz != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along L and u's batch size must be 1; "
                             f"got {Bsz}")
        num_states = cu_seqlens.numel() - 1
        seq_idx = cu_seqlens_to_seq_idx(cu_seqlens, L)
    else:
        num_states = Bsz
        if seq_idx is not None:
            _checks.tensor(seq_idx, "seq_idx", integer=True, shape=(Bsz, L))
            _checks.same_device("u", u, seq_idx=seq_idx)
            if seq_idx.dtype != torch.int32 and seq_idx.numel():  # the kernels read int32: no silent wrap-around
                wide = seq_idx.long()
                _checks.values(((wide >= -2 ** 31) & (wide < 2 ** 31)).all(),
                               lambda: f"seq_idx must fit in int32; got {_checks.shown(seq_idx)}")
            seq_idx = seq_idx.to(torch.int32).contiguous()
    ct = ref.compute_dtype(u.dtype)
    if initial_state is not None:
        _checks.tensor(initial_state, "initial_state", dtypes=SCAN_DTYPES, shape=(num_states, Dm, N))
        _checks.same_device("u", u, initial_state=initial_state)
        initial_state = initial_state.to(ct).contiguous()
    conv = lambda t: None if t is None else t.to(ct).contiguous()  # noqa: E731
    out, last, _ = _direct.run_op(
        torch.ops.fastnn.selective_scan_forward, u.contiguous(), delta.contiguous(), conv(A), conv(B), conv(C),
        conv(D), None if z is None else z.contiguous(), conv(delta_bias), delta_softplus, initial_state, seq_idx,
        per_seq, num_states, chunk_size_for(u.device.type, N))
    return (out, last) if return_last_state else out
