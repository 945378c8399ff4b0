"""Triton kernels of the detection family: CenterNet peak scores (the fused local-max test).

peak_scores(heat, kernel) writes, for every pixel of a (B, C, H, W) heatmap, the pixel's value if it equals
the maximum of its kernel x kernel window (max_pool2d stride 1, padding kernel // 2: -inf outside, NaN
propagating) and 0 otherwise. The top-k selection is done by the caller (fastnn/ops/detect.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnn import _alloc

from .boxes import EXACT_ROUNDING

# 1024 pixels per program at 8 warps (4 per thread; at 4 warps the 7 x 7 window spilled 16-32 bytes on
# sm_80): one read of the window per pixel from L1/L2; bound by reading the map once and writing it once.
PEAK_BLOCK, PEAK_WARPS = 1024, 8


@triton.jit
def _peak_scores_kernel(
    heat_ptr,            # (P, H, W) heatmap planes, contiguous
    out_ptr,             # (P, H, W) out: peak score or 0, dtype of heat
    H,                   # rows per plane
    W,                   # columns per plane
    KERNEL: tl.constexpr,  # odd window size
    BLOCK: tl.constexpr,   # pixels per program
):
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < H * W
    y = offs // W
    x = offs % W
    base = heat_ptr + plane * H * W
    # comparisons only: kept in the input dtype (a float32 copy of float64 data could tie distinct values)
    h = tl.load(base + offs, mask=inside, other=0.0)
    m = tl.full([BLOCK], float("-inf"), heat_ptr.dtype.element_ty)
    PAD: tl.constexpr = KERNEL // 2
    for dy in range(KERNEL):  # a loop, not unrolled: 7 x 7 fully unrolled spilled on sm_80 (bf16) / sm_90 (fp64)
        for dx in tl.static_range(KERNEL):
            yy = y + (dy - PAD)
            xx = x + (dx - PAD)
            ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            v = tl.load(base + yy * W + xx, mask=ok, other=float("-inf"))
            m = tl.where((v > m) | (v != v), v, m)  # NaN propagates, as max_pool2d
    out = tl.where(m == h, h, tl.zeros_like(h))
    tl.store(out_ptr + plane * H * W + offs, out, mask=inside)


def peak_scores(heat: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, C, H, W) peak scores (the heat at local maxima, 0 elsewhere), dtype of heat."""
    b, c, h, w = heat.shape
    out = _alloc.empty((b, c, h, w), heat.dtype, heat.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(h * w, PEAK_BLOCK), b * c)
    _peak_scores_kernel[grid](heat, out, h, w, KERNEL=kernel, BLOCK=PEAK_BLOCK, num_warps=PEAK_WARPS)
    return out


def aot_specs():
    """Every kernel configuration the launcher uses (kernel sizes 3, 5, 7 are the ones compiled ahead)."""
    specs = []
    for fp in ("fp32", "fp16", "bf16", "fp64"):
        for k in (1, 3, 5, 7):
            specs.append((_peak_scores_kernel,
                          {"heat_ptr": f"*{fp}", "out_ptr": f"*{fp}", "H": "i32", "W": "i32",
                           "KERNEL": "constexpr", "BLOCK": "constexpr"},
                          {"KERNEL": k, "BLOCK": PEAK_BLOCK}, PEAK_WARPS))
    for bt in ("fp32", "fp64"):
        for st in ("fp32", "fp64"):
            for block in SOFT_NMS_BLOCKS[bt == "fp64"]:
                for gaussian in (False, True):
                    specs.append((_soft_nms_kernel,
                                  {"boxes_ptr": f"*{bt}", "scores_ptr": f"*{st}", "keep_ptr": "*i64",
                                   "kept_scores_ptr": f"*{st}", "count_ptr": "*i64", "N": "i32",
                                   "box_params_ptr": f"*{bt}", "score_thr_ptr": f"*{st}",
                                   "GAUSSIAN": "constexpr", "BLOCK": "constexpr"},
                                  {"GAUSSIAN": gaussian, "BLOCK": block}, SOFT_NMS_WARPS[block]))
    return specs


# ---------------------------------------------------------------- Soft-NMS

# One program holds every box in registers: each step is a masked argmax, an IoU row and a decay over the
# block, with no global-memory round trip between steps. Float32 boxes: up to 4096 (16 per thread at 8
# warps); float64 boxes: up to 2048 (4096 spilled 88 bytes at 8 warps and ~200 at 16, where the register
# file allows 128 per thread).
SOFT_NMS_BLOCKS = {False: (256, 1024, 4096), True: (256, 1024, 2048)}  # by float64 boxes
SOFT_NMS_WARPS = {256: 4, 1024: 8, 2048: 8, 4096: 8}


def soft_nms_max_boxes(boxes_fp64: bool) -> int:
    """The most boxes the one-program Soft-NMS kernel holds."""
    return SOFT_NMS_BLOCKS[boxes_fp64][-1]


@triton.jit
def _soft_nms_kernel(
    boxes_ptr,        # (N, 4) boxes, float32 / float64 (IoU is computed in this dtype)
    scores_ptr,       # (N,) scores, float32 / float64, NaN where a box must never be kept
    keep_ptr,         # out (N,) int64: selected indices in selection order (first `count` written)
    kept_scores_ptr,  # out (N,) scores at selection, dtype of scores
    count_ptr,        # out (1,) int64: number of selected boxes
    N,                # number of boxes (<= BLOCK)
    box_params_ptr,   # (2,) box dtype: IoU threshold (linear decay when IoU > it), gaussian sigma
    score_thr_ptr,    # (1,) score dtype: boxes whose score falls below it are dropped
    GAUSSIAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    inb = offs < N
    x1 = tl.load(boxes_ptr + offs * 4 + 0, mask=inb, other=0.0)
    y1 = tl.load(boxes_ptr + offs * 4 + 1, mask=inb, other=0.0)
    x2 = tl.load(boxes_ptr + offs * 4 + 2, mask=inb, other=0.0)
    y2 = tl.load(boxes_ptr + offs * 4 + 3, mask=inb, other=0.0)
    area = (x2 - x1) * (y2 - y1)
    s = tl.load(scores_ptr + offs, mask=inb, other=float("nan"))
    # thresholds arrive rounded to the dtypes they are compared in (as torch compares a tensor with a scalar)
    sthr = tl.load(score_thr_ptr)
    ithr = tl.load(box_params_ptr)
    sigma = tl.load(box_params_ptr + 1)
    alive = s >= sthr  # NaN: never
    n_alive = tl.sum(alive.to(tl.int32), 0)
    count = 0
    while n_alive > 0:
        v = tl.where(alive, s, float("-inf"))
        m = tl.max(v, 0)
        pick = tl.min(tl.where(alive & (v == m), offs, BLOCK), 0)  # the lowest index holding the maximum
        sel = offs == pick
        bx1 = tl.max(tl.where(sel, x1, float("-inf")), 0)
        by1 = tl.max(tl.where(sel, y1, float("-inf")), 0)
        bx2 = tl.max(tl.where(sel, x2, float("-inf")), 0)
        by2 = tl.max(tl.where(sel, y2, float("-inf")), 0)
        ba = (bx2 - bx1) * (by2 - by1)
        tl.store(keep_ptr + count, pick.to(tl.int64))
        tl.store(kept_scores_ptr + count, m)
        count += 1
        alive = alive & (offs != pick)
        # torchvision.ops.box_iou's formula; IEEE division (plain `/` is approximate for float32)
        w = tl.maximum(tl.minimum(bx2, x2) - tl.maximum(bx1, x1), 0.0)
        h = tl.maximum(tl.minimum(by2, y2) - tl.maximum(by1, y1), 0.0)
        inter = w * h
        den = ba + area - inter
        if x1.dtype == tl.float64:
            iou = inter / den
        else:
            iou = tl.math.div_rn(inter, den)
        if GAUSSIAN:
            q = -(iou * iou)
            if x1.dtype == tl.float64:
                wgt = tl.exp(q / sigma)
            else:
                wgt = tl.exp(tl.math.div_rn(q, sigma))
        else:
            wgt = tl.where(iou > ithr, 1.0 - iou, 1.0)
        s = tl.where(alive, s * wgt.to(s.dtype), s)
        alive = alive & (s >= sthr)
        n_alive = tl.sum(alive.to(tl.int32), 0)
    tl.store(count_ptr, count.to(tl.int64))


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float,
             score_threshold: float, gaussian: bool):
    """Soft-NMS of up to soft_nms_max_boxes() boxes in one program: (indices in selection order, scores).
    boxes: (N, 4) float32/float64; scores: (N,) float32/float64 with NaN for boxes never to keep.
    One host read (the number kept)."""
    n = boxes.shape[0]
    is64 = boxes.dtype == torch.float64
    if n > soft_nms_max_boxes(is64):
        raise ValueError(f"soft_nms Triton kernel: at most {soft_nms_max_boxes(is64)} boxes, got {n}")
    block = next(b for b in SOFT_NMS_BLOCKS[is64] if b >= n)
    keep = _alloc.empty((n,), torch.long, boxes.device)
    kept = _alloc.empty((n,), scores.dtype, boxes.device)
    count = _alloc.empty((1,), torch.long, boxes.device)
    box_params = torch.tensor([iou_threshold, sigma], dtype=boxes.dtype, device=boxes.device)
    score_thr = torch.tensor([score_threshold], dtype=scores.dtype, device=boxes.device)
    _soft_nms_kernel[(1,)](boxes, scores, keep, kept, count, n, box_params, score_thr,
                           GAUSSIAN=bool(gaussian), BLOCK=block, num_warps=SOFT_NMS_WARPS[block], **EXACT_ROUNDING)
    k = int(count.item())
    return keep[:k], kept[:k]
