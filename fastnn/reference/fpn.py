"""Reference FPN top-down op in plain PyTorch.

``fpn_topdown_add(lateral, top) = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")``,
the step torchvision's FeaturePyramidNetwork runs at each level. The backward is written independently of
torch's upsample backward: grad_top is the sum of grad over each top pixel's nearest-source preimage, built
from the source-index tables below with index_add (a scatter formulation, unlike the kernels' gather).

Nearest source index (torch's rule for F.interpolate(..., size=...), mode="nearest"): the scale is the
float32 quotient in_size / out_size and ``src(o) = min(floor(float32(o) * scale), in_size - 1)``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearest_scale(in_size: int, out_size: int) -> float:
    """torch's float32 nearest-neighbour scale in_size / out_size (as a Python float holding a float32)."""
    return float(np.float32(in_size) / np.float32(out_size))


def nearest_source(in_size: int, out_size: int, device=None) -> Tensor:
    """(out_size,) int64 source index of each output index along one axis."""
    o = torch.arange(out_size, dtype=torch.float32, device=device)
    src = torch.floor(o * torch.tensor(nearest_scale(in_size, out_size), dtype=torch.float32, device=device))
    return src.long().clamp(max=in_size - 1)


def fpn_topdown_add(lateral: Tensor, top: Tensor) -> Tensor:
    """lateral + nearest_upsample(top, lateral.shape[-2:]); float16/bfloat16 add in float32, then round."""
    up = F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    ct = compute_dtype(lateral.dtype)
    return (lateral.to(ct) + up.to(ct)).to(lateral.dtype)


def fpn_topdown_add_backward(grad: Tensor, top_hw) -> Tensor:
    """grad_top (N, C, Ht, Wt) for upstream grad (N, C, Hl, Wl): each top pixel sums grad over the output
    pixels whose nearest source it is. Accumulated in float32 (float64 for float64 grad)."""
    n, c, hl, wl = grad.shape
    ht, wt = int(top_hw[0]), int(top_hw[1])
    ct = compute_dtype(grad.dtype)
    g = grad.to(ct)
    sy = nearest_source(ht, hl, grad.device)
    sx = nearest_source(wt, wl, grad.device)
    rows = torch.zeros(n, c, ht, wl, dtype=ct, device=grad.device).index_add_(2, sy, g)
    out = torch.zeros(n, c, ht, wt, dtype=ct, device=grad.device).index_add_(3, sx, rows)
    return out.to(grad.dtype)
