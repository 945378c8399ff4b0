"""Triton box kernels: the NMS suppression bitmask and keep-sweep, and pairwise (G)IoU forward/backward.

The NMS kernels work on the segmented layout that fastnn/ops/boxes.py builds (also used by the CUDA C++
kernels, csrc/cuda/nms_kernels.cuh): boxes sorted by (class, descending score), each class padded to a
multiple of 64, and for a class of nb blocks an upper-triangular bitmask whose row r of block b holds the
words for column blocks b..nb-1, starting at word 64 * (b * nb - b * (b - 1) / 2).

Exactness: IoU values must equal torchvision's bit for bit, so float32 division is the IEEE-rounded
tl.math.div_rn (plain `/` lowers to an approximate division) and launches pass enable_fp_fusion=False.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnn import _alloc
from fastnn.reference.boxes import clamp_grad_at_zero

NMS_BLOCK = 64
# Mask: 4 column blocks per program, 64 x 64 IoU tiles at 8 warps: 186 registers for fp32 (255 at 4
# warps). fp64 does the 64 rows in two steps of 32 (whole tiles spill 320 bytes on sm_90, at 16 warps too).
NMS_MASK_COLS, NMS_MASK_WARPS = 4, 8
NMS_MASK_ROWS = {False: 64, True: 32}  # by IS_FP64
# Sweep: the 64 x 64 in-block suppression matrix plus a 64 x 32 tile of mask words; 8 warps (4 spill).
NMS_SWEEP_COLS, NMS_SWEEP_WARPS = 32, 8
# Pairwise IoU tiles: 32 x 64 outputs per program at 4 warps (16 per thread); float64 GIoU spills at
# that size on sm_90, so float64 uses 16 x 64.
IOU_BLOCK_N, IOU_BLOCK_N_FP64, IOU_BLOCK_M = 32, 16, 64
# Backward tiles stay small: ~40 live temporaries per pair would spill at 8+ pairs per thread.
IOU_BWD_ROWS, IOU_BWD_COLS = 16, 32


@triton.jit
def _div(num, den, IS_FP64: tl.constexpr):
    # IEEE-rounded division (what torch computes); float64 `/` is already div.rn.
    if IS_FP64:
        return num / den
    else:
        return tl.math.div_rn(num, den)


@triton.jit
def _or_combine(a, b):
    return a | b


@triton.jit
def _nms_mask_kernel(
    boxes_ptr,            # (P, 4) float32/float64 boxes in layout order
    block_segment_ptr,    # (B,) int64 segment of each 64-box block
    seg_first_block_ptr,  # (S,) int64 first block of each segment
    seg_num_blocks_ptr,   # (S,) int64 blocks in each segment
    seg_mask_offset_ptr,  # (S,) int64 first mask word of each segment
    mask_ptr,             # out: int64 words
    threshold_ptr,        # () IoU threshold in the box dtype, already rounded down (exact for float64)
    COLS: tl.constexpr,   # column blocks per program (grid axis 1 walks the rest)
    ROWS: tl.constexpr,   # rows of the block handled per step (64, or 32 to bound float64 registers)
    IS_FP64: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    s = tl.load(block_segment_ptr + g)
    first = tl.load(seg_first_block_ptr + s)
    nb = tl.load(seg_num_blocks_ptr + s)
    moff = tl.load(seg_mask_offset_ptr + s)
    b = g - first
    threshold = tl.load(threshold_ptr)
    lane = tl.arange(0, 64)
    lane64 = lane.to(tl.int64)
    one = tl.full([64], 1, tl.int64)
    for r0 in tl.static_range(0, 64, ROWS):
        row = r0 + tl.arange(0, ROWS)
        rpos = g * 64 + row.to(tl.int64)
        rx1 = tl.load(boxes_ptr + rpos * 4 + 0)
        ry1 = tl.load(boxes_ptr + rpos * 4 + 1)
        rx2 = tl.load(boxes_ptr + rpos * 4 + 2)
        ry2 = tl.load(boxes_ptr + rpos * 4 + 3)
        rarea = (rx2 - rx1) * (ry2 - ry1)
        row_words = moff + 64 * (b * nb - b * (b - 1) // 2) + row.to(tl.int64) * (nb - b)
        for c in tl.static_range(COLS):
            w = b + tl.program_id(1).to(tl.int64) * COLS + c
            if w < nb:
                cpos = (first + w) * 64 + lane64
                cx1 = tl.load(boxes_ptr + cpos * 4 + 0)
                cy1 = tl.load(boxes_ptr + cpos * 4 + 1)
                cx2 = tl.load(boxes_ptr + cpos * 4 + 2)
                cy2 = tl.load(boxes_ptr + cpos * 4 + 3)
                carea = (cx2 - cx1) * (cy2 - cy1)
                iw = tl.minimum(rx2[:, None], cx2[None, :]) - tl.maximum(rx1[:, None], cx1[None, :])
                ih = tl.minimum(ry2[:, None], cy2[None, :]) - tl.maximum(ry1[:, None], cy1[None, :])
                iw = tl.where(iw > 0, iw, 0.0)
                ih = tl.where(ih > 0, ih, 0.0)
                inter = iw * ih
                iou = _div(inter, (rarea[:, None] + carea[None, :]) - inter, IS_FP64)
                # On the diagonal block only later boxes are marked.
                sup = (iou > threshold) & ((lane[None, :] > row[:, None]) | (w != b))
                word = tl.sum(tl.where(sup, one[None, :] << lane64[None, :], 0), axis=1)
                tl.store(mask_ptr + row_words + (w - b), word)


@triton.jit
def _nms_sweep_kernel(
    mask_ptr,             # int64 words, layout above
    valid_ptr,            # (B,) int64: bit r of word g set when position 64g+r holds a valid box
    seg_first_block_ptr,
    seg_num_blocks_ptr,
    seg_mask_offset_ptr,
    removed_ptr,          # scratch (B,) int64
    keep_ptr,             # out (B,) int64 keep words
    BLOCK_C: tl.constexpr,
):
    # One program per class segment. Block by block: resolve the 64 boxes of the block (greedy order),
    # then OR the mask rows of the kept boxes into the removed-bits of later blocks.
    s = tl.program_id(0)
    first = tl.load(seg_first_block_ptr + s)
    nb = tl.load(seg_num_blocks_ptr + s)
    moff = tl.load(seg_mask_offset_ptr + s)
    lane = tl.arange(0, 64).to(tl.int64)
    one = tl.full([64], 1, tl.int64)
    ccols = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(0, nb, BLOCK_C):
        tl.store(removed_ptr + first + c0 + ccols, tl.zeros([BLOCK_C], tl.int64), mask=c0 + ccols < nb)
    tl.debug_barrier()
    for b in range(0, nb):
        row0 = moff + 64 * (b * nb - b * (b - 1) // 2)
        stride = nb - b
        cand_word = tl.load(valid_ptr + first + b) & ~tl.load(removed_ptr + first + b)
        cand = ((cand_word >> lane) & 1) != 0
        diag = tl.load(mask_ptr + row0 + lane * stride)
        sup_by = ((diag[:, None] >> lane[None, :]) & 1) != 0   # [j, i]: box j suppresses box i
        # Greedy within the block as a fixed point: kept[i] = cand[i] and no kept j < i suppresses i.
        # Entry i is final after i + 1 rounds, and the greedy answer is the only fixed point, so stopping
        # at the first round that changes nothing is exact (usually 2-3 rounds).
        kept = cand
        changed = 1
        while changed != 0:
            hit = tl.max(tl.where(kept[:, None] & sup_by, 1, 0), axis=0)
            new_kept = cand & (hit == 0)
            changed = tl.max(tl.where(new_kept != kept, 1, 0), axis=0)
            kept = new_kept
        tl.store(keep_ptr + first + b, tl.sum(tl.where(kept, one << lane, 0), axis=0))
        for c0 in range(b + 1, nb, BLOCK_C):
            cols = c0 + ccols
            in_seg = cols < nb
            tile = tl.load(mask_ptr + row0 + lane[:, None] * stride + (cols - b)[None, :],
                           mask=kept[:, None] & in_seg[None, :], other=0)
            acc = tl.reduce(tile, 0, _or_combine)
            old = tl.load(removed_ptr + first + cols, mask=in_seg, other=0)
            tl.store(removed_ptr + first + cols, old | acc, mask=in_seg)
        # Later iterations read words other threads wrote.
        tl.debug_barrier()


@triton.jit
def _nan_min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp0(v):
    return tl.where(v < 0, 0.0, v)


@triton.jit
def _pairwise_iou_kernel(
    b1_ptr, b2_ptr,        # (N, 4), (M, 4) float32/float64
    out_ptr,               # out (N, M)
    N, M,
    GENERALIZED: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm, cm = rows < N, cols < M
    ax1 = tl.load(b1_ptr + rows * 4 + 0, mask=rm, other=0.0)[:, None]
    ay1 = tl.load(b1_ptr + rows * 4 + 1, mask=rm, other=0.0)[:, None]
    ax2 = tl.load(b1_ptr + rows * 4 + 2, mask=rm, other=1.0)[:, None]
    ay2 = tl.load(b1_ptr + rows * 4 + 3, mask=rm, other=1.0)[:, None]
    bx1 = tl.load(b2_ptr + cols * 4 + 0, mask=cm, other=0.0)[None, :]
    by1 = tl.load(b2_ptr + cols * 4 + 1, mask=cm, other=0.0)[None, :]
    bx2 = tl.load(b2_ptr + cols * 4 + 2, mask=cm, other=1.0)[None, :]
    by2 = tl.load(b2_ptr + cols * 4 + 3, mask=cm, other=1.0)[None, :]
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = _clamp0(_nan_min(ax2, bx2) - _nan_max(ax1, bx1))
    h = _clamp0(_nan_min(ay2, by2) - _nan_max(ay1, by1))
    inter = w * h
    uni = (area_a + area_b) - inter
    res = _div(inter, uni, IS_FP64)
    if GENERALIZED:
        cw = _clamp0(_nan_max(ax2, bx2) - _nan_min(ax1, bx1))
        ch = _clamp0(_nan_max(ay2, by2) - _nan_min(ay1, by1))
        enclose = cw * ch
        res = res - _div(enclose - uni, enclose, IS_FP64)
    tl.store(out_ptr + rows[:, None] * M + cols[None, :], res, mask=rm[:, None] & cm[None, :])


@triton.jit
def _max_share(x, y):
    return tl.where(x > y, 1.0, tl.where(x == y, 0.5, 0.0))


@triton.jit
def _min_share(x, y):
    return tl.where(x < y, 1.0, tl.where(x == y, 0.5, 0.0))


@triton.jit
def _clamp_passes(v, AT_ZERO: tl.constexpr):
    if AT_ZERO:
        return v >= 0
    else:
        return v > 0


@triton.jit
def _pairwise_iou_backward_kernel(
    grad_ptr,              # (N, M) upstream gradient, box dtype
    b1_ptr, b2_ptr,        # (N, 4), (M, 4)
    out_ptr,               # out: (N, 4) grad of boxes1 if FOR_BOXES1 else (M, 4) grad of boxes2
    N, M,
    GENERALIZED: tl.constexpr,
    FOR_BOXES1: tl.constexpr,  # which side this launch reduces for (the other is summed over)
    CLAMP_AT_ZERO: tl.constexpr,  # clamp(min=0) passes the gradient at exactly 0 (torch-version dependent)
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Mirrors pair_iou_backward in csrc/common/box_math.h: torch autograd through the forward, clamp
    # passing gradient where its input is > 0 (or >= 0, CLAMP_AT_ZERO), min/max splitting ties evenly.
    own_n = N if FOR_BOXES1 else M
    other_n = M if FOR_BOXES1 else N
    own_ptr = b1_ptr if FOR_BOXES1 else b2_ptr
    other_ptr = b2_ptr if FOR_BOXES1 else b1_ptr
    own = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    om = own < own_n
    o0 = tl.load(own_ptr + own * 4 + 0, mask=om, other=0.0)[:, None]
    o1 = tl.load(own_ptr + own * 4 + 1, mask=om, other=0.0)[:, None]
    o2 = tl.load(own_ptr + own * 4 + 2, mask=om, other=1.0)[:, None]
    o3 = tl.load(own_ptr + own * 4 + 3, mask=om, other=1.0)[:, None]
    acc0 = tl.zeros([BLOCK_R], dtype=o0.dtype)
    acc1 = tl.zeros([BLOCK_R], dtype=o0.dtype)
    acc2 = tl.zeros([BLOCK_R], dtype=o0.dtype)
    acc3 = tl.zeros([BLOCK_R], dtype=o0.dtype)
    for start in range(0, other_n, BLOCK_C):
        oth = start + tl.arange(0, BLOCK_C).to(tl.int64)
        tm = oth < other_n
        t0 = tl.load(other_ptr + oth * 4 + 0, mask=tm, other=0.0)[None, :]
        t1 = tl.load(other_ptr + oth * 4 + 1, mask=tm, other=0.0)[None, :]
        t2 = tl.load(other_ptr + oth * 4 + 2, mask=tm, other=1.0)[None, :]
        t3 = tl.load(other_ptr + oth * 4 + 3, mask=tm, other=1.0)[None, :]
        pm = om[:, None] & tm[None, :]
        if FOR_BOXES1:
            ax1, ay1, ax2, ay2 = o0, o1, o2, o3
            bx1, by1, bx2, by2 = t0, t1, t2, t3
            g = tl.load(grad_ptr + own[:, None] * M + oth[None, :], mask=pm, other=0.0)
        else:
            ax1, ay1, ax2, ay2 = t0, t1, t2, t3
            bx1, by1, bx2, by2 = o0, o1, o2, o3
            g = tl.load(grad_ptr + oth[None, :] * M + own[:, None], mask=pm, other=0.0)
        g = g.to(o0.dtype)
        wa = ax2 - ax1
        ha = ay2 - ay1
        wb = bx2 - bx1
        hb = by2 - by1
        w0 = _nan_min(ax2, bx2) - _nan_max(ax1, bx1)
        h0 = _nan_min(ay2, by2) - _nan_max(ay1, by1)
        w = _clamp0(w0)
        h = _clamp0(h0)
        inter = w * h
        uni = (wa * ha + wb * hb) - inter
        d_uni = -_div(g * inter, uni * uni, IS_FP64)
        d_inter = _div(g, uni, IS_FP64)
        # (x-side gradient of the own box, y-side gradient), built up term by term
        s0 = tl.zeros_like(g)
        s1 = tl.zeros_like(g)
        s2 = tl.zeros_like(g)
        s3 = tl.zeros_like(g)
        if GENERALIZED:
            cw0 = _nan_max(ax2, bx2) - _nan_min(ax1, bx1)
            ch0 = _nan_max(ay2, by2) - _nan_min(ay1, by1)
            cw = _clamp0(cw0)
            ch = _clamp0(ch0)
            enclose = cw * ch
            d_num = -_div(g, enclose, IS_FP64)
            d_enc = _div(g * (enclose - uni), enclose * enclose, IS_FP64) + d_num
            d_uni = d_uni - d_num
            d_cw0 = tl.where(_clamp_passes(cw0, CLAMP_AT_ZERO), d_enc * ch, 0.0)
            d_ch0 = tl.where(_clamp_passes(ch0, CLAMP_AT_ZERO), d_enc * cw, 0.0)
            if FOR_BOXES1:
                s2 += d_cw0 * _max_share(ax2, bx2)
                s0 -= d_cw0 * _min_share(ax1, bx1)
                s3 += d_ch0 * _max_share(ay2, by2)
                s1 -= d_ch0 * _min_share(ay1, by1)
            else:
                s2 += d_cw0 * _max_share(bx2, ax2)
                s0 -= d_cw0 * _min_share(bx1, ax1)
                s3 += d_ch0 * _max_share(by2, ay2)
                s1 -= d_ch0 * _min_share(by1, ay1)
        d_inter = d_inter - d_uni
        d_w0 = tl.where(_clamp_passes(w0, CLAMP_AT_ZERO), d_inter * h, 0.0)
        d_h0 = tl.where(_clamp_passes(h0, CLAMP_AT_ZERO), d_inter * w, 0.0)
        if FOR_BOXES1:
            s2 += d_uni * ha + d_w0 * _min_share(ax2, bx2)
            s0 -= d_uni * ha + d_w0 * _max_share(ax1, bx1)
            s3 += d_uni * wa + d_h0 * _min_share(ay2, by2)
            s1 -= d_uni * wa + d_h0 * _max_share(ay1, by1)
        else:
            s2 += d_uni * hb + d_w0 * _min_share(bx2, ax2)
            s0 -= d_uni * hb + d_w0 * _max_share(bx1, ax1)
            s3 += d_uni * wb + d_h0 * _min_share(by2, ay2)
            s1 -= d_uni * wb + d_h0 * _max_share(by1, ay1)
        acc0 += tl.sum(tl.where(pm, s0, 0.0), axis=1)
        acc1 += tl.sum(tl.where(pm, s1, 0.0), axis=1)
        acc2 += tl.sum(tl.where(pm, s2, 0.0), axis=1)
        acc3 += tl.sum(tl.where(pm, s3, 0.0), axis=1)
    tl.store(out_ptr + own * 4 + 0, acc0, mask=om)
    tl.store(out_ptr + own * 4 + 1, acc1, mask=om)
    tl.store(out_ptr + own * 4 + 2, acc2, mask=om)
    tl.store(out_ptr + own * 4 + 3, acc3, mask=om)


# ---------------------------------------------------------------- launchers

EXACT_ROUNDING = dict(enable_fp_fusion=False)  # no FMA contraction: IoU bit-identical to torch / the CPU kernels


def nms_mask(boxes, block_segment, seg_first_block, seg_num_blocks, seg_mask_offset, max_blocks: int,
             total_words: int, threshold: float):
    """Suppression bitmask over the segmented layout (see module docstring). Returns int64 words."""
    mask = _alloc.empty((total_words,), torch.int64, boxes.device)
    threshold_t = torch.full((), threshold, dtype=boxes.dtype, device=boxes.device)
    total_blocks = boxes.shape[0] // NMS_BLOCK
    if total_blocks:
        is64 = boxes.dtype == torch.float64
        grid = (total_blocks, triton.cdiv(max_blocks, NMS_MASK_COLS))
        _nms_mask_kernel[grid](boxes, block_segment, seg_first_block, seg_num_blocks, seg_mask_offset, mask,
                               threshold_t, COLS=NMS_MASK_COLS, ROWS=NMS_MASK_ROWS[is64], IS_FP64=is64,
                               num_warps=NMS_MASK_WARPS,
                               **EXACT_ROUNDING)
    return mask


def nms_sweep(mask, valid_words, seg_first_block, seg_num_blocks, seg_mask_offset, max_blocks: int):
    """Greedy keep-sweep over the bitmask, one program per class. Returns int64 keep words per block."""
    keep = _alloc.empty(valid_words.shape, torch.int64, valid_words.device)
    if seg_first_block.numel():
        removed = torch.empty_like(valid_words)
        _nms_sweep_kernel[(seg_first_block.numel(),)](mask, valid_words, seg_first_block, seg_num_blocks,
                                                      seg_mask_offset, removed, keep, BLOCK_C=NMS_SWEEP_COLS,
                                                      num_warps=NMS_SWEEP_WARPS)
    return keep


def pairwise_iou(boxes1, boxes2, generalized: bool):
    """(N, M) IoU / GIoU of float32 or float64 boxes (same dtype), in that dtype."""
    n, m = boxes1.shape[0], boxes2.shape[0]
    out = _alloc.empty((n, m), boxes1.dtype, boxes1.device)
    if n and m:
        is64 = boxes1.dtype == torch.float64
        block_n = IOU_BLOCK_N_FP64 if is64 else IOU_BLOCK_N
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, IOU_BLOCK_M))
        _pairwise_iou_kernel[grid](boxes1, boxes2, out, n, m, GENERALIZED=generalized, IS_FP64=is64,
                                   BLOCK_N=block_n, BLOCK_M=IOU_BLOCK_M, num_warps=4, **EXACT_ROUNDING)
    return out


def pairwise_iou_backward(grad, boxes1, boxes2, generalized: bool, grad_at_zero: bool):
    """Gradients (boxes1, boxes2) of pairwise_iou for upstream `grad` (N, M), in the boxes' dtype.
    grad_at_zero: whether clamp(min=0) passes the gradient at exactly 0 (as the running torch does)."""
    n, m = boxes1.shape[0], boxes2.shape[0]
    outs = []
    for for_boxes1, rows in ((True, n), (False, m)):
        out = _alloc.empty((rows, 4), boxes1.dtype, boxes1.device)
        if rows:
            if n and m:
                _pairwise_iou_backward_kernel[(triton.cdiv(rows, IOU_BWD_ROWS),)](
                    grad, boxes1, boxes2, out, n, m, GENERALIZED=generalized, FOR_BOXES1=for_boxes1,
                    CLAMP_AT_ZERO=grad_at_zero, IS_FP64=boxes1.dtype == torch.float64, BLOCK_R=IOU_BWD_ROWS,
                    BLOCK_C=IOU_BWD_COLS,
                    num_warps=4, **EXACT_ROUNDING)
            else:
                out.zero_()
        outs.append(out)
    return outs[0], outs[1]


def aot_specs():
    """Every kernel configuration the launchers use, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps)."""
    at_zero = clamp_grad_at_zero()
    specs = []
    for fp in ("fp32", "fp64"):
        is64 = fp == "fp64"
        specs.append((_nms_mask_kernel,
                      {"boxes_ptr": f"*{fp}", "block_segment_ptr": "*i64", "seg_first_block_ptr": "*i64",
                       "seg_num_blocks_ptr": "*i64", "seg_mask_offset_ptr": "*i64", "mask_ptr": "*i64",
                       "threshold_ptr": f"*{fp}", "COLS": "constexpr", "ROWS": "constexpr",
                       "IS_FP64": "constexpr"},
                      {"COLS": NMS_MASK_COLS, "ROWS": NMS_MASK_ROWS[is64], "IS_FP64": is64}, NMS_MASK_WARPS))
        for gen in (False, True):
            specs.append((_pairwise_iou_kernel,
                          {"b1_ptr": f"*{fp}", "b2_ptr": f"*{fp}", "out_ptr": f"*{fp}", "N": "i32", "M": "i32",
                           "GENERALIZED": "constexpr", "IS_FP64": "constexpr", "BLOCK_N": "constexpr",
                           "BLOCK_M": "constexpr"},
                          {"GENERALIZED": gen, "IS_FP64": is64, "BLOCK_N": IOU_BLOCK_N_FP64 if is64 else IOU_BLOCK_N,
                           "BLOCK_M": IOU_BLOCK_M}, 4))
            for side in (True, False):
                specs.append((_pairwise_iou_backward_kernel,
                              {"grad_ptr": f"*{fp}", "b1_ptr": f"*{fp}", "b2_ptr": f"*{fp}", "out_ptr": f"*{fp}",
                               "N": "i32", "M": "i32", "GENERALIZED": "constexpr", "FOR_BOXES1": "constexpr",
                               "CLAMP_AT_ZERO": "constexpr", "IS_FP64": "constexpr", "BLOCK_R": "constexpr",
                               "BLOCK_C": "constexpr"},
                              {"GENERALIZED": gen, "FOR_BOXES1": side, "CLAMP_AT_ZERO": at_zero, "IS_FP64": is64,
                               "BLOCK_R": IOU_BWD_ROWS,
                               "BLOCK_C": IOU_BWD_COLS}, 4))
    specs.append((_nms_sweep_kernel,
                  {"mask_ptr": "*i64", "valid_ptr": "*i64", "seg_first_block_ptr": "*i64", "seg_num_blocks_ptr": "*i64",
                   "seg_mask_offset_ptr": "*i64", "removed_ptr": "*i64", "keep_ptr": "*i64", "BLOCK_C": "constexpr"},
                  {"BLOCK_C": NMS_SWEEP_COLS}, NMS_SWEEP_WARPS))
    return specs
