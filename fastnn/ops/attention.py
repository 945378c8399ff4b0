"""Fused attention: scaled_dot_product_attention (torch's signature), flash_attention, attention_decode.

Custom ops (``torch.ops.fastnn.*``): attention_forward, attention_backward (its autograd), attention_decode.
All three use the kernels' calling convention of fastnn/reference/attention.py (4-D (B, L, H, D) views,
last stride 1; varlen through cu_seqlens; the float bias or bool mask expanded to (B, H, Lq, Lk)).
Kernels:
  CPU   C++ (csrc/cpu/attention_*.cpp): tiled online softmax, fp32 accumulation, parallel over
        batch x heads x query blocks; backward recomputes P from the log-sum-exp, deterministic.
  CUDA  Triton (kernels/attention.py): FlashAttention-2 forward / backward (dK dV and dQ passes, no
        atomics) and a split-KV decode kernel with a combine step. Head dims 32-256 with D == Dv, float16,
        bfloat16 and float32 (float32 with a bias, dropout or softcap up to D = 64); anything else on CUDA
        (float64, other head dims) runs the reference, logged once.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._backend import _C, forced_backend, pick
from ..reference import attention as ref
from . import _checks, _direct, _onnx

_log = logging.getLogger("fastnn")
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_fallback_logged: set = set()


def _triton_attention():
    from fastnn.kernels import attention as ka  # imported on first use: importing triton costs ~1 s

    return ka


def _last_dim_contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _triton_can_run(q: Tensor, v: Tensor, general: bool) -> Optional[str]:
    """Why the Triton kernels cannot take these inputs (None when they can)."""
    try:
        return _triton_attention().unsupported(q.dtype, q.shape[-1], v.shape[-1], general)
    except ImportError as exc:
        return f"triton is not importable ({exc})"


def _log_once(op: str, why: str, message: str, *args) -> None:
    """Logs a fallback to the reference once per (op, reason)."""
    if (op, why) not in _fallback_logged:
        _fallback_logged.add((op, why))
        _log.warning(message, *args)


def _pick(op: str, q: Tensor, v: Tensor, impls: dict, general: bool = False):
    """pick(), except that CUDA inputs the Triton kernels do not cover (kernels.attention.unsupported) run the
    reference, logged once, unless a backend is forced (then the forced kernel raises its own error).
    general: a bias, dropout or softcap is used."""
    if q.device.type == "cuda" and forced_backend() is None:
        why = _triton_can_run(q, v, general)
        if why is not None:
            _log_once(op, why, "fastnn.%s on cuda runs the slow reference implementation for %s", op, why)
            return impls["reference"]
    return pick(op, q.device, impls, _PREFERENCE.get(q.device.type, ()))


# ---------------------------------------------------------------- implementations per backend

def _nonfinite(*tensors: Optional[Tensor], bias: Optional[Tensor] = None) -> bool:
    """Whether the (CPU) tensors hold a NaN or inf, or a float bias a NaN or +inf (-inf masks are allowed).
    The tensors: one parallel scan of exponent bits in C++ (0.35 ms for three 2 M-element bf16 tensors
    here, half of one torch sum per tensor; isnan().any() took 5 ms). The bias: a sum of its stored
    elements, where -inf must pass and NaN / +inf survive."""
    if not _C.all_finite_cpu(list(tensors)):
        return True
    if bias is not None and bias.is_floating_point():
        # an expanded (broadcast) bias: each stored element once
        stored = bias.as_strided([1 if st == 0 else n for n, st in zip(bias.shape, bias.stride())], bias.stride())
        total = stored.sum()
        if not (torch.isnan(total) or total == math.inf):
            return False
        # NaN / +inf in the sum: a NaN or +inf element, or large finite ones overflowing it (look once)
        return bool(torch.isnan(stored).any() or (stored == math.inf).any())
    return False


def _cpu_nonfinite_fallback(op: str, *tensors: Optional[Tensor], bias: Optional[Tensor] = None) -> bool:
    """The C++ kernels' max/exp steps do not carry NaN through; inputs with NaN or inf (checked at the cost
    of one pass, free of syncs on the CPU) run the reference, which propagates them like torch's math."""
    if not _nonfinite(*tensors, bias=bias):
        return False
    _log_once(op, "nonfinite", "fastnn.%s: non-finite inputs run the reference implementation", op)
    return True


def _forward_cpp(*args):
    q, k, v, bias = args[0], args[1], args[2], args[8]
    if _cpu_nonfinite_fallback("attention", q, k, v, bias=bias):
        return ref.attention_forward(*args)
    return tuple(_C.attention_forward_cpu(*args))


def _forward_triton(*args):
    return tuple(_triton_attention().forward(*args))


def _backward_reference(dout, q, k, v, out, lse, *rest):
    return ref.attention_backward(dout, q, k, v, out, lse, *rest)


# The backward recomputes p = exp(s - lse) from the saved float32 lse. A row whose scores are huge (under a
# finite mask of finfo.min, or an absurd scale) has an lse that cannot hold log(sum) beside them: float32's
# spacing at |lse| = 2^8 is 2^-15, so past that p's error would pass float32 accuracy. Such calls run the
# reference, which forms p from the row max. (torch's CPU flash backward has the same limit and returns
# wrong gradients there.)
_LSE_EXACT_LIMIT = 2.0 ** 8


def _huge_lse_fallback(op: str, lse: Tensor) -> bool:
    """Whether a finite |lse| passes _LSE_EXACT_LIMIT (CPU tensors: no sync), logged once."""
    finite = lse[torch.isfinite(lse)]
    if finite.numel() == 0 or float(finite.abs().max()) <= _LSE_EXACT_LIMIT:
        return False
    _log_once(op, "huge", "fastnn.%s: rows with |logsumexp| > %g run the reference", op, _LSE_EXACT_LIMIT)
    return True


def _backward_cpp(*args):
    dout, q, k, v, lse, bias = args[0], args[1], args[2], args[3], args[5], args[11]
    if _cpu_nonfinite_fallback("attention_backward", dout, q, k, v, bias=bias):
        return ref.attention_backward(*args)
    if _huge_lse_fallback("attention_backward", lse):
        return ref.attention_backward(*args)
    return tuple(_C.attention_backward_cpu(*args))


def _backward_triton(*args):
    # On CUDA the |lse| check would cost a sync per call: there such rows keep the limit of torch's flash
    # backward (bench/NOTES.md); the interpreter's CPU tensors take the reference like the C++ path.
    if args[5].device.type == "cpu" and _huge_lse_fallback("attention_backward", args[5]):
        return ref.attention_backward(*args)
    return tuple(_triton_attention().backward(*args))


_FORWARD_IMPLS = {"reference": ref.attention_forward, "cpp": _forward_cpp, "triton": _forward_triton}
_BACKWARD_IMPLS = {"reference": _backward_reference, "cpp": _backward_cpp, "triton": _backward_triton}


def _decode_reference(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right, num_splits):
    return ref.attention_forward(q, k_cache, v_cache, None, None, cache_seqlens, 0, 0, None, scale, softcap,
                                 window_left, window_right, True, 0.0, 0)


def _decode_rows_see_keys(cache_seqlens: Tensor, lq: int, window_left: int, window_right: int) -> Tensor:
    """(B, Lq) bool: whether decode query row i of sequence b sees at least one cache position. Row i sits at
    position s - Lq + i (s = cache_seqlens[b], bottom-right aligned) and sees [pos - left, pos + right]
    within [0, s) (-1: unbounded; causal is right = 0)."""
    s = cache_seqlens.long().view(-1, 1)
    pos = s - lq + torch.arange(lq, device=s.device).view(1, -1)
    lo = (pos - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(pos)
    hi = torch.minimum(pos + window_right, s - 1) if window_right >= 0 else (s - 1).expand_as(pos)
    return lo <= hi


def _decode_cpp(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right, num_splits):
    # On the CPU, decoding is the forward kernel with per-sequence key counts.
    # Only q is checked up front: cache entries past cache_seqlens are never read and may hold anything, and
    # a pass over the valid cache would cost as much as the decode itself.
    args = (q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right, num_splits)
    if _cpu_nonfinite_fallback("attention_decode", q):
        return _decode_reference(*args)
    out, lse = _C.attention_forward_cpu(q, k_cache, v_cache, None, None, cache_seqlens, 0, 0, None, scale,
                                        softcap, window_left, window_right, True, 0.0, 0)
    # A NaN or +inf score (from a non-finite key; NaN or inf in v reaches the output by itself) leaves its
    # row's lse NaN or -inf in the kernel, where torch's math gives NaN: such a row that has keys to see
    # reruns the call on the reference. (A row that sees no key has lse -inf legitimately.) All finite, the
    # common case, is one reduction.
    if bool(lse.isfinite().all()):
        return out, lse
    suspect = lse.isnan() | ((lse == -math.inf) & _decode_rows_see_keys(cache_seqlens, q.shape[1], window_left,
                                                                        window_right).unsqueeze(1))
    if bool(suspect.any()):
        _log_once("attention_decode", "nonfinite", "fastnn.%s: non-finite inputs run the reference implementation",
                  "attention_decode")
        return _decode_reference(*args)
    return out, lse


def _decode_triton(*args):
    return tuple(_triton_attention().decode(*args))


_DECODE_IMPLS = {"reference": _decode_reference, "cpp": _decode_cpp, "triton": _decode_triton}


# ---------------------------------------------------------------- custom ops

def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _like(x: Tensor, value: Tensor) -> Tensor:
    """value in x's dtype and strides (empty_like's layout: broadcast dims become dense)."""
    out = torch.empty_like(x)
    return value.to(x.dtype) if value.stride() == out.stride() else out.copy_(value)


def _seed_int(seed: Optional[Tensor], dropout_p: float) -> int:
    return int(seed.item()) if dropout_p > 0 and seed is not None else 0


def _fits_int32(t: Tensor, name: str) -> None:
    """The kernels take int32 offsets: wider values would wrap in the cast (checked eagerly on CPU tensors
    only, where it reads no device memory)."""
    if t.dtype != torch.int32 and t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < -2 ** 31 or hi >= 2 ** 31:
            raise ValueError(f"{name} must fit in int32 (the kernels' offsets); got values in [{lo}, {hi}]")


def _check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int) -> None:
    """Data checks of cu_seqlens; run in the op body on CPU tensors (on CUDA they would cost a sync)."""
    for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
        if cu.device.type != "cpu" or cu.numel() == 0:
            continue
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total:
            raise ValueError(f"{name} must start at 0, never decrease and end at the number of packed tokens "
                             f"({total}); got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")


@torch.library.custom_op("fastnn::attention_forward", mutates_args=())
def _attention_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
                          cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor], max_seqlen_q: int,
                          max_seqlen_k: int, bias: Optional[Tensor], scale: float, softcap: float,
                          window_left: int, window_right: int, bottom_right: bool, dropout_p: float,
                          seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _attention_forward_body(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias,
                                   scale, softcap, window_left, window_right, bottom_right, dropout_p, seed)


def _attention_forward_body(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias, scale,
                            softcap, window_left, window_right, bottom_right, dropout_p, seed):
    """The attention_forward op's body (the op, or _run_forward's direct call: ._direct)."""
    B, Lq, H, _ = q.shape
    if cu_seqlens_q is not None:
        _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, Lq, k.shape[1])
    if B * Lq * H == 0 or k.shape[1] == 0 or v.shape[-1] == 0:  # nothing to attend to: zeros, lse -inf
        return (q.new_zeros(B, Lq, H, v.shape[-1]),
                torch.full((B, H, Lq), -math.inf, dtype=_lse_dtype(q), device=q.device))
    # head_dim 0: every score is 0 (plus the bias), so rows still average v; only the reference handles it
    impl = (ref.attention_forward if q.shape[-1] == 0 else
            _pick("attention", q, v, _FORWARD_IMPLS, bias is not None or dropout_p > 0 or softcap > 0))
    out, lse = impl(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), cu_seqlens_q,
                    cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias, scale, softcap, window_left,
                    window_right, bottom_right, dropout_p, _seed_int(seed, dropout_p))
    return out, lse


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias,
                            scale, softcap, window_left, window_right, bottom_right, dropout_p, seed):
    B, Lq, H, _ = q.shape
    return q.new_empty(B, Lq, H, v.shape[-1]), q.new_empty(B, H, Lq, dtype=_lse_dtype(q))


@torch.library.custom_op("fastnn::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                           seqused_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                           bias: Optional[Tensor], bias_requires_grad: bool, scale: float, softcap: float,
                           window_left: int, window_right: int, bottom_right: bool, dropout_p: float,
                           seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias); dbias is the full (B, H, Lq, Lk) gradient in the bias dtype, or an empty
    tensor when bias_requires_grad is False."""
    return _attention_backward_body(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                    max_seqlen_k, bias, bias_requires_grad, scale, softcap, window_left, window_right,
                                    bottom_right, dropout_p, seed)


def _attention_backward_body(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                             max_seqlen_k, bias, bias_requires_grad, scale, softcap, window_left, window_right,
                             bottom_right, dropout_p, seed):
    """The attention_backward op's body (the op, or _forward_backward's direct call)."""
    want_dbias = bias_requires_grad and bias is not None and bias.dtype != torch.bool
    if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[1] == 0 or v.shape[-1] == 0:
        dbias = torch.zeros_like(bias) if want_dbias else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    impl = (_backward_reference if q.shape[-1] == 0 else
            _pick("attention_backward", q, v, _BACKWARD_IMPLS, bias is not None or dropout_p > 0 or softcap > 0))
    dq, dk, dv, dbias = impl(_last_dim_contiguous(dout), _last_dim_contiguous(q), _last_dim_contiguous(k),
                             _last_dim_contiguous(v), out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                             max_seqlen_k, bias, want_dbias, scale, softcap, window_left, window_right,
                             bottom_right, dropout_p, _seed_int(seed, dropout_p))
    # gradients in their inputs' layouts, as the fake promises (and as the compiler expects)
    dbias = _like(bias, dbias) if want_dbias else q.new_empty(0)
    return _like(q, dq), _like(k, dk), _like(v, dv), dbias


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                             max_seqlen_k, bias, bias_requires_grad, scale, softcap, window_left, window_right,
                             bottom_right, dropout_p, seed):
    want_dbias = bias_requires_grad and bias is not None and bias.dtype != torch.bool
    dbias = torch.empty_like(bias) if want_dbias else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_FORWARD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "max_seqlen_q", "max_seqlen_k", "bias",
                 "scale", "softcap", "window_left", "window_right", "bottom_right", "dropout_p", "seed")
_BIAS_INDEX = _FORWARD_ARGS.index("bias")


def _forward_setup_context(ctx, inputs, output):
    a = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(a["q"], a["k"], a["v"], out, lse, a["cu_seqlens_q"], a["cu_seqlens_k"], a["seqused_k"],
                          a["bias"], a["seed"])
    ctx.params = (a["max_seqlen_q"], a["max_seqlen_k"], a["scale"], a["softcap"], a["window_left"],
                  a["window_right"], a["bottom_right"], a["dropout_p"])


def _forward_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, used_k, bias, seed = ctx.saved_tensors
    max_q, max_k, scale, softcap, wl, wr, br, p = ctx.params
    bias_grad = bool(ctx.needs_input_grad[_BIAS_INDEX])
    # (under create_graph the op path raises, having no double backward: the body would instead return
    # gradients without history, silently)
    direct = not torch.is_grad_enabled() and _direct.plain_eager(dout, q, k, v, out, lse, cu_q, cu_k, used_k, bias,
                                                                 seed)
    backward = _attention_backward_body if direct else functools.partial(_direct.run_op,
                                                                         torch.ops.fastnn.attention_backward)
    dq, dk, dv, dbias = backward(
        dout, q, k, v, out, lse, cu_q, cu_k, used_k, max_q, max_k, bias, bias_grad, scale, softcap, wl, wr, br, p,
        seed)
    grads = [dq, dk, dv] + [None] * (len(_FORWARD_ARGS) - 3)
    if bias_grad:
        grads[_BIAS_INDEX] = dbias
    return tuple(grads)


_direct.register_autograd(_attention_forward_op, _forward_backward, _forward_setup_context)
_direct.register_backward_op(_attention_backward_op)


_AttentionFunction = _direct.autograd_function(_attention_forward_body, _forward_setup_context, _forward_backward)


def _run_forward(*args) -> Tuple[Tensor, Tensor]:
    """attention_forward(*args): the op, or in plain eager mode its body (._direct), which spares small calls
    ~20 us of dispatch."""
    return _direct.call(torch.ops.fastnn.attention_forward, _attention_forward_body, _AttentionFunction, *args)


@torch.library.custom_op("fastnn::attention_decode", mutates_args=())
def _attention_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float,
                         softcap: float, window_left: int, window_right: int,
                         num_splits: int) -> Tuple[Tensor, Tensor]:
    return _attention_decode_body(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right,
                                  num_splits)


def _attention_decode_body(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right, num_splits):
    """The attention_decode op's body (the op, or attention_decode's direct call in plain eager mode: ._direct)."""
    B, Lq, H, _ = q.shape
    if q.numel() == 0 or k_cache.shape[1] == 0 or v_cache.shape[-1] == 0:
        return (q.new_zeros(B, Lq, H, v_cache.shape[-1]),
                torch.full((B, H, Lq), -math.inf, dtype=_lse_dtype(q), device=q.device))
    impl = _pick("attention_decode", q, v_cache, _DECODE_IMPLS)
    out, lse = impl(_last_dim_contiguous(q), _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache),
                    cache_seqlens, scale, softcap, window_left, window_right, num_splits)
    return out, lse


@_attention_decode_op.register_fake
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, window_right,
                           num_splits):
    B, Lq, H, _ = q.shape
    return q.new_empty(B, Lq, H, v_cache.shape[-1]), q.new_empty(B, H, Lq, dtype=_lse_dtype(q))


# ---------------------------------------------------------------- validation shared by the public functions

def _check_qkv(q: Tensor, k: Tensor, v: Tensor, names=("q", "k", "v")) -> None:
    qn, kn, vn = names
    _checks.tensor(q, qn, dtypes=ATTENTION_DTYPES)
    _checks.tensor(k, kn, dtypes=ATTENTION_DTYPES)
    _checks.tensor(v, vn, dtypes=ATTENTION_DTYPES)
    _checks.same_device(qn, q, **{kn: k, vn: v})
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{qn}, {kn} and {vn} must have the same dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in ((qn, q), (kn, k), (vn, v)):
        if t.dim() == 0:
            raise ValueError(f"{name} must have dimensions (..., seqlen, heads, head_dim); got a 0-d tensor")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{qn} and {kn} must have the same head dim (last size); got {q.shape[-1]} and {k.shape[-1]}")


def _check_heads(H: int, Hkv: int, qn: str, kn: str, allow_gqa: bool) -> None:
    if H == Hkv == 0:  # no heads: an empty result, as torch's
        return
    if Hkv == 0 or H % Hkv != 0 or (not allow_gqa and H != Hkv):
        want = "a divisor of" if allow_gqa else "equal to"
        raise ValueError(f"the number of heads of {kn} ({Hkv}) must be {want} the number of heads of {qn} ({H})"
                         + ("" if allow_gqa else "; pass enable_gqa=True for grouped-query attention"))


def _window_pair(window, causal: bool) -> Tuple[int, int]:
    if window is None:
        window = (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), -1 for unbounded; got {window!r}")
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window sizes must be >= 0, or -1 for unbounded; got {window!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _scale_value(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    value = _checks.real_number(scale, "scale")
    # abs() == inf, not math.isinf: a SymFloat under torch.compile(dynamic=True) cannot go through math
    if abs(value) == math.inf:  # inf * 0 scores would be NaN, and every other score infinite
        raise ValueError(f"scale must be finite; got {value}")
    return value


def _dropout_value(dropout_p) -> float:
    p = _checks.real_number(dropout_p, "dropout_p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {p}")
    return p


def _softcap_value(softcap) -> float:
    c = _checks.real_number(softcap, "softcap")
    if c < 0 or c == math.inf:
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it); got {c}")
    return c


def _draw_seed(dropout_p: float) -> Optional[Tensor]:
    """A 63-bit dropout seed from torch's default CPU generator (torch.manual_seed makes it repeatable)."""
    if dropout_p <= 0:
        return None
    return torch.randint(0, 2 ** 62, (), dtype=torch.long)


def _bias_for(bias: Optional[Tensor], q: Tensor, shape: Sequence[int], name: str) -> Optional[Tensor]:
    """bias checked and expanded (a view, no copy) to `shape` = (B, H, Lq, Lk)."""
    if bias is None:
        return None
    _checks.tensor(bias, name)
    _checks.same_device("query" if name == "attn_mask" else "q", q, **{name: bias})
    if bias.dtype != torch.bool and bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{name} must be bool or have the query's dtype ({q.dtype}) or float32; got {bias.dtype}")
    try:
        return bias.expand(*shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(bias.shape)} does not broadcast to {tuple(shape)} "
                         "(batch, heads, query length, key length)") from None


# ---------------------------------------------------------------- public functions

def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, window=(-1, -1),
                    softcap: float = 0.0, bias: Optional[Tensor] = None, dropout_p: float = 0.0,
                    scale: Optional[float] = None, cu_seqlens_q: Optional[Tensor] = None,
                    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None, seqused_k: Optional[Tensor] = None,
                    return_lse: bool = False):
    """Fused attention in flash-attention's layout, differentiable in q, k, v and a float bias.

    Args:
        q: (B, Lq, H, D) queries, or (total_q, H, D) packed sequences with ``cu_seqlens_q``. float16,
            bfloat16, float32 (computed in float32) or float64; CPU or CUDA.
        k: (B, Lk, Hkv, D) keys (or (total_k, Hkv, D)); H must be a multiple of Hkv (grouped-query /
            multi-query attention: query head h uses key head h // (H // Hkv)).
        v: (B, Lk, Hkv, Dv) values, same dtype and device.
        causal: query i sees keys j <= i + Lk - Lq: causal masking aligned to the bottom-right corner
            when Lq != Lk (the last query sees every key), as in flash-attention. (torch SDPA's is_causal
            aligns top-left; :func:`scaled_dot_product_attention` keeps that.)
        window: (left, right) sliding window: query i sees keys i + Lk - Lq - left ... i + Lk - Lq + right;
            -1 leaves a side unbounded. causal=True sets right to 0.
        softcap: when > 0, scores s become softcap * tanh(s / softcap) (before the bias).
        bias: additive float bias (q's dtype or float32) or bool mask (True takes part), broadcastable to
            (B, H, Lq, Lk); it gets a gradient when it requires grad. Not with cu_seqlens.
        dropout_p: dropout on the attention probabilities (a counter-based mask seeded from torch's
            default generator and regenerated identically in the backward).
        scale: score scale, 1/sqrt(D) by default.
        cu_seqlens_q, cu_seqlens_k: (nseq + 1,) int32 cumulative sequence lengths of the packed batch,
            from 0 to the number of packed tokens.
        max_seqlen_q, max_seqlen_k: the longest sequences (computed from cu_seqlens when omitted; on CUDA
            that costs a host sync, and cu_seqlens values are not validated there).
        seqused_k: (B,) int32 number of valid keys per sequence (the rest are ignored).
        return_lse: also return the log-sum-exp of each row's scores: (B, H, Lq) or (H, total_q), float32.

    Returns:
        out with q's leading shape and Dv (plus lse when return_lse). A query row that sees no key
        returns zeros (not NaN) and lse -inf.
    """
    _check_qkv(q, k, v)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    want = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "(total, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
            raise ValueError(f"{name} must be {want}-D {layout}; got shape {tuple(t.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on all but the last size; got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size; got {q.shape[0]} and {k.shape[0]}")
    H, Hkv = q.shape[-2], k.shape[-2]
    _check_heads(H, Hkv, "q", "k", True)
    left, right = _window_pair(window, bool(causal))
    sc = _softcap_value(softcap)
    p = _dropout_value(dropout_p)
    s = _scale_value(scale, q.shape[-1])
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        if bias is not None:
            raise ValueError("bias is not supported with cu_seqlens (packed sequences)")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            _checks.tensor(cu, name, integer=True)
            _checks.same_device("q", q, **{name: cu})
            if cu.dim() != 1 or cu.numel() < 1:
                raise ValueError(f"{name} must be 1-D with nseq + 1 entries; got shape {tuple(cu.shape)}")
            _fits_int32(cu, name)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (nseq + 1); got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        cu_q, cu_k = cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous()
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        nseq = cu_q.numel() - 1
    else:
        cu_q = cu_k = None
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
        q4, k4, v4 = q, k, v
        nseq = q.shape[0]
    used = None
    if seqused_k is not None:
        _checks.tensor(seqused_k, "seqused_k", integer=True, shape=(nseq,))
        _checks.same_device("q", q, seqused_k=seqused_k)
        _fits_int32(seqused_k, "seqused_k")
        used = seqused_k.to(torch.int32).contiguous()
    b4 = None if bias is None else _bias_for(bias, q, (q.shape[0], H, q.shape[1], k.shape[1]), "bias")
    out, lse = _run_forward(q4, k4, v4, cu_q, cu_k, used, int(max_seqlen_q), int(max_seqlen_k), b4, s, sc, left, right,
                            True, p, _draw_seed(p))
    if varlen:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature and semantics.

    Args:
        query: (N, ..., Hq, L, E); key: (N, ..., H, S, E); value: (N, ..., H, S, Ev). float16, bfloat16,
            float32 or float64, CPU or CUDA.
        attn_mask: bool (True takes part) or float (added to the scores; query's dtype or float32), broadcastable
            to (N, ..., Hq, L, S). Not together with is_causal (as torch).
        dropout_p: dropout probability, applied whenever > 0 (as torch's functional form). The mask is fastnn's
            counter-based one seeded from torch's default generator, so it differs from torch's bits.
        is_causal: causal mask aligned top-left (query i sees keys j <= i), as torch.
        scale: defaults to 1 / sqrt(E).
        enable_gqa: allow Hq to be a multiple of H (grouped-query attention).

    Returns:
        (N, ..., Hq, L, Ev) in query's dtype, stored as (N, ..., L, Hq, Ev) underneath (a transposed view, as
        torch's flash kernel returns). Differs from torch in one documented way: a query row whose keys are all
        masked returns zeros, where torch's math backend returns NaN.
    """
    _check_qkv(query, key, value, names=("query", "key", "value"))
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError("query, key and value must have the same number of dimensions, at least 3 "
                         f"((N, ..., H, L, E)); got {query.dim()}, {key.dim()}, {value.dim()}")
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(f"query, key and value must have the same batch dims; got {tuple(query.shape[:-3])}, "
                         f"{tuple(key.shape[:-3])}, {tuple(value.shape[:-3])}")
    if key.shape[-2] != value.shape[-2] or key.shape[-3] != value.shape[-3]:
        raise ValueError(f"key and value must have the same heads and length; got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    Hq, L, E = query.shape[-3:]
    Hkv, S = key.shape[-3], key.shape[-2]
    _check_heads(Hq, Hkv, "query", "key", bool(enable_gqa))
    p = _dropout_value(dropout_p)
    s = _scale_value(scale, E)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (as in torch)")
    if _onnx.exporting():
        _bias_for(attn_mask, query, (*lead, Hq, L, S), "attn_mask")  # (its checks; the graph broadcasts the mask)
        return _onnx.scaled_dot_product_attention(query, key, value, attn_mask, p, bool(is_causal), s,
                                                  bool(enable_gqa))
    B = math.prod(lead) if lead else 1
    q4 = query.reshape(B, Hq, L, E).transpose(1, 2)
    k4 = key.reshape(B, Hkv, S, E).transpose(1, 2)
    v4 = value.reshape(B, Hkv, S, value.shape[-1]).transpose(1, 2)
    b4 = None
    if attn_mask is not None:
        full = _bias_for(attn_mask, query, (*lead, Hq, L, S), "attn_mask")
        b4 = full.reshape(B, Hq, L, S)
    out, _ = _run_forward(q4, k4, v4, None, None, None, L, S, b4, s, 0.0, -1, 0 if is_causal else -1, False, p,
                          _draw_seed(p))
    return out.transpose(1, 2).reshape(*lead, Hq, L, value.shape[-1])


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                     scale: Optional[float] = None, causal: bool = False, window=(-1, -1), softcap: float = 0.0,
                     num_splits: int = 0, return_lse: bool = False):
    """Attention of a few new query tokens against a KV cache (inference; no autograd).

    Args:
        q: (B, Lq, H, D) new queries (Lq small: 1 for plain decoding, a few for speculative decoding).
        k_cache: (B, Lk_max, Hkv, D) key cache; v_cache: (B, Lk_max, Hkv, Dv); H a multiple of Hkv.
        cache_seqlens: (B,) integer number of valid cache entries per sequence (the new tokens' keys
            included: write them into the cache first). Entries past it are never read.
        causal: query i sees cache positions j <= i + cache_seqlens[b] - Lq (bottom-right aligned).
        window, softcap, scale: as in :func:`flash_attention`.
        num_splits: how many parts the keys are split into on CUDA (combined afterwards); 0 chooses from the
            shape to fill the GPU. Ignored on the CPU.
        return_lse: also return the (B, H, Lq) float32 log-sum-exp.

    Returns:
        (B, Lq, H, Dv) output (and lse). A sequence with cache_seqlens 0 gives zeros.
    """
    _check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim); got shape {tuple(t.shape)}")
    if k_cache.shape[:-1] != v_cache.shape[:-1] or k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on all "
                         f"but the last size, with q's batch size {q.shape[0]}")
    _check_heads(q.shape[2], k_cache.shape[2], "q", "k_cache", True)
    _checks.tensor(cache_seqlens, "cache_seqlens", integer=True, shape=(q.shape[0],))
    _checks.same_device("q", q, cache_seqlens=cache_seqlens)
    # eager CUDA skips the check (a host read per decode step); a compiled graph checks on the device
    if cache_seqlens.numel() and (cache_seqlens.device.type == "cpu" or torch.compiler.is_compiling()):
        cache_len = k_cache.shape[1]
        _checks.values(((cache_seqlens >= 0) & (cache_seqlens <= cache_len)).all(),
                       lambda: f"cache_seqlens must be in [0, {_checks.size_text(cache_len, 'k_cache.shape[1]')}] "
                               f"(the cache length); got {_checks.shown(cache_seqlens)}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic); got {num_splits!r}")
    left, right = _window_pair(window, bool(causal))
    seqlens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    args = (q.detach(), k_cache.detach(), v_cache.detach(), seqlens.contiguous(), _scale_value(scale, q.shape[-1]),
            _softcap_value(softcap), left, right, int(num_splits))
    out, lse = _direct.call(torch.ops.fastnn.attention_decode, _attention_decode_body, None, *args)
    return (out, lse) if return_lse else out
