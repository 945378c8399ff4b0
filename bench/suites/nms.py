"""Box ops against torchvision on the same device: nms (1k, 10k, 100k boxes), batched_nms (80 classes),
box_iou / generalized_box_iou (forward, and forward+backward)."""
from __future__ import annotations

import torch
import torchvision

import fastnn
from fastnn import ops

from ..harness import Case


def make_boxes(n: int, device: str, seed: int = 0):
    """Detector-like boxes: centres uniform in a 1024 x 1024 image, sides uniform in [16, 128]."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 1024
    wh = torch.rand(n, 2, generator=g) * 112 + 16
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 80, (n,), generator=g)
    return boxes.to(device), scores.to(device), idxs.to(device)


def _same_set(a, b):
    return torch.equal(torch.sort(a).values, torch.sort(b).values)


def _with_backend(backend, fn, *args):
    def call():
        with fastnn.use_backend(backend):
            return fn(*args)
    return call


def cases(device: str, quick: bool):
    backends = ["cpp"] if device == "cpu" else [b for b in ("cuda", "triton") if b in fastnn.usable_backends("cuda")]
    out = []
    for n in (1000, 10000, 100000):
        boxes, scores, idxs = make_boxes(n, device)
        floor = n * (4 * 4 + 4)  # read boxes and scores once (the output is smaller)
        for b in backends:
            out.append(Case("nms", f"nms[{b}]", f"N={n}", "float32", _with_backend(b, ops.nms, boxes, scores, 0.5),
                            "torchvision.ops.nms", lambda bx=boxes, s=scores: torchvision.ops.nms(bx, s, 0.5),
                            work=floor, check=_same_set))
        if n >= 10000:
            for b in backends:
                out.append(Case("nms", f"batched_nms[{b}]", f"N={n},classes=80", "float32",
                                _with_backend(b, ops.batched_nms, boxes, scores, idxs, 0.5),
                                "torchvision.batched_nms",
                                lambda bx=boxes, s=scores, i=idxs: torchvision.ops.batched_nms(bx, s, i, 0.5),
                                work=floor + n * 8, check=_same_set))
    m = 1000 if device == "cpu" else 4096
    a, _, _ = make_boxes(m, device, seed=1)
    b, _, _ = make_boxes(m, device, seed=2)
    iou_bytes = m * m * 4 + 2 * m * 16
    close = lambda x, y: bool(torch.allclose(x, y, rtol=1e-5, atol=1e-6))  # noqa: E731
    out.append(Case("nms", "box_iou", f"{m}x{m}", "float32", lambda: ops.box_iou(a, b), "torchvision.box_iou",
                    lambda: torchvision.ops.box_iou(a, b), work=iou_bytes, check=close))
    out.append(Case("nms", "generalized_box_iou", f"{m}x{m}", "float32", lambda: ops.generalized_box_iou(a, b),
                    "torchvision.giou", lambda: torchvision.ops.generalized_box_iou(a, b), work=iou_bytes, check=close))
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()

    def giou_fwd_bwd(fn):
        def call():
            out = fn(ag, bg)
            return torch.autograd.grad(out.sum(), (ag, bg))[0]
        return call

    out.append(Case("nms", "giou fwd+bwd", f"{m}x{m}", "float32", giou_fwd_bwd(ops.generalized_box_iou),
                    "torchvision.giou", giou_fwd_bwd(torchvision.ops.generalized_box_iou), work=2 * iou_bytes,
                    check=lambda x, y: bool(torch.allclose(x, y, rtol=1e-4, atol=1e-5))))
    return out
