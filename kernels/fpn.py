"""Triton FPN top-down kernels: out = lateral + nearest_upsample(top), and the gradient for top.

Both kernels walk their output in memory order (NCHW or channels_last, a constexpr switch), one element per
lane, so loads of lateral / stores of out are unit-stride; the nearest source index follows torch's rule
``min(floor(float32(o) * scale), in - 1)`` with the float32 scale ``in / out`` computed on the host.
The backward gathers, for each top pixel, the rectangle of output pixels whose nearest source it is
(preimage tables built on the host), columns summed over rows first and then across, in float32 (float64
for float64): deterministic, no atomics, and the same order as the C++ CPU kernel.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from fastnn import _alloc
from fastnn.reference.fpn import nearest_scale, nearest_source

# 1024 elements per program at 4 warps (8 per thread): a memory-bound elementwise kernel; not yet tuned
# on a GPU (no measurement behind it so far).
FWD_BLOCK, FWD_WARPS = 1024, 4
# The backward's inner loops run over the preimage (2 x 2 for the usual 2x pyramid): 256 top pixels per
# program keeps enough programs for a 128 x 128 level at batch 1.
BWD_BLOCK, BWD_WARPS = 256, 4


@triton.jit
def _split(i, C, W, H, CHANNELS_LAST: tl.constexpr):
    # flat index in memory order -> (image-or-plane, channel, y, x); for NCHW the first is the plane
    # n * C + c and the channel is unused.
    if CHANNELS_LAST:
        c = i % C
        t = i // C
        x = t % W
        t = t // W
        y = t % H
        n = t // H
    else:
        c = i * 0
        x = i % W
        t = i // W
        y = t % H
        n = t // H
    return n, c, y, x


@triton.jit
def _fpn_topdown_add_kernel(
    lat_ptr,              # (N, C, HL, WL) lateral, dense in the layout given by CHANNELS_LAST
    top_ptr,              # (N, C, HT, WT) top, same dtype and layout
    out_ptr,              # out (N, C, HL, WL), lateral's layout
    total,                # N * C * HL * WL
    C, HL, WL, HT, WT,
    scale_h, scale_w,     # float32 HT / HL and WT / WL (torch's nearest scales)
    CHANNELS_LAST: tl.constexpr,
    IS_FP64: tl.constexpr,  # add in float64 (else float32)
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    n, c, y, x = _split(i, C, WL, HL, CHANNELS_LAST)
    sy = tl.minimum((y.to(tl.float32) * scale_h).to(tl.int64), HT - 1)  # truncation = floor (non-negative)
    sx = tl.minimum((x.to(tl.float32) * scale_w).to(tl.int64), WT - 1)
    if CHANNELS_LAST:
        toff = ((n * HT + sy) * WT + sx) * C + c
    else:
        toff = (n * HT + sy) * WT + sx
    a = tl.load(lat_ptr + i, mask=m, other=0.0)
    b = tl.load(top_ptr + toff, mask=m, other=0.0)
    if IS_FP64:
        s = a + b
    else:
        s = a.to(tl.float32) + b.to(tl.float32)
    tl.store(out_ptr + i, s.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fpn_topdown_add_backward_kernel(
    grad_ptr,             # (N, C, HL, WL) upstream gradient, dense in the layout given by CHANNELS_LAST
    ys_ptr,               # (HT + 1,) int32: rows [ys[i], ys[i + 1]) have nearest source row i
    xs_ptr,               # (WT + 1,) int32: the same for columns
    out_ptr,              # out (N, C, HT, WT) grad of top, same layout
    total,                # N * C * HT * WT
    C, HL, WL, HT, WT,
    MAX_Y, MAX_X,         # longest row / column preimage (loop bounds; shorter ones are masked)
    CHANNELS_LAST: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    n, c, ty, tx = _split(i, C, WT, HT, CHANNELS_LAST)
    y0 = tl.load(ys_ptr + ty, mask=m, other=0).to(tl.int64)
    y1 = tl.load(ys_ptr + ty + 1, mask=m, other=0).to(tl.int64)
    x0 = tl.load(xs_ptr + tx, mask=m, other=0).to(tl.int64)
    x1 = tl.load(xs_ptr + tx + 1, mask=m, other=0).to(tl.int64)
    if IS_FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dx in range(0, MAX_X):
        xx = x0 + dx
        col = tl.zeros_like(acc)
        for dy in range(0, MAX_Y):
            yy = y0 + dy
            ok = m & (yy < y1) & (xx < x1)
            if CHANNELS_LAST:
                goff = ((n * HL + yy) * WL + xx) * C + c
            else:
                goff = (n * HL + yy) * WL + xx
            col += tl.load(grad_ptr + goff, mask=ok, other=0.0).to(acc.dtype)
        acc += col
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------- launchers

def _channels_last(t) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _new(shape, dtype, device, is_cl: bool):
    out = torch.empty(shape, dtype=dtype, device=device,
                      memory_format=torch.channels_last if is_cl else torch.contiguous_format)
    if _alloc.poisoning() and out.numel():
        out.fill_(float("nan"))
    return out


@functools.lru_cache(maxsize=256)
def _preimage(in_size: int, out_size: int):
    """(starts (in_size + 1,) int32 numpy, longest preimage) for the nearest map out_size -> in_size."""
    src = nearest_source(in_size, out_size).numpy()
    starts = np.searchsorted(src, np.arange(in_size + 1), side="left").astype(np.int32)
    return starts, int(np.diff(starts).max(initial=0))


def fpn_topdown_add(lateral, top):
    """lateral + nearest_upsample(top, lateral's size); output in lateral's layout and dtype."""
    is_cl = _channels_last(lateral)
    fmt = torch.channels_last if is_cl else torch.contiguous_format
    lat, tp = lateral.contiguous(memory_format=fmt), top.contiguous(memory_format=fmt)
    n, c, hl, wl = lat.shape
    ht, wt = tp.shape[2], tp.shape[3]
    out = _new(lat.shape, lat.dtype, lat.device, is_cl)
    total = out.numel()
    if total:
        _fpn_topdown_add_kernel[(triton.cdiv(total, FWD_BLOCK),)](
            lat, tp, out, total, c, hl, wl, ht, wt, nearest_scale(ht, hl), nearest_scale(wt, wl),
            CHANNELS_LAST=is_cl, IS_FP64=lat.dtype == torch.float64, BLOCK=FWD_BLOCK, num_warps=FWD_WARPS)
    return out


def fpn_topdown_add_backward(grad, top_h: int, top_w: int, is_cl: bool):
    """Gradient of fpn_topdown_add with respect to top (N, C, top_h, top_w), in the layout is_cl gives."""
    fmt = torch.channels_last if is_cl else torch.contiguous_format
    g = grad.contiguous(memory_format=fmt)
    n, c, hl, wl = g.shape
    out = _new((n, c, top_h, top_w), g.dtype, g.device, is_cl)
    total = out.numel()
    if total:
        if g.numel() == 0:
            return out.zero_()
        ys, max_y = _preimage(top_h, hl)
        xs, max_x = _preimage(top_w, wl)
        ys_t = torch.from_numpy(ys).to(g.device, non_blocking=True)
        xs_t = torch.from_numpy(xs).to(g.device, non_blocking=True)
        _fpn_topdown_add_backward_kernel[(triton.cdiv(total, BWD_BLOCK),)](
            g, ys_t, xs_t, out, total, c, hl, wl, top_h, top_w, max_y, max_x,
            CHANNELS_LAST=is_cl, IS_FP64=g.dtype == torch.float64, BLOCK=BWD_BLOCK, num_warps=BWD_WARPS)
    return out


def aot_specs():
    """Every kernel configuration the launchers use, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps)."""
    specs = []
    for fp in ("fp32", "fp16", "bf16", "fp64"):
        is64 = fp == "fp64"
        for cl in (False, True):
            specs.append((_fpn_topdown_add_kernel,
                          {"lat_ptr": f"*{fp}", "top_ptr": f"*{fp}", "out_ptr": f"*{fp}", "total": "i32",
                           "C": "i32", "HL": "i32", "WL": "i32", "HT": "i32", "WT": "i32",
                           "scale_h": "fp32", "scale_w": "fp32", "CHANNELS_LAST": "constexpr",
                           "IS_FP64": "constexpr", "BLOCK": "constexpr"},
                          {"CHANNELS_LAST": cl, "IS_FP64": is64, "BLOCK": FWD_BLOCK}, FWD_WARPS))
            specs.append((_fpn_topdown_add_backward_kernel,
                          {"grad_ptr": f"*{fp}", "ys_ptr": "*i32", "xs_ptr": "*i32", "out_ptr": f"*{fp}",
                           "total": "i32", "C": "i32", "HL": "i32", "WL": "i32", "HT": "i32", "WT": "i32",
                           "MAX_Y": "i32", "MAX_X": "i32", "CHANNELS_LAST": "constexpr", "IS_FP64": "constexpr",
                           "BLOCK": "constexpr"},
                          {"CHANNELS_LAST": cl, "IS_FP64": is64, "BLOCK": BWD_BLOCK}, BWD_WARPS))
    return specs
