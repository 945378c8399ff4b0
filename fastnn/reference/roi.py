"""Reference RoIAlign, RoIPool and multi-scale RoIAlign in plain PyTorch.

Semantics are torchvision's (torchvision.ops.roi_align / roi_pool / MultiScaleRoIAlign), written as a loop
over RoIs with each RoI's samples vectorised over channels: slow, readable, differentiable by autograd,
float64-capable. Arithmetic runs in the input dtype with torchvision's operation order, so float32 results
equal torchvision's CPU kernel.

Conventions (documented here once, used by the kernels):
- ``rois`` is (K, 5): (batch index, x1, y1, x2, y2). The batch index is truncated toward zero as torchvision
  casts it; an index outside [0, N) is an error.
- A sample whose coordinate lies outside [-1, size] along either axis, or is NaN, reads nothing; so does
  every sample of a map with no rows or no columns. The average divides by grid_h * grid_w, exactly.
- roi_pool ignores NaN inputs (torchvision compares with ``>``); an empty bin gives 0 and sends no
  gradient; ties send the gradient to the first maximum in row-major order. A RoI with a non-finite corner
  (NaN, +-inf) pools nothing; finite corners beyond +-2^29 saturate there.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def batch_indices(rois: Tensor, batch_size: int) -> List[int]:
    """The batch index of each RoI as Python ints (truncated toward zero), checked against [0, batch_size)."""
    out = []
    for k, v in enumerate(rois[:, 0].tolist()):
        if not (math.isfinite(v) and 0 <= int(v) < batch_size):
            raise ValueError(f"boxes[{k}, 0] (batch index) is {v}, expected an integer in [0, {batch_size})")
        out.append(int(v))
    return out


def _axis_taps(v: Tensor, size: int):
    """Bilinear taps along one axis: (valid, low, high, w_low, w_high), torchvision's clamping."""
    valid = (v >= -1) & (v <= size)
    v = torch.where(v <= 0, torch.zeros_like(v), v)
    cap = min(2.0 ** 30, torch.finfo(v.dtype).max)
    low = torch.nan_to_num(v, nan=0.0).clamp(max=cap).to(torch.int64)  # (int) cast of a non-negative value
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    v = torch.where(edge, low.to(v.dtype), v)
    w_high = v - low.to(v.dtype)
    w_low = 1 - w_high
    return valid, low, high, w_low, w_high


def _align_geometry(roi: Tensor, scale: float, pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool):
    dt = roi.dtype
    s = torch.tensor(scale, dtype=dt)
    offset = torch.tensor(0.5 if aligned else 0.0, dtype=dt)
    start_w, start_h = roi[1] * s - offset, roi[2] * s - offset
    end_w, end_h = roi[3] * s - offset, roi[4] * s - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:
        one = torch.ones((), dtype=dt)
        roi_w = torch.where(roi_w < 1, one, roi_w)
        roi_h = torch.where(roi_h < 1, one, roi_h)
    bin_h = roi_h / torch.tensor(float(pooled_h), dtype=dt)
    bin_w = roi_w / torch.tensor(float(pooled_w), dtype=dt)

    def grid(extent, pooled):
        if sampling_ratio > 0:
            return sampling_ratio
        g = torch.ceil(extent / torch.tensor(float(pooled), dtype=dt)).item()
        return int(g) if math.isfinite(g) and g > 0 else 0

    grid_h, grid_w = grid(roi_h, pooled_h), grid(roi_w, pooled_w)
    if any(math.isnan(t.item()) for t in (start_h, start_w, bin_h, bin_w)):
        grid_h = grid_w = 0
    return start_h, start_w, bin_h, bin_w, grid_h, grid_w


def _sample_coords(start: Tensor, bin_size: Tensor, pooled: int, grid: int) -> Tensor:
    """(pooled, grid) coordinates: start + p * bin + (i + 0.5) * bin / grid, in that order."""
    dt = start.dtype
    p = torch.arange(pooled, dtype=dt)[:, None]
    i = (torch.arange(grid, dtype=torch.float32) + 0.5).to(dt)[None, :]
    return (start + p * bin_size) + (i * bin_size) / torch.tensor(float(grid), dtype=dt)


def roi_align(input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align on (N, C, H, W) input and (K, 5) rois -> (K, C, pooled_h, pooled_w)."""
    n, c, height, width = input.shape
    dt = input.dtype
    rois = rois.to(dt)
    batch = batch_indices(rois, n)
    outs = []
    for k in range(rois.shape[0]):
        start_h, start_w, bin_h, bin_w, gh, gw = _align_geometry(rois[k], spatial_scale, pooled_h, pooled_w,
                                                                 sampling_ratio, aligned)
        acc = input.new_zeros((c, pooled_h, pooled_w))
        if gh > 0 and gw > 0 and height > 0 and width > 0:
            vy, y0, y1, hy, ly = _axis_taps(_sample_coords(start_h, bin_h, pooled_h, gh), height)  # (PH, gh)
            vx, x0, x1, hx, lx = _axis_taps(_sample_coords(start_w, bin_w, pooled_w, gw), width)   # (PW, gw)
            plane = input[batch[k]]
            for iy in range(gh):
                for ix in range(gw):
                    yl, yh_, wyl, wyh = y0[:, iy, None], y1[:, iy, None], hy[:, iy, None], ly[:, iy, None]
                    xl, xh_, wxl, wxh = x0[None, :, ix], x1[None, :, ix], hx[None, :, ix], lx[None, :, ix]
                    term = ((wyl * wxl) * plane[:, yl, xl] + (wyl * wxh) * plane[:, yl, xh_]
                            + (wyh * wxl) * plane[:, yh_, xl] + (wyh * wxh) * plane[:, yh_, xh_])
                    ok = vy[:, iy, None] & vx[None, :, ix]
                    acc = acc + torch.where(ok, term, torch.zeros((), dtype=dt))
        outs.append(acc / torch.tensor(float(max(gh * gw, 1)), dtype=dt))
    if not outs:
        return input.new_zeros((0, c, pooled_h, pooled_w))
    return torch.stack(outs)


def _round_half_away(v: float) -> int:
    """std::round: halves away from zero (Python's round() rounds them to even)."""
    a = abs(v)
    r = math.floor(a) + (1 if a - math.floor(a) >= 0.5 else 0)
    return int(math.copysign(r, v))


def roi_pool(input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float = 1.0,
             return_argmax: bool = False):
    """torchvision.ops.roi_pool on (N, C, H, W) input and (K, 5) rois -> (K, C, pooled_h, pooled_w).

    return_argmax: also return where each maximum was read, as int32 h * W + w (-1: nothing pooled)."""
    n, c, height, width = input.shape
    dt = input.dtype
    rois = rois.to(dt)
    batch = batch_indices(rois, n)
    s = torch.tensor(spatial_scale, dtype=dt)
    lowest = torch.tensor(-torch.finfo(torch.float32).max, dtype=dt)  # torchvision's -FLT_MAX
    outs, args = [], []
    for k in range(rois.shape[0]):
        corners = [(rois[k, j] * s).item() for j in range(1, 5)]
        out = input.new_zeros((c, pooled_h, pooled_w))
        arg = torch.full((c, pooled_h, pooled_w), -1, dtype=torch.int32, device=input.device)
        if all(math.isfinite(v) for v in corners) and pooled_h > 0 and pooled_w > 0:
            x1, y1, x2, y2 = (_round_half_away(max(min(v, 2.0 ** 29), -2.0 ** 29)) for v in corners)
            roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
            bin_h = torch.tensor(float(roi_h), dtype=dt) / float(pooled_h)
            bin_w = torch.tensor(float(roi_w), dtype=dt) / float(pooled_w)
            rows = []
            for ph in range(pooled_h):
                h0 = min(max(int(math.floor((ph * bin_h).item())) + y1, 0), height)
                h1 = min(max(int(math.ceil(((ph + 1) * bin_h).item())) + y1, 0), height)
                cols = []
                for pw in range(pooled_w):
                    w0 = min(max(int(math.floor((pw * bin_w).item())) + x1, 0), width)
                    w1 = min(max(int(math.ceil(((pw + 1) * bin_w).item())) + x1, 0), width)
                    if h1 <= h0 or w1 <= w0:  # empty bin: 0, nothing pooled
                        cols.append(input.new_zeros((c,)))
                        continue
                    window = input[batch[k], :, h0:h1, w0:w1].reshape(c, -1)
                    clean = torch.where(torch.isnan(window), torch.full_like(window, -math.inf), window)
                    first = clean.argmax(1, keepdim=True)  # first maximum in row-major order
                    best = window.gather(1, first)[:, 0]
                    cols.append(torch.where(best > lowest, best, lowest))
                    at = (h0 + first[:, 0] // (w1 - w0)) * width + (w0 + first[:, 0] % (w1 - w0))
                    arg[:, ph, pw] = torch.where(best > lowest, at, -1).to(torch.int32)
                rows.append(torch.stack(cols, -1))
            out = torch.stack(rows, -2)
        outs.append(out)
        args.append(arg)
    shape = (0, c, pooled_h, pooled_w)
    result = torch.stack(outs) if outs else input.new_zeros(shape)
    if return_argmax:
        return result, (torch.stack(args) if args else torch.zeros(shape, dtype=torch.int32)).to(input.device)
    return result


# ---------------------------------------------------------------- multi-scale (torchvision.ops.poolers)

def infer_scale(size: Sequence[int], original_size: Sequence[int]) -> float:
    """Power-of-two scale of a feature map of spatial `size` relative to the image (height, width)."""
    return 2.0 ** round(math.log2(float(size[0]) / float(original_size[0])))


def setup_scales(feature_sizes: Sequence[Sequence[int]], image_shapes: Sequence[Tuple[int, int]]):
    """(scales, k_min, k_max) as torchvision's MultiScaleRoIAlign derives them from the first forward."""
    if not image_shapes:
        raise ValueError("image_shapes must not be empty")
    if any(len(s) != 2 or min(int(s[0]), int(s[1])) <= 0 for s in image_shapes):
        raise ValueError(f"image_shapes must hold positive (height, width) pairs, got {list(image_shapes)}")
    if any(int(sz[0]) <= 0 for sz in feature_sizes):  # its scale would be log2(0)
        raise ValueError(f"the feature maps must have at least one row to infer their scales, got sizes "
                         f"{[tuple(int(v) for v in sz) for sz in feature_sizes]}")
    original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    scales = [infer_scale(sz, original) for sz in feature_sizes]
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    return scales, k_min, k_max


def map_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
               eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """FPN eq. 1: level of each (x1, y1, x2, y2) box, floor(k0 + log2(sqrt(area) / s0) + eps), clamped, minus
    k_min (int64), and whether it is defined: a box of negative or NaN area has no level (torchvision then
    pools it from no level, giving zeros); its level is reported as 0. float16 / bfloat16 boxes are measured
    in float32, as torchvision's box_area does (a 256 x 256 box's area overflows float16)."""
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    lvl = torch.clamp(lvl, min=k_min, max=k_max)
    defined = ~torch.isnan(lvl)
    lvl = torch.where(defined, lvl, torch.full_like(lvl, k_min))
    return lvl.to(torch.int64) - k_min, defined


def multi_scale_roi_align(features: Sequence[Tensor], rois: Tensor, levels: Optional[Tensor],
                          scales: Sequence[float], pooled_h: int, pooled_w: int, sampling_ratio: int,
                          aligned: bool = False) -> Tensor:
    """RoI k pooled from features[levels[k]] at scales[levels[k]] (levels None: one level)."""
    if levels is None:
        return roi_align(features[0], rois, pooled_h, pooled_w, scales[0], sampling_ratio, aligned)
    c = features[0].shape[1]
    out = features[0].new_zeros((rois.shape[0], c, pooled_h, pooled_w))
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.nonzero(levels == lvl).flatten()
        if idx.numel():
            out = out.index_copy(0, idx, roi_align(feat, rois[idx], pooled_h, pooled_w, scale, sampling_ratio,
                                                   aligned))
    return out
