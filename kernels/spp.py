"""Triton spatial pyramid pooling: SPP (adaptive max / average bins, flattened and concatenated) and YOLOv5
SPPF pooling (cat([x, y1, y2, y3], 1), y_j = j chained k x k stride-1 max pools), forward and backward.

Inputs are contiguous NCHW (the launchers' callers make them so). Max pooling follows torch's max_pool2d /
adaptive_max_pool2d pick exactly: the row-major first maximum of the window, the last NaN when there is one,
the window's first element when it is all -inf. Gradients are gathered or owned per (n, c) plane: no atomics,
so the backward is deterministic.

SPPF: one program per (n, c) plane walks the plane in chunks of BLOCK pixels. Each pool is separable (row
maxima into a scratch plane, then column maxima), and the three pools chain through the output slots, so x is
read once and each output slot written once. The backward is four launches: one replays torch's chain, keeping
per level the argmax of every k x k window (row pass keeps the column, column pass the row); then one per
level, from y3 down, gathers each pixel's gradient from the outputs whose window covers it and picked it, in
torch's summation order. Passes within a launch are separated by tl.debug_barrier (a program owns its plane,
so a CTA barrier orders the scratch accesses).

SPP forward: one program per (plane, bin), reducing the bin in BH x BW tiles. SPP backward: one program per
plane, bins in output order; each bin adds its gradient to its argmax (max) or its rectangle (avg) in an fp32
scratch plane, with a barrier between bins.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnn import _alloc

# Pixels per chunk of an SPPF plane: 20 x 20 and 40 x 40 (YOLOv5 sizes) in one or two chunks at 4 warps
# (8 per thread for 1024). Not measured on a GPU yet (no device in this session): a round, occupancy-safe size.
SPPF_BLOCK, SPPF_WARPS = 1024, 4
# The backward keeps ~10 live vectors per chunk (argmax state, gathered gradients): 1024 pixels spilled
# (255 registers + 160 bytes of stack on sm_90); 256 pixels per chunk (2 per thread) do not.
SPPF_BWD_BLOCK = 256
# Larger windows (and fp64) hold more state: smaller chunks keep them spill-free (checked by the AOT test).


def sppf_blocks(r: int, is_fp64: bool):
    """(forward, backward) pixels per chunk for window radius r = k // 2."""
    fwd = SPPF_BLOCK if r <= 2 else SPPF_BLOCK // 2
    bwd = SPPF_BWD_BLOCK if r <= 2 and not is_fp64 else SPPF_BWD_BLOCK // 2
    return fwd, bwd


def spp_tile(is_fp64: bool):
    """(BH, BW, BLOCK) of the SPP kernels: fp64 halves the tile rows and the plane chunk."""
    return (SPP_BH // 2, SPP_BW, SPPF_BLOCK // 2) if is_fp64 else (SPP_BH, SPP_BW, SPPF_BLOCK)
# SPP bin tiles: 16 x 32 at 4 warps (4 per thread); bins of a 13 x 13 map at level 1 fit one tile.
SPP_BH, SPP_BW, SPP_WARPS = 16, 32, 4
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@triton.jit
def _takes(v, m):
    # torch's max-pool update: a greater value or a NaN replaces the running max
    return (v > m) | (v != v)


@triton.jit
def _row_pass(src, dst, col_ptr, H, W, R: tl.constexpr, BLOCK: tl.constexpr, WITH_ARG: tl.constexpr):
    # dst[p] = max of src over columns w-R..w+R of p's row (-inf outside); col_ptr[p] = column torch picks.
    HW = H * W
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK)
        valid = p < HW
        w = p % W
        m = tl.full([BLOCK], float("-inf"), src.dtype.element_ty)
        col = tl.maximum(w - R, 0)
        for i in tl.static_range(2 * R + 1):
            cw = w + (i - R)
            ok = valid & (cw >= 0) & (cw < W)
            v = tl.load(src + p + (i - R), mask=ok, other=float("-inf"))
            take = ok & _takes(v, m)
            m = tl.where(take, v, m)
            if WITH_ARG:
                col = tl.where(take, cw, col)
        tl.store(dst + p, m, mask=valid)
        if WITH_ARG:
            tl.store(col_ptr + p, col, mask=valid)


@triton.jit
def _col_pass(src, col_ptr, dst, arg_ptr, H, W, R: tl.constexpr, BLOCK: tl.constexpr, WITH_ARG: tl.constexpr):
    # dst[p] = max of the row maxima src over rows h-R..h+R; arg_ptr[p] = pixel torch's max_pool2d picks.
    HW = H * W
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK)
        valid = p < HW
        h = p // W
        w = p % W
        m = tl.full([BLOCK], float("-inf"), src.dtype.element_ty)
        row = tl.maximum(h - R, 0)
        if WITH_ARG:
            col = tl.load(col_ptr + row * W + w, mask=valid, other=0)
        for i in tl.static_range(2 * R + 1):
            rh = h + (i - R)
            ok = valid & (rh >= 0) & (rh < H)
            v = tl.load(src + p + (i - R) * W, mask=ok, other=float("-inf"))
            take = ok & _takes(v, m)
            m = tl.where(take, v, m)
            if WITH_ARG:
                row = tl.where(take, rh, row)
                col = tl.where(take, tl.load(col_ptr + p + (i - R) * W, mask=ok, other=0), col)
        tl.store(dst + p, m.to(dst.dtype.element_ty), mask=valid)
        if WITH_ARG:
            tl.store(arg_ptr + p, row * W + col, mask=valid)


@triton.jit
def _sppf_fwd_kernel(
    x_ptr,      # (N, C, H, W) contiguous input
    out_ptr,    # (N, 4C, H, W) output: [x, y1, y2, y3] along channels
    tmp_ptr,    # (N * C, H * W) scratch for the row maxima, input dtype
    C, H, W,
    R: tl.constexpr,      # k // 2
    BLOCK: tl.constexpr,  # pixels per chunk
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // C
    c = pid % C
    HW = H * W
    xp = x_ptr + pid * HW
    tp = tmp_ptr + pid * HW
    o0 = out_ptr + (n * 4 * C + c) * HW
    slot = C * HW
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK)
        tl.store(o0 + p, tl.load(xp + p, mask=p < HW), mask=p < HW)
    tl.debug_barrier()
    for s in tl.static_range(1, 4):
        # level s pools level s-1 (x itself for s = 1, its copy in slot 0 is identical)
        _row_pass(o0 + (s - 1) * slot, tp, tp, H, W, R, BLOCK, False)
        tl.debug_barrier()
        _col_pass(tp, tp, o0 + s * slot, tp, H, W, R, BLOCK, False)
        tl.debug_barrier()


@triton.jit
def _sppf_replay_kernel(
    x_ptr,      # (N, C, H, W) input
    val_ptr,    # (N * C, 3, H * W) scratch, input dtype: row maxima, y1 and y2 (recomputed)
    col_ptr,    # (N * C, H * W) int32 scratch: column of each row maximum
    arg_ptr,    # (N * C, 3, H * W) int32 out: argmax pixel of each level's windows
    H, W,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Replays the chain: level 1 pools x into y1, level 2 y1 into y2, level 3 y2 (its values are not needed:
    # they go to the y1 scratch, which is free by then), keeping each level's argmax plane.
    pid = tl.program_id(0).to(tl.int64)
    HW = H * W
    xp = x_ptr + pid * HW
    hm = val_ptr + pid * 3 * HW
    y1 = hm + HW
    y2 = hm + 2 * HW
    cp = col_ptr + pid * HW
    a1 = arg_ptr + pid * 3 * HW
    _row_pass(xp, hm, cp, H, W, R, BLOCK, True)
    tl.debug_barrier()
    _col_pass(hm, cp, y1, a1, H, W, R, BLOCK, True)
    tl.debug_barrier()
    _row_pass(y1, hm, cp, H, W, R, BLOCK, True)
    tl.debug_barrier()
    _col_pass(hm, cp, y2, a1 + HW, H, W, R, BLOCK, True)
    tl.debug_barrier()
    _row_pass(y2, hm, cp, H, W, R, BLOCK, True)
    tl.debug_barrier()
    _col_pass(hm, cp, y1, a1 + 2 * HW, H, W, R, BLOCK, True)


@triton.jit
def _sppf_route_kernel(
    grad_ptr,   # (N, 4C, H, W) gradient of the output
    arg_ptr,    # (N * C, 3, H * W) int32: the replay's argmax planes
    acc_ptr,    # (N * C, 2, H * W) scratch in the accumulation dtype: gradients of y2 and y1
    gx_ptr,     # (N, C, H, W) out: gradient of x
    C, H, W,
    LEVEL: tl.constexpr,  # routes the gradient of y_LEVEL (3, then 2, then 1) to y_(LEVEL - 1) (y_0 = x)
    R: tl.constexpr,
    BLOCK: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    # gin[s] = sum over outputs q whose window holds s and picked s of gout[q] (q ascending: torch's
    # max_pool2d backward order), plus gdirect[s] (y_(LEVEL - 1)'s own slice of the concatenated gradient).
    # One launch per level, the window as runtime loops (LLVM still unrolls the columns): with the nine passes
    # in one kernel and the (2R + 1)^2 window unrolled, R = 4 took 17-19 s to compile for sm_90; now each
    # kernel takes 0.2-1.7 s. A static column loop spilled 8 bytes in 4 of the 48 route configurations.
    pid = tl.program_id(0).to(tl.int64)
    n = pid // C
    c = pid % C
    HW = H * W
    g_level = grad_ptr + (n * 4 * C + c) * HW + LEVEL * C * HW
    gdirect = g_level - C * HW
    arg = arg_ptr + pid * 3 * HW + (LEVEL - 1) * HW
    if LEVEL == 3:
        gout = g_level
    else:
        gout = acc_ptr + pid * 2 * HW + (2 - LEVEL) * HW
    if LEVEL == 1:
        gin = gx_ptr + pid * HW
    else:
        gin = acc_ptr + pid * 2 * HW + (3 - LEVEL) * HW
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK)
        valid = p < HW
        h = p // W
        w = p % W
        if IS_FP64:
            acc = tl.zeros([BLOCK], tl.float64)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, 2 * R + 1):
            qh = h + (i - R)
            row_ok = valid & (qh >= 0) & (qh < H)
            for j in range(0, 2 * R + 1):
                qw = w + (j - R)
                ok = row_ok & (qw >= 0) & (qw < W)
                q = p + (i - R) * W + (j - R)
                a = tl.load(arg + q, mask=ok, other=-1)
                hit = ok & (a == p)
                g = tl.load(gout + q, mask=hit, other=0.0)
                acc += tl.where(hit, g.to(acc.dtype), 0.0)
        acc = acc + tl.load(gdirect + p, mask=valid, other=0.0).to(acc.dtype)
        tl.store(gin + p, acc.to(gin.dtype.element_ty), mask=valid)


@triton.jit
def _spp_fwd_kernel(
    x_ptr,      # (N, C, H, W) contiguous input
    out_ptr,    # (N, C * S) output
    bins_ptr,   # (B, 6) int64 per bin: h0, h1, w0, w1, output index of channel 0, channel stride (l * l)
    C, H, W, CS,
    AVG: tl.constexpr,
    IS_FP64: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    n = pid // C
    c = pid % C
    xp = x_ptr + pid * H * W
    h0 = tl.load(bins_ptr + b * 6 + 0)
    h1 = tl.load(bins_ptr + b * 6 + 1)
    w0 = tl.load(bins_ptr + b * 6 + 2)
    w1 = tl.load(bins_ptr + b * 6 + 3)
    o = tl.load(bins_ptr + b * 6 + 4)
    ll = tl.load(bins_ptr + b * 6 + 5)
    rows = tl.arange(0, BH)
    cols = tl.arange(0, BW)
    if IS_FP64:
        acc = tl.zeros([BH, BW], tl.float64)
    else:
        acc = tl.zeros([BH, BW], tl.float32)
    if not AVG:
        acc = acc - float("inf")
    nan = tl.zeros([BH, BW], tl.int32)
    for hs in range(h0, h1, BH):
        for ws in range(w0, w1, BW):
            hh = hs + rows
            ww = ws + cols
            m = (hh < h1)[:, None] & (ww < w1)[None, :]
            v = tl.load(xp + hh[:, None] * W + ww[None, :], mask=m, other=0.0).to(acc.dtype)
            if AVG:
                acc += v
            else:
                acc = tl.where(m & (v > acc), v, acc)
                nan = nan | (m & (v != v)).to(tl.int32)
    if AVG:
        res = tl.sum(tl.sum(acc, axis=1), axis=0) / (h1 - h0).to(acc.dtype) / (w1 - w0).to(acc.dtype)
    else:
        res = tl.max(tl.max(acc, axis=1), axis=0)
        has_nan = tl.max(tl.max(nan, axis=1), axis=0)
        res = tl.where(has_nan > 0, float("nan"), res)
    tl.store(out_ptr + n * CS + o + c * ll, res.to(out_ptr.dtype.element_ty))


@triton.jit
def _spp_bwd_kernel(
    grad_ptr,   # (N, C * S) gradient of the output
    x_ptr,      # (N, C, H, W) input (read for max only)
    gx_ptr,     # (N, C, H, W) out: gradient of x
    acc_ptr,    # (N * C, H * W) scratch in the accumulation dtype
    bins_ptr,   # (B, 6) int64 bins as in _spp_fwd_kernel
    NB, C, H, W, CS,
    AVG: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // C
    c = pid % C
    HW = H * W
    xp = x_ptr + pid * HW
    ga = acc_ptr + pid * HW
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK)
        tl.store(ga + p, tl.zeros([BLOCK], ga.dtype.element_ty), mask=p < HW)
    tl.debug_barrier()
    rows = tl.arange(0, BH)
    cols = tl.arange(0, BW)
    for b in range(0, NB):
        h0 = tl.load(bins_ptr + b * 6 + 0)
        h1 = tl.load(bins_ptr + b * 6 + 1)
        w0 = tl.load(bins_ptr + b * 6 + 2)
        w1 = tl.load(bins_ptr + b * 6 + 3)
        o = tl.load(bins_ptr + b * 6 + 4)
        ll = tl.load(bins_ptr + b * 6 + 5)
        g = tl.load(grad_ptr + n * CS + o + c * ll).to(ga.dtype.element_ty)
        if AVG:
            d = g / (h1 - h0).to(g.dtype) / (w1 - w0).to(g.dtype)   # torch: grad / kh / kw on every pixel
            for hs in range(h0, h1, BH):
                for ws in range(w0, w1, BW):
                    hh = hs + rows
                    ww = ws + cols
                    m = (hh < h1)[:, None] & (ww < w1)[None, :]
                    q = ga + hh[:, None] * W + ww[None, :]
                    tl.store(q, tl.load(q, mask=m, other=0.0) + d, mask=m)
        else:
            # torch's pick: the row-major first maximum, else the last NaN, else (all -inf) the first pixel
            best = tl.full([], float("-inf"), ga.dtype.element_ty)   # compared in the (exact) fp32 / fp64
            best_i = h0 * W + w0
            nan_i = best_i * 0 - 1
            for hs in range(h0, h1, BH):
                for ws in range(w0, w1, BW):
                    hh = hs + rows
                    ww = ws + cols
                    m = (hh < h1)[:, None] & (ww < w1)[None, :]
                    idx = hh[:, None] * W + ww[None, :]
                    v = tl.load(xp + idx, mask=m, other=float("-inf")).to(ga.dtype.element_ty)
                    real = m & (v == v)
                    tmax = tl.max(tl.max(tl.where(real, v, float("-inf")), axis=1), axis=0)
                    big = HW + 1
                    tidx = tl.min(tl.min(tl.where(real & (v == tmax), idx, big), axis=1), axis=0)
                    upd = (tmax > best) | ((tmax == best) & (tidx < best_i))
                    best = tl.where(upd, tmax, best)
                    best_i = tl.where(upd, tidx, best_i)
                    nidx = tl.max(tl.max(tl.where(m & (v != v), idx, -1), axis=1), axis=0)
                    nan_i = tl.maximum(nan_i, nidx)
            a = tl.where(nan_i >= 0, nan_i, best_i)
            tl.store(ga + a, tl.load(ga + a) + g)
        tl.debug_barrier()
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK)
        tl.store(gx_ptr + pid * HW + p, tl.load(ga + p, mask=p < HW).to(gx_ptr.dtype.element_ty), mask=p < HW)


# ---------------------------------------------------------------- launchers

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sppf_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """cat([x, y1, y2, y3], 1) for contiguous (N, C, H, W) x; k odd."""
    N, C, H, W = x.shape
    out = _alloc.empty((N, 4 * C, H, W), x.dtype, x.device)
    if out.numel():
        tmp = torch.empty((N * C, H * W), dtype=x.dtype, device=x.device)
        _sppf_fwd_kernel[(N * C,)](x, out, tmp, C, H, W, R=k // 2, BLOCK=sppf_blocks(k // 2, x.dtype == torch.float64)[0],
                                   num_warps=SPPF_WARPS)
    return out


def sppf_pool_backward(grad: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of sppf_pool with respect to contiguous x, for contiguous grad (N, 4C, H, W)."""
    N, C, H, W = x.shape
    gx = _alloc.empty((N, C, H, W), x.dtype, x.device)
    if gx.numel():
        dev = x.device
        val = torch.empty((N * C, 3, H * W), dtype=x.dtype, device=dev)
        col = torch.empty((N * C, H * W), dtype=torch.int32, device=dev)
        arg = torch.empty((N * C, 3, H * W), dtype=torch.int32, device=dev)
        acc = torch.empty((N * C, 2, H * W), dtype=_acc_dtype(x.dtype), device=dev)
        r, is64 = k // 2, x.dtype == torch.float64
        block = sppf_blocks(r, is64)[1]
        _sppf_replay_kernel[(N * C,)](x, val, col, arg, H, W, R=r, BLOCK=block, num_warps=SPPF_WARPS)
        for level in (3, 2, 1):
            _sppf_route_kernel[(N * C,)](grad, arg, acc, gx, C, H, W, LEVEL=level, R=r, BLOCK=block,
                                         IS_FP64=is64, num_warps=SPPF_WARPS)
    return gx


def spp_bins(C: int, H: int, W: int, levels, device) -> torch.Tensor:
    """(B, 6) int64 bin table, bins in output order: h0, h1, w0, w1, output index of channel 0, l * l."""
    rows, off = [], 0
    for lv in levels:
        for i in range(lv):
            for j in range(lv):
                rows.append((i * H // lv, -(-(i + 1) * H // lv), j * W // lv, -(-(j + 1) * W // lv),
                             off + i * lv + j, lv * lv))
        off += C * lv * lv
    return torch.tensor(rows, dtype=torch.int64).to(device)


def spp_pool(x: torch.Tensor, levels, avg: bool) -> torch.Tensor:
    """(N, C * S) SPP output for contiguous (N, C, H, W) x with H, W > 0."""
    N, C, H, W = x.shape
    S = sum(lv * lv for lv in levels)
    out = _alloc.empty((N, C * S), x.dtype, x.device)
    if out.numel():
        bins = spp_bins(C, H, W, levels, x.device)
        bh, bw, _ = spp_tile(x.dtype == torch.float64)
        _spp_fwd_kernel[(N * C, bins.shape[0])](x, out, bins, C, H, W, C * S, AVG=avg,
                                                 IS_FP64=x.dtype == torch.float64, BH=bh, BW=bw,
                                                 num_warps=SPP_WARPS)
    return out


def spp_pool_backward(grad: torch.Tensor, x: torch.Tensor, levels, avg: bool) -> torch.Tensor:
    """Gradient of spp_pool with respect to contiguous x, for contiguous grad (N, C * S)."""
    N, C, H, W = x.shape
    S = sum(lv * lv for lv in levels)
    gx = _alloc.empty((N, C, H, W), x.dtype, x.device)
    if gx.numel():
        bins = spp_bins(C, H, W, levels, x.device)
        acc = torch.empty((N * C, H * W), dtype=_acc_dtype(x.dtype), device=x.device)
        bh, bw, block = spp_tile(x.dtype == torch.float64)
        _spp_bwd_kernel[(N * C,)](grad, x, gx, acc, bins, bins.shape[0], C, H, W, C * S, AVG=avg, BH=bh,
                                  BW=bw, BLOCK=block, num_warps=SPP_WARPS)
    return gx


# Launched on sm_90 only: on sm_80 three configurations (SPPF backward route fp32 k=9, SPP backward fp16 max,
# SPPF forward bf16 k=5) compile with an 8-16 byte stack, so fastnn.ops.spp runs the reference there.
_AOT_OPTIONS = {"archs": (90,)}


def aot_specs():
    """Every kernel configuration the launchers use, for the ahead-of-time compile test:
    (kernel, signature, constexprs, num_warps)."""
    specs = []
    for dtype, fp in _DTYPES.items():
        acc = "fp64" if fp == "fp64" else "fp32"
        is64 = fp == "fp64"
        for r in (1, 2, 3, 4):   # k = 3, 5 (YOLOv5), 7, 9 (SPP-style)
            specs.append((_sppf_fwd_kernel,
                          {"x_ptr": f"*{fp}", "out_ptr": f"*{fp}", "tmp_ptr": f"*{fp}", "C": "i32", "H": "i32",
                           "W": "i32", "R": "constexpr", "BLOCK": "constexpr"},
                          {"R": r, "BLOCK": sppf_blocks(r, is64)[0]}, SPPF_WARPS, _AOT_OPTIONS))
            specs.append((_sppf_replay_kernel,
                          {"x_ptr": f"*{fp}", "val_ptr": f"*{fp}", "col_ptr": "*i32", "arg_ptr": "*i32",
                           "H": "i32", "W": "i32", "R": "constexpr", "BLOCK": "constexpr"},
                          {"R": r, "BLOCK": sppf_blocks(r, is64)[1]}, SPPF_WARPS, _AOT_OPTIONS))
            for level in (3, 2, 1):
                specs.append((_sppf_route_kernel,
                              {"grad_ptr": f"*{fp}", "arg_ptr": "*i32", "acc_ptr": f"*{acc}", "gx_ptr": f"*{fp}",
                               "C": "i32", "H": "i32", "W": "i32", "LEVEL": "constexpr", "R": "constexpr",
                               "BLOCK": "constexpr", "IS_FP64": "constexpr"},
                              {"LEVEL": level, "R": r, "BLOCK": sppf_blocks(r, is64)[1], "IS_FP64": is64},
                              SPPF_WARPS, _AOT_OPTIONS))
        bh, bw, block = spp_tile(is64)
        for avg in (False, True):
            specs.append((_spp_fwd_kernel,
                          {"x_ptr": f"*{fp}", "out_ptr": f"*{fp}", "bins_ptr": "*i64", "C": "i32", "H": "i32",
                           "W": "i32", "CS": "i32", "AVG": "constexpr", "IS_FP64": "constexpr", "BH": "constexpr",
                           "BW": "constexpr"},
                          {"AVG": avg, "IS_FP64": is64, "BH": bh, "BW": bw}, SPP_WARPS, _AOT_OPTIONS))
            specs.append((_spp_bwd_kernel,
                          {"grad_ptr": f"*{fp}", "x_ptr": f"*{fp}", "gx_ptr": f"*{fp}", "acc_ptr": f"*{acc}",
                           "bins_ptr": "*i64", "NB": "i32", "C": "i32", "H": "i32", "W": "i32", "CS": "i32",
                           "AVG": "constexpr", "BH": "constexpr", "BW": "constexpr", "BLOCK": "constexpr"},
                          {"AVG": avg, "BH": bh, "BW": bw, "BLOCK": block}, SPP_WARPS, _AOT_OPTIONS))
    return specs
