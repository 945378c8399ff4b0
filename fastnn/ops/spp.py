"""Spatial pyramid pooling ops: spp_pool (He et al.'s SPP) and sppf_pool (YOLOv5's SPPF pooling).

Custom ops (``torch.ops.fastnn.*``): spp_pool, sppf_pool and their backward ops. Each forward and each
backward is one fused kernel that writes the concatenated result directly:
  CPU   C++ (csrc/cpu/spp_cpu.cpp): blocks of channels in parallel, contiguous NCHW or channels_last input
        read in place (the output keeps the input's layout), fp32 / fp64 / fp16 / bf16 (fp32 compute).
  CUDA  Triton (kernels/spp.py), on contiguous NCHW (other layouts are made contiguous first).

Max pooling picks what torch picks (row-major first maximum, last NaN; all -inf: the window's first
element), so gradients land where torch.nn.functional's chain puts them, ties included. Backward kernels
own their gradient planes (no atomics): results are deterministic.
"""
from __future__ import annotations

import numbers
from typing import List, Sequence

import torch
from torch import Tensor

from .._backend import _C, pick
from ..reference import spp as ref
from . import _checks, _direct, _onnx

# Dispatch preference per device (first usable wins; use_backend overrides). Only Triton exists for CUDA.
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}


def _preference(device: torch.device):
    """The Triton kernels are checked spill-free for sm_90 only (kernels/spp.py): older GPUs run the
    reference (logged once)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return ()
    return _PREFERENCE.get(device.type, ())
MODES = ("max", "avg")


def _triton_spp():
    from fastnn.kernels import spp as ks  # imported on first use: importing triton costs ~1 s

    return ks


def is_channels_last(x: Tensor) -> bool:
    """Whether the kernels treat `x` as channels_last (C > 1, H * W > 1, not NCHW-contiguous); outputs of
    sppf_pool and gradients of x then come back channels_last too."""
    return (x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def _new_4d(x: Tensor, channels: int) -> Tensor:
    n, _, h, w = x.shape
    if is_channels_last(x):
        return x.new_empty((n, h, w, channels)).permute(0, 3, 1, 2)
    return x.new_empty((n, channels, h, w))


# ---------------------------------------------------------------- SPPF pooling

def _sppf_backward_reference(grad, x, k):
    _, vjp = torch.func.vjp(lambda t: ref.sppf_pool(t, k), x)
    return vjp(grad)[0]


_SPPF_IMPLS = {
    "reference": ref.sppf_pool,
    "cpp": lambda x, k: _C.sppf_pool_cpu(x, k),
    "triton": lambda x, k: _triton_spp().sppf_pool(x.contiguous(), k),
}
_SPPF_BACKWARD_IMPLS = {
    "reference": _sppf_backward_reference,
    "cpp": lambda grad, x, k: _C.sppf_pool_backward_cpu(grad, x, k),
    "triton": lambda grad, x, k: _triton_spp().sppf_pool_backward(grad.contiguous(), x.contiguous(), k),
}


@torch.library.custom_op("fastnn::sppf_pool", mutates_args=())
def _sppf_pool_op(x: Tensor, k: int) -> Tensor:
    return _sppf_pool_body(x, k)


def _sppf_pool_body(x: Tensor, k: int) -> Tensor:
    """The sppf_pool op's body (the op, or sppf_pool's direct call: ._direct)."""
    if x.numel() == 0:
        return _new_4d(x, 4 * x.shape[1])
    impl = pick("sppf_pool", x.device, _SPPF_IMPLS, _preference(x.device))
    return _like_input(impl(x, k), x)


@_sppf_pool_op.register_fake
def _sppf_pool_fake(x, k):
    return _new_4d(x, 4 * x.shape[1])


@torch.library.custom_op("fastnn::sppf_pool_backward", mutates_args=())
def _sppf_pool_backward_op(grad: Tensor, x: Tensor, k: int) -> Tensor:
    if x.numel() == 0:
        return _new_4d(x, x.shape[1]).zero_()
    impl = pick("sppf_pool_backward", x.device, _SPPF_BACKWARD_IMPLS, _preference(x.device))
    return _like_input(impl(grad.to(x.dtype), x, k), x)


@_sppf_pool_backward_op.register_fake
def _sppf_pool_backward_fake(grad, x, k):
    return _new_4d(x, x.shape[1])


def _sppf_setup_context(ctx, inputs, output):
    x, k = inputs
    ctx.save_for_backward(x)
    ctx.k = k


def _sppf_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _direct.run_op(torch.ops.fastnn.sppf_pool_backward, grad, x, ctx.k), None


_direct.register_autograd(_sppf_pool_op, _sppf_backward, _sppf_setup_context)
_direct.register_backward_op(_sppf_pool_backward_op)
# the op's body with its autograd, without torch.library's dispatch (~20 us a call), in plain eager mode
_SppfPoolFunction = _direct.autograd_function(_sppf_pool_body, _sppf_setup_context, _sppf_backward)


# ---------------------------------------------------------------- SPP

def _spp_backward_reference(grad, x, levels, mode):
    _, vjp = torch.func.vjp(lambda t: ref.spp_pool(t, levels, mode), x)
    return vjp(grad)[0]


_SPP_IMPLS = {
    "reference": ref.spp_pool,
    "cpp": lambda x, levels, mode: _C.spp_pool_cpu(x, levels, mode == "avg"),
    "triton": lambda x, levels, mode: _triton_spp().spp_pool(x.contiguous(), levels, mode == "avg"),
}
_SPP_BACKWARD_IMPLS = {
    "reference": _spp_backward_reference,
    "cpp": lambda grad, x, levels, mode: _C.spp_pool_backward_cpu(grad, x, levels, mode == "avg"),
    "triton": lambda grad, x, levels, mode: _triton_spp().spp_pool_backward(grad.contiguous(), x.contiguous(),
                                                                            levels, mode == "avg"),
}


def _bins(levels: Sequence[int]) -> int:
    return sum(int(lv) * int(lv) for lv in levels)


@torch.library.custom_op("fastnn::spp_pool", mutates_args=())
def _spp_pool_op(x: Tensor, levels: List[int], mode: str) -> Tensor:
    # (again: a raw call of the op skips spp_pool's checks)
    return _spp_pool_body(x, check_levels(levels), check_mode(mode))


def _spp_pool_body(x: Tensor, levels: List[int], mode: str) -> Tensor:
    """The spp_pool op's body, for checked levels (the op, or spp_pool's direct call: ._direct)."""
    if x.numel() == 0:
        return x.new_empty((x.shape[0], x.shape[1] * _bins(levels)))
    impl = pick("spp_pool", x.device, _SPP_IMPLS, _preference(x.device))
    return impl(x, list(levels), mode).contiguous()


@_spp_pool_op.register_fake
def _spp_pool_fake(x, levels, mode):
    return x.new_empty((x.shape[0], x.shape[1] * _bins(levels)))


@torch.library.custom_op("fastnn::spp_pool_backward", mutates_args=())
def _spp_pool_backward_op(grad: Tensor, x: Tensor, levels: List[int], mode: str) -> Tensor:
    levels, mode = check_levels(levels), check_mode(mode)
    if x.numel() == 0:
        return _new_4d(x, x.shape[1]).zero_()
    impl = pick("spp_pool_backward", x.device, _SPP_BACKWARD_IMPLS, _preference(x.device))
    return _like_input(impl(grad.to(x.dtype), x, list(levels), mode), x)


@_spp_pool_backward_op.register_fake
def _spp_pool_backward_fake(grad, x, levels, mode):
    return _new_4d(x, x.shape[1])


def _spp_setup_context(ctx, inputs, output):
    x, levels, mode = inputs
    ctx.save_for_backward(x)
    ctx.levels, ctx.mode = levels, mode


def _spp_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _direct.run_op(torch.ops.fastnn.spp_pool_backward, grad, x, ctx.levels, ctx.mode), None, None


_direct.register_autograd(_spp_pool_op, _spp_backward, _spp_setup_context)
_direct.register_backward_op(_spp_pool_backward_op)
_SppPoolFunction = _direct.autograd_function(_spp_pool_body, _spp_setup_context, _spp_backward)


# ---------------------------------------------------------------- public functions

_MAX_BINS = 2 ** 31 - 1


def check_levels(levels) -> List[int]:
    """Validates SPP levels: a non-empty list or tuple of positive Python ints (not bools)."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels must be a list or tuple of positive ints, got {type(levels).__name__}")
    if len(levels) == 0:
        raise ValueError("levels must not be empty")
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, numbers.Integral):
            raise TypeError(f"levels must hold ints, got {lv!r} ({type(lv).__name__})")
        if lv <= 0:
            raise ValueError(f"levels must be positive ints, got {lv}")
    bins = sum(int(lv) * int(lv) for lv in levels)
    if bins > _MAX_BINS:  # (l * l wrapped in the kernels' int64 past l = 2^32, and their bin tables hold l rows)
        raise ValueError(f"levels must give at most {_MAX_BINS} bins per channel (sum of l * l); got {bins} for "
                         f"{list(levels) if len(levels) <= 8 else list(levels[:8]) + ['...']}")
    return [int(lv) for lv in levels]


def check_mode(mode) -> str:
    """Validates the SPP pooling mode: "max" or "avg"."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return mode


def check_kernel_size(k) -> int:
    """Validates SPPF's pool size: a positive odd Python int (the pool keeps H and W only when k is odd)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd int, got {k}")
    return int(k)


def _check_x(x) -> Tensor:
    return _checks.tensor(x, "x", dtypes=_checks.FLOAT_DTYPES, shape=(None, None, None, None))


def spp_pool(x: Tensor, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> Tensor:
    """Spatial pyramid pooling (He et al., 2014): a fixed-length vector for any input size.

    For each level l, x is pooled into l x l adaptive bins, flattened, and the levels are concatenated:
    ``cat([flatten(adaptive_pool(x, l), 1) for l in levels], 1)`` with ``adaptive_pool`` =
    ``torch.nn.functional.adaptive_max_pool2d`` or ``adaptive_avg_pool2d``, whose bins it reproduces exactly:
    bin i of a level covers rows ``floor(i * H / l)`` to ``ceil((i + 1) * H / l)`` (exclusive), columns likewise,
    so bins may overlap when l does not divide H, and a level larger than H or W repeats rows or columns.

    Output layout: level blocks in the order of ``levels``; inside a level's block of ``C * l * l`` values,
    channel c's bin (i, j) is at ``c * l * l + i * l + j``.

    Args:
        x: (N, C, H, W) with H, W > 0; float16, bfloat16, float32 or float64; CPU or CUDA; NCHW or
            channels_last (read in place on the CPU).
        levels: non-empty list/tuple of positive ints (default (1, 2, 4)).
        mode: "max" or "avg".

    Returns:
        (N, C * sum(l * l for l in levels)) in x's dtype. Differentiable (max: the gradient goes to the element
        torch's adaptive_max_pool2d picks; avg: spread evenly over the bin). NaN propagates as in torch. N = 0
        or C = 0 gives an empty result.
    """
    _check_x(x)
    levels = check_levels(levels)
    mode = check_mode(mode)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must have positive H and W for spp_pool, got shape {tuple(x.shape)}")
    if _onnx.exporting():
        return _onnx.spp_pool(x, levels, mode)
    return _direct.call(torch.ops.fastnn.spp_pool, _spp_pool_body, _SppPoolFunction, x, levels, mode)


def sppf_pool(x: Tensor, k: int = 5) -> Tensor:
    """YOLOv5 SPPF pooling: ``cat([x, y1, y2, y3], 1)`` with ``y1 = m(x)``, ``y2 = m(y1)``, ``y3 = m(y2)`` and
    ``m = max_pool2d(kernel_size=k, stride=1, padding=k // 2)`` (-inf padding).

    The three chained pools equal single max pools of sizes k, 2k - 1 and 3k - 2; the kernels compute them
    as separable row / column maxima, reading x once and writing each of the four slices once.

    Args:
        x: (N, C, H, W); float16, bfloat16, float32 or float64; CPU or CUDA; NCHW or channels_last (on the CPU
            read in place, and the result is channels_last too).
        k: pool size, a positive odd int (default 5, YOLOv5's). A k past 2 max(H, W) - 1 pools the same as that
            size (every window already covers the plane) and is run as it.

    Returns:
        (N, 4C, H, W) in x's dtype. Differentiable: the gradient of each pooled slice goes back through the
        chain exactly as torch's max_pool2d backward routes it (ties and NaN included). Empty x gives an empty
        result.
    """
    _check_x(x)
    k = check_kernel_size(k)
    # From every pixel a window of radius max(H, W) - 1 already covers the whole plane: a larger k pools the
    # same values with the same argmax (so the same gradients), while the kernels' scratch grows with k.
    reach = max(x.shape[2], x.shape[3]) - 1
    if reach >= 0 and k // 2 > reach:
        k = 2 * reach + 1
    if _onnx.exporting():
        return ref.sppf_pool(x, k)
    return _direct.call(torch.ops.fastnn.sppf_pool, _sppf_pool_body, _SppfPoolFunction, x, k)
