"""Layer-normalised LSTM with zoneout (haste's LayerNormLSTM, torch's gate order), beyond torch.nn.

Custom ops (``torch.ops.fastnn.*``): layer_norm_lstm_layer_forward (one layer, one direction, a whole
time-major packed batch) and layer_norm_lstm_layer_backward (its backward through time). Contract:
csrc/families/rnn_ln.h; semantics: fastnn/reference/rnn.py (layer_norm_lstm_layer).
Kernels:
  CPU   C++ (csrc/cpu/rnn_ln_cpu.cpp): the input projection and its layer norm for all steps up front, per
        step one GEMM with W_hh and a fused pass per row (layer norms, gates, cell, zoneout); weight
        gradients as one GEMM each after the recurrence. fp16 / bf16 run in float32 and are rounded back.
  CUDA  Triton (kernels/rnn_ln.py): the same structure, per step one cuBLAS GEMM and one launch of the fused
        cell (a program per row), forward and backward; float32 inside, like the CPU kernel (fp16 / bf16 are
        lifted to float32 and rounded back). float64 runs the reference.
Zoneout masks are drawn here with torch's RNG (Bernoulli(z) per unit, step, layer and direction) and given
to the kernel, so a seed reproduces them and tests can pass their own.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .._backend import _C, dense_copies, pick
from ..reference import rnn as ref
from . import _checks, _direct
from .rnn import (RNN_DTYPES, _compute_dtype, _contig, _fresh_empties, _lift, _refuse_dense, autocast_off,
                  check_dense, check_dropout, check_stacked_weights, empty_batch_outputs, initial_states,
                  keeps_workspace, pack_input, run_stacked, unpack_output, workspace_dtype)

try:  # the Triton cells (CUDA; CPU tensors under TRITON_INTERPRET=1)
    from ..kernels import rnn_ln as _triton_ln
except ImportError:  # triton missing, or kernels without this family
    _triton_ln = None

_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_WEIGHT_NAMES = ref.LayerNormLSTMWeights._fields  # w_ih, w_hh, bias, ln_ih_weight, ..., ln_cell_bias
_STATS = 6  # mean and rstd of x W_ih^T, h W_hh^T and c' per row (csrc/families/rnn_ln.h)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _workspace_shapes(rows: int, H: int) -> Tuple[Tuple[int, ...], ...]:
    """gates, x_proj, h_proj (rows, 4H); cells (rows, H); stats (rows, 6)."""
    return (rows, 4 * H), (rows, 4 * H), (rows, 4 * H), (rows, H), (rows, _STATS)


def _zoneout_keep(zoneout_mask: Optional[Tensor], zoneout: float) -> Union[None, float, Tensor]:
    """The reference's zoneout argument: the mask (training), the constant z (evaluation), or None."""
    if zoneout_mask is not None:
        return zoneout_mask
    return zoneout if zoneout != 0 else None


# ---------------------------------------------------------------- kernel entry points per backend

def _forward_reference(x, batch_sizes, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                       ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask, zoneout, reverse, train):
    """The reference keeps no workspace: its backward recomputes the layer under torch.func.vjp."""
    weights = ref.LayerNormLSTMWeights(w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                                       ln_cell_weight, ln_cell_bias)
    with torch.no_grad():
        y, h, c = ref.layer_norm_lstm_layer(x, batch_sizes.tolist(), weights, h0, c0,
                                            _zoneout_keep(zoneout_mask, zoneout), reverse)
    h, c = dense_copies([h, c])  # with no steps, h0 and c0 themselves
    return [y, h, c] + [x.new_empty(0, dtype=workspace_dtype(x.dtype)) for _ in range(5)]


def _backward_reference(dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight,
                        ln_hh_bias, ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask, zoneout, y, gates, x_proj,
                        h_proj, cells, stats, reverse, want_dx, want_dweights):
    names = ("x",) + _WEIGHT_NAMES + ("h0", "c0")
    given = dict(zip(names, (x, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
                             ln_cell_bias, h0, c0)))
    keys = [k for k in names if given[k] is not None]
    sizes = batch_sizes.tolist()
    keep = _zoneout_keep(zoneout_mask, zoneout)

    def layer(*xs):
        a = dict(zip(keys, xs))
        weights = ref.LayerNormLSTMWeights(*(a.get(k) for k in _WEIGHT_NAMES))
        return ref.layer_norm_lstm_layer(a["x"], sizes, weights, a["h0"], a["c0"], keep, reverse)

    _, vjp = torch.func.vjp(layer, *[given[k] for k in keys])
    grads = dict(zip(keys, vjp((dy, dh_n, dc_n))))
    return dense_copies([grads.get(k) for k in names])


def _forward_cpp(x, *args):
    """fp16 / bf16 run in float32: y, h_n, c_n are rounded back, the workspace stays float32."""
    y, h, c, *workspace = _C.layer_norm_lstm_forward_cpu(*_lift([x, *args]))
    return [t.to(x.dtype) for t in (y, h, c)] + workspace


def _backward_cpp(dy, *args):
    return [g.to(dy.dtype) for g in _C.layer_norm_lstm_backward_cpu(*_lift([dy, *args]))]


def _forward_triton(x, *args):
    """fp16 / bf16 run in float32 as in _forward_cpp: y, h_n, c_n are rounded back, the workspace stays float32."""
    lifted = _lift([x, *args])
    _check_kernel_layer("layer_norm_lstm_layer_forward", *lifted[:14])
    y, h, c, *workspace = _triton_ln.layer_norm_lstm_forward(*lifted)
    return _fresh_empties([t.to(x.dtype) for t in (y, h, c)] + workspace)


def _backward_triton(dy, *args):
    lifted = _lift([dy, *args])
    _check_kernel_backward(*lifted[:17], *lifted[18:24])
    return _fresh_empties([g.to(dy.dtype) for g in _triton_ln.layer_norm_lstm_backward(*lifted)])


# The Triton kernels' own checks (rnn.py's check_dense, which says why): the C++ kernel's (csrc/cpu/rnn_ln_cpu.cpp
# check_layer, check_dense), on the arguments as lifted to float32, before any launch.

def _check_kernel_layer(who: str, x: Tensor, batch_sizes: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                        ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor,
                        ln_cell_weight: Tensor, ln_cell_bias: Tensor, h0: Tensor, c0: Tensor,
                        zoneout_mask: Optional[Tensor]) -> Tuple[int, int, int]:
    """The forward's arguments as the kernels read them -> (rows, H, B). batch_sizes is the launcher's to check
    (kernels/rnn.py _Layer)."""
    try:  # (unpacking: cheaper than checking dim() first)
        rows, I = x.shape
        G4, H = w_hh.shape
        B = h0.shape[0]  # h0's whole shape is check_dense's
        ok = G4 == 4 * H
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise _checks.SizeMismatchError(f"{who}: x must be (rows, input_size), w_hh (4 * hidden_size, hidden_size) and "
                                        f"h0 (batch, hidden_size); got x {tuple(x.shape)}, w_hh {tuple(w_hh.shape)}, "
                                        f"h0 {tuple(h0.shape)}")
    if not x.is_contiguous():  # (x's shape, dtype and device are the reference)
        _refuse_dense(who, "x", x, (rows, I), x, False)
    check_dense(who, x, (("w_ih", w_ih, (G4, I)), ("w_hh", w_hh, (G4, H)), ("bias", bias, (G4,)),
                         ("ln_ih_weight", ln_ih_weight, (G4,)), ("ln_ih_bias", ln_ih_bias, (G4,)),
                         ("ln_hh_weight", ln_hh_weight, (G4,)), ("ln_hh_bias", ln_hh_bias, (G4,)),
                         ("ln_cell_weight", ln_cell_weight, (H,)), ("ln_cell_bias", ln_cell_bias, (H,)),
                         ("h0", h0, (B, H)), ("c0", c0, (B, H)), ("zoneout_mask", zoneout_mask, (rows, H))))
    return rows, H, B


def _check_kernel_backward(dy: Tensor, dh_n: Tensor, dc_n: Tensor, *args) -> None:
    """The backward's arguments as the kernels read them: dy, dh_n, dc_n, the forward's 14 tensor arguments (x to
    zoneout_mask), then y and the workspace gates, x_proj, h_proj, cells, stats."""
    who = "layer_norm_lstm_layer_backward"
    x = args[0]
    rows, H, B = _check_kernel_layer(who, *args[:14])
    y, gates, x_proj, h_proj, cells, stats = args[14:]
    check_dense(who, x, (("dy", dy, (rows, H)), ("dh_n", dh_n, (B, H)), ("dc_n", dc_n, (B, H)), ("y", y, (rows, H)),
                         ("gates", gates, (rows, 4 * H)), ("x_proj", x_proj, (rows, 4 * H)),
                         ("h_proj", h_proj, (rows, 4 * H)), ("cells", cells, (rows, H)),
                         ("stats", stats, (rows, _STATS))))


_FORWARD_IMPLS = {"reference": _forward_reference, "cpp": _forward_cpp}
_BACKWARD_IMPLS = {"reference": _backward_reference, "cpp": _backward_cpp}
if _triton_ln is not None:
    _FORWARD_IMPLS["triton"] = _forward_triton
    _BACKWARD_IMPLS["triton"] = _backward_triton


def _pick(op: str, x: Tensor, impls: dict):
    if x.dtype == torch.float64 and x.device.type == "cuda":
        impls = {k: v for k, v in impls.items() if k != "triton"}  # the Triton cells are float32
    return pick(op, x.device, impls, _PREFERENCE.get(x.device.type, ()))


def _keeps_workspace(x: Tensor) -> bool:
    """Whether the forward that runs for x keeps a workspace (every backend but the reference)."""
    return _pick("layer_norm_lstm_layer", x, _FORWARD_IMPLS) is not _forward_reference


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fastnn::layer_norm_lstm_layer_forward", mutates_args=())
def _layer_forward_op(x: Tensor, batch_sizes: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                      ln_ih_weight: Tensor, ln_ih_bias: Tensor, ln_hh_weight: Tensor, ln_hh_bias: Tensor,
                      ln_cell_weight: Tensor, ln_cell_bias: Tensor, h0: Tensor, c0: Tensor,
                      zoneout_mask: Optional[Tensor], zoneout: float, reverse: bool,
                      train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y (rows, H), h_n, c_n (B, H), and the backward's workspace gates, x_proj, h_proj, cells, stats)."""
    impl = _pick("layer_norm_lstm_layer", x, _FORWARD_IMPLS)
    return tuple(impl(x, batch_sizes, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                      ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask, zoneout, reverse, train))


@_layer_forward_op.register_fake
def _layer_forward_fake(x, batch_sizes, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                        ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask, zoneout, reverse, train):
    # the workspace's shapes follow the backend (the reference keeps none), as its pick does in the real op
    shapes = _workspace_shapes(x.shape[0], h0.shape[1]) if train and _keeps_workspace(x) else ((0,),) * 5
    ws_dtype = workspace_dtype(x.dtype)
    return (x.new_empty(x.shape[0], h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            *(x.new_empty(s, dtype=ws_dtype) for s in shapes))


@torch.library.custom_op("fastnn::layer_norm_lstm_layer_backward", mutates_args=())
def _layer_backward_op(dy: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, batch_sizes: Tensor, w_ih: Tensor,
                       w_hh: Tensor, bias: Optional[Tensor], ln_ih_weight: Tensor, ln_ih_bias: Tensor,
                       ln_hh_weight: Tensor, ln_hh_bias: Tensor, ln_cell_weight: Tensor, ln_cell_bias: Tensor,
                       h0: Tensor, c0: Tensor, zoneout_mask: Optional[Tensor], zoneout: float, y: Tensor,
                       gates: Tensor, x_proj: Tensor, h_proj: Tensor, cells: Tensor, stats: Tensor, reverse: bool,
                       want_dx: bool, want_dweights: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_ih, dw_hh, dbias, d_ln_ih_weight, d_ln_ih_bias, d_ln_hh_weight, d_ln_hh_bias, d_ln_cell_weight,
    d_ln_cell_bias, dh0, dc0); an empty tensor where not wanted or absent."""
    # The backward of the forward that made the workspace: an empty one comes from the reference's forward
    # (run under use_backend("reference")), whose backward recomputes instead of reading it.
    impl = _backward_reference if gates.numel() == 0 else _pick("layer_norm_lstm_layer_backward", x, _BACKWARD_IMPLS)
    got = impl(dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
               ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask, zoneout, y, gates, x_proj, h_proj, cells, stats,
               reverse, want_dx, want_dweights)
    wanted = (want_dx,) + (want_dweights,) * len(_WEIGHT_NAMES) + (True, True)
    # the reference differentiates everything; drop what was not asked for so both backends agree
    return tuple(g if (g is not None and on and g.numel()) else _empty(x) for g, on in zip(got, wanted))


@_layer_backward_op.register_fake
def _layer_backward_fake(dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight,
                         ln_hh_bias, ln_cell_weight, ln_cell_bias, h0, c0, zoneout_mask, zoneout, y, gates, x_proj,
                         h_proj, cells, stats, reverse, want_dx, want_dweights):
    # dense row-major, as every backend returns them (empty_like would copy a strided input's layout)
    like = lambda t, on: t.new_empty(t.shape) if (t is not None and on) else _empty(x)  # noqa: E731
    weights = (w_ih, w_hh, bias, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias)
    return (like(x, want_dx), *(like(w, want_dweights) for w in weights), like(h0, True), like(c0, True))


_FORWARD_ARGS = ("x", "batch_sizes") + _WEIGHT_NAMES + ("h0", "c0", "zoneout_mask", "zoneout", "reverse", "train")
_DIFFERENTIABLE = ("x",) + _WEIGHT_NAMES + ("h0", "c0")  # in the order of the backward op's results


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FORWARD_ARGS, inputs))
    ctx.save_for_backward(*(a[k] for k in ("x", "batch_sizes") + _WEIGHT_NAMES + ("h0", "c0", "zoneout_mask")),
                          *output[:1], *output[3:])
    ctx.zoneout, ctx.reverse = a["zoneout"], a["reverse"]


def _backward(ctx, dy, dh_n, dc_n, *_workspace_grads):
    saved = ctx.saved_tensors
    x, batch_sizes = saved[:2]
    weights = saved[2:11]
    h0, c0, zoneout_mask, y = saved[11:15]
    workspace = saved[15:]
    need = dict(zip(_FORWARD_ARGS, ctx.needs_input_grad))
    dy = torch.zeros_like(y) if dy is None else dy.contiguous()
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n.contiguous()
    want_dweights = any(need[k] for k in _WEIGHT_NAMES)
    # (under create_graph=True, and torch.func.grad, the op's own autograd differentiates these gradients again
    # through the reference: _backward_backward)
    backward = functools.partial(_direct.run_op, torch.ops.fastnn.layer_norm_lstm_layer_backward)
    grads = backward(dy, dh_n, dc_n, x, batch_sizes, *weights, h0, c0, zoneout_mask, ctx.zoneout, y, *workspace,
                     ctx.reverse, need["x"], want_dweights)
    by_name = dict(zip(_DIFFERENTIABLE, grads))
    return tuple(by_name[k] if k in by_name and need[k] else None for k in _FORWARD_ARGS)


_BACKWARD_ARGS = (("dy", "dh_n", "dc_n", "x", "batch_sizes") + _WEIGHT_NAMES
                  + ("h0", "c0", "zoneout_mask", "zoneout", "y", "gates", "x_proj", "h_proj", "cells", "stats",
                     "reverse", "want_dx", "want_dweights"))
_BACKWARD_PRIMALS = ("dy", "dh_n", "dc_n") + _DIFFERENTIABLE


def _backward_setup_context(ctx, inputs, output):
    a = dict(zip(_BACKWARD_ARGS, inputs))
    ctx.save_for_backward(a["batch_sizes"], a["zoneout_mask"], *(a[k] for k in _BACKWARD_PRIMALS))
    ctx.zoneout, ctx.reverse = a["zoneout"], a["reverse"]


def _backward_backward(ctx, *cotangents):
    """layer_norm_lstm_layer_backward's own backward, through the reference (as rnn's _backward_backward)."""
    batch_sizes, zoneout_mask, *primals = ctx.saved_tensors

    def first_order(dy, dh_n, dc_n, x, *rest):
        weights, (h0, c0) = rest[:-2], rest[-2:]
        return _backward_reference(dy, dh_n, dc_n, x, batch_sizes, *weights, h0, c0, zoneout_mask, ctx.zoneout, None,
                                   None, None, None, None, None, ctx.reverse, True, True)

    grads = dict(zip(_BACKWARD_PRIMALS, _direct.second_order(first_order, primals, cotangents)))
    return tuple(grads.get(k) for k in _BACKWARD_ARGS)


_direct.register_autograd(_layer_forward_op, _backward, _setup_context)
_direct.register_autograd(_layer_backward_op, _backward_backward, _backward_setup_context)


# ---------------------------------------------------------------- validation

def _check_layer_weights(w: Sequence[Optional[Tensor]], where: str) -> Tuple[int, int, int]:
    """Checks one layer's weights (a LayerNormLSTMWeights or a 9-tuple in its order) -> (input_size, H, H)."""
    if len(w) != len(_WEIGHT_NAMES):
        raise ValueError(f"{where[:-1]} must hold the {len(_WEIGHT_NAMES)} tensors {', '.join(_WEIGHT_NAMES)}; "
                         f"got {len(w)}")
    w = ref.LayerNormLSTMWeights(*w)
    _checks.tensor(w.w_ih, f"{where}w_ih", dtypes=RNN_DTYPES)
    _checks.tensor(w.w_hh, f"{where}w_hh", dtypes=RNN_DTYPES)
    if w.w_ih.dim() != 2 or w.w_ih.shape[0] % 4 or w.w_ih.shape[0] == 0:
        raise ValueError(f"{where}w_ih must be (4 * hidden_size, input_size); got {tuple(w.w_ih.shape)}")
    H = w.w_ih.shape[0] // 4
    _checks.tensor(w.w_hh, f"{where}w_hh", shape=(4 * H, H))
    for name in _WEIGHT_NAMES[2:]:
        t = getattr(w, name)
        if t is None and name == "bias":
            continue
        if t is None:
            raise ValueError(f"{where}{name} must be a tensor (only bias may be None)")
        _checks.tensor(t, f"{where}{name}", dtypes=RNN_DTYPES, shape=(H,) if name.startswith("ln_cell") else (4 * H,))
    for name in _WEIGHT_NAMES[1:]:
        t = getattr(w, name)
        if t is not None:
            _checks.same_device(f"{where}w_ih", w.w_ih, **{f"{where}{name}": t})
            if t.dtype != w.w_ih.dtype:
                raise TypeError(f"{where}{name} has dtype {t.dtype} but {where}w_ih has {w.w_ih.dtype}; "
                                "expected one dtype")
    return w.w_ih.shape[1], H, H


def _check_zoneout(zoneout) -> float:
    zoneout = _checks.real_number(zoneout, "zoneout")
    if not 0.0 <= zoneout <= 1.0:
        raise ValueError(f"zoneout must be in [0, 1], got {zoneout}")
    return zoneout


def draw_zoneout_mask(rows: int, H: int, zoneout: float, device, dtype) -> Tensor:
    """A training step's zoneout mask for one layer and direction, (rows, H) Bernoulli(zoneout) draws from
    torch's default generator. (Out of place: under torch.vmap(randomness="different") each entry draws its
    own; an in-place draw on the unbatched tensor is refused there.)"""
    return torch.bernoulli(torch.full((rows, H), zoneout, device=device, dtype=dtype))


def _layer(x: Tensor, batch_sizes: Tensor, weights: ref.LayerNormLSTMWeights, h0: Tensor, c0: Tensor,
           zoneout_mask: Optional[Tensor], zoneout: float, reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One validated layer and direction: runs the custom op (empty inputs answered here). zoneout_mask
    (rows, H) in training, else the constant zoneout (0: none)."""
    tensors = (x, *weights, h0, c0)
    if x.shape[0] == 0 or h0.shape[0] == 0:
        return empty_batch_outputs(x, h0, c0, tensors)
    train = keeps_workspace(tensors)
    y, h, c, *_ = _direct.run_op(
        torch.ops.fastnn.layer_norm_lstm_layer_forward, x.contiguous(), batch_sizes, *(_contig(w) for w in weights),
        h0.contiguous(), c0.contiguous(), _contig(zoneout_mask), float(zoneout), reverse, train)
    return y, h, c


# ---------------------------------------------------------------- public function

def layer_norm_lstm(input: Union[Tensor, PackedSequence], hx: Optional[Tuple[Tensor, Tensor]],
                    weights: Sequence[Sequence[Optional[Tensor]]], *, num_layers: int, bidirectional: bool = False,
                    batch_first: bool = False, dropout: float = 0.0, zoneout: float = 0.0, training: bool = False,
                    zoneout_masks: Optional[Sequence[Tensor]] = None):
    """A stacked (bi)directional layer-normalised LSTM with zoneout -> ``(output, (h_n, c_n))``.

    The math (haste's LayerNormLSTM in torch's gate order): fastnn.reference.rnn.layer_norm_lstm_layer.
      input     (T, B, I) ((B, T, I) with batch_first), unbatched (T, I), or a PackedSequence (lengths in any
                order): as fastnn.nn.LSTM takes it
      hx        None (zeros) or (h0, c0), each (num_layers * directions, B, H), or (num_layers * directions, H)
                for an unbatched input
      weights   per layer and direction (layer-major, forward then reverse) a LayerNormLSTMWeights, or the
                tuple (w_ih, w_hh, bias or None, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                ln_cell_weight, ln_cell_bias)
      dropout   probability of zeroing each output of every layer but the last, in training
      zoneout   z in [0, 1] on h (c is not zoned out). Training: each unit keeps its previous h with
                probability z, drawn per unit, step, layer and direction from torch's RNG. Evaluation:
                h' = z h + (1 - z) h_new.
      zoneout_masks  in training, replaces those draws: one (rows, H) tensor of 0 / 1 per layer and direction,
                rows in the time-major packed layout of the input (row t * B + b of a padded batch, the data
                order of a PackedSequence)
    output: a PackedSequence for a PackedSequence input, else (T, B, directions * H) ((B, T, .) batch_first).
    """
    directions = 2 if bidirectional else 1
    I, H, _ = check_stacked_weights(weights, num_layers, directions, _check_layer_weights)
    dropout = check_dropout(dropout)
    zoneout = _check_zoneout(zoneout)
    w0 = weights[0][0]

    seq = pack_input(input, I, batch_first)
    _checks.same_device("weights[0].w_ih", w0, input=seq.x)
    h0, c0 = initial_states(hx, num_layers * directions, seq, H, H, with_cell=True)
    dtype = _compute_dtype(seq.x, w0, mode="lstm", states=(h0, c0))  # autocast as torch applies it to its LSTM
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    h0, c0 = cast(h0), cast(c0)
    rows = seq.x.shape[0]
    if zoneout_masks is not None:
        if len(zoneout_masks) != num_layers * directions:
            raise ValueError(f"zoneout_masks must hold num_layers * directions = {num_layers * directions} masks, "
                             f"got {len(zoneout_masks)}")
        for k, m in enumerate(zoneout_masks):
            _checks.tensor(m, f"zoneout_masks[{k}]", dtypes=RNN_DTYPES, shape=(rows, H))
            _checks.same_device("input", seq.x, **{f"zoneout_masks[{k}]": m})

    def run_layer(k, layer_in, reverse):
        mask = None
        if training and zoneout_masks is not None:
            mask = zoneout_masks[k]
        elif training and zoneout > 0:
            mask = draw_zoneout_mask(rows, H, zoneout, seq.x.device, dtype)
        weights_k = ref.LayerNormLSTMWeights(*(cast(w) for w in weights[k]))
        return _layer(layer_in, seq.batch_sizes, weights_k, h0[k], c0[k], cast(mask),
                      0.0 if training else zoneout, reverse)

    with autocast_off(seq.x.device.type):
        y, h_n, c_n = run_stacked(seq.x.to(dtype), num_layers, directions, run_layer, dropout, training)
    output, h_n, c_n = unpack_output(seq, y, h_n, c_n)
    return output, (h_n, c_n)
