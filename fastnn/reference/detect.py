"""Reference detection post-processing in plain PyTorch: heatmap peaks, box decoding (FCOS, YOLO v1-v8),
fixed-size detection post-processing (score filter + per-class NMS + padding), Soft-NMS and Matrix NMS.

Written as the readable textbook loops (per image, per step), independent of the kernels: the C++ and
composed kernels are tested against these, and these against torchvision / a second formulation in
tests/test_detect.py.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import boxes as box_ref


# ---------------------------------------------------------------- heatmap peaks (CenterNet)

def heatmap_peak_scores(heatmap: Tensor, kernel: int = 3) -> Tensor:
    """(B, C, H, W) heat where the pixel equals the max of its kernel x kernel window, else 0.

    max_pool2d(stride 1, padding kernel // 2) semantics: the window is padded with -inf and NaN propagates
    through the max, so a NaN pixel, and every pixel whose window holds a NaN, scores 0.
    """
    hmax = F.max_pool2d(heatmap, kernel, stride=1, padding=kernel // 2)
    return torch.where(hmax == heatmap, heatmap, torch.zeros((), dtype=heatmap.dtype))


def heatmap_peaks(heatmap: Tensor, k: int, kernel: int = 3) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scores, classes, ys, xs), each (B, k): the k best entries of heatmap_peak_scores over C*H*W,
    by descending score, equal scores by ascending flattened index c*H*W + y*W + x."""
    b, c, h, w = heatmap.shape
    v = heatmap_peak_scores(heatmap, kernel).reshape(b, -1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    scores = torch.gather(v, 1, order)
    return scores, order // (h * w), (order % (h * w)) // w, order % w


# ---------------------------------------------------------------- box decoding

def decode_fcos(points: Tensor, distances: Tensor, stride: float = 1.0) -> Tensor:
    """xyxy from points (..., 2) as (x, y) and distances (..., 4) as (l, t, r, b) in units of stride."""
    px, py = points[..., 0], points[..., 1]
    l, t, r, b = (distances * stride).unbind(-1)
    return torch.stack([px - l, py - t, px + r, py + b], -1)


def _grid(h: int, w: int, dtype, device) -> Tuple[Tensor, Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                            torch.arange(w, dtype=dtype, device=device), indexing="ij")
    return xs, ys


def decode_yolo(pred: Tensor, anchors: Optional[Tensor], stride: float, version: int,
                reg_max: int = 16) -> Tensor:
    """Loop-free but formula-by-formula reference of fastnn.ops.decode_yolo (see its docstring)."""
    if version == 1:
        b, _, h, w, _ = pred.shape
        xs, ys = _grid(h, w, pred.dtype, pred.device)
        cx = (xs + pred[..., 0]) * stride
        cy = (ys + pred[..., 1]) * stride
        bw, bh = pred[..., 2] ** 2 * (w * stride), pred[..., 3] ** 2 * (h * stride)
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    if version == 8:
        b, _, h, w = pred.shape
        dist = pred.reshape(b, 4, reg_max, h, w).softmax(2)
        bins = torch.arange(reg_max, dtype=pred.dtype, device=pred.device).reshape(1, 1, reg_max, 1, 1)
        ltrb = (dist * bins).sum(2)  # (B, 4, H, W)
        xs, ys = _grid(h, w, pred.dtype, pred.device)
        ax, ay = xs + 0.5, ys + 0.5
        x1, y1 = (ax - ltrb[:, 0]) * stride, (ay - ltrb[:, 1]) * stride
        x2, y2 = (ax + ltrb[:, 2]) * stride, (ay + ltrb[:, 3]) * stride
        return torch.stack([x1, y1, x2, y2], -1)  # (B, H, W, 4)
    b, a, h, w, _ = pred.shape
    xs, ys = _grid(h, w, pred.dtype, pred.device)
    aw = anchors[:, 0].reshape(1, a, 1, 1).to(pred.dtype)
    ah = anchors[:, 1].reshape(1, a, 1, 1).to(pred.dtype)
    t = pred[..., :4]
    if version in (2, 3):
        cx = (torch.sigmoid(t[..., 0]) + xs) * stride
        cy = (torch.sigmoid(t[..., 1]) + ys) * stride
        bw, bh = aw * torch.exp(t[..., 2]), ah * torch.exp(t[..., 3])
    else:  # 4 (scaled), 5, 7
        sg = torch.sigmoid(t)
        cx = (sg[..., 0] * 2 - 0.5 + xs) * stride
        cy = (sg[..., 1] * 2 - 0.5 + ys) * stride
        bw, bh = (sg[..., 2] * 2) ** 2 * aw, (sg[..., 3] * 2) ** 2 * ah
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


# ---------------------------------------------------------------- fixed-size detection post-processing

def detection_postprocess(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                          max_detections: int, class_agnostic: bool = False,
                          pre_nms_top_k: int = -1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image: candidates (n, c) with score > score_threshold and a NaN-free box, ordered by descending
    score (ties by flattened index n*C + c), at most pre_nms_top_k of them (-1: all), greedy NMS per class
    (or across classes), the first max_detections kept. Padded: boxes 0, scores 0, classes -1."""
    bsz, n, c = scores.shape
    per_class = boxes.dim() == 4
    dev = scores.device
    num = torch.zeros(bsz, dtype=torch.long, device=dev)
    out_b = torch.zeros(bsz, max_detections, 4, dtype=boxes.dtype, device=dev)
    out_s = torch.zeros(bsz, max_detections, dtype=scores.dtype, device=dev)
    out_c = torch.full((bsz, max_detections), -1, dtype=torch.long, device=dev)
    for i in range(bsz):
        s = scores[i].reshape(-1)
        flat_boxes = boxes[i].reshape(-1, 4) if per_class else boxes[i].repeat_interleave(c, 0)
        valid = (s > score_threshold) & ~torch.isnan(flat_boxes).any(1)
        order = box_ref.score_order(s, valid)
        if pre_nms_top_k >= 0:
            order = order[:pre_nms_top_k]
        cls = order % c
        group = torch.zeros_like(cls) if class_agnostic else cls
        keep = box_ref.batched_nms(flat_boxes[order], s[order], group, iou_threshold)[:max_detections]
        sel = order[keep]
        k = sel.numel()
        num[i] = k
        out_b[i, :k] = flat_boxes[sel]
        out_s[i, :k] = s[sel]
        out_c[i, :k] = sel % c
    return num, out_b, out_s, out_c


# ---------------------------------------------------------------- Soft-NMS (Bodla et al. 2017)

def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float = 0.5,
             score_threshold: float = 0.001, method: str = "linear") -> Tuple[Tensor, Tensor]:
    """The step-by-step loop: take the remaining box with the highest current score (ties: lower index),
    decay every other remaining box by its IoU with it, drop those whose score falls below
    score_threshold. Returns (indices in selection order, their scores when selected)."""
    ct = box_ref.compute_dtype(boxes.dtype)
    b = boxes.to(ct)
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32).clone()
    alive = ~torch.isnan(s) & ~torch.isnan(b).any(1) & (s >= score_threshold)
    keep, kept_scores = [], []
    while bool(alive.any()):
        cand = torch.nonzero(alive).flatten()
        i = int(cand[torch.argmax(s[cand])])  # argmax returns the first maximum: the lowest index
        keep.append(i)
        kept_scores.append(s[i].clone())
        alive[i] = False
        rest = torch.nonzero(alive).flatten()
        if rest.numel() == 0:
            break
        iou = box_ref.pairwise_box_iou(b[i:i + 1], b[rest])[0]
        if method == "linear":
            w = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            w = torch.exp(-(iou * iou) / sigma)
        s[rest] = s[rest] * w.to(s.dtype)
        alive[rest] = s[rest] >= score_threshold
    idx = torch.tensor(keep, dtype=torch.long, device=boxes.device)
    out_s = torch.stack(kept_scores) if kept_scores else s.new_zeros(0)
    return idx, out_s.to(scores.dtype)


# ---------------------------------------------------------------- Matrix NMS (SOLOv2)

def matrix_nms(boxes: Tensor, scores: Tensor, labels: Optional[Tensor] = None, kernel: str = "gaussian",
               sigma: float = 2.0) -> Tensor:
    """Decayed scores (N,), in input order, by explicit loops over pairs: for box j,
    decay_j = min over higher-ranked i (same class when labels are given) of f(iou_ij) / f(comp_i),
    comp_i = max IoU of i with any box ranked above it (same class), f linear 1 - x or gaussian
    exp(-sigma x^2) (taken as a ratio exp(-sigma (iou^2 - comp^2))). A box i with comp_i = 1 (wholly covered)
    decays nothing in the linear kernel (its ratio would be 0 / 0 for a duplicate of it)."""
    n = scores.shape[0]
    ct = torch.float64 if scores.dtype == torch.float64 or boxes.dtype == torch.float64 else torch.float32
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].to(ct)
    s = scores[order].to(ct)
    lab = labels[order] if labels is not None else None
    iou = box_ref.pairwise_box_iou(b, b).tolist()
    same = [[True] * n for _ in range(n)] if lab is None else (lab[:, None] == lab[None, :]).tolist()
    comp = [0.0] * n
    for j in range(n):
        for i in range(j):
            if same[i][j]:
                comp[j] = max(comp[j], iou[i][j])
    decay = [1.0] * n
    for j in range(n):
        for i in range(j):
            x = iou[i][j] if same[i][j] else 0.0
            if kernel == "linear":
                d = (1 - x) / (1 - comp[i]) if comp[i] < 1 else math.inf  # box i wholly covered: no decay
            else:
                d = math.exp(-sigma * (x * x - comp[i] * comp[i]))
            decay[j] = min(decay[j], d)
    out = torch.empty(n, dtype=ct, device=scores.device)
    out[order] = s * torch.tensor(decay, dtype=ct, device=scores.device)
    return out.to(scores.dtype)
