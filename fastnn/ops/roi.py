"""RoI ops, drop-in for torchvision.ops: roi_align, roi_pool, and the one-call multi-level RoIAlign behind
fastnn.nn.MultiScaleRoIAlign.

Custom ops (``torch.ops.fastnn.*``): roi_align (one or several levels; each RoI reads its own level),
roi_align_backward, roi_pool (output and argmax), roi_pool_backward. Kernels:
  CPU   C++ (csrc/cpu/roi_align_cpu.cpp): RoIs grouped by (level, image); NCHW input is read 8 planes at a
        time through an interleaved per-thread buffer (sample taps shared by every channel), channels-last
        input with the taps as contiguous channel vectors, and no copy. Backward: each task owns its gradient planes
        (or channel blocks) and adds in RoI order: bitwise deterministic, equal to torchvision's CPU
        gradient, independent of the thread count.
  CUDA  CUDA C++ (csrc/cuda/roi_align_kernels.cuh) for roi_align: forward one thread per output element;
        backward without float atomics: every sample's taps become (pixel, source, weight) entries, a stable
        sort groups them by pixel in RoI order, one thread per (pixel, channel) sums its segment. Bitwise
        deterministic, equal to the CPU kernels. roi_pool likewise (forward per output element; backward
        sorts the argmax targets). Not yet measured on a GPU.
Semantics (batch-index errors, NaN, empty bins): fastnn/reference/roi.py.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._backend import _C, pick
from ..reference import roi as ref
from ..reference.boxes import compute_dtype
from . import _checks, _direct, _onnx

# Dispatch preference per device (first usable wins; use_backend overrides).
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda",)}


def _is_channels_last(features: Sequence[Tensor]) -> bool:
    """The channels-last kernels run when every level is channels-last and one of them is not also
    NCHW-contiguous (then nothing is copied); otherwise every level is read NCHW (and under torch.vmap)."""
    if any(_direct.vmapped(f) for f in features):
        return False
    return (all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
            and any(not f.is_contiguous() for f in features))


def _empty_output(k: int, like: Tensor, pooled_h: int, pooled_w: int, channels_last: bool, dtype=None) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((k, like.shape[1], pooled_h, pooled_w), dtype=dtype or like.dtype, device=like.device,
                       memory_format=fmt)


# ---------------------------------------------------------------- roi_align

def _align_reference(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned, channels_last):
    out = ref.multi_scale_roi_align(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def _align_backward_reference(grad, rois, levels, scales, shapes, channels_last, sampling_ratio, aligned, dtypes):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.zeros(shapes[4 * i:4 * i + 4], dtype=grad.dtype, device=grad.device) for i in range(len(scales))]
    pooled_h, pooled_w = grad.shape[2], grad.shape[3]
    _, vjp = torch.func.vjp(lambda fs: ref.multi_scale_roi_align(fs, rois, levels, scales, pooled_h, pooled_w,
                                                                 sampling_ratio, aligned), feats)
    (grads,) = vjp(grad)
    return [g.contiguous(memory_format=fmt) for g in grads]


_ALIGN_IMPLS = {
    "reference": _align_reference,
    "cpp": lambda f, r, lv, s, ph, pw, sr, al, cl: _C.roi_align_forward_cpu(f, r, lv, s, ph, pw, sr, al, cl),
    "cuda": lambda f, r, lv, s, ph, pw, sr, al, cl: _C.roi_align_forward_cuda(f, r, lv, s, ph, pw, sr, al, cl),
}
_ALIGN_BACKWARD_IMPLS = {
    "reference": _align_backward_reference,
    "cpp": lambda g, r, lv, s, shp, cl, sr, al, dt: _C.roi_align_backward_cpu(g, r, lv, s, shp, cl, sr, al),
    "cuda": lambda g, r, lv, s, shp, cl, sr, al, dt: _C.roi_align_backward_cuda(g, r, lv, s, shp, cl, sr, al),
}


@torch.library.custom_op("fastnn::roi_align", mutates_args=())
def _roi_align_op(features: List[Tensor], rois: Tensor, levels: Optional[Tensor], scales: List[float],
                  pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    impl = pick("roi_align", rois.device, _ALIGN_IMPLS, _PREFERENCE.get(rois.device.type, ()))
    return impl(list(features), rois, levels, list(scales), pooled_h, pooled_w, sampling_ratio, aligned,
                _is_channels_last(features))


@_roi_align_op.register_fake
def _roi_align_fake(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned):
    return _empty_output(rois.shape[0], features[0], pooled_h, pooled_w, _is_channels_last(features))


@torch.library.custom_op("fastnn::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, levels: Optional[Tensor], scales: List[float],
                           feature_shapes: List[int], channels_last: bool, sampling_ratio: int,
                           aligned: bool) -> List[Tensor]:
    impl = pick("roi_align_backward", grad.device, _ALIGN_BACKWARD_IMPLS, _PREFERENCE.get(grad.device.type, ()))
    return list(impl(grad, rois, levels, list(scales), list(feature_shapes), channels_last, sampling_ratio, aligned,
                     None))


@_roi_align_backward_op.register_fake
def _roi_align_backward_fake(grad, rois, levels, scales, feature_shapes, channels_last, sampling_ratio, aligned):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.empty(feature_shapes[4 * i:4 * i + 4], dtype=grad.dtype, device=grad.device, memory_format=fmt)
            for i in range(len(scales))]


def _align_setup_context(ctx, inputs, output):
    features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.shapes = [int(s) for f in features for s in f.shape]
    ctx.channels_last = _is_channels_last(features)
    ctx.scales, ctx.sampling_ratio, ctx.aligned = list(scales), sampling_ratio, aligned


def _align_backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = _direct.run_op(torch.ops.fastnn.roi_align_backward, grad, rois, levels, ctx.scales, ctx.shapes,
                           ctx.channels_last, ctx.sampling_ratio, ctx.aligned)
    return list(grads), None, None, None, None, None, None, None


_direct.register_autograd(_roi_align_op, _align_backward, _align_setup_context)
_direct.register_backward_op(_roi_align_backward_op)
# (functorch's fallback loop refuses Tensor[] arguments and results)
_direct.register_loop_vmap(_roi_align_op)
_direct.register_loop_vmap(_roi_align_backward_op)


# ---------------------------------------------------------------- roi_pool

def _pool_reference(x, rois, scale, pooled_h, pooled_w, channels_last):
    out, arg = ref.roi_pool(x, rois, pooled_h, pooled_w, scale, return_argmax=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt), arg.contiguous(memory_format=fmt)


def _pool_backward_reference(grad, rois, argmax, shape, channels_last):
    # Routes each bin's gradient to its argmax, in RoI order (the kernels' order).
    n, c, h, w = shape
    out = torch.zeros((n, c, h * w), dtype=grad.dtype, device=grad.device)
    batch = ref.batch_indices(rois, n)
    for k, b in enumerate(batch):
        a = argmax[k].reshape(c, -1).long()
        g = grad[k].reshape(c, -1)
        for j in range(a.shape[1]):
            ok = a[:, j] >= 0
            rows = torch.nonzero(ok).flatten()
            out[b, rows, a[rows, j]] += g[rows, j]
    out = out.reshape(n, c, h, w)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


_POOL_IMPLS = {
    "reference": _pool_reference,
    "cpp": lambda x, r, s, ph, pw, cl: tuple(_C.roi_pool_forward_cpu(x, r, s, ph, pw, cl)),
    "cuda": lambda x, r, s, ph, pw, cl: tuple(_C.roi_pool_forward_cuda(x, r, s, ph, pw, cl)),
}
_POOL_BACKWARD_IMPLS = {
    "reference": _pool_backward_reference,
    "cpp": lambda g, r, a, shp, cl: _C.roi_pool_backward_cpu(g, r, a, shp, cl),
    "cuda": lambda g, r, a, shp, cl: _C.roi_pool_backward_cuda(g, r, a, shp, cl),
}


@torch.library.custom_op("fastnn::roi_pool", mutates_args=())
def _roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                 pooled_w: int) -> Tuple[Tensor, Tensor]:
    impl = pick("roi_pool", input.device, _POOL_IMPLS, _PREFERENCE.get(input.device.type, ()))
    return impl(input, rois, spatial_scale, pooled_h, pooled_w, _is_channels_last([input]))


@_roi_pool_op.register_fake
def _roi_pool_fake(input, rois, spatial_scale, pooled_h, pooled_w):
    cl = _is_channels_last([input])
    return (_empty_output(rois.shape[0], input, pooled_h, pooled_w, cl),
            _empty_output(rois.shape[0], input, pooled_h, pooled_w, cl, dtype=torch.int32))


@torch.library.custom_op("fastnn::roi_pool_backward", mutates_args=())
def _roi_pool_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor, input_shape: List[int],
                          channels_last: bool) -> Tensor:
    impl = pick("roi_pool_backward", grad.device, _POOL_BACKWARD_IMPLS, _PREFERENCE.get(grad.device.type, ()))
    return impl(grad, rois, argmax, list(input_shape), channels_last)


@_roi_pool_backward_op.register_fake
def _roi_pool_backward_fake(grad, rois, argmax, input_shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(input_shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)


def _pool_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.shape = [int(s) for s in input.shape]
    ctx.channels_last = _is_channels_last([input])


def _pool_backward(ctx, grad, grad_argmax):
    rois, argmax = ctx.saved_tensors
    return (_direct.run_op(torch.ops.fastnn.roi_pool_backward, grad, rois, argmax, ctx.shape, ctx.channels_last),
            None, None, None, None)


_direct.register_autograd(_roi_pool_op, _pool_backward, _pool_setup_context)
_direct.register_backward_op(_roi_pool_backward_op)


# ---------------------------------------------------------------- public functions

def _output_size(output_size) -> Tuple[int, int]:
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        size = (int(output_size), int(output_size))
    elif isinstance(output_size, (tuple, list)) and len(output_size) in (1, 2) and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in output_size):
        size = (int(output_size[0]), int(output_size[-1]))
    else:
        raise TypeError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    if min(size) < 0:  # (0 gives an empty output, as torchvision's)
        raise ValueError(f"output_size must be non-negative, got {output_size!r}")
    return size


def _features(input: Tensor, name: str) -> Tensor:
    _checks.tensor(input, name, dtypes=_checks.FLOAT_DTYPES)
    if input.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(input.shape)}")
    return input


def boxes_to_rois(boxes: Union[Tensor, Sequence[Tensor]], like: Tensor, name: str = "boxes") -> Tensor:
    """(K, 5) rois (batch index, x1, y1, x2, y2) from a (K, 5) tensor or a list of (L, 4) per-image boxes
    (torchvision's two forms), in float64 for float64 ``like`` and float32 otherwise; checks shapes, dtypes
    and devices."""
    # The kernels' compute dtype: float16 / bfloat16 features keep float32 boxes (coordinates above 2048
    # would not survive float16), float32 / float64 features get boxes of their own dtype, as torchvision.
    dtype = compute_dtype(like.dtype)
    if isinstance(boxes, Tensor):
        _checks.tensor(boxes, name, dtypes=_checks.FLOAT_DTYPES, shape=(None, 5))
        _checks.same_device("input", like, **{name: boxes})
        return boxes.to(dtype).contiguous()
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    parts = []
    for i, b in enumerate(boxes):
        _checks.tensor(b, f"{name}[{i}]", dtypes=_checks.FLOAT_DTYPES, shape=(None, 4))
        _checks.same_device("input", like, **{f"{name}[{i}]": b})
        parts.append(torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dtype, device=like.device),
                                b.to(dtype)], 1))
    if not parts:
        return like.new_zeros((0, 5), dtype=dtype)
    return torch.cat(parts, 0)


def _scale(spatial_scale, name: str = "spatial_scale") -> float:
    # finite, as torchvision takes it: 0 or a negative scale is accepted too (boxes then sample at or beyond
    # the map's origin, with torchvision's results)
    if torch.is_tensor(spatial_scale) and spatial_scale.dim() == 0:  # torchvision takes a 0-d tensor too
        spatial_scale = spatial_scale.item()
    s = _checks.real_number(spatial_scale, name)
    if s in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {spatial_scale!r}")
    return s


def _aligned(aligned) -> bool:
    if aligned not in (True, False):  # (bool() would take any truthy value, 'no' included)
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    return bool(aligned)


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def _sampling_ratio(v) -> int:
    """An int the kernels' 32-bit argument holds (<= 0: adaptive), not wrapped around silently."""
    v = _int(v, "sampling_ratio")
    if not -2 ** 31 <= v < 2 ** 31:
        raise ValueError(f"sampling_ratio must fit in 32 bits (<= 0 for adaptive), got {v}")
    return v


def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoI Align (Mask R-CNN), a drop-in for ``torchvision.ops.roi_align``.

    Args:
        input: (N, C, H, W) features, float16/bfloat16/float32/float64, contiguous or channels-last (read
            without a copy; the output is then channels-last too).
        boxes: (K, 5) rois (batch index, x1, y1, x2, y2), or a list of N tensors (L_i, 4) of per-image boxes,
            any float dtype (torchvision requires ``input``'s): used in float32 (float64 for float64
            ``input``). A batch index outside [0, N) raises a ValueError naming the box.
        output_size: int or (height, width) of the pooled output.
        spatial_scale: box coordinates are multiplied by it to reach feature-map coordinates.
        sampling_ratio: samples per bin along each axis; <= 0 picks ceil(roi size / output size) per RoI.
        aligned: shift boxes by -0.5 pixel (Detectron2's convention); False is the legacy behaviour.

    Returns:
        (K, C, output_size[0], output_size[1]) in ``input``'s dtype. float32/float64 values equal
        torchvision's CPU kernel; float16/bfloat16 are computed in float32. Differentiable with respect to
        ``input``; the backward is deterministic (no order-dependent atomics: two runs are bitwise equal).
        Samples outside the map read nothing, so a map with no rows or no columns gives zeros (torchvision
        reads out of bounds there).
    """
    _features(input, "input")
    pooled_h, pooled_w = _output_size(output_size)
    rois = boxes_to_rois(boxes, input)
    args = ([input], rois, None, [_scale(spatial_scale)], pooled_h, pooled_w, _sampling_ratio(sampling_ratio),
            _aligned(aligned))
    if _onnx.exporting():
        return _onnx.roi_align(*args)
    return _direct.run_op(torch.ops.fastnn.roi_align, *args)


def roi_pool(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoI max pooling (Fast R-CNN), a drop-in for ``torchvision.ops.roi_pool``.

    Same arguments as :func:`roi_align` (no sampling). Each RoI is rounded to whole pixels and split into
    bins; each bin takes the maximum (NaN ignored, as torchvision compares with ``>``; an empty bin gives 0).
    A box with a NaN or infinite coordinate pools nothing (zeros; torchvision's integer cast is undefined).
    The gradient goes to the first maximum of each bin, accumulated in RoI order (deterministic).
    """
    _features(input, "input")
    pooled_h, pooled_w = _output_size(output_size)
    rois = boxes_to_rois(boxes, input)
    if _onnx.exporting():
        return _onnx.roi_pool(input, rois, _scale(spatial_scale), pooled_h, pooled_w)
    out, _ = _direct.run_op(torch.ops.fastnn.roi_pool, input, rois, _scale(spatial_scale), pooled_h, pooled_w)
    return out


def multi_scale_roi_align(features: Sequence[Tensor], rois: Tensor, levels: Optional[Tensor],
                          scales: Sequence[float], output_size, sampling_ratio: int = -1,
                          aligned: bool = False) -> Tensor:
    """RoIAlign of every RoI from its own feature level, all levels in one kernel call.

    Args:
        features: L maps (N, C, H_l, W_l) with the same N, C and dtype.
        rois: (K, 5) rois (batch index, x1, y1, x2, y2) in image coordinates.
        levels: (K,) integer level of each RoI in [0, L); may be None when L == 1.
        scales: L spatial scales (feature size / image size), one per level.
        output_size, sampling_ratio, aligned: as in :func:`roi_align`.

    Returns:
        (K, C, PH, PW): RoI k is ``roi_align(features[levels[k]], rois[k], ..., spatial_scale=scales[levels[k]])``.
    """
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError("features must be a non-empty list of (N, C, H, W) tensors")
    for i, f in enumerate(features):
        _features(f, f"features[{i}]")
        if f.shape[:2] != features[0].shape[:2] or f.dtype != features[0].dtype:
            raise ValueError(f"features[{i}] is {tuple(f.shape)} {f.dtype}; every level must have the N, C and dtype "
                             f"of features[0] {tuple(features[0].shape)} {features[0].dtype}")
        _checks.same_device("features[0]", features[0], **{f"features[{i}]": f})
    if not isinstance(scales, (list, tuple)) or len(scales) != len(features):
        raise ValueError(f"scales must be a list of {len(features)} numbers (one per level), got {scales!r}")
    scales = [_scale(s, f"scales[{i}]") for i, s in enumerate(scales)]
    rois = boxes_to_rois(rois, features[0], "rois")
    if levels is None:
        if len(features) != 1:
            raise ValueError("levels is required when there are several feature levels")
    else:
        _checks.tensor(levels, "levels", integer=True, shape=(rois.shape[0],))
        _checks.same_device("rois", rois, levels=levels)
        levels = levels.long().contiguous()
    pooled_h, pooled_w = _output_size(output_size)
    args = (list(features), rois, levels, scales, pooled_h, pooled_w, _sampling_ratio(sampling_ratio),
            _aligned(aligned))
    if _onnx.exporting():
        return _onnx.roi_align(*args)
    return _direct.run_op(torch.ops.fastnn.roi_align, *args)
