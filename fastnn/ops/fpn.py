"""FPN top-down step, the fused op of fastnn.nn.FeaturePyramidNetwork: fpn_topdown_add.

``fpn_topdown_add(lateral, top) = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")``
in one kernel per call (torch materialises the upsampled top, then reads it back for the add).

Custom ops (``torch.ops.fastnn.*``): fpn_topdown_add and fpn_topdown_add_backward (the gradient with respect
to top; the gradient with respect to lateral is the upstream gradient itself). Kernels:
  CPU   C++ (csrc/cpu/fpn_cpu.cpp): NCHW and channels_last read in place, parallel over rows, vectorised adds.
  CUDA  Triton (kernels/fpn.py): one program per block of output elements in memory order.
The backward is a gather over each top pixel's nearest-source preimage (a rectangle of output pixels) in a
fixed order: deterministic, no atomics (torch's CUDA upsample backward uses float atomics).
Layout: the output is channels_last when lateral is channels_last (and not also contiguous), NCHW otherwise.
float16/bfloat16 add and accumulate in float32; float64 in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _alloc
from .._backend import _C, pick
from ..reference import fpn as ref
from . import _checks, _direct, _onnx

# CPU: the C++ kernel; CUDA: Triton (the only GPU kernel).
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}


def _triton_fpn():
    from fastnn.kernels import fpn as kf  # imported on first use: importing triton costs ~1 s

    return kf


def channels_last(t: Tensor) -> bool:
    """Whether the op treats a 4-d tensor as channels_last: dense in that layout and not also contiguous (never
    under torch.vmap, where the layout cannot be queried)."""
    if _direct.vmapped(t):
        return False
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _format(is_cl: bool):
    return torch.channels_last if is_cl else torch.contiguous_format


def _new(shape, like: Tensor, is_cl: bool) -> Tensor:
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_format(is_cl))
    if _alloc.poisoning() and out.numel():
        out.fill_(float("nan"))
    return out


def _forward_reference(lateral: Tensor, top: Tensor) -> Tensor:
    return ref.fpn_topdown_add(lateral, top).contiguous(memory_format=_format(channels_last(lateral)))


def _backward_reference(grad: Tensor, top_hw, is_cl: bool) -> Tensor:
    return ref.fpn_topdown_add_backward(grad, top_hw).contiguous(memory_format=_format(is_cl))


_IMPLS = {
    "reference": _forward_reference,
    "cpp": lambda lateral, top: _C.fpn_topdown_add_cpu(lateral, top),
    "triton": lambda lateral, top: _triton_fpn().fpn_topdown_add(lateral, top),
}
_BACKWARD_IMPLS = {
    "reference": _backward_reference,
    "cpp": lambda grad, hw, is_cl: _C.fpn_topdown_add_backward_cpu(grad, hw[0], hw[1], is_cl),
    "triton": lambda grad, hw, is_cl: _triton_fpn().fpn_topdown_add_backward(grad, hw[0], hw[1], is_cl),
}


@torch.library.custom_op("fastnn::fpn_topdown_add", mutates_args=())
def _fpn_topdown_add_op(lateral: Tensor, top: Tensor) -> Tensor:
    return _fpn_topdown_add_body(lateral, top)


def _fpn_topdown_add_body(lateral: Tensor, top: Tensor) -> Tensor:
    """The fpn_topdown_add op's body (the op, or fpn_topdown_add's direct call: ._direct)."""
    if lateral.numel() == 0:
        return _new(lateral.shape, lateral, channels_last(lateral))
    impl = pick("fpn_topdown_add", lateral.device, _IMPLS, _PREFERENCE.get(lateral.device.type, ()))
    return impl(lateral, top)


@_fpn_topdown_add_op.register_fake
def _fpn_topdown_add_fake(lateral, top):
    return torch.empty(lateral.shape, dtype=lateral.dtype, device=lateral.device,
                       memory_format=_format(channels_last(lateral)))


@torch.library.custom_op("fastnn::fpn_topdown_add_backward", mutates_args=())
def _fpn_topdown_add_backward_op(grad: Tensor, top_hw: list[int], top_channels_last: bool) -> Tensor:
    if len(top_hw) != 2:
        raise ValueError(f"top_hw must be [height, width] of top; got {list(top_hw)}")
    n, c = grad.shape[0], grad.shape[1]
    shape = (n, c, top_hw[0], top_hw[1])
    if n * c * top_hw[0] * top_hw[1] == 0:
        return _new(shape, grad, top_channels_last)
    if grad.numel() == 0:
        return _new(shape, grad, top_channels_last).zero_()
    impl = pick("fpn_topdown_add_backward", grad.device, _BACKWARD_IMPLS, _PREFERENCE.get(grad.device.type, ()))
    return impl(grad, list(top_hw), top_channels_last)


@_fpn_topdown_add_backward_op.register_fake
def _fpn_topdown_add_backward_fake(grad, top_hw, top_channels_last):
    return torch.empty((grad.shape[0], grad.shape[1], top_hw[0], top_hw[1]), dtype=grad.dtype, device=grad.device,
                       memory_format=_format(top_channels_last))


def _setup_context(ctx, inputs, output):
    lateral, top = inputs
    ctx.top_hw = [top.shape[2], top.shape[3]]
    ctx.top_channels_last = channels_last(lateral)  # the layout the forward ran in


def _backward(ctx, grad):
    grad_top = None
    if ctx.needs_input_grad[1]:
        grad_top = _direct.run_op(torch.ops.fastnn.fpn_topdown_add_backward, grad, ctx.top_hw,
                                  ctx.top_channels_last)
    return grad, grad_top


_direct.register_autograd(_fpn_topdown_add_op, _backward, _setup_context)
_direct.register_backward_op(_fpn_topdown_add_backward_op)
# the op's body with its autograd, without torch.library's dispatch (~20 us a call), in plain eager mode
_FpnTopdownAddFunction = _direct.autograd_function(_fpn_topdown_add_body, _setup_context, _backward)


def fpn_topdown_add(lateral: Tensor, top: Tensor) -> Tensor:
    """One top-down step of a feature pyramid: ``lateral + nearest_upsample(top, lateral's size)``, fused.

    Equal to ``lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")`` (torch's nearest rule,
    non-integer size ratios included: source index ``min(floor(o * float32(in / out)), in - 1)``), in one
    pass over memory.

    Args:
        lateral: (N, C, H, W) float16, bfloat16, float32 or float64, on the CPU or a CUDA device; NCHW or
            channels_last (read without a copy in either).
        top: (N, C, h, w) coarser map, same dtype and device; any h, w >= 1 (usually H / 2, W / 2).

    Returns:
        (N, C, H, W) tensor in lateral's dtype, channels_last when lateral is (and is not also contiguous).
        Differentiable: the gradient for lateral is the upstream gradient; for top, each pixel sums the
        upstream gradient over the output pixels that copy it (deterministic gather, no atomics).
        float16/bfloat16 are added and accumulated in float32.
    """
    _checks.tensor(lateral, "lateral", dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(top, "top", dtypes=_checks.FLOAT_DTYPES)
    if lateral.dim() != 4:
        raise ValueError(f"lateral must be a 4-d (N, C, H, W) tensor, got shape {tuple(lateral.shape)}")
    if top.dim() != 4:
        raise ValueError(f"top must be a 4-d (N, C, h, w) tensor, got shape {tuple(top.shape)}")
    _checks.same_device("lateral", lateral, top=top)
    if top.dtype != lateral.dtype:
        raise TypeError(f"top has dtype {top.dtype} but lateral has {lateral.dtype}; expected the same dtype")
    if top.shape[0] != lateral.shape[0]:
        raise ValueError(f"top has batch size {top.shape[0]} but lateral has {lateral.shape[0]}; "
                         "expected the same batch size")
    if top.shape[1] != lateral.shape[1]:
        raise ValueError(f"top has {top.shape[1]} channels but lateral has {lateral.shape[1]}; "
                         "expected the same number of channels")
    if lateral.numel() and (top.shape[2] == 0 or top.shape[3] == 0):
        raise ValueError(f"top must have a non-empty spatial size to upsample, got shape {tuple(top.shape)}")
    if _onnx.exporting():
        return _onnx.fpn_topdown_add(lateral, top)
    return _direct.call(torch.ops.fastnn.fpn_topdown_add, _fpn_topdown_add_body, _FpnTopdownAddFunction, lateral, top)
