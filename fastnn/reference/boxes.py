"""Reference box ops in plain PyTorch.

Formulas follow torchvision exactly (same operation order), computed in float32 for float16/bfloat16
input and in the input dtype otherwise. NMS is written as the textbook greedy loop over a full IoU matrix
(O(N^2) memory), and batched NMS as a loop over classes: formulations independent of the kernels'.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype box math runs in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def threshold_below(threshold: float, dtype: torch.dtype) -> float:
    """Largest value of `dtype` (float32/float64) not above `threshold`.

    torchvision compares the IoU with the threshold as a double; for IoU values of `dtype`,
    ``iou > threshold`` is the same as ``iou > threshold_below(threshold, dtype)``.
    """
    if dtype == torch.float64 or math.isnan(threshold) or math.isinf(threshold):
        return float(threshold)
    t = np.float32(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


@functools.lru_cache(maxsize=None)
def clamp_grad_at_zero() -> bool:
    """Whether torch's clamp(min=0) passes the gradient at exactly 0: it does up to torch 2.11 and does
    not in 2.14. The kernels' backward follows the running torch (call this with autograd enabled)."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(x.clamp(min=0).sum(), x)
    return bool(g.item() == 1.0)


def pairwise_box_iou(boxes1: Tensor, boxes2: Tensor, generalized: bool = False) -> Tensor:
    """(N, M) IoU or generalized IoU, as torchvision.ops.box_iou / generalized_box_iou compute it."""
    ct = compute_dtype(torch.promote_types(boxes1.dtype, boxes2.dtype))
    a, b = boxes1.to(ct), boxes2.to(ct)
    area1 = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area2 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    iou = inter / union
    if not generalized:
        return iou
    lti = torch.min(a[:, None, :2], b[:, :2])
    rbi = torch.max(a[:, None, 2:], b[:, 2:])
    whi = (rbi - lti).clamp(min=0)
    areai = whi[:, :, 0] * whi[:, :, 1]
    return iou - (areai - union) / areai


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Reference for fastnn.ops.box_iou."""
    return pairwise_box_iou(boxes1, boxes2, False)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Reference for fastnn.ops.generalized_box_iou."""
    return pairwise_box_iou(boxes1, boxes2, True)


def _nms_overlap_matrix(boxes: Tensor) -> Tensor:
    """IoU matrix with NMS semantics: a NaN width or height (from infinite coordinates) counts as 0."""
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    w = torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])
    h = torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])
    w = torch.where(w > 0, w, torch.zeros_like(w))
    h = torch.where(h > 0, h, torch.zeros_like(h))
    inter = w * h
    return inter / (area[:, None] + area[None, :] - inter)


def score_order(scores: Tensor, valid: Tensor) -> Tensor:
    """Indices of valid entries by descending score, ties broken by ascending index."""
    candidates = torch.nonzero(valid).flatten()
    return candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS. Boxes with a NaN coordinate or NaN score are never kept."""
    ct = compute_dtype(boxes.dtype)
    valid = ~(torch.isnan(boxes).any(1) | torch.isnan(scores))
    order = score_order(scores, valid)
    b = boxes[order].to(ct)
    over = _nms_overlap_matrix(b) > threshold_below(iou_threshold, ct)
    n = b.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    later = torch.arange(n, device=boxes.device)
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i] & (later > i)
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class of `idxs`, result by descending score (ties by index)."""
    kept = [torch.zeros(0, dtype=torch.long, device=boxes.device)]
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.sort(torch.cat(kept)).values
    valid = torch.ones_like(keep, dtype=torch.bool)
    return keep[score_order(scores[keep], valid)] if keep.numel() else keep
