"""Detection post-processing against the eager compositions users write today:
detection_postprocess vs a per-image loop of score filter + torchvision.ops.batched_nms + truncate + pad
(YOLO-like 8400 anchors x 80 classes); heatmap_peaks vs max_pool2d + topk (CenterNet, 80 x 128 x 128);
soft_nms vs the reference step loop (1k boxes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

import fastnn
from fastnn import ops
from fastnn.reference import detect as ref

from ..harness import Case


def yolo_outputs(b: int, n: int, c: int, device: str, seed: int = 0):
    """Boxes in a 640 x 640 image (sides 8..160) and mostly-background sigmoid class scores:
    sigmoid(2 z - 6), so ~0.7% of the (anchor, class) pairs pass 0.25 and ~6% pass 0.05."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(b, n, 2, generator=g) * 640
    wh = torch.rand(b, n, 2, generator=g) * 152 + 8
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], -1)
    scores = torch.sigmoid(torch.randn(b, n, c, generator=g) * 2 - 6)
    return boxes.to(device), scores.to(device)


def torchvision_postprocess(boxes, scores, score_threshold, iou_threshold, max_det):
    """The eager peer: per image, filter, torchvision batched_nms, truncate, pad to max_det."""
    b, n, c = scores.shape
    dev = scores.device
    num = torch.zeros(b, dtype=torch.long, device=dev)
    ob = torch.zeros(b, max_det, 4, dtype=boxes.dtype, device=dev)
    os_ = torch.zeros(b, max_det, dtype=scores.dtype, device=dev)
    oc = torch.full((b, max_det), -1, dtype=torch.long, device=dev)
    for i in range(b):
        s = scores[i].reshape(-1)
        idx = torch.nonzero(s > score_threshold).flatten()
        bx, sc, cl = boxes[i][idx // c], s[idx], idx % c
        keep = torchvision.ops.batched_nms(bx, sc, cl, iou_threshold)[:max_det]
        k = keep.numel()
        num[i] = k
        ob[i, :k], os_[i, :k], oc[i, :k] = bx[keep], sc[keep], cl[keep]
    return num, ob, os_, oc


def _all_equal(x, y):
    return all(torch.equal(a, b) for a, b in zip(x, y))


def _peaks_agree(heat):
    """Same scores; every returned position holds its score (torch.topk orders equal scores arbitrarily)."""
    def check(x, y):
        b = torch.arange(heat.shape[0], device=heat.device)[:, None]
        return torch.equal(x[0], y[0]) and torch.equal(heat[b, x[1], x[2], x[3]], x[0])
    return check


def _peaks_peer(heat, k):
    hmax = F.max_pool2d(heat, 3, stride=1, padding=1)
    v = torch.where(hmax == heat, heat, torch.zeros((), dtype=heat.dtype)).flatten(1)
    s, i = torch.topk(v, k, dim=1)
    hw = heat.shape[2] * heat.shape[3]
    return s, i // hw, (i % hw) // heat.shape[3], i % heat.shape[3]


def _with_backend(backend, fn, *args, **kw):
    def call():
        with fastnn.use_backend(backend):
            return fn(*args, **kw)
    return call


def cases(device: str, quick: bool):
    out = []
    if device == "cpu":
        post_shapes = [(4, 8400, 80)]
        post_settings = [(0.25, 0.45, 300)] + ([] if quick else [(0.05, 0.6, 300)])
    else:
        post_shapes = [(16, 8400, 80)]
        post_settings = [(0.25, 0.45, 300), (0.05, 0.6, 300)]
    for b, n, c in post_shapes:
        boxes, scores = yolo_outputs(b, n, c, device)
        for thr, iou, max_det in post_settings:
            floor = boxes.numel() * 4 + scores.numel() * 4  # read boxes and scores once
            out.append(Case("detect", "detection_postprocess", f"B={b},N={n},C={c},thr={thr}", "float32",
                            lambda bx=boxes, s=scores, t=thr, u=iou, m=max_det: ops.detection_postprocess(bx, s, t, u, m),
                            "filter+tv.batched_nms loop",
                            lambda bx=boxes, s=scores, t=thr, u=iou, m=max_det: torchvision_postprocess(bx, s, t, u, m),
                            work=floor, check=_all_equal))
    b, c, hw = (4, 80, 128) if device == "cpu" else (16, 80, 128)
    g = torch.Generator().manual_seed(1)
    heat = torch.rand(b, c, hw, hw, generator=g).to(device)
    out.append(Case("detect", "heatmap_peaks", f"{b}x{c}x{hw}x{hw},k=100", "float32",
                    lambda: ops.heatmap_peaks(heat, 100, 3), "max_pool2d+topk", lambda: _peaks_peer(heat, 100),
                    work=heat.numel() * 4, check=_peaks_agree(heat)))
    g = torch.Generator().manual_seed(2)
    n = 1000
    centre = torch.rand(n, 2, generator=g) * 400
    wh = torch.rand(n, 2, generator=g) * 60 + 10
    sb = torch.cat([centre - wh / 2, centre + wh / 2], 1).to(device)
    ss = torch.rand(n, generator=g).to(device)
    for method in ("linear", "gaussian"):  # CPU: the C++ kernel; CUDA: the one-program Triton kernel
        out.append(Case("detect", f"soft_nms[{method}]", f"N={n}", "float32",
                        lambda m=method: ops.soft_nms(sb, ss, 0.3, 0.5, 0.001, m),
                        "reference step loop", lambda m=method: ref.soft_nms(sb, ss, 0.3, 0.5, 0.001, m),
                        metric="boxes/s", work=n,  # compute-bound O(N x kept) loop: no byte floor
                        check=lambda x, y: torch.equal(x[0], y[0]) and bool(torch.allclose(x[1], y[1], rtol=1e-5))))
    return out
