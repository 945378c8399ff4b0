"""Detection post-processing: heatmap peaks (CenterNet), box decoding (FCOS, YOLO v1-v8), fixed-size
detection post-processing (TensorRT EfficientNMS's contract, exportable), Soft-NMS and Matrix NMS.

Custom ops (``torch.ops.fastnn.*``): heatmap_peaks, detection_postprocess, soft_nms. Kernels:
  CPU   C++ (csrc/cpu/detect_cpu.cpp): per image in parallel; fused local-max + bounded top-k; score filter
        + lazily ranked candidates + per-class greedy NMS that stops at max_detections kept; Soft-NMS over
        a compacted structure-of-arrays.
  CUDA  heatmap_peaks: Triton local-max kernel (kernels/detect.py) + a stable sort for the top-k.
        detection_postprocess: a composed path, batched over the images (no per-image Python loop): one
        score filter, one stable ranking, then fastnn's batched_nms with (image, class) groups (the CUDA C++
        or Triton NMS kernels, whichever backend is in force), then a scatter into the padded outputs.
        soft_nms: Triton, one program holding up to 4096 boxes (2048 float64 boxes) in registers (more: the
        reference step loop, logged once).
decode_fcos, decode_yolo and matrix_nms are compositions of torch ops (and fastnn.ops.box_iou), so they
inherit autograd, torch.compile and export without custom ops of their own.
"""
from __future__ import annotations

import logging
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import _C, pick
from ..reference import boxes as box_ref
from ..reference import detect as ref
from . import _checks, _onnx
from .boxes import batched_nms, box_iou

_PEAKS_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_POST_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
_SOFT_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_log = logging.getLogger("fastnn")
_warned_soft = set()


_INT_MAX = 2 ** 31 - 1


def _int(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    if x > _INT_MAX:  # sizes past int32 would reach the kernels and the op schema (int64) as overflows
        raise ValueError(f"{name} must be at most {_INT_MAX}, got {x}")
    return x


# ---------------------------------------------------------------- heatmap peaks

def _peaks_triton(heat: Tensor, k: int, kernel: int):
    from fastnn.kernels import detect as kd

    b, c, h, w = heat.shape
    v = kd.peak_scores(heat.contiguous(), kernel).reshape(b, -1)
    # torch.topk does not promise which of equal values it returns; a stable sort does (ties by index).
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(v, 1, order), order // (h * w), (order % (h * w)) // w, order % w


_PEAKS_IMPLS = {
    "reference": ref.heatmap_peaks,
    "cpp": lambda heat, k, kernel: tuple(_C.heatmap_peaks_cpu(heat, k, kernel)),
    "triton": _peaks_triton,
}


@torch.library.custom_op("fastnn::heatmap_peaks", mutates_args=())
def _heatmap_peaks_op(heatmap: Tensor, k: int, kernel: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if heatmap.shape[0] == 0 or k == 0:
        return _peaks_fake(heatmap, k, kernel)
    impl = pick("heatmap_peaks", heatmap.device, _PEAKS_IMPLS, _PEAKS_PREFERENCE.get(heatmap.device.type, ()))
    s, c, y, x = impl(heatmap.contiguous(), k, kernel)
    return s.contiguous(), c.contiguous(), y.contiguous(), x.contiguous()


@_heatmap_peaks_op.register_fake
def _peaks_fake(heatmap, k, kernel):
    b = heatmap.shape[0]
    idx = heatmap.new_empty((b, k), dtype=torch.long)
    return heatmap.new_empty((b, k)), idx, torch.empty_like(idx), torch.empty_like(idx)


def heatmap_peaks(heatmap: Tensor, k: int, kernel: int = 3) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """CenterNet's peak extraction: local maxima of a class heatmap and the top-k of them per image.

    A pixel is a peak when it equals the maximum of its kernel x kernel neighbourhood, with
    ``max_pool2d(heatmap, kernel, stride=1, padding=kernel // 2)`` semantics (outside the map counts as
    -inf; a NaN in the window makes the pixel no peak). Every position gets the score ``heat`` if it is a
    peak and 0 otherwise (CenterNet's ``heat * keep``), and the k best of the C*H*W positions of each image
    are returned.

    Args:
        heatmap: (B, C, H, W) float16/bfloat16/float32/float64, CPU or CUDA.
        k: number of peaks per image, 0 <= k <= C*H*W (ValueError otherwise, as torch.topk).
        kernel: odd window size (default 3).

    Returns:
        (scores, classes, ys, xs), each (B, k): scores in the heatmap's dtype, the others int64, ordered by
        descending score; equal scores by ascending flattened index c*H*W + y*W + x (so when fewer than k
        positive peaks exist, the zero scores that follow come in index order). Not differentiable.
    """
    _checks.tensor(heatmap, "heatmap", dtypes=_checks.FLOAT_DTYPES, shape=(None, None, None, None))
    k = _int(k, "k", 0)
    kernel = _int(kernel, "kernel", 1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (max_pool2d with padding kernel // 2 keeps the size), got {kernel}")
    total = heatmap.shape[1] * heatmap.shape[2] * heatmap.shape[3]
    if k > total:
        raise ValueError(f"k ({k}) must be at most C*H*W = {total} (the number of positions per image)")
    if _onnx.exporting():
        return _onnx.heatmap_peaks(heatmap.detach(), k, kernel)
    return torch.ops.fastnn.heatmap_peaks(heatmap.detach(), k, kernel)


# ---------------------------------------------------------------- box decoding

def decode_fcos(points: Tensor, distances: Tensor, stride: float = 1.0) -> Tensor:
    """FCOS / anchor-free box decoding: (l, t, r, b) distances from points to box sides -> (x1, y1, x2, y2).

    ``x1 = px - l * stride, y1 = py - t * stride, x2 = px + r * stride, y2 = py + b * stride``.

    Args:
        points: (..., 2) point coordinates (x, y) in pixels (FCOS uses the cell centres
            ``(i + 0.5) * stride``, or ``i * stride + stride // 2``); broadcast against distances.
        distances: (..., 4) non-negative distances (l, t, r, b), in units of ``stride`` (pass stride=1 for
            distances already in pixels, e.g. FCOS with norm_reg_targets=False).
        stride: scale of the distances.

    Returns:
        (..., 4) boxes, dtype of the promoted inputs. Differentiable.
    """
    _checks.tensor(points, "points", dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(distances, "distances", dtypes=_checks.FLOAT_DTYPES)
    if points.shape[-1:] != (2,):
        raise ValueError(f"points must have shape (..., 2), got {tuple(points.shape)}")
    if distances.shape[-1:] != (4,):
        raise ValueError(f"distances must have shape (..., 4), got {tuple(distances.shape)}")
    _checks.same_device("points", points, distances=distances)
    stride = _checks.real_number(stride, "stride")
    d = distances * stride
    px, py = points[..., 0], points[..., 1]
    return torch.stack([px - d[..., 0], py - d[..., 1], px + d[..., 2], py + d[..., 3]], -1)


_YOLO_VERSIONS = (1, 2, 3, 4, 5, 7, 8)


def decode_yolo(pred: Tensor, anchors: Optional[Tensor] = None, stride: float = 1.0, version: int = 5,
                reg_max: int = 16) -> Tensor:
    """Decode raw YOLO box predictions of one feature level (grid H x W, cell ``stride`` pixels) to xyxy.

    ``x``, ``y`` index the grid column and row. Layouts and formulas (t = pred[..., :4], anchors (A, 2) as
    (w, h) in pixels, ``sig`` the logistic sigmoid; extra channels such as objectness / class logits after
    the first 4 are ignored):

    - v1: pred (B, A, H, W, >=4) holds (x offset in the cell, y offset, sqrt(w / image width),
      sqrt(h / image height)) with no activation; image size = (W * stride, H * stride); no anchors.
      ``cx = (x + t0) * stride, cy = (y + t1) * stride, w = t2^2 * W * stride, h = t3^2 * H * stride``.
      (stride = 1 / S gives YOLOv1's normalised coordinates.)
    - v2, v3: pred (B, A, H, W, >=4), anchors required.
      ``cx = (sig(t0) + x) * stride, cy = (sig(t1) + y) * stride, w = aw * exp(t2), h = ah * exp(t3)``
      (YOLOv2 anchors given in grid units: pass them multiplied by stride).
    - v4 (scaled-YOLOv4), v5, v7: pred (B, A, H, W, >=4), anchors required.
      ``cx = (2 sig(t0) - 0.5 + x) * stride, cy = (2 sig(t1) - 0.5 + y) * stride,
      w = (2 sig(t2))^2 * aw, h = (2 sig(t3))^2 * ah``.
    - v8 (anchor-free, DFL): pred (B, 4 * reg_max, H, W), channel ``s * reg_max + i`` the logit of bin i of
      side s in (l, t, r, b); ``d_s = sum_i i * softmax_i(pred[s])`` (grid units); anchor point
      ``(x + 0.5, y + 0.5)``; ``x1 = (x + 0.5 - d_l) * stride, y1 = (y + 0.5 - d_t) * stride,
      x2 = (x + 0.5 + d_r) * stride, y2 = (y + 0.5 + d_b) * stride``; no anchors.

    Returns:
        (x1, y1, x2, y2) = (cx - w/2, cy - h/2, cx + w/2, cy + h/2): shape (B, A, H, W, 4) for v1-v7,
        (B, H, W, 4) for v8; dtype of pred. Differentiable (torch ops).
    """
    _checks.tensor(pred, "pred", dtypes=_checks.FLOAT_DTYPES)
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version not in _YOLO_VERSIONS:
        raise ValueError(f"version must be one of {_YOLO_VERSIONS}, got {version!r}")
    stride = _checks.real_number(stride, "stride")
    if version == 8:
        reg_max = _int(reg_max, "reg_max", 1)
        if pred.dim() != 4 or pred.shape[1] != 4 * reg_max:
            raise ValueError(f"pred must have shape (B, 4 * reg_max = {4 * reg_max}, H, W) for version 8, "
                             f"got {tuple(pred.shape)}")
        if anchors is not None:
            raise ValueError("anchors must be None for version 8 (anchor-free)")
    else:
        if pred.dim() != 5 or pred.shape[-1] < 4:
            raise ValueError(f"pred must have shape (B, A, H, W, >=4) for version {version}, got {tuple(pred.shape)}")
        if version == 1:
            if anchors is not None:
                raise ValueError("anchors must be None for version 1")
        else:
            if anchors is None:
                raise ValueError(f"anchors (A, 2) are required for version {version}")
            _checks.tensor(anchors, "anchors", dtypes=_checks.FLOAT_DTYPES, shape=(pred.shape[1], 2))
            _checks.same_device("pred", pred, anchors=anchors)
    dt, dev = pred.dtype, pred.device
    if version == 8:
        b, _, h, w = pred.shape
        logits = pred.reshape(b, 4, reg_max, h, w)
        bins = torch.arange(reg_max, dtype=dt, device=dev).view(reg_max, 1, 1)
        ltrb = torch.einsum("bsihw,ihw->bshw", torch.softmax(logits, 2), bins.expand(reg_max, h, w))
        ax = torch.arange(w, dtype=dt, device=dev) + 0.5
        ay = (torch.arange(h, dtype=dt, device=dev) + 0.5)[:, None]
        out = torch.stack([ax - ltrb[:, 0], ay - ltrb[:, 1], ax + ltrb[:, 2], ay + ltrb[:, 3]], -1)
        return out * stride
    b, a, h, w, _ = pred.shape
    gx = torch.arange(w, dtype=dt, device=dev)
    gy = torch.arange(h, dtype=dt, device=dev)[:, None]
    t = pred[..., :4]
    if version == 1:
        cx, cy = (t[..., 0] + gx) * stride, (t[..., 1] + gy) * stride
        half_w, half_h = t[..., 2].square() * (w * stride) / 2, t[..., 3].square() * (h * stride) / 2
    else:
        aw = anchors[:, 0].to(dt).view(1, a, 1, 1)
        ah = anchors[:, 1].to(dt).view(1, a, 1, 1)
        sg = torch.sigmoid(t)
        if version in (2, 3):
            cx, cy = (sg[..., 0] + gx) * stride, (sg[..., 1] + gy) * stride
            half_w, half_h = torch.exp(t[..., 2]) * aw / 2, torch.exp(t[..., 3]) * ah / 2
        else:
            cx, cy = (sg[..., 0] * 2 - 0.5 + gx) * stride, (sg[..., 1] * 2 - 0.5 + gy) * stride
            half_w, half_h = (sg[..., 2] * 2).square() * aw / 2, (sg[..., 3] * 2).square() * ah / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)


# ---------------------------------------------------------------- fixed-size detection post-processing

def _postprocess_composed(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                          max_det: int, agnostic: bool, top_k: int):
    """All images at once: filter, rank per image, one batched_nms over (image, class) groups, scatter.
    Same contract as the C++ kernel; the NMS runs on whichever backend is in force (CUDA C++ or Triton)."""
    bsz, n, c = scores.shape
    dev = scores.device
    per_class = boxes.dim() == 4
    out_b = torch.zeros(bsz, max_det, 4, dtype=boxes.dtype, device=dev)
    out_s = torch.zeros(bsz, max_det, dtype=scores.dtype, device=dev)
    out_c = torch.full((bsz, max_det), -1, dtype=torch.long, device=dev)
    num = torch.zeros(bsz, dtype=torch.long, device=dev)
    if bsz == 0 or n * c == 0 or max_det == 0 or top_k == 0:
        return num, out_b, out_s, out_c
    box_nan = torch.isnan(boxes).any(-1)
    valid = (scores > score_threshold) & ~(box_nan if per_class else box_nan[..., None])
    cand = torch.nonzero(valid.reshape(-1)).flatten()  # flattened b*N*C + n*C + c, ascending
    if cand.numel() == 0:
        return num, out_b, out_s, out_c
    s = scores.reshape(-1)[cand]
    img = cand // (n * c)
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[torch.sort(img[order], stable=True).indices]  # per image, score desc, ties by index
    cand, s, img = cand[order], s[order], img[order]
    counts = torch.bincount(img, minlength=bsz)
    if top_k > 0:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(cand.numel(), device=dev) - starts[img]
        sel = rank < top_k
        cand, s, img = cand[sel], s[sel], img[sel]
    cls = cand % c
    cand_boxes = boxes.reshape(-1, 4)[cand if per_class else cand // c]
    group = img if agnostic else img * c + cls
    keep = batched_nms(cand_boxes, s, group, iou_threshold)  # by score desc, ties by position = rank
    keep = keep[torch.sort(img[keep], stable=True).indices]
    kimg = img[keep]
    kept_counts = torch.bincount(kimg, minlength=bsz)
    pos = torch.arange(keep.numel(), device=dev) - (torch.cumsum(kept_counts, 0) - kept_counts)[kimg]
    sel = pos < max_det
    keep, kimg, pos = keep[sel], kimg[sel], pos[sel]
    out_b[kimg, pos] = cand_boxes[keep]
    out_s[kimg, pos] = s[keep]
    out_c[kimg, pos] = cls[keep]
    return kept_counts.clamp(max=max_det), out_b, out_s, out_c


_POST_IMPLS = {
    "reference": ref.detection_postprocess,
    "cpp": lambda *a: tuple(_C.detection_postprocess_cpu(*a)),
    # composed: the NMS inside is fastnn's batched_nms on the forced backend (CUDA C++ or Triton)
    "cuda": _postprocess_composed,
    "triton": _postprocess_composed,
}


@torch.library.custom_op("fastnn::detection_postprocess", mutates_args=())
def _postprocess_op(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                    max_detections: int, class_agnostic: bool,
                    pre_nms_top_k: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # (the op's own check, for every backend: its kernels index boxes by the scores' sizes, and a direct call
    # of the op skips detection_postprocess's)
    if scores.dim() != 3 or boxes.dim() not in (3, 4) or tuple(boxes.shape[:2]) != tuple(scores.shape[:2]) \
            or boxes.shape[-1] != 4 or (boxes.dim() == 4 and boxes.shape[2] != scores.shape[2]):
        raise _checks.SizeMismatchError(f"boxes must be (B, N, 4) or (B, N, C, 4) for scores (B, N, C); got boxes "
                                        f"{tuple(boxes.shape)}, scores {tuple(scores.shape)}")
    impl = pick("detection_postprocess", scores.device, _POST_IMPLS, _POST_PREFERENCE.get(scores.device.type, ()))
    outs = impl(boxes.contiguous(), scores.contiguous(), score_threshold, iou_threshold, max_detections,
                class_agnostic, pre_nms_top_k)
    return tuple(o.contiguous() for o in outs)


@_postprocess_op.register_fake
def _postprocess_fake(boxes, scores, score_threshold, iou_threshold, max_detections, class_agnostic, pre_nms_top_k):
    b = scores.shape[0]
    return (scores.new_empty((b,), dtype=torch.long), boxes.new_empty((b, max_detections, 4)),
            scores.new_empty((b, max_detections)), scores.new_empty((b, max_detections), dtype=torch.long))


def detection_postprocess(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                          max_detections: int, class_agnostic: bool = False,
                          pre_nms_top_k: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused detection post-processing with fixed-size outputs (TensorRT EfficientNMS's contract).

    Per image: the candidates are the (box n, class c) pairs with ``score > score_threshold`` (NaN scores
    and boxes with a NaN coordinate never qualify), ranked by descending score, equal scores by ascending
    flattened index ``n * C + c``; the first ``pre_nms_top_k`` are kept (all when None); greedy NMS runs
    per class (boxes of different classes never suppress each other) or across classes when
    ``class_agnostic``, with torchvision's IoU and its ``IoU > iou_threshold`` rule; the first
    ``max_detections`` survivors, in rank order, are returned. The result equals a loop over images of
    score filter + ``torchvision.ops.batched_nms`` + truncation (whose order of equal scores is unspecified).

    Output shapes depend only on the input shapes and ``max_detections``, so the op exports with
    ``torch.export`` (a custom op whose fake returns the fixed shapes) and compiles with fullgraph=True.

    Args:
        boxes: (B, N, 4) boxes (x1, y1, x2, y2) shared by all classes, or (B, N, C, 4) one box per class;
            float16/bfloat16/float32/float64 (IoU in float32, float64 for float64 boxes).
        scores: (B, N, C) class scores (any float dtype), same device.
        score_threshold: keep candidates with score > score_threshold (compared in the scores' dtype,
            float32 for float16/bfloat16).
        iou_threshold: suppress boxes with IoU > iou_threshold with a kept box of the same class.
        max_detections: output slots per image (>= 0).
        class_agnostic: run one NMS over all classes of an image.
        pre_nms_top_k: at most this many ranked candidates per image enter NMS (None: all).

    Returns:
        (num_detections (B,) int64, boxes (B, max_detections, 4) dtype of boxes,
        scores (B, max_detections) dtype of scores, classes (B, max_detections) int64); slots past
        num_detections hold boxes 0, scores 0 and classes -1. Not differentiable.
    """
    _checks.tensor(scores, "scores", dtypes=_checks.FLOAT_DTYPES, shape=(None, None, None))
    bsz, n, c = scores.shape
    _checks.tensor(boxes, "boxes", dtypes=_checks.FLOAT_DTYPES)
    if tuple(boxes.shape) not in ((bsz, n, 4), (bsz, n, c, 4)):
        raise ValueError(f"boxes must have shape (B, N, 4) = {(bsz, n, 4)} or (B, N, C, 4) = {(bsz, n, c, 4)} "
                         f"for scores of shape {tuple(scores.shape)}, got {tuple(boxes.shape)}")
    _checks.same_device("scores", scores, boxes=boxes)
    score_threshold = _checks.real_number(score_threshold, "score_threshold")
    iou_threshold = _checks.real_number(iou_threshold, "iou_threshold")
    max_detections = _int(max_detections, "max_detections", 0)
    if not isinstance(class_agnostic, bool):
        raise TypeError(f"class_agnostic must be a bool, got {type(class_agnostic).__name__}")
    top_k = -1 if pre_nms_top_k is None else _int(pre_nms_top_k, "pre_nms_top_k", 0)
    if _onnx.exporting():
        return _onnx.detection_postprocess(boxes.detach(), scores.detach(), score_threshold, iou_threshold,
                                           max_detections, class_agnostic, top_k)
    return torch.ops.fastnn.detection_postprocess(boxes.detach(), scores.detach(), score_threshold, iou_threshold,
                                                  max_detections, class_agnostic, top_k)


# ---------------------------------------------------------------- Soft-NMS

def _soft_reference(boxes, scores, iou_threshold, sigma, score_threshold, gaussian):
    return ref.soft_nms(boxes, scores, iou_threshold, sigma, score_threshold, "gaussian" if gaussian else "linear")


def _soft_triton(boxes, scores, iou_threshold, sigma, score_threshold, gaussian):
    from fastnn.kernels import detect as kd

    b = boxes.to(box_ref.compute_dtype(boxes.dtype))
    limit = kd.soft_nms_max_boxes(b.dtype == torch.float64)
    if boxes.shape[0] > limit:
        if "big" not in _warned_soft:
            _warned_soft.add("big")
            _log.warning("fastnn.soft_nms: more than %d boxes runs the reference step loop (slow) on %s",
                         limit, boxes.device)
        return _soft_reference(boxes, scores, iou_threshold, sigma, score_threshold, gaussian)
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    s = torch.where(torch.isnan(b).any(1), torch.full((), float("nan"), dtype=s.dtype, device=s.device), s)
    idx, kept = kd.soft_nms(b.contiguous(), s.contiguous(), iou_threshold, sigma, score_threshold, gaussian)
    return idx, kept.to(scores.dtype)


_SOFT_IMPLS = {
    "reference": _soft_reference,
    "triton": _soft_triton,
    "cpp": lambda *a: tuple(_C.soft_nms_cpu(*a)),
}


@torch.library.custom_op("fastnn::soft_nms", mutates_args=())
def _soft_nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
                 gaussian: bool) -> Tuple[Tensor, Tensor]:
    if boxes.dim() != 2 or boxes.shape[1] != 4 or tuple(scores.shape) != (boxes.shape[0],):
        raise _checks.SizeMismatchError(f"boxes must be (N, 4) and scores (N,), one per box; got boxes "
                                        f"{tuple(boxes.shape)}, scores {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return boxes.new_empty((0,), dtype=torch.long), scores.new_empty((0,))
    impl = pick("soft_nms", boxes.device, _SOFT_IMPLS, _SOFT_PREFERENCE.get(boxes.device.type, ()))
    idx, s = impl(boxes.contiguous(), scores.contiguous(), iou_threshold, sigma, score_threshold, gaussian)
    return idx.contiguous(), s.contiguous()


@_soft_nms_op.register_fake
def _soft_nms_fake(boxes, scores, iou_threshold, sigma, score_threshold, gaussian):
    ctx = torch.library.get_ctx()
    size = (getattr(ctx, "new_dynamic_size", None) or ctx.create_unbacked_symint)()
    return boxes.new_empty((size,), dtype=torch.long), scores.new_empty((size,))


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             score_threshold: float = 0.001, method: str = "linear") -> Tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al., 2017) with mmcv's semantics.

    Repeatedly selects the remaining box with the highest current score (equal scores: the lower index),
    then decays the score of every other remaining box by its IoU ``o`` with the selected one:
    ``linear``: ``s *= 1 - o`` when ``o > iou_threshold`` (unchanged otherwise); ``gaussian``:
    ``s *= exp(-o^2 / sigma)``. Boxes whose score is (or falls) below ``score_threshold`` are dropped.
    IoU is torchvision's box_iou (float32; float64 for float64 boxes); weights are applied in the
    scores' dtype (float32 for float16/bfloat16 scores). mmcv differs only in tie order and in keeping
    the very first box even when its score is below score_threshold.

    Args:
        boxes: (N, 4) boxes (x1, y1, x2, y2), float dtypes, CPU or CUDA.
        scores: (N,) scores, same device.
        iou_threshold: overlap above which the linear method decays.
        sigma: gaussian width (> 0).
        score_threshold: minimum score to stay in the running.
        method: "linear" or "gaussian".

    Returns:
        (indices, scores): int64 indices of the kept boxes in selection (decay) order and their decayed
        scores at selection, in the scores' dtype. NaN boxes or scores are never kept. Not differentiable.
        On CUDA one Triton program runs the whole loop for up to 4096 boxes, 2048 float64 boxes (beyond:
        the reference step loop, with a warning logged once).
    """
    _checks.tensor(boxes, "boxes", dtypes=_checks.FLOAT_DTYPES, shape=(None, 4))
    _checks.tensor(scores, "scores", dtypes=_checks.FLOAT_DTYPES, shape=(boxes.shape[0],))
    _checks.same_device("boxes", boxes, scores=scores)
    iou_threshold = _checks.real_number(iou_threshold, "iou_threshold")
    sigma = _checks.real_number(sigma, "sigma")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    score_threshold = _checks.real_number(score_threshold, "score_threshold")
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    return torch.ops.fastnn.soft_nms(boxes.detach(), scores.detach(), iou_threshold, sigma, score_threshold,
                                     method == "gaussian")


# ---------------------------------------------------------------- Matrix NMS

def matrix_nms(boxes: Tensor, scores: Tensor, labels: Optional[Tensor] = None, kernel: str = "gaussian",
               sigma: float = 2.0) -> Tensor:
    """Matrix NMS (SOLOv2, Wang et al. 2020) on boxes: every score decayed in parallel from the IoU matrix.

    Boxes are ranked by descending score (ties by index). With ``iou[i, j]`` the IoU of box i ranked above
    box j (0 for i >= j, and 0 across classes when ``labels`` is given), ``comp[i] = max_k iou[k, i]``
    (box i's largest overlap with a higher-ranked box), box j's decay is
    ``min_i f(iou[i, j]) / f(comp[i])`` with ``f(x) = 1 - x`` (linear) or ``exp(-sigma x^2)`` (gaussian),
    and its new score ``scores[j] * decay_j``. IoU via :func:`fastnn.ops.box_iou`.

    Args:
        boxes: (N, 4) boxes (x1, y1, x2, y2), float dtypes.
        scores: (N,) scores, same device.
        labels: optional (N,) integer classes: decay only within a class.
        kernel: "gaussian" (default, as SOLOv2) or "linear".
        sigma: gaussian parameter (default 2.0).

    Returns:
        (N,) decayed scores in input order, dtype of scores (float32 math for float16/bfloat16).
        Differentiable with respect to scores and boxes. Filtering / top-k is left to the caller.
    """
    _checks.tensor(boxes, "boxes", dtypes=_checks.FLOAT_DTYPES, shape=(None, 4))
    _checks.tensor(scores, "scores", dtypes=_checks.FLOAT_DTYPES, shape=(boxes.shape[0],))
    _checks.same_device("boxes", boxes, scores=scores)
    if labels is not None:
        _checks.tensor(labels, "labels", integer=True, shape=(boxes.shape[0],))
        _checks.same_device("boxes", boxes, labels=labels)
    if kernel not in ("linear", "gaussian"):
        raise ValueError(f"kernel must be 'linear' or 'gaussian', got {kernel!r}")
    sigma = _checks.real_number(sigma, "sigma")
    if not 0 < sigma < float("inf"):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    n = boxes.shape[0]
    ct = torch.float64 if torch.float64 in (boxes.dtype, scores.dtype) else torch.float32
    if n == 0:
        return scores.clone()
    if _onnx.exporting():  # (no ONNX form of a stable sort; TopK orders equal values by index, as it does)
        order = torch.topk(scores.detach(), n).indices
    else:
        order = torch.sort(scores.detach(), descending=True, stable=True).indices
    # a pair with no defined IoU (0 / 0 of two empty boxes, a NaN coordinate) overlaps nothing, as in the
    # reference: left NaN, the max / min below would spread it to every score
    iou = torch.nan_to_num(box_iou(boxes[order], boxes[order]).to(ct), nan=0.0).triu(diagonal=1)
    if labels is not None:
        lab = labels[order]
        iou = iou * (lab[:, None] == lab[None, :])
    comp = iou.max(0).values[:, None]  # (N, 1): row i's compensation
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou.square() - comp.square())).min(0).values
    else:
        # a box i wholly covered by a higher one (comp 1) decays nothing: its row would read 0 / 0 (NaN) for
        # a duplicate j of it, which the duplicate's first copy decays to 0 anyway
        # (the denominator kept nonzero where the branch is not taken, so its gradient is 0 there, not NaN)
        covered = comp >= 1
        decay = torch.where(covered, float("inf"), (1 - iou) / torch.where(covered, 1.0, 1 - comp)).min(0).values
    decayed = scores[order].to(ct) * decay
    out = torch.empty_like(decayed).scatter(0, order, decayed)
    return out.to(scores.dtype)
