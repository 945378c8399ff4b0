"""Multi-scale (image-pyramid) inference: run a detector at several scales and merge its detections.

Design: one function, :func:`multiscale_detect`, that takes any detector callable with torchvision's output
convention (a list with one ``{"boxes", "scores", "labels"}`` dict per image) and returns the same
convention; fastnn.nn.ImagePyramid is a thin module holding a detector and these settings. The resizing is
torch's bilinear F.interpolate, the merge is fastnn.ops.batched_nms per image (classes never suppress each
other). Not a custom op: it is Python glue around the detector, NMS runs in fastnn's kernels.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .boxes import batched_nms


def _check_scales(scales) -> list:
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise TypeError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    out = []
    for s in scales:
        # comparisons, not math.isfinite: a scale may be a SymFloat under torch.compile(dynamic=True)
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < float(s) < math.inf:
            raise ValueError(f"scales must hold positive finite numbers, got {s!r}")
        out.append(float(s))
    return out


def scaled_size(height: int, width: int, scale: float) -> tuple:
    """The (h, w) an image of (height, width) is resized to at `scale`: each side rounded, at least 1."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def multiscale_detect(detector: Callable[[Tensor], list], images: Tensor, scales: Sequence[float],
                      iou_threshold: float = 0.5, *, detections_per_img: Optional[int] = None,
                      clip_boxes: bool = True) -> list:
    """Image-pyramid inference: detect at every scale, map boxes back, merge per image with class-wise NMS.

    For each scale ``s`` the batch is resized to ``scaled_size(H, W, s)`` with
    ``F.interpolate(mode="bilinear", align_corners=False)`` (scale 1 passes the batch unchanged), the
    detector runs on it, and its boxes are mapped back to the original image by the per-axis ratios
    ``W / w`` and ``H / h`` (exact for the resized size, not the nominal scale). Per image, the detections
    of all scales are concatenated and merged with :func:`fastnn.ops.batched_nms` keyed by label.

    Args:
        detector: callable taking a (B, C, h, w) batch and returning a list of B dicts with "boxes"
            (K, 4) as (x1, y1, x2, y2) in that batch's pixel coordinates, "scores" (K,), "labels" (K,)
            integer (torchvision detectors' eval output).
        images: (B, C, H, W) floating image batch.
        scales: non-empty sequence of positive resize factors, e.g. (0.5, 1.0, 2.0).
        iou_threshold: NMS threshold: among boxes of one label, drop those with IoU > iou_threshold with a
            higher-scoring kept box.
        detections_per_img: keep at most this many detections per image (highest scores); None keeps all.
        clip_boxes: clamp the mapped boxes to the original image (x in [0, W], y in [0, H]) before NMS.

    Returns:
        list of B dicts {"boxes" (M, 4), "scores" (M,), "labels" (M,)} in original-image coordinates, by
        decreasing score (ties by scale order, then by the detector's order).
    """
    _checks.tensor(images, "images", dtypes=_checks.FLOAT_DTYPES)
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-d (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if not callable(detector):
        raise TypeError(f"detector must be callable, got {type(detector).__name__}")
    scale_list = _check_scales(scales)
    thr = _checks.real_number(iou_threshold, "iou_threshold")
    if detections_per_img is not None and (isinstance(detections_per_img, bool)
                                           or not isinstance(detections_per_img, int) or detections_per_img < 0):
        raise ValueError(f"detections_per_img must be None or a non-negative int, got {detections_per_img!r}")
    b, _, height, width = images.shape
    per_image: list = [[] for _ in range(b)]
    for s in scale_list:
        h, w = scaled_size(height, width, s)
        batch = images if (h, w) == (height, width) else F.interpolate(
            images, size=(h, w), mode="bilinear", align_corners=False)
        dets = detector(batch)
        if not isinstance(dets, (list, tuple)) or len(dets) != b:
            got = type(dets).__name__ + (f" of length {len(dets)}" if hasattr(dets, "__len__") else "")
            raise ValueError(f"detector must return a list of {b} dicts (one per image) at scale {s}, got {got}")
        for i, d in enumerate(dets):
            for key in ("boxes", "scores", "labels"):
                if key not in d:
                    raise ValueError(f"detector output for image {i} at scale {s} has no {key!r} entry")
            boxes, scores, labels = d["boxes"], d["scores"], d["labels"]
            if not all(torch.is_tensor(t) for t in (boxes, scores, labels)):
                raise TypeError(f"detector output for image {i} at scale {s}: boxes, scores and labels must be tensors")
            M = boxes.shape[0] if boxes.dim() == 2 else -1
            if boxes.dim() != 2 or boxes.shape[1] != 4 or tuple(scores.shape) != (M,) or tuple(labels.shape) != (M,):
                raise ValueError(f"detector output for image {i} at scale {s} must hold boxes (M, 4), scores (M,) and "
                                 f"labels (M,); got {tuple(boxes.shape)}, {tuple(scores.shape)}, "
                                 f"{tuple(labels.shape)}")
            ratio = torch.tensor([width / w, height / h, width / w, height / h], dtype=boxes.dtype,
                                 device=boxes.device)
            per_image[i].append((boxes * ratio, scores, labels))
    results = []
    for i in range(b):
        boxes = torch.cat([p[0] for p in per_image[i]])
        scores = torch.cat([p[1] for p in per_image[i]])
        labels = torch.cat([p[2] for p in per_image[i]])
        if clip_boxes:
            x = boxes[:, 0::2].clamp(0, width)
            y = boxes[:, 1::2].clamp(0, height)
            boxes = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
        keep = batched_nms(boxes, scores, labels, thr)
        if detections_per_img is not None:
            keep = keep[:detections_per_img]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results
