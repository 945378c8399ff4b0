"""Mamba-family convolution and decode ops, drop-in for causal-conv1d and mamba_ssm's decode step:
causal_conv1d_fn, causal_conv1d_update, selective_state_update.

Custom ops (``torch.ops.fastnn.*``): causal_conv1d_forward (autograd registered), causal_conv1d_backward,
causal_conv1d_update (mutates conv_state), selective_state_update (mutates state). Kernels:
  CPU   C++ (csrc/cpu/ssm_conv_cpu.cpp): one (row, channel) series at a time through a widened fp32 buffer,
        vectorised over time; the backward per channel, so dweight / dbias sum in a fixed order.
  CUDA  Triton (kernels/ssm.py): (batch, channel block, time block) tiles; backward partials per time block
        summed afterwards (deterministic). There is no CUDA C++ kernel for these ops.
Semantics: fastnn/reference/ssm.py. Weight, bias, A, D and dt_bias reach the kernels in the compute dtype
(float32; float64 for float64 inputs): they are small, and the kernels take their precision from them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import _C, pick
from ..reference import ssm as ref
from . import _checks, _direct

_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_ACTIVATIONS = (None, "silu", "swish")
MAX_STATE_SIZE = 256


def _triton_ssm():
    from fastnn.kernels import ssm as ks  # imported on first use: importing triton costs ~1 s

    return ks


def _pick(op: str, device: torch.device, impls):
    return pick(op, device, impls, _PREFERENCE.get(device.type, ()))


def _opt(t: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    if t is None:
        return None
    return (t if dtype is None or t.dtype == dtype else t.to(dtype)).contiguous()  # (.to costs ~1 us a call)


# ---------------------------------------------------------------- causal conv1d: kernels per backend

def _fwd_reference(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    res = ref.causal_conv1d(x, weight, bias, seq_idx, initial_states, True, "silu" if silu else None)
    return res[0], (res[1] if return_final_states else None)


def _fwd_cpp(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    out, final = _C.causal_conv1d_forward_cpu(x, weight, bias, seq_idx, initial_states, return_final_states, silu)
    return out, (final if return_final_states else None)


def _fwd_triton(*args):
    return _triton_ssm().causal_conv1d_fwd(*args)


_FORWARD_IMPLS = {"reference": _fwd_reference, "cpp": _fwd_cpp, "triton": _fwd_triton}


def _bwd_reference(dout, dfinal, x, weight, bias, seq_idx, initial_states, silu, want_dinit):
    """The gradients in plain torch ops, by the chain rule through the reference's definition (torch.func.vjp
    of the reference does not run under opcheck's schema mode; gradcheck checks this formulation)."""
    ct = ref.compute_dtype(x.dtype)
    Bsz, D, L = x.shape
    W = weight.shape[1]
    xf, w = x.to(ct), weight.to(ct)
    init = initial_states.to(ct) if initial_states is not None else xf.new_zeros(Bsz, D, W - 1)
    xc = torch.cat([init, xf], 2)  # extended input: position W - 1 + t is step t
    g = dout.to(ct)
    if silu:  # d silu(p) / dp = s (1 + p (1 - s)), s = sigmoid(p), at the recomputed pre-activation
        pre = ref.causal_conv1d(xf, w, None if bias is None else bias.to(ct), seq_idx, init)
        s = torch.sigmoid(pre)
        g = g * (s * (1 + pre * (1 - s)))
    if seq_idx is not None:  # sequence id of every extended position (before step 0: the first sequence)
        sc = torch.cat([seq_idx[:, :1].expand(Bsz, W - 1), seq_idx], 1)
    zero = torch.zeros((), dtype=ct, device=x.device)
    dxc = torch.zeros_like(xc)
    dw = torch.empty_like(w)
    for k in range(W):  # output t read extended position t + k through weight[:, k]
        src = xc[:, :, k:k + L]
        gk = g
        if seq_idx is not None:
            keep = (sc[:, k:k + L] == seq_idx)[:, None, :]
            src, gk = torch.where(keep, src, zero), torch.where(keep, g, zero)
        dw[:, k] = (g * src).sum((0, 2))
        dxc[:, :, k:k + L] += w[:, k, None] * gk
    if dfinal is not None:  # final_states[j] is extended position L + j
        df = dfinal.to(ct)
        if seq_idx is not None:
            df = torch.where((sc[:, L:] == seq_idx[:, -1:])[:, None, :], df, zero)
        dxc[:, :, L:] += df
    dinit = dxc[:, :, :W - 1].to(x.dtype).clone() if want_dinit else None
    return dxc[:, :, W - 1:].to(x.dtype).clone(), dw, g.sum((0, 2)), dinit


def _bwd_cpp(dout, dfinal, x, weight, bias, seq_idx, initial_states, silu, want_dinit):
    dx, dw, db, dinit = _C.causal_conv1d_backward_cpu(dout, dfinal, x, weight, bias, seq_idx, initial_states, silu,
                                                      want_dinit)
    return dx, dw, db, (dinit if want_dinit else None)


def _bwd_triton(*args):
    return _triton_ssm().causal_conv1d_bwd(*args)


_BACKWARD_IMPLS = {"reference": _bwd_reference, "cpp": _bwd_cpp, "triton": _bwd_triton}


# ---------------------------------------------------------------- custom ops' own size checks

def _raw_shapes(op: str, **named) -> None:
    """Sizes a kernel indexes without bounds: a raw call of the op (torch.ops.fastnn.*, which skips the
    public function's checks) with another size must fail here, before any backend reads past a tensor's
    end. named: name=(tensor or None, expected shape)."""
    for name, (t, shape) in named.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"fastnn {op}: {name} must be {tuple(shape)}, got {tuple(t.shape)}")


def _raw_weight(op: str, weight: Tensor, D: int) -> int:
    if weight.dim() != 2 or weight.shape[0] != D or not 2 <= weight.shape[1] <= 4:
        raise RuntimeError(f"fastnn {op}: weight must be ({D}, W) with W in 2..4, got {tuple(weight.shape)}")
    return weight.shape[1]


def _raw_cache_rows(op: str, name: str, indices: Optional[Tensor], batch: int, rows: int) -> None:
    if indices is None and rows != batch:
        raise RuntimeError(f"fastnn {op}: without {name} the cache must have {batch} rows (the batch), got {rows}")
    _raw_shapes(op, **{name: (indices, (batch,))})


# ---------------------------------------------------------------- causal conv1d: custom ops

@torch.library.custom_op("fastnn::causal_conv1d_forward", mutates_args=())
def _conv_forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                     initial_states: Optional[Tensor], return_final_states: bool,
                     silu: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, D, L) in x's dtype, final_states (B, D, W - 1) in x's dtype, or an empty tensor when not
    return_final_states)."""
    Bsz, D, L = x.shape
    W = _raw_weight("causal_conv1d", weight, D)
    _raw_shapes("causal_conv1d", bias=(bias, (D,)), seq_idx=(seq_idx, (Bsz, L)),
                initial_states=(initial_states, (Bsz, D, W - 1)))
    ct = ref.compute_dtype(x.dtype)
    if x.numel() == 0:
        # no steps: the final states are the initial ones (zeros without them)
        final = (initial_states.clone(memory_format=torch.contiguous_format) if initial_states is not None and L == 0
                 else x.new_zeros(Bsz, D, W - 1)) if return_final_states else x.new_empty(0)
        return x.new_empty(Bsz, D, L), final
    impl = _pick("causal_conv1d", x.device, _FORWARD_IMPLS)
    out, final = impl(x.contiguous(), weight.to(ct).contiguous(), _opt(bias, ct), _opt(seq_idx),
                      _opt(initial_states), return_final_states, silu)
    return out, (final if return_final_states else x.new_empty(0))


@_conv_forward_op.register_fake
def _conv_forward_fake(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    Bsz, D, L = x.shape
    final = x.new_empty(Bsz, D, weight.shape[1] - 1) if return_final_states else x.new_empty(0)
    return x.new_empty(Bsz, D, L), final


@torch.library.custom_op("fastnn::causal_conv1d_backward", mutates_args=())
def _conv_backward_op(dout: Tensor, dfinal_states: Optional[Tensor], x: Tensor, weight: Tensor,
                      bias: Optional[Tensor], seq_idx: Optional[Tensor], initial_states: Optional[Tensor],
                      silu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx in x's dtype, dweight in weight's dtype, dbias in bias's dtype (weight's without a bias),
    dinitial_states in x's dtype, or an empty tensor without initial_states)."""
    Bsz, D, L = x.shape
    W = _raw_weight("causal_conv1d_backward", weight, D)
    _raw_shapes("causal_conv1d_backward", dout=(dout, (Bsz, D, L)), dfinal_states=(dfinal_states, (Bsz, D, W - 1)),
                bias=(bias, (D,)), seq_idx=(seq_idx, (Bsz, L)), initial_states=(initial_states, (Bsz, D, W - 1)))
    ct = ref.compute_dtype(x.dtype)
    want_dinit = initial_states is not None
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    if x.numel() == 0:
        dinit = x.new_empty(0)
        if want_dinit:  # L == 0: final_states were the initial states; B or D == 0: nothing
            dinit = (dfinal_states.clone(memory_format=torch.contiguous_format) if dfinal_states is not None and L == 0
                     else initial_states.new_zeros(initial_states.shape))
        return (x.new_zeros(x.shape), weight.new_zeros(weight.shape), weight.new_zeros(D, dtype=bias_dtype), dinit)
    impl = _pick("causal_conv1d_backward", x.device, _BACKWARD_IMPLS)
    dx, dw, db, dinit = impl(dout.contiguous(), _opt(dfinal_states), x.contiguous(), weight.to(ct).contiguous(),
                             _opt(bias, ct), _opt(seq_idx), _opt(initial_states), silu, want_dinit)
    return dx, dw.to(weight.dtype), db.to(bias_dtype), (dinit if want_dinit else x.new_empty(0))


@_conv_backward_op.register_fake
def _conv_backward_fake(dout, dfinal_states, x, weight, bias, seq_idx, initial_states, silu):
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    # dense row-major, as the kernels write them (empty_like would copy a strided input's layout: Mamba's x is
    # a transposed view, and a compiled graph's stride assert failed)
    dinit = initial_states.new_empty(initial_states.shape) if initial_states is not None else x.new_empty(0)
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0], dtype=bias_dtype),
            dinit)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.return_final_states = return_final_states
    ctx.silu = silu


def _conv_backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    dx, dw, db, dinit = _direct.run_op(
        torch.ops.fastnn.causal_conv1d_backward, dout, dfinal if ctx.return_final_states else None, x, weight, bias,
        seq_idx, initial_states, ctx.silu)
    return (dx, dw, db if bias is not None else None, None, dinit if initial_states is not None else None, None,
            None)


_direct.register_autograd(_conv_forward_op, _conv_backward, _conv_setup_context)
_direct.register_backward_op(_conv_backward_op)


# ---------------------------------------------------------------- decode: conv state update

def _update_reference(x, conv_state, weight, bias, silu, conv_state_indices, cache_seqlens):
    return ref.causal_conv1d_update(x, conv_state, weight, bias, "silu" if silu else None, conv_state_indices,
                                    cache_seqlens)


_UPDATE_IMPLS = {
    "reference": _update_reference,
    "cpp": lambda *a: _C.causal_conv1d_update_cpu(*a),
    "triton": lambda *a: _triton_ssm().causal_conv1d_update(*a),
}


def _in_place(state: Tensor, run):
    """run(contiguous state) -> result; a non-contiguous state is updated through a contiguous copy."""
    if state.is_contiguous():
        return run(state)
    tmp = state.contiguous()
    res = run(tmp)
    state.copy_(tmp)
    return res


@torch.library.custom_op("fastnn::causal_conv1d_update", mutates_args=("conv_state",))
def _conv_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                    conv_state_indices: Optional[Tensor], cache_seqlens: Optional[Tensor] = None) -> Tensor:
    """x (B, D, T); conv_state (B_cache, D, S) updated in place (a circular buffer with cache_seqlens).
    Returns out (B, D, T) in x's dtype."""
    Bsz, D, _ = x.shape
    W = _raw_weight("causal_conv1d_update", weight, D)
    if conv_state.dim() != 3 or conv_state.shape[1] != D or conv_state.shape[2] < W - 1:
        raise RuntimeError(f"fastnn causal_conv1d_update: conv_state must be (B_cache, {D}, S >= {W - 1}), got "
                           f"{tuple(conv_state.shape)}")
    _raw_shapes("causal_conv1d_update", bias=(bias, (D,)), cache_seqlens=(cache_seqlens, (Bsz,)))
    _raw_cache_rows("causal_conv1d_update", "conv_state_indices", conv_state_indices, Bsz, conv_state.shape[0])
    return _conv_update_run(x, conv_state, weight, bias, silu, conv_state_indices, cache_seqlens)


def _conv_update_run(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                     conv_state_indices: Optional[Tensor], cache_seqlens: Optional[Tensor]) -> Tensor:
    """The body of the causal_conv1d_update op once its arguments are checked (the op, or the public
    function's direct call: ._direct)."""
    if x.numel() == 0:
        return x.new_empty(x.shape)
    ct = ref.compute_dtype(x.dtype)
    impl = _pick("causal_conv1d_update", x.device, _UPDATE_IMPLS)
    w, b, idx = weight.to(ct).contiguous(), _opt(bias, ct), _opt(conv_state_indices, torch.int32)
    lens = _opt(cache_seqlens, torch.int32)
    return _in_place(conv_state, lambda st: impl(x.contiguous(), st, w, b, silu, idx, lens))


@_conv_update_op.register_fake
def _conv_update_fake(x, conv_state, weight, bias, silu, conv_state_indices, cache_seqlens=None):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- decode: selective state update

_SSU_IMPLS = {
    "reference": ref.selective_state_update,
    "cpp": lambda *a: _C.selective_state_update_cpu(*a),
    "triton": lambda *a: _triton_ssm().selective_state_update(*a),
}


@torch.library.custom_op("fastnn::selective_state_update", mutates_args=("state",))
def _ssu_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
            state_batch_indices: Optional[Tensor]) -> Tensor:
    """Head form: state (B_cache, H, P, N) updated in place; x, dt, z (B, H, P); A (H, P, N); B, C (B, G, N);
    D, dt_bias (H, P). Returns out (B, H, P) in x's dtype."""
    op = "selective_state_update"
    if state.dim() != 4 or x.dim() != 3 or B.dim() != 3:
        raise RuntimeError(f"fastnn {op}: the head form takes state (B_cache, H, P, N), x (B, H, P) and B, C "
                           f"(B, G, N); got {tuple(state.shape)}, {tuple(x.shape)}, {tuple(B.shape)}")
    Bsz, H, P = x.shape
    N, G = state.shape[3], B.shape[1]
    if G == 0 or H % G:
        raise RuntimeError(f"fastnn {op}: B's groups ({G}) must divide the heads ({H})")
    _raw_shapes(op, state=(state, (state.shape[0], H, P, N)), dt=(dt, (Bsz, H, P)), z=(z, (Bsz, H, P)),
                A=(A, (H, P, N)), B=(B, (Bsz, G, N)), C=(C, (Bsz, G, N)), D=(D, (H, P)), dt_bias=(dt_bias, (H, P)))
    _raw_cache_rows(op, "state_batch_indices", state_batch_indices, Bsz, state.shape[0])
    return _ssu_run(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def _ssu_run(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
             state_batch_indices: Optional[Tensor]) -> Tensor:
    """The body of the selective_state_update op once its arguments are checked (the op, or the public
    function's direct call: ._direct): the head form, or mamba 1's 3-D form (every kernel takes both)."""
    if x.numel() == 0:
        return x.new_empty(x.shape)
    ct = ref.compute_dtype(state.dtype)
    impl = _pick("selective_state_update", x.device, _SSU_IMPLS)
    args = (x.contiguous(), dt.contiguous(), _opt(A, ct), B.contiguous(), C.contiguous(), _opt(D, ct),
            _opt(z), _opt(dt_bias, ct), dt_softplus, _opt(state_batch_indices, torch.int32))
    return _in_place(state, lambda st: impl(st, *args))


@_ssu_op.register_fake
def _ssu_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- validation helpers

def _dtype_is(t: Tensor, name: str, dtype: torch.dtype, what: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must have {what} ({str(dtype).replace('torch.', '')}); got {t.dtype}")


def _activation(activation) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    return activation is not None


def _check_weight(weight, bias, D: int, device_ref: Tensor) -> int:
    _checks.tensor(weight, "weight", dtypes=_checks.FLOAT_DTYPES, shape=(D, None))
    W = weight.shape[1]
    if not 2 <= W <= 4:
        raise ValueError(f"weight must have width W in 2..4 (shape (D, W)); got W = {W}")
    _checks.same_device("x", device_ref, weight=weight)
    if bias is not None:
        _checks.tensor(bias, "bias", dtypes=_checks.FLOAT_DTYPES, shape=(D,))
        _checks.same_device("x", device_ref, bias=bias)
    return W


def _writable_in_place(t: Tensor, name: str) -> None:
    """A state updated in place must not be an expanded view (several of its elements one memory location)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} is updated in place, so it must not be an expanded (stride 0) view; got shape "
                         f"{tuple(t.shape)} with strides {t.stride()} (pass a .clone())")


def _check_indices(idx, name: str, batch: int, cache_rows: int, x: Tensor) -> None:
    _checks.tensor(idx, name, integer=True, shape=(batch,))
    _checks.same_device("x", x, **{name: idx})
    # value checks on CPU tensors only (on CUDA they would cost a host sync every decode step)
    if idx.device.type == "cpu" and idx.numel():
        _checks.values(((idx >= 0) & (idx < cache_rows)).all(),
                       lambda: f"{name} must be in [0, {_checks.size_text(cache_rows, 'cache rows')}) (the cache's "
                               f"batch size); got {_checks.shown(idx)}")
        # two rows updating one cache row would race on the GPU and apply in turn on the CPU: refused
        # counted per cache row, not by sort().diff(): a compiled graph would specialise to batch 2 (a diff of one)
        uses = torch.zeros(cache_rows, dtype=torch.int32).index_add_(
            0, idx.long().clamp(0, max(cache_rows - 1, 0)), torch.ones(idx.shape, dtype=torch.int32))
        _checks.values((uses <= 1).all(),
                       lambda: f"{name} must be distinct (each cache row updated by one batch row); got "
                               f"{_checks.shown(idx)}")


# ---------------------------------------------------------------- public functions

def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                     initial_states: Optional[Tensor] = None, return_final_states: bool = False,
                     final_states_out: Optional[Tensor] = None, activation: Optional[str] = None):
    """Depthwise causal 1-D convolution, a drop-in for ``causal_conv1d.causal_conv1d_fn``.

    ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k])``, where steps before 0
    read ``initial_states`` (zeros when absent) and, with ``seq_idx``, terms from another sequence than
    step t's are dropped (packed variable-length sequences). Semantics: fastnn/reference/ssm.py.

    Args:
        x: (B, D, L) input, float16 / bfloat16 / float32 / float64, CPU or CUDA; any strides.
        weight: (D, W) depthwise kernel, W in 2..4, any float dtype (used in float32; float64 for float64 x).
        bias: optional (D,) bias, any float dtype.
        seq_idx: optional (B, L) int32 sequence id of every step; no term crosses a change of id. Steps
            before 0 (initial_states) belong to the row's first sequence.
        initial_states: optional (B, D, W - 1) inputs before step 0 (oldest first), x's dtype.
        return_final_states: also return final_states (B, D, W - 1): the last W - 1 inputs of each row
            (from initial_states when L < W - 1), zeroed where they belong to another sequence than the
            row's last step.
        final_states_out: optional (B, D, W - 1) tensor in x's dtype that receives final_states (needs
            return_final_states); it is returned in place of a new tensor.
        activation: None, "silu" or "swish" (the same as "silu").

    Returns:
        out (B, D, L) in x's dtype, or (out, final_states) when return_final_states. Differentiable with
        respect to x, weight, bias and initial_states (deterministic backward kernels).

    Every combination of seq_idx, initial_states and final states is supported (causal-conv1d refuses
    seq_idx together with states). L = 0 gives an empty output and final_states equal to initial_states.
    """
    _checks.tensor(x, "x", dtypes=_checks.FLOAT_DTYPES, shape=(None, None, None))
    Bsz, D, L = x.shape
    W = _check_weight(weight, bias, D, x)
    silu = _activation(activation)
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool, got {type(return_final_states).__name__}")
    if seq_idx is not None:
        _checks.tensor(seq_idx, "seq_idx", integer=True, shape=(Bsz, L))
        _dtype_is(seq_idx, "seq_idx", torch.int32, "dtype int32")
        _checks.same_device("x", x, seq_idx=seq_idx)
    if initial_states is not None:
        _checks.tensor(initial_states, "initial_states", dtypes=_checks.FLOAT_DTYPES, shape=(Bsz, D, W - 1))
        _dtype_is(initial_states, "initial_states", x.dtype, "x's dtype")
        _checks.same_device("x", x, initial_states=initial_states)
    if final_states_out is not None:
        if not return_final_states:
            raise ValueError("final_states_out needs return_final_states=True")
        _checks.tensor(final_states_out, "final_states_out", dtypes=_checks.FLOAT_DTYPES, shape=(Bsz, D, W - 1))
        _dtype_is(final_states_out, "final_states_out", x.dtype, "x's dtype")
        _checks.same_device("x", x, final_states_out=final_states_out)
    out, final = _direct.run_op(torch.ops.fastnn.causal_conv1d_forward, x, weight, bias, seq_idx, initial_states,
                                                        return_final_states, silu)
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None, cache_seqlens: Optional[Tensor] = None,
                         conv_state_indices: Optional[Tensor] = None) -> Tensor:
    """Decode step(s) of the causal conv1d, a drop-in for ``causal_conv1d.causal_conv1d_update``.

    The new inputs are appended to ``conv_state`` (the last S inputs, oldest first), the conv is evaluated
    at the new steps, and ``conv_state`` is shifted in place so that it again holds the last S inputs.
    Running it token by token reproduces :func:`causal_conv1d_fn` and its final states.

    Args:
        x: (B, D) one new step, or (B, D, T) T new steps; float16 / bfloat16 / float32 / float64.
        conv_state: (B_cache, D, S) with S >= W - 1, x's dtype, same device; updated in place. B_cache == B
            without conv_state_indices.
        weight: (D, W), W in 2..4, any float dtype. bias: optional (D,).
        activation: None, "silu" or "swish".
        cache_seqlens: optional (B,) integer tensor >= 0: conv_state is then a circular buffer (causal-conv1d's
            semantics): the W - 1 inputs before the new steps are read at positions cache_seqlens[b] - W + 1 ..
            cache_seqlens[b] - 1 (mod S) and the new steps written at cache_seqlens[b] .. + T - 1 (mod S), the
            rest of the buffer untouched. The caller advances cache_seqlens. Values are checked for CPU tensors.
        conv_state_indices: optional (B,) integer tensor: row b uses conv_state[conv_state_indices[b]]
            (continuous batching). Rows must be distinct; range and distinctness are checked for CPU tensors.
            On CUDA (no host sync per step) a row whose index is outside [0, B_cache) touches no cache row and
            returns NaN.

    Returns:
        out shaped like x, in x's dtype. A decode step has no backward (it updates conv_state in place), as
        causal-conv1d's has none: out carries no gradient history.
    """
    _checks.tensor(x, "x", dtypes=_checks.FLOAT_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (B, D) or (B, D, T), got {tuple(x.shape)}")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    Bsz, D, _ = x3.shape
    W = _check_weight(weight, bias, D, x)
    silu = _activation(activation)
    _checks.tensor(conv_state, "conv_state", dtypes=_checks.FLOAT_DTYPES, shape=(None, D, None))
    _dtype_is(conv_state, "conv_state", x.dtype, "x's dtype")
    _checks.same_device("x", x, conv_state=conv_state)
    _writable_in_place(conv_state, "conv_state")
    if conv_state.shape[2] < W - 1:
        raise ValueError(f"conv_state must hold at least W - 1 = {W - 1} steps (shape (B_cache, D, S >= W - 1)); "
                         f"got S = {conv_state.shape[2]}")
    if conv_state_indices is not None:
        _check_indices(conv_state_indices, "conv_state_indices", Bsz, conv_state.shape[0], x)
    elif conv_state.shape[0] != Bsz:
        raise ValueError(f"conv_state must have batch size {Bsz} (x's) without conv_state_indices; "
                         f"got {conv_state.shape[0]}")
    if cache_seqlens is not None:
        _checks.tensor(cache_seqlens, "cache_seqlens", integer=True, shape=(Bsz,))
        _checks.same_device("x", x, cache_seqlens=cache_seqlens)
        if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
            wide = cache_seqlens.long()  # (2^31 as an int32 scalar would wrap around)
            _checks.values(((wide >= 0) & (wide < 2 ** 31)).all(),
                           lambda: f"cache_seqlens must be in [0, 2^31); got {_checks.shown(cache_seqlens)}")
    if _direct.plain_eager(x, conv_state, weight, bias, conv_state_indices, cache_seqlens):
        out = _direct.run_mutating(_conv_update_run, conv_state, x3, conv_state, weight, bias, silu,
                                   conv_state_indices, cache_seqlens)
    else:
        with torch.no_grad():  # no backward (see Returns)
            out = torch.ops.fastnn.causal_conv1d_update(x3, conv_state, weight, bias, silu, conv_state_indices,
                                                        cache_seqlens)
    return out.squeeze(-1) if squeeze else out


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False, state_batch_indices: Optional[Tensor] = None) -> Tensor:
    """One recurrent step of the selective scan, a drop-in for
    ``mamba_ssm.ops.triton.selective_state_update.selective_state_update``; ``state`` is updated in place.

    Per channel (h, p) and state entry n, with dt' = softplus(dt + dt_bias) (softplus when dt_softplus):
    ``state = exp(dt' A) state + dt' B x``, ``out = sum_n state C + D x``, times ``silu(z)`` when z is given.

    Args:
        state: (B_cache, D, N) (mamba 1) or (B_cache, H, P, N) (mamba 2); float16 / bfloat16 / float32 /
            float64; x's dtype or float32 (float64 x needs a float64 state). N <= 256.
        x: (B, D) or (B, H, P). dt: like x, x's dtype.
        A: (D, N) or (H, P, N), any float dtype (used in float32; float64 for a float64 state).
        B, C: (B, N) or (B, G, N) with H divisible by G (head h reads group h // (H / G)), x's dtype.
        D: optional (D,) or (H, P) skip. z: optional gate like x, x's dtype. dt_bias: optional like D.
        dt_softplus: apply softplus (threshold 20) to dt + dt_bias.
        state_batch_indices: optional (B,) integer tensor: row b updates state[state_batch_indices[b]]
            (continuous batching). Rows must be distinct; range and distinctness are checked for CPU tensors.
            On CUDA (no host sync per step) a row whose index is outside [0, B_cache) touches no state row
            and returns NaN. Without it, B_cache must equal B.

    Returns:
        out shaped like x, in x's dtype. Math in float32 (float64 for a float64 state); the state keeps its
        dtype. A decode step has no backward (it updates the state in place), as mamba's Triton step has
        none: out carries no gradient history (a backward through it stops there, instead of failing).
    """
    _checks.tensor(state, "state", dtypes=_checks.FLOAT_DTYPES)
    if state.dim() not in (3, 4):
        raise ValueError(f"state must have shape (B_cache, D, N) or (B_cache, H, P, N), got {tuple(state.shape)}")
    three_d = state.dim() == 3
    N = state.shape[-1]
    if N > MAX_STATE_SIZE:
        raise ValueError(f"state size N must be <= {MAX_STATE_SIZE}; got {N}")
    _checks.tensor(x, "x", dtypes=_checks.FLOAT_DTYPES)
    if three_d:
        Dm = state.shape[1]
        _checks.tensor(x, "x", shape=(None, Dm))
        Bsz = x.shape[0]
        H, P = 1, Dm
        xs, chan, bc = (Bsz, Dm), (Dm,), (Bsz, N)
    else:
        H, P = state.shape[1], state.shape[2]
        _checks.tensor(x, "x", shape=(None, H, P))
        Bsz = x.shape[0]
        _checks.tensor(B, "B", dtypes=_checks.FLOAT_DTYPES)
        G = B.shape[1] if B.dim() == 3 else None
        if G is not None and (G == 0 or H % G != 0):
            raise ValueError(f"B and C must have a number of groups G dividing the number of heads H = {H}; "
                             f"got G = {G}")
        xs, chan, bc = (Bsz, H, P), (H, P), (Bsz, G, N)
    if state.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"state must have x's dtype ({x.dtype}) or float32; got {state.dtype}")
    if (x.dtype == torch.float64) != (state.dtype == torch.float64):
        raise TypeError(f"float64 x needs a float64 state (and the reverse); got x {x.dtype}, state {state.dtype}")
    _checks.same_device("x", x, state=state)
    _writable_in_place(state, "state")
    _checks.tensor(dt, "dt", dtypes=_checks.FLOAT_DTYPES, shape=xs)
    _dtype_is(dt, "dt", x.dtype, "x's dtype")
    _checks.tensor(A, "A", dtypes=_checks.FLOAT_DTYPES, shape=chan + (N,))
    for name, t in (("B", B), ("C", C)):
        _checks.tensor(t, name, dtypes=_checks.FLOAT_DTYPES, shape=bc)
        _dtype_is(t, name, x.dtype, "x's dtype")
    _checks.same_device("x", x, dt=dt, A=A, B=B, C=C)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _checks.tensor(t, name, dtypes=_checks.FLOAT_DTYPES, shape=chan)
            _checks.same_device("x", x, **{name: t})
    if z is not None:
        _checks.tensor(z, "z", dtypes=_checks.FLOAT_DTYPES, shape=xs)
        _dtype_is(z, "z", x.dtype, "x's dtype")
        _checks.same_device("x", x, z=z)
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    if state_batch_indices is not None:
        _check_indices(state_batch_indices, "state_batch_indices", Bsz, state.shape[0], x)
    elif state.shape[0] != Bsz:
        raise ValueError(f"state must have batch size {Bsz} (x's) without state_batch_indices; got {state.shape[0]}")
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    if _direct.plain_eager(*args, state_batch_indices):  # the body takes both forms
        return _direct.run_mutating(_ssu_run, state, *args, dt_softplus, state_batch_indices)
    if three_d:  # the op's schema is the head form: H = 1 (views: the state is updated through them)
        args = tuple(None if t is None else t.unsqueeze(0 if k in (3, 6, 8) else 1) for k, t in enumerate(args))
    with torch.no_grad():  # no backward (see Returns)
        out = torch.ops.fastnn.selective_state_update(*args, dt_softplus, state_batch_indices)
    return out.squeeze(1) if three_d else out
