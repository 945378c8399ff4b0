"""Recurrent layers: LSTM and GRU over padded or packed batches, and their single-step cells.

Custom ops (``torch.ops.fastnn.*``): rnn_layer_forward (one layer, one direction, a whole time-major packed
batch) and rnn_layer_backward (its backward through time). Contract: csrc/families/rnn.h; semantics
(torch.nn's gate order and formulas): fastnn/reference/rnn.py.
Kernels:
  CPU   C++ (csrc/cpu/rnn_cpu.cpp): one GEMM for the input projection of all steps, per step one GEMM with
        W_hh and a fused, vectorised gate pass; weight gradients as one GEMM each after the recurrence.
        fp16 / bf16 inputs run in float32 and are rounded back; bf16 layers without projection, on CPUs with
        AVX512-BF16, take bf16 operands in their GEMMs instead (BF16_NATIVE below).
  CUDA  Triton (kernels/rnn.py) when present: per-step cuBLAS GEMM plus a fused Triton cell. For batches of
        at most PERSISTENT_MAX_BATCH rows (PERSISTENT below): the forward and the backward's recurrence each
        as one persistent CUDA C++ launch (csrc/cuda/rnn_persistent_*) with W_hh in registers, when they fit
        (no projection, H up to ~1024); the weight gradients stay one GEMM each.
Packed batches (PackedSequence) run as they are: step t computes only its batch_sizes[t] live rows.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .._backend import _C, dense_copies, pick
from ..reference import rnn as ref
from . import _checks, _direct

_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
RNN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OUTPUT_NAMES = ("y", "h_n", "c_n", "gates", "aux", "r")
_GRAD_NAMES = ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr", "dh0", "dc0")

try:  # the Triton cells (CUDA; CPU tensors under TRITON_INTERPRET=1)
    from ..kernels import rnn as _triton_rnn
except ImportError:  # triton missing, or kernels without the recurrent family
    _triton_rnn = None


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---------------------------------------------------------------- kernel entry points per backend

def _forward_reference(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
    """The reference keeps no workspace: its backward recomputes the layer under torch.func.vjp."""
    with torch.no_grad():
        y, h, c = ref.rnn_layer(mode, x, batch_sizes.tolist(), w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse)
    none = x.new_empty(0, dtype=workspace_dtype(x.dtype))
    h, c = dense_copies([h, c])  # with no steps, h0 and c0 themselves
    return [y, h, _empty(x) if c is None else c, none, none.clone(), none.clone()]


_LAYER_INPUTS = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0")  # a layer's differentiable inputs


def _backward_reference(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux,
                        r, reverse, want_dx, want_dweights, want_dh0=True):
    given = dict(zip(_LAYER_INPUTS, (x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)))
    keys = [k for k in _LAYER_INPUTS if given[k] is not None]
    sizes = batch_sizes.tolist()

    def layer(*xs):
        a = dict(zip(keys, xs))
        out, h, c = ref.rnn_layer(mode, a["x"], sizes, a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh"),
                                  a.get("w_hr"), a["h0"], a.get("c0"), reverse)
        return (out, h) if c is None else (out, h, c)

    _, vjp = torch.func.vjp(layer, *[given[k] for k in keys])
    grads = dict(zip(keys, vjp((dy, dh_n) if mode == "gru" else (dy, dh_n, dc_n))))
    return dense_copies([grads.get(k) for k in _LAYER_INPUTS])


def _lift(args):
    """fp16 / bf16 tensors to float32 (the C++ kernel's compute dtype); others as they are."""
    low = (torch.float16, torch.bfloat16)
    return [a.float() if isinstance(a, Tensor) and a.dtype in low else a for a in args]


# bf16 layers on the CPU: bf16 operands in the input projection and the recurrent products (float32 sums,
# the rest in float32) where the kernel has them (_C.rnn_bf16_native), as torch's oneDNN LSTM does; False
# runs them wholly in float32 (more accurate, about half the speed).
BF16_NATIVE = True


def _bf16_native(x, w_ih, w_hh, w_hr) -> bool:
    return (BF16_NATIVE and x.dtype == torch.bfloat16 and w_ih.dtype == w_hh.dtype == torch.bfloat16
            and _C.rnn_bf16_native(x.shape[1], w_hr is not None))


def _forward_cpp(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
    """fp16 / bf16 run in float32 (bf16 layers with bf16 operands where BF16_NATIVE allows): y, h_n, c_n are
    rounded back, the workspace stays float32."""
    if x.dtype not in (torch.float16, torch.bfloat16):  # float32 / float64: as they are
        return _C.rnn_layer_forward_cpu(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train)
    native = _bf16_native(x, w_ih, w_hh, w_hr)
    x_in, w_ih_in, w_hh_in = (x, w_ih, w_hh) if native else _lift([x, w_ih, w_hh])
    y, h, c, *workspace = _C.rnn_layer_forward_cpu(mode, x_in, batch_sizes, w_ih_in, w_hh_in,
                                                   *_lift([b_ih, b_hh, w_hr, h0, c0]), reverse, train)
    return [t.to(x.dtype) for t in (y, h, c)] + workspace


def _backward_cpp(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                  reverse, want_dx, want_dweights, want_dh0=True):
    """The bf16 path (x, w_ih, w_hh and y kept in bf16) where the forward's would run, else float32."""
    if x.dtype not in (torch.float16, torch.bfloat16):  # float32 / float64: as they are
        return _C.rnn_layer_backward_cpu(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y,
                                         gates, aux, r, reverse, want_dx, want_dweights, want_dh0)
    native = _bf16_native(x, w_ih, w_hh, w_hr) and y.dtype == torch.bfloat16
    x_in, w_ih_in, w_hh_in, y_in = (x, w_ih, w_hh, y) if native else _lift([x, w_ih, w_hh, y])
    dy_in, dh_in, dc_in, b_ih_in, b_hh_in, w_hr_in, h0_in, c0_in, gates_in, aux_in, r_in = _lift(
        [dy, dh_n, dc_n, b_ih, b_hh, w_hr, h0, c0, gates, aux, r])
    grads = _C.rnn_layer_backward_cpu(mode, dy_in, dh_in, dc_in, x_in, batch_sizes, w_ih_in, w_hh_in, b_ih_in,
                                      b_hh_in, w_hr_in, h0_in, c0_in, y_in, gates_in, aux_in, r_in, reverse, want_dx,
                                      want_dweights, want_dh0)
    return [g.to(dy.dtype) for g in grads]


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the forward's saved workspace: float32 for fp16 / bf16 layers (every backend)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_FORWARD_IMPLS = {"reference": _forward_reference, "cpp": _forward_cpp}
_BACKWARD_IMPLS = {"reference": _backward_reference, "cpp": _backward_cpp}


def _fresh_empties(outputs):
    """A new tensor for every empty output (the launchers share one; custom ops may not return aliases)."""
    return [t if t.numel() else t.new_empty(0) for t in outputs]


# The persistent CUDA kernels: "auto" (the default) takes them for batches of at most PERSISTENT_MAX_BATCH
# rows, where they fit; True / False (FASTNN_RNN_PERSISTENT=1 / 0) force them on where they fit, or off.
# On the H200 (bench/NOTES.md; quick bench, bf16, T 64, H 512 / 1024, LSTM and GRU) they beat the per-step
# path by 3.7-7.1x (forward) and 3.8-4.6x (forward+backward) at B 1, by 0.67-1.4x and 0.92-1.6x at B 64; at
# B 256 they are 1.9-3.9x slower (the rows take several passes per step), so larger batches stay per-step.
PERSISTENT_MAX_BATCH = 64
_PERSISTENT_ENV = {"auto": "auto", "1": True, "0": False}
try:
    PERSISTENT: Union[bool, str] = _PERSISTENT_ENV[os.environ.get("FASTNN_RNN_PERSISTENT", "auto")]
except KeyError:
    raise ValueError(f"FASTNN_RNN_PERSISTENT must be one of {sorted(_PERSISTENT_ENV)}, got "
                     f"{os.environ['FASTNN_RNN_PERSISTENT']!r}") from None


def _persistent_takes(mode, x, w_hh, w_hr, h0) -> bool:
    if PERSISTENT is False or w_hr is not None or not x.is_cuda or _C is None:
        return False
    if PERSISTENT == "auto" and h0.shape[0] > PERSISTENT_MAX_BATCH:
        return False
    return (hasattr(_C, "rnn_layer_forward_persistent_cuda")
            and _C.rnn_persistent_fits(mode, w_hh.shape[1], h0.shape[0], x.device.index))


def _forward_triton(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
    """Workspace dtypes: gates and r in x's dtype, aux (the per-step c / h W_hn^T + b_hn) in float32 (the
    persistent forward's too, which the Triton backward reads)."""
    _check_kernel_layer("rnn_layer_forward", mode, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)
    if _persistent_takes(mode, x, w_hh, w_hr, h0):
        return _fresh_empties(_C.rnn_layer_forward_persistent_cuda(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, h0,
                                                                   c0, reverse, train))
    return _fresh_empties(_triton_rnn.rnn_layer_forward(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0,
                                                        reverse, train))


def _backward_triton(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                     reverse, want_dx, want_dweights, want_dh0=True):
    _check_kernel_backward(mode, dy, dh_n, dc_n, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux)
    if _persistent_takes(mode, x, w_hh, w_hr, h0):
        # the recurrence in one persistent launch; the weight gradients as one GEMM each after it
        rec = _C.rnn_layer_backward_persistent_cuda(mode, dy, dh_n, dc_n, batch_sizes, w_hh, h0, c0, y, gates,
                                                    aux.to(torch.float32), reverse)
        return _fresh_empties(_triton_rnn.rnn_layer_backward_from_gates(mode, rec, x, batch_sizes, w_ih, w_hh, b_ih,
                                                                        h0, y, reverse, want_dx, want_dweights))
    return _fresh_empties(_triton_rnn.rnn_layer_backward(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh,
                                                         w_hr, h0, c0, y, gates, aux, r, reverse, want_dx,
                                                         want_dweights))


# The GPU kernels' own checks. The CPU kernel checks its arguments in C++ (csrc/cpu/rnn_cpu.cpp check_shapes,
# check_contiguous, rnn_steps.h check_dense); on CUDA the Triton cells and the persistent kernel index raw
# pointers with the layer's extents too, so a direct call of a raw op with a misshapen or strided tensor would
# read or write out of bounds (corrupting the CUDA context) or read a strided state as dense. _forward_triton
# and _backward_triton, the one way into either GPU kernel, run these first: the CPU kernel's shape and
# contiguity checks, and x's dtype and device for every tensor (the CPU kernel's data_ptr<T> and the persistent
# launcher refuse another dtype; Triton's launcher refuses a CPU tensor's pointer but not another GPU's).
# Per tensor four C calls (~0.4 us on a 2-vCPU Xeon), no allocation.

def check_dense(who: str, x: Tensor, tensors, any_dtype=(), any_strides=()) -> None:
    """Each (name, tensor or None for absent, expected shape) in `tensors` has that shape, is contiguous, and
    has x's dtype and device; names in any_dtype may have another dtype, those in any_strides other strides.
    The error names the argument and what was expected."""
    dt, dev = x.dtype, x.get_device()  # (get_device: an int, cheaper than comparing torch.device objects)
    for name, t, shape in tensors:
        if t is not None and (t.shape != shape or t.get_device() != dev
                              or (t.dtype is not dt and name not in any_dtype)
                              or (not t.is_contiguous() and name not in any_strides)):
            _refuse_dense(who, name, t, shape, x, name in any_dtype)


def _refuse_dense(who: str, name: str, t: Tensor, shape, x: Tensor, any_dtype: bool) -> None:
    if t.get_device() != x.get_device():
        raise ValueError(f"{who}: {name} is on {t.device} but x is on {x.device}; expected the same device")
    if t.dtype is not x.dtype and not any_dtype:
        raise _checks.DtypeMismatchError(f"{who}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.shape != shape:
        want = "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
        raise _checks.SizeMismatchError(f"{who}: {name} must have shape {want}, got {tuple(t.shape)}")
    raise ValueError(f"{who}: {name} must be contiguous (the kernels read it as a dense row-major array); got "
                     f"strides {t.stride()} for shape {tuple(t.shape)}")


_GATES = {"lstm": 4, "gru": 3}


def _check_kernel_layer(who: str, mode: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                        b_hh: Optional[Tensor], w_hr: Optional[Tensor], h0: Tensor,
                        c0: Optional[Tensor]) -> Tuple[int, int, int, int, int]:
    """The forward's arguments as the GPU kernels read them (csrc/families/rnn.h) -> (rows, G, H, P, B).
    batch_sizes is the launchers' to check (kernels/rnn.py _Layer, rnn_persistent_plan.h step_meta)."""
    G = _GATES.get(mode)
    if G is None:
        raise ValueError(f"{who}: mode must be one of {ref.MODES}, got {mode!r}")
    try:  # (unpacking: cheaper than checking dim() first)
        rows, I = x.shape
        GH, P = w_hh.shape
        B = h0.shape[0]  # h0's whole shape is check_dense's
    except (ValueError, IndexError):
        raise _checks.SizeMismatchError(f"{who}: x must be (rows, input_size), w_hh ({G} * hidden_size, P) and h0 "
                                        f"(batch, P); got x {tuple(x.shape)}, w_hh {tuple(w_hh.shape)}, h0 "
                                        f"{tuple(h0.shape)}") from None
    H = GH // G
    if GH != G * H or (P != H if w_hr is None else P >= H) or (b_ih is None) != (b_hh is None) or (
            c0 is None and G == 4):
        if GH != G * H:
            raise _checks.SizeMismatchError(f"{who}: w_hh must be ({G} * hidden_size, P), got {tuple(w_hh.shape)}")
        if w_hr is None and P != H:
            raise _checks.SizeMismatchError(f"{who}: without w_hr, w_hh must have shape ({GH}, {H}), got "
                                            f"{tuple(w_hh.shape)}")
        if w_hr is not None and P >= H:
            raise _checks.SizeMismatchError(f"{who}: with w_hr, w_hh's second size P must be below hidden_size {H}; "
                                            f"got w_hh {tuple(w_hh.shape)}")
        if (b_ih is None) != (b_hh is None):
            raise ValueError(f"{who}: b_ih and b_hh must be both given or both absent")
        raise ValueError(f"{who}: the LSTM needs c0")
    if not x.is_contiguous():  # (x's shape, dtype and device are the reference)
        _refuse_dense(who, "x", x, (rows, I), x, False)
    # (w_hr only enters torch.mm: any strides)
    check_dense(who, x, (("w_ih", w_ih, (GH, I)), ("w_hh", w_hh, (GH, P)), ("b_ih", b_ih, (GH,)),
                         ("b_hh", b_hh, (GH,)), ("w_hr", w_hr, (P, H)), ("h0", h0, (B, P)), ("c0", c0, (B, H))),
                any_strides=("w_hr",))
    return rows, G, H, P, B


def _check_kernel_backward(mode, dy, dh_n, dc_n, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux) -> None:
    """The backward's arguments as the GPU kernels read them; aux may have any float dtype (the launchers take
    it to float32), gates and aux only need the right number of elements (as on the CPU). r enters torch.mm
    only."""
    who = "rnn_layer_backward"
    rows, G, H, P, B = _check_kernel_layer(who, mode, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)
    if mode == "lstm" and dc_n is None:
        raise ValueError(f"{who}: the LSTM needs dc_n")
    check_dense(who, x, (("dy", dy, (rows, P)), ("y", y, (rows, P)), ("dh_n", dh_n, (B, P)), ("dc_n", dc_n, (B, H)),
                         ("gates", gates, gates.shape), ("aux", aux, aux.shape)), any_dtype=("aux",))
    if gates.numel() != rows * G * H or aux.numel() != rows * H:
        raise _checks.SizeMismatchError(f"{who}: the workspace must hold gates ({rows}, {G * H}) and aux ({rows}, "
                                        f"{H}) elements, got {tuple(gates.shape)} and {tuple(aux.shape)} (was the "
                                        "forward run with train=True?)")


if _triton_rnn is not None:
    _FORWARD_IMPLS["triton"] = _forward_triton
    _BACKWARD_IMPLS["triton"] = _backward_triton


def _pick(op: str, x: Tensor, impls: dict):
    if x.dtype == torch.float64 and x.device.type == "cuda":
        impls = {k: v for k, v in impls.items() if k != "triton"}  # the Triton cells are fp16/bf16/fp32
    return pick(op, x.device, impls, _PREFERENCE.get(x.device.type, ()))


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fastnn::rnn_layer_forward", mutates_args=())
def _layer_forward_op(mode: str, x: Tensor, batch_sizes: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                      b_hh: Optional[Tensor], w_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], reverse: bool,
                      train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y (rows, P), h_n (B, P), c_n (B, H) or empty, and the backward's workspace gates, aux, r)."""
    return _layer_forward_body(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train)


def _layer_forward_body(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
    """The rnn_layer_forward op's body (the op, or _layer's direct call: ._direct)."""
    impl = _pick("rnn_layer", x, _FORWARD_IMPLS)
    return tuple(impl(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train))


@_layer_forward_op.register_fake
def _layer_forward_fake(mode, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
    G = ref.gates_per_unit(mode)
    H = w_hh.shape[0] // G
    rows = x.shape[0]
    # the workspace follows the backend the real op picks: the reference keeps none; the C++ kernel keeps
    # float32 for fp16 / bf16 layers; the Triton one keeps gates and r in x's dtype and aux in float32
    impl = _pick("rnn_layer", x, _FORWARD_IMPLS)
    keeps = train and impl is not _forward_reference
    if impl is _FORWARD_IMPLS.get("triton"):
        dtypes = (x.dtype, torch.float32 if keeps else x.dtype, x.dtype)
    else:
        dtypes = (workspace_dtype(x.dtype),) * 3
    ws = lambda i, *shape: x.new_empty(*(shape if keeps else (0,)), dtype=dtypes[i])  # noqa: E731
    return (x.new_empty(rows, h0.shape[1]), h0.new_empty(h0.shape), _empty(x) if c0 is None else c0.new_empty(c0.shape),
            ws(0, rows, G * H), ws(1, rows, H), ws(2, rows, H) if w_hr is not None else ws(2, 0))


@torch.library.custom_op("fastnn::rnn_layer_backward", mutates_args=())
def _layer_backward_op(mode: str, dy: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor, batch_sizes: Tensor,
                       w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                       w_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], y: Tensor, gates: Tensor, aux: Tensor,
                       r: Tensor, reverse: bool, want_dx: bool, want_dweights: bool,
                       want_dh0: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0); an empty tensor where not wanted or absent."""
    return _layer_backward_body(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates,
                                aux, r, reverse, want_dx, want_dweights, want_dh0)


def _layer_backward_body(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                         reverse, want_dx, want_dweights, want_dh0=True):
    """The rnn_layer_backward op's body (the op, or _backward's direct call)."""
    # The backward of the forward that made the workspace: an empty one comes from the reference's forward,
    # whose backward recomputes the layer instead of reading it.
    impl = _backward_reference if gates.numel() == 0 else _pick("rnn_layer_backward", x, _BACKWARD_IMPLS)
    got = list(impl(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                    reverse, want_dx, want_dweights, want_dh0))
    # the reference differentiates everything: drop what was not asked for, as the kernels do (dh0: the C++
    # kernel's skips the GEMM that only feeds it; the others compute it)
    if not want_dx:
        got[0] = None
    if not want_dweights:
        got[1:6] = [None] * 5
    if not want_dh0:
        got[6] = None
    return tuple(_empty(x) if g is None else g for g in got)


@_layer_backward_op.register_fake
def _layer_backward_fake(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                         reverse, want_dx, want_dweights, want_dh0=True):
    # dense row-major, as every backend returns them (empty_like would copy a strided input's layout)
    like = lambda t, on: t.new_empty(t.shape) if (t is not None and on) else _empty(x)  # noqa: E731
    return (like(x, want_dx), like(w_ih, want_dweights), like(w_hh, want_dweights), like(b_ih, want_dweights),
            like(b_hh, want_dweights), like(w_hr, want_dweights), like(h0, want_dh0), like(c0, True))


_FORWARD_ARGS = ("mode", "x", "batch_sizes", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0", "reverse", "train")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FORWARD_ARGS, inputs))
    ctx.save_for_backward(a["x"], a["batch_sizes"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"], a["h0"],
                          a["c0"], output[0], output[3], output[4], output[5])
    ctx.mode, ctx.reverse = a["mode"], a["reverse"]
    # No gradient flows into the workspace, and none is made up for outputs the loss does not use (_backward
    # takes None for zeros): materialised, the zeros for the gates alone were a rows x G H fill per backward
    # (12 ms of a 390 ms LSTM forward+backward at B = 32, H = 512, T = 160 here).
    ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh_n, dc_n, *_workspace_grads):
    x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = torch.zeros_like(y) if dy is None else dy.contiguous()
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
    if c0 is not None:
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n.contiguous()
    else:
        dc_n = None
    want_dweights = any(need[3:8])
    # create_graph=True (double backward; torch.func.grad always) takes the op, whose own autograd
    # (_backward_backward) differentiates these gradients again through the reference
    if not torch.is_grad_enabled() and _direct.plain_eager(dy, dh_n, dc_n, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0,
                                                           y, gates, aux, r):
        backward = _layer_backward_body
    else:
        backward = functools.partial(_direct.run_op, torch.ops.fastnn.rnn_layer_backward)
    grads = backward(ctx.mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                     ctx.reverse, need[1], want_dweights, need[8])
    dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0 = grads
    keep = lambda g, i: g if need[i] else None  # noqa: E731
    return (None, keep(dx, 1), None, keep(dw_ih, 3), keep(dw_hh, 4), keep(db_ih, 5), keep(db_hh, 6), keep(dw_hr, 7),
            keep(dh0, 8), keep(dc0, 9) if c0 is not None else None, None, None)


_BACKWARD_ARGS = ("mode", "dy", "dh_n", "dc_n", "x", "batch_sizes", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0",
                  "y", "gates", "aux", "r", "reverse", "want_dx", "want_dweights", "want_dh0")
_BACKWARD_PRIMALS = ("dy", "dh_n", "dc_n", "x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0")


def _backward_setup_context(ctx, inputs, output):
    a = dict(zip(_BACKWARD_ARGS, inputs))
    ctx.save_for_backward(a["batch_sizes"], *(a[k] for k in _BACKWARD_PRIMALS))
    ctx.mode, ctx.reverse = a["mode"], a["reverse"]
    ctx.wanted = [a["want_dx"]] + [a["want_dweights"]] * 5 + [a["want_dh0"], True]  # (the results that are not empty)


def _reference_grads(mode, batch_sizes, reverse):
    """The differentiable reference's (dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0), None where absent, as a
    function of _BACKWARD_PRIMALS."""
    def first_order(dy, dh_n, dc_n, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0):
        return _backward_reference(mode, dy, dh_n, dc_n, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0,
                                   None, None, None, None, reverse, True, True)
    return first_order


def _backward_backward(ctx, *cotangents):
    """rnn_layer_backward's own backward: through the reference, which recomputes the layer from the primals
    (so nothing flows into y or the workspace, which the primals determine)."""
    batch_sizes, *primals = ctx.saved_tensors
    first_order = _reference_grads(ctx.mode, batch_sizes, ctx.reverse)
    grads = dict(zip(_BACKWARD_PRIMALS, _direct.second_order(first_order, primals, cotangents)))
    return tuple(grads.get(k) for k in _BACKWARD_ARGS)


def _forward_jvp(ctx, *tangents):
    """rnn_layer_forward's forward mode (torch.func.jvp, jacfwd, hessian, forward_ad), through the reference:
    tangents of y, h_n and c_n; none for the workspace."""
    x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0 = ctx.saved_tensors[:9]
    t = dict(zip(_FORWARD_ARGS, tangents))
    sizes = batch_sizes.tolist()

    def layer(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0):
        return ref.rnn_layer(ctx.mode, x, sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, ctx.reverse)

    dy, dh, dc = _direct.linearised(layer, [x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0], [t[k] for k in _LAYER_INPUTS])
    return (dy.to(x.dtype), dh.to(x.dtype), x.new_zeros(0) if dc is None else dc.to(x.dtype), None, None, None)


def _backward_jvp(ctx, *tangents):
    """rnn_layer_backward's forward mode (forward over reverse: torch.func.hessian), through the reference;
    zeros where the op returned an empty placeholder."""
    batch_sizes, *primals = ctx.saved_tensors
    t = dict(zip(_BACKWARD_ARGS, tangents))
    first_order = _reference_grads(ctx.mode, batch_sizes, ctx.reverse)
    out = _direct.linearised(first_order, primals, [t[k] for k in _BACKWARD_PRIMALS])
    empty = primals[_BACKWARD_PRIMALS.index("x")].new_zeros(0)
    return tuple(g if g is not None and on else empty for g, on in zip(out, ctx.wanted))


_direct.register_autograd(_layer_forward_op, _backward, _setup_context, _forward_jvp)
_direct.register_autograd(_layer_backward_op, _backward_backward, _backward_setup_context, _backward_jvp)


# _layer's path in plain eager mode (._direct): the op's body, setup_context and backward without
# torch.library's dispatch (~20 us a call: a cell step is ~15 us of kernel at small sizes)
_LayerFunction = _direct.autograd_function(_layer_forward_body, _setup_context, _backward)


# ---------------------------------------------------------------- validation

def _check_layer_weights(mode: str, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                         w_hr: Optional[Tensor], where: str) -> Tuple[int, int, int]:
    """Checks one layer's weights against each other -> (input_size, hidden_size, P)."""
    G = ref.gates_per_unit(mode)
    _checks.tensor(w_ih, f"{where}w_ih", dtypes=RNN_DTYPES)
    _checks.tensor(w_hh, f"{where}w_hh", dtypes=RNN_DTYPES)
    if w_ih.dim() != 2 or w_hh.dim() != 2 or w_ih.shape[0] % G or w_hh.shape[0] != w_ih.shape[0]:
        raise ValueError(f"{where}w_ih must be ({G} * hidden_size, input_size) and w_hh ({G} * hidden_size, P) with the "
                         f"same first size; got w_ih {tuple(w_ih.shape)}, w_hh {tuple(w_hh.shape)}")
    H = w_ih.shape[0] // G
    P = w_hh.shape[1]
    if w_hr is not None:
        if mode != "lstm":
            raise ValueError(f"{where}w_hr (the projection) exists for the LSTM only")
        _checks.tensor(w_hr, f"{where}w_hr", dtypes=RNN_DTYPES, shape=(P, H))
    elif P != H:
        raise ValueError(f"{where}w_hh must be ({G} * hidden_size, hidden_size) = ({G * H}, {H}) without a projection; "
                         f"got {tuple(w_hh.shape)}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{where}b_ih and b_hh must be both given or both None")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _checks.tensor(b, f"{where}{name}", dtypes=RNN_DTYPES, shape=(G * H,))
    device, dtype = w_ih.device, w_ih.dtype
    for name, t in (("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr)):
        if t is not None and (t.device != device or t.dtype != dtype):  # (names formatted on failure only)
            _checks.same_device(f"{where}w_ih", w_ih, **{f"{where}{name}": t})
            raise TypeError(f"{where}{name} has dtype {t.dtype} but {where}w_ih has {w_ih.dtype}; expected one dtype")
    return w_ih.shape[1], H, P


def _check_batch_sizes(batch_sizes: Tensor, rows: int) -> Tensor:
    _checks.tensor(batch_sizes, "batch_sizes", integer=True)
    if batch_sizes.dim() != 1 or batch_sizes.device.type != "cpu":
        raise ValueError(f"batch_sizes must be a 1-D CPU tensor (as in PackedSequence), got shape "
                         f"{tuple(batch_sizes.shape)} on {batch_sizes.device}")
    sizes = batch_sizes.to(torch.int64)
    if torch.compiler.is_compiling():  # the value checks read data: not traceable (the kernel re-checks)
        return sizes.contiguous()
    if sizes.numel():
        if bool((sizes < 1).any()) or bool((sizes[1:] > sizes[:-1]).any()):
            raise ValueError("batch_sizes must be positive and non-increasing (sequences sorted by length, as in "
                             f"PackedSequence); got {sizes.tolist()}")
    if int(sizes.sum()) != rows:
        raise ValueError(f"batch_sizes sum to {int(sizes.sum())} but the input has {rows} rows")
    return sizes.contiguous()


def empty_batch_outputs(x: Tensor, h0: Tensor, c0: Optional[Tensor],
                        tensors: Sequence[Optional[Tensor]]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """A layer's (y, h_n, c_n) for an empty batch: nothing runs, but the (empty) outputs stay in the autograd
    graph of every input, so that a backward through them gives zero gradients as torch.nn's does, instead
    of failing for want of a grad_fn."""
    anchor = sum(t.sum() * 0 for t in tensors if t is not None and t.requires_grad)
    y = x.new_zeros(x.shape[0], h0.shape[1]) + anchor
    return y, h0 + anchor, (None if c0 is None else c0 + anchor)


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def keeps_workspace(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a layer keeps its workspace for a backward (the ops' `train`): grad mode on and a tensor that
    requires grad. While torch.jit traces, grad mode is left out: jit.trace's check traces again under
    no_grad, and the flag it records must be the first trace's."""
    tracing = torch._C._get_tracing_state() is not None
    return (tracing or torch.is_grad_enabled()) and any(t is not None and t.requires_grad for t in tensors)


def _layer(mode: str, x: Tensor, batch_sizes: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
           b_hh: Optional[Tensor], w_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
           reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One validated layer: runs the custom op (empty inputs answered here)."""
    tensors = (x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)
    if x.shape[0] == 0 or h0.shape[0] == 0:
        y, h, c = empty_batch_outputs(x, h0, c0, tensors)
        return y, h, (c if mode == "lstm" else None)
    train = keeps_workspace(tensors)
    y, h, c, *_ = _direct.call(torch.ops.fastnn.rnn_layer_forward, _layer_forward_body, _LayerFunction, mode,
                               x.contiguous(), batch_sizes, w_ih.contiguous(), w_hh.contiguous(), _contig(b_ih),
                               _contig(b_hh), _contig(w_hr), h0.contiguous(), _contig(c0), reverse, train)
    return y, h, (c if mode == "lstm" else None)


# ---------------------------------------------------------------- public functions

def lstm_cell(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step, as torch.nn.LSTMCell computes it: ``(h', c')``.

    input (B, I) or unbatched (I,); hx = (h, c), each (B, H) / (H,), or None for zeros; w_ih (4H, I),
    w_hh (4H, H), optional biases (4H,). Differentiable in every tensor.
    """
    return _cell("lstm", input, hx, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """One GRU step, as torch.nn.GRUCell computes it: ``h'``.

    input (B, I) or unbatched (I,); hx (B, H) / (H,) or None for zeros; w_ih (3H, I), w_hh (3H, H),
    optional biases (3H,). Differentiable in every tensor.
    """
    return _cell("gru", input, hx, w_ih, w_hh, b_ih, b_hh)


# One-row batch_sizes tensors for the cells' plain path, by batch size. Only that path uses them (plain eager,
# so no fake or symbolic batch), and only tensors made outside inference mode are kept: an inference tensor
# could not be saved for a later backward.
_ONE_STEP_BATCH_SIZES: dict = {}


def _one_step_batch_sizes(B: int) -> Tensor:
    t = _ONE_STEP_BATCH_SIZES.get(B)
    if t is None:
        t = torch.tensor([B], dtype=torch.int64, device="cpu")
        if not torch.is_inference_mode_enabled() and len(_ONE_STEP_BATCH_SIZES) < 256:
            _ONE_STEP_BATCH_SIZES[B] = t
    return t


def _cell_plain(mode, input, hx, w_ih, w_hh, b_ih, b_hh):
    """A cell step in its common case, with cheap checks: plain eager, batched input, one dtype and device
    for every tensor, no autocast, shapes right, nothing empty. None when any of that does not hold; _cell
    then runs its full validation, which also names what is wrong. (At B 4, H 32 a step's kernel is ~25 us
    and the full validation ~30 us more.)"""
    states = () if hx is None else (tuple(hx) if mode == "lstm" and isinstance(hx, (tuple, list)) else (hx,))
    if len(states) not in (0, 2 if mode == "lstm" else 1) or (b_ih is None) != (b_hh is None):
        return None
    tensors = (input, w_ih, w_hh, b_ih, b_hh, *states)
    # (plain_eager: every non-None one a plain Tensor or Parameter)
    if input is None or w_ih is None or w_hh is None or not _direct.plain_eager(*tensors):
        return None
    if input.dim() != 2 or w_ih.dim() != 2:
        return None
    dtype = input.dtype
    GH, I = w_ih.shape
    G = 4 if mode == "lstm" else 3
    H = GH // G
    B = input.shape[0]
    if (B == 0 or H == 0 or GH != G * H or input.shape[1] != I or tuple(w_hh.shape) != (GH, H)
            or dtype not in RNN_DTYPES or autocast_on(input.device.type)):
        return None
    # one dtype and one device (on the CPU, is_cpu is cheaper to read than .device)
    if input.is_cpu:
        for t in tensors[1:]:
            if t is not None and (t.dtype is not dtype or not t.is_cpu):
                return None
    else:
        device = input.device
        for t in tensors[1:]:
            if t is not None and (t.dtype is not dtype or t.device != device):
                return None
    if b_ih is not None and (tuple(b_ih.shape) != (GH,) or tuple(b_hh.shape) != (GH,)):
        return None
    for st in states:
        if tuple(st.shape) != (B, H):
            return None
    if not states:
        states = tuple(input.new_zeros(B, H) for _ in range(2 if mode == "lstm" else 1))
    train = keeps_workspace(tensors)
    args = (mode, input.contiguous(), _one_step_batch_sizes(B), w_ih.contiguous(), w_hh.contiguous(), _contig(b_ih),
            _contig(b_hh), None, states[0].contiguous(), states[1].contiguous() if mode == "lstm" else None, False,
            train)
    _, h, c, *_ = _LayerFunction.apply(*args) if train else _layer_forward_body(*args)
    return (h, c) if mode == "lstm" else h


def _cell(mode, input, hx, w_ih, w_hh, b_ih, b_hh):
    out = _cell_plain(mode, input, hx, w_ih, w_hh, b_ih, b_hh)
    if out is not None:
        return out
    I, H, _ = _check_layer_weights(mode, w_ih, w_hh, b_ih, b_hh, None, "")
    _checks.tensor(input, "input", dtypes=RNN_DTYPES)
    if input.dim() not in (1, 2) or input.shape[-1] != I:
        raise _checks.SizeMismatchError(f"input must be (batch, input_size) or (input_size,) with input_size = {I} "
                                        f"(w_ih's second size); got {tuple(input.shape)}")
    _checks.same_device("input", input, w_ih=w_ih)
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    B = x.shape[0]
    states = [] if hx is None else (list(hx) if mode == "lstm" else [hx])
    if mode == "lstm" and hx is not None and len(states) != 2:
        raise ValueError("hx must be a tuple (h, c) for the LSTM cell")
    for name, s in zip(("hx[0]", "hx[1]") if mode == "lstm" else ("hx",), states):
        _checks.tensor(s, name, dtypes=RNN_DTYPES)
        _checks.same_device("input", input, **{name: s})
        check_state_dtype(name, s, input)
        if tuple(s.shape) != ((B, H) if batched else (H,)):
            raise _checks.SizeMismatchError(f"{name} must have shape {(B, H) if batched else (H,)} for input "
                                            f"{tuple(input.shape)} and hidden_size {H}; got {tuple(s.shape)}")
    dtype = _compute_dtype(x, w_ih, cell=True, states=states or [None])
    # (a cell step is small: each no-op .to costs ~1 us, an autocast context ~5 us)
    to = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    x, w_ih, w_hh, b_ih, b_hh = to(x), to(w_ih), to(w_hh), to(b_ih), to(b_hh)
    states = [to(s if batched else s.unsqueeze(0)) for s in states]
    if not states:
        states = [x.new_zeros(B, H, dtype=dtype) for _ in range(2 if mode == "lstm" else 1)]
    if H == 0:  # nothing to compute (ATen's GEMM would have MKL print an error about the empty weights);
        # (B, 0) slices of x, so that a backward through them reaches x as torch.nn's does
        h, c = x[:, :0].clone(), (x[:, :0].clone() if mode == "lstm" else None)
    else:
        # (batch_sizes made per call, on the CPU whatever the default device: a cached one would carry the
        # mode it was made in, inference or fake, into later calls, and a symbolic batch cannot key a cache)
        step = lambda: _layer(mode, x, torch.tensor([B], dtype=torch.int64, device="cpu"), w_ih, w_hh,  # noqa: E731
                              b_ih, b_hh, None, states[0], states[1] if mode == "lstm" else None, False)
        if autocast_on(x.device.type):
            with autocast_off(x.device.type):
                y, h, c = step()
        else:
            y, h, c = step()
    if not batched:
        h = h.squeeze(0)
        c = None if c is None else c.squeeze(0)
    return (h, c) if mode == "lstm" else h


def autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is active for this device type (False for those without autocast, e.g. meta)."""
    # (one C call, where the two below take ~0.6 us; it covers CPU and CUDA, not every device type)
    if device_type in ("cpu", "cuda") and not torch._C._is_any_autocast_enabled():
        return False
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A context that switches autocast off for the kernels' own casts (nothing for devices without it)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(x: Tensor, w: Tensor, cell: bool = False, mode: str = "lstm", states=(),
                   packed: bool = False) -> torch.dtype:
    """The dtype a layer runs in: autocast's, as torch applies it to its RNNs (CUDA: every RNN and cell; CPU:
    the LSTM layer on padded input only: its PackedSequence overload is not on the list), else the weights'
    (which the input must match). Under CPU autocast torch's GRU, packed LSTM and
    cells are not on autocast's list but decompose into autocast GEMMs and promoting pointwise ops: with
    float32 weights the gates come out in the autocast dtype, and the pointwise ops promote them with the
    initial `states`' dtypes (absent states are zeros in the input's dtype)."""
    dev = x.device.type
    autocast = autocast_on(dev)
    low = torch.get_autocast_dtype(dev) if autocast else None
    # (CPU autocast casts float32 tensors only: another low-precision input falls to the rules below)
    if autocast and (dev == "cuda" or (not cell and not packed and mode == "lstm" and x.dtype in (torch.float32, low))):
        return torch.get_autocast_dtype(dev)
    if autocast and w.dtype == torch.float32 and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        dtype = low
        for s in states:  # absent states are zeros in x's dtype, as torch.nn makes them
            if s is not None and s.dtype == torch.float64:  # torch's autocast GEMMs refuse it too
                raise _checks.DtypeMismatchError(f"an initial state of dtype {s.dtype} cannot join {x.dtype} input "
                                                 "under autocast; expected float32, float16 or bfloat16")
            dtype = torch.promote_types(dtype, x.dtype if s is None else s.dtype)
        return dtype
    if x.dtype == w.dtype:
        return w.dtype
    raise _checks.DtypeMismatchError(f"input has dtype {x.dtype} but the weights have {w.dtype}; expected the same "
                                     "dtype (or run under torch.autocast)")


def check_state_dtype(name: str, state: Tensor, x: Tensor) -> None:
    """Outside autocast an initial state must have the input's dtype, as torch.nn requires (autocast casts)."""
    if state.dtype != x.dtype and not autocast_on(x.device.type):
        raise _checks.DtypeMismatchError(f"{name} has dtype {state.dtype} but the input has {x.dtype}; expected the "
                                         "same dtype")


def rnn(mode: str, input: Union[Tensor, PackedSequence], hx: Union[None, Tensor, Tuple[Tensor, Tensor]],
        weights: Sequence[Sequence[Optional[Tensor]]], *, num_layers: int, bidirectional: bool = False,
        batch_first: bool = False, dropout: float = 0.0, training: bool = False):
    """A stacked (bi)directional LSTM or GRU, as torch.nn.LSTM / GRU compute it.

    mode: "lstm" or "gru". input: (T, B, I) (or (B, T, I) with batch_first), unbatched (T, I), or a
    PackedSequence (lengths in any order). hx: None (zeros), h0 (GRU) or (h0, c0) (LSTM), each
    (num_layers * directions, B, P / H) or without the batch dimension for unbatched input.
    weights: per layer and direction (layer-major, forward then reverse) (w_ih, w_hh, b_ih, b_hh, w_hr),
    None for absent ones (w_hr: the LSTM's projection, proj_size > 0). dropout: probability of zeroing
    each output of every layer but the last, in training only.
    Returns (output, h_n) for the GRU and (output, (h_n, c_n)) for the LSTM; output is a PackedSequence
    for a PackedSequence input, else (T, B, directions * P) (batch_first: (B, T, .)).
    """
    if mode not in ref.MODES:
        raise ValueError(f"mode must be one of {ref.MODES}, got {mode!r}")
    directions = 2 if bidirectional else 1
    I, H, P = check_stacked_weights(weights, num_layers, directions,
                                    lambda w, where: _check_layer_weights(mode, *w, where))
    dropout = check_dropout(dropout)
    w0 = weights[0][0]

    seq = pack_input(input, I, batch_first)
    _checks.same_device("weights[0].w_ih", w0, input=seq.x)
    h0, c0 = initial_states(hx, num_layers * directions, seq, H, P, with_cell=mode == "lstm")
    dtype = _compute_dtype(seq.x, w0, mode=mode, states=(h0, c0) if mode == "lstm" else (h0,),
                           packed=seq.packed is not None)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    h0, c0 = cast(h0), cast(c0)

    def run_layer(k, layer_in, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = [cast(w) for w in weights[k]]
        return _layer(mode, layer_in, seq.batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0[k],
                      None if c0 is None else c0[k], reverse)

    with autocast_off(seq.x.device.type):
        y, h_n, c_n = run_stacked(seq.x.to(dtype), num_layers, directions, run_layer, dropout, training)
    output, h_n, c_n = unpack_output(seq, y, h_n, c_n)
    return (output, (h_n, c_n)) if mode == "lstm" else (output, h_n)


# ---------------------------------------------------------------- stacking and layout (shared with rnn_ln)

def check_stacked_weights(weights: Sequence, num_layers: int, directions: int,
                          check_layer: Callable) -> Tuple[int, int, int]:
    """Checks one weight tuple per layer and direction, each with check_layer(w, where) -> (input_size,
    hidden_size, P), and that the layers chain (layer l > 0 reads directions * P features) -> layer 0's sizes."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if len(weights) != num_layers * directions:
        raise ValueError(f"weights must hold num_layers * directions = {num_layers * directions} layer tuples, "
                         f"got {len(weights)}")
    sizes = []
    for k, w in enumerate(weights):
        where = f"weights[{k}]."
        sizes.append(check_layer(w, where))
        want_in = sizes[0][0] if k < directions else directions * sizes[0][2]
        if sizes[-1][0] != want_in:
            raise ValueError(f"{where}w_ih must have input size {want_in} for layer {k // directions}, got {sizes[-1][0]}")
        if sizes[-1][1:] != sizes[0][1:]:
            raise ValueError(f"{where} hidden / projection sizes {sizes[-1][1:]} differ from layer 0's {sizes[0][1:]}")
    return sizes[0]


def check_dropout(dropout) -> float:
    dropout = _checks.real_number(dropout, "dropout")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    return dropout


class PackedInput(NamedTuple):
    """A recurrent layer's input as a time-major packed batch, and what it takes to give the output the
    input's form back (see pack_input / unpack_output)."""
    x: Tensor                       # (rows, input_size)
    batch_sizes: Tensor             # (T,) int64 on the CPU: the rows of each step
    batch: int                      # B
    steps: int                      # T of a padded input
    batched: bool                   # False for an unbatched (T, I) input
    batch_first: bool
    packed: Optional[PackedSequence]  # the PackedSequence given, or None for a padded input


def pack_input(input: Union[Tensor, PackedSequence], input_size: int, batch_first: bool) -> PackedInput:
    """Validates a padded ((T, B, I), batch_first (B, T, I), unbatched (T, I)) or PackedSequence input and
    lays it out as a packed batch (a padded one is the case batch_sizes = [B] * T)."""
    I = input_size
    if isinstance(input, PackedSequence):
        x = input.data
        _checks.tensor(x, "input.data", dtypes=RNN_DTYPES)
        if x.dim() != 2 or x.shape[1] != I:
            raise _checks.SizeMismatchError(f"input.data must be (rows, input_size) with input_size = {I}; got "
                                            f"{tuple(x.shape)}")
        batch_sizes = _check_batch_sizes(input.batch_sizes, x.shape[0])
        if input.sorted_indices is not None:  # B without reading data (traceable under torch.compile)
            B = input.sorted_indices.shape[0]
            first = int(batch_sizes[0]) if batch_sizes.numel() and not torch.compiler.is_compiling() else B
            if first != B:  # B > first: sequences of no step, whose h_n would be read from another row
                raise ValueError(f"input: a PackedSequence of {B} sequences (input.sorted_indices) must have "
                                 f"batch_sizes[0] == {B} (every sequence at least one step long); got {first}")
        elif torch.compiler.is_compiling():
            B = int(batch_sizes[0])  # data-dependent there: a PackedSequence holds at least one sequence
            torch._check(B > 0)
        else:
            B = int(batch_sizes[0]) if batch_sizes.numel() else 0
        return PackedInput(x, batch_sizes, B, batch_sizes.numel(), True, False, input)
    _checks.tensor(input, "input", dtypes=RNN_DTYPES)
    if input.dim() not in (2, 3) or input.shape[-1] != I:
        layout = "batch first" if batch_first else "time first"
        raise _checks.SizeMismatchError(f"input must be (seq_len, batch, input_size) ({layout}) or unbatched "
                                        f"(seq_len, input_size) with input_size = {I}; got {tuple(input.shape)}")
    batched = input.dim() == 3
    xt = input if batched else input.unsqueeze(1)
    if batched and batch_first:
        xt = xt.transpose(0, 1)
    T, B = xt.shape[0], xt.shape[1]
    if T == 0:  # torch.nn refuses it too; an empty batch (B = 0) is fine
        raise ValueError(f"input must hold at least one time step (seq_len > 0); got shape {tuple(input.shape)}")
    batch_sizes = torch.full((T,), B, dtype=torch.int64) if B > 0 else torch.zeros(0, dtype=torch.int64)
    return PackedInput(xt.reshape(T * B, I), batch_sizes, B, T, batched, batch_first, None)


def initial_states(hx, num_states: int, seq: PackedInput, H: int, P: int,
                   with_cell: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(h0, c0) as (num_states, B, P / H) in the sorted order of a packed batch; zeros when hx is None. hx is
    (h_0, c_0) with_cell (the LSTMs), else h_0; each (num_states, B, .), or (num_states, .) unbatched."""
    x = seq.x
    if hx is None:
        h0 = x.new_zeros(num_states, seq.batch, P)
        return h0, (x.new_zeros(num_states, seq.batch, H) if with_cell else None)
    if with_cell:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError("hx must be a tuple (h_0, c_0) for the LSTM")
        pairs = (("hx[0]", hx[0], P), ("hx[1]", hx[1], H))
    else:
        pairs = (("hx", hx, H),)
    sorted_indices = None if seq.packed is None else seq.packed.sorted_indices
    out = []
    for name, s, width in pairs:
        _checks.tensor(s, name, dtypes=RNN_DTYPES)
        _checks.same_device("input", x, **{name: s})
        check_state_dtype(name, s, x)
        want = (num_states, seq.batch, width) if seq.batched else (num_states, width)
        if tuple(s.shape) != want:
            raise _checks.SizeMismatchError(f"{name} must have shape {want} (num_layers * directions, batch, "
                                            f"{'proj_size' if width == P and P != H else 'hidden_size'}); got "
                                            f"{tuple(s.shape)}")
        s = s if seq.batched else s.unsqueeze(1)
        if sorted_indices is not None:
            s = s.index_select(1, sorted_indices)
        out.append(s)
    return out[0], (out[1] if with_cell else None)


def run_stacked(x: Tensor, num_layers: int, directions: int, run_layer: Callable, dropout: float,
                training: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Stacks layers and directions: run_layer(k, layer_in, reverse) -> (y, h_n, c_n or None) runs layer and
    direction k (layer-major, forward then reverse); the directions' outputs are concatenated, and dropout
    applies to every layer's output but the last's, in training. -> (y, h_n stacked, c_n stacked or None)."""
    hs, cs = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            y, h, c = run_layer(layer * directions + d, layer_in, d == 1)
            outs.append(y)
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, dim=1) if directions == 2 else outs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            layer_in = torch.nn.functional.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(hs), (None if cs[0] is None else torch.stack(cs))


def unpack_output(seq: PackedInput, y: Tensor, h_n: Tensor,
                  c_n: Optional[Tensor]) -> Tuple[Union[Tensor, PackedSequence], Tensor, Optional[Tensor]]:
    """The packed output y (rows, F) and final states in the form of the input: a PackedSequence (states in
    the caller's batch order), or padded / batch_first / unbatched."""
    if seq.packed is not None:
        if seq.packed.unsorted_indices is not None:
            h_n = h_n.index_select(1, seq.packed.unsorted_indices)
            c_n = None if c_n is None else c_n.index_select(1, seq.packed.unsorted_indices)
        p = seq.packed
        return PackedSequence(y, p.batch_sizes, p.sorted_indices, p.unsorted_indices), h_n, c_n
    output = y.reshape(seq.steps, seq.batch, y.shape[-1])
    if seq.batched and seq.batch_first:
        output = output.transpose(0, 1)
    if not seq.batched:
        output = output.squeeze(1)
        h_n = h_n.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(1)
    return output, h_n, c_n


def lstm(input, hx, weights, **kwargs):
    """``rnn("lstm", ...)``: a stacked LSTM as torch.nn.LSTM computes it -> (output, (h_n, c_n))."""
    return rnn("lstm", input, hx, weights, **kwargs)


def gru(input, hx, weights, **kwargs):
    """``rnn("gru", ...)``: a stacked GRU as torch.nn.GRU computes it -> (output, h_n)."""
    return rnn("gru", input, hx, weights, **kwargs)
