"""RoI ops (roi_align, roi_pool, multi-level roi_align) and modules (RoIAlign, RoIPool, MultiScaleRoIAlign)
against torchvision and fastnn.reference, through the tiers of DESIGN.md section 5."""
from collections import OrderedDict

import pytest
import torch
import torchvision

import fastnn
from fastnn import nn as fnn
from fastnn import ops
from fastnn.ops import roi as roi_ops
from fastnn.reference import roi as ref

from _tiers import backends_under_test, check_compiles, expect_error, lowp_close, run, run_gradcheck, run_opcheck

ALIGN_BACKENDS = backends_under_test("cpu", tuple(roi_ops._ALIGN_IMPLS))
POOL_BACKENDS = backends_under_test("cpu", tuple(roi_ops._POOL_IMPLS))
LOWP = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- inputs

def random_rois(k, n, height, width, scale=1.0, *, spread=1.2, dtype=torch.float32, seed=0):
    """RoIs in image coordinates over a map of (height, width) at `scale`: some reach past the border,
    a few are tiny, one is inverted and one has zero width."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float64) / scale
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * size * spread - 0.1 * size
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * size * 0.7
    wh[: max(k // 6, 1)] *= 0.02  # smaller than a pixel
    rois = torch.cat([torch.randint(0, n, (k, 1), generator=g).double(), xy, xy + wh], 1)
    if k > 3:
        rois[1, 3] = rois[1, 1] - 2.0   # inverted
        rois[2, 3] = rois[2, 1]         # zero width
    return rois.to(dtype)


def features(n, c, h, w, dtype=torch.float32, channels_last=False):
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


ALIGN_CASES = [  # (output_size, spatial_scale, sampling_ratio, aligned)
    ((7, 7), 1.0, 2, False),
    ((3, 5), 0.5, -1, False),
    ((3, 5), 0.25, 0, True),
    ((2, 2), 0.125, 3, True),
    ((1, 4), 1.0, -1, True),
]


# ---------------------------------------------------------------- tier 1: reference vs torchvision

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ALIGN_CASES)
def test_reference_roi_align_equals_torchvision(case, dtype):
    size, scale, sr, aligned = case
    x = features(2, 3, 11, 14, dtype)
    rois = random_rois(12, 2, 11, 14, scale, dtype=dtype)
    want = torchvision.ops.roi_align(x, rois, size, scale, sr, aligned)
    assert torch.equal(ref.roi_align(x, rois, *size, scale, sr, aligned), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
def test_reference_roi_pool_equals_torchvision(scale, dtype):
    x = features(2, 3, 11, 14, dtype)
    rois = random_rois(12, 2, 11, 14, scale, dtype=dtype)
    assert torch.equal(ref.roi_pool(x, rois, 3, 4, scale), torchvision.ops.roi_pool(x, rois, (3, 4), scale))


def test_reference_level_mapping_equals_torchvision():
    from torchvision.ops.poolers import LevelMapper, _setup_scales

    feats = [torch.zeros(1, 1, 64, 80), torch.zeros(1, 1, 32, 40), torch.zeros(1, 1, 16, 20)]
    scales_tv, mapper = _setup_scales(feats, [(256, 320), (250, 300)], 224, 4)
    scales, k_min, k_max = ref.setup_scales([f.shape[-2:] for f in feats], [(256, 320), (250, 300)])
    assert scales == scales_tv and (k_min, k_max) == (mapper.k_min, mapper.k_max)
    boxes = random_rois(40, 1, 256, 320)[:, 1:].abs() + torch.tensor([0, 0, 1, 1])
    levels, defined = ref.map_levels(boxes, k_min, k_max)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert torch.equal(defined, area >= 0) and not defined.all()  # the inverted box has no level
    assert torch.equal(levels[defined], LevelMapper(k_min, k_max)([boxes])[defined])
    # low-precision boxes are measured in float32 as torchvision does: 300 x 300 (area 90000) overflows float16
    big = torch.tensor([[0.0, 0.0, 300.0, 300.0], [10.0, 20.0, 700.0, 400.0], [0.0, 0.0, 50.0, 40.0]])
    for dtype in (torch.float16, torch.bfloat16):
        levels, defined = ref.map_levels(big.to(dtype), k_min, k_max)
        assert defined.all() and torch.equal(levels, LevelMapper(k_min, k_max)([big.to(dtype)]))


# ---------------------------------------------------------------- tier 2: kernels

@pytest.mark.parametrize("backend", ALIGN_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ALIGN_CASES)
def test_roi_align_equals_torchvision(case, dtype, channels_last, backend):
    """Forward and gradient equal torchvision's CPU kernel bit for bit (same operation order)."""
    size, scale, sr, aligned = case
    x = features(3, 5, 13, 17, dtype, channels_last).requires_grad_()
    rois = random_rois(20, 3, 13, 17, scale, dtype=dtype)
    out = run(backend, ops.roi_align, x, rois, size, scale, sr, aligned)
    xt = x.detach().contiguous().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois, size, scale, sr, aligned)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(out, want)
    grad = torch.randn_like(want)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gt,) = torch.autograd.grad(want, xt, grad)
    if backend == "cpp":
        assert torch.equal(gx, gt)
    else:  # autograd of the reference sums in another order
        torch.testing.assert_close(gx, gt, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", LOWP)
def test_roi_align_low_precision(dtype, channels_last):
    x64 = features(2, 4, 12, 15, torch.float64)
    rois = random_rois(16, 2, 12, 15, 0.5, dtype=dtype).double()  # exactly representable in dtype
    x = x64.to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    out = run("cpp", ops.roi_align, x, rois, (3, 3), 0.5, 2, True)
    assert out.dtype == dtype
    lowp_close(out, ref.roi_align(x64, rois, 3, 3, 0.5, 2, True),
               ref.roi_align(x64.to(dtype), rois.to(dtype), 3, 3, 0.5, 2, True), what="roi_align")
    grad = torch.randn(out.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, x, grad.to(dtype))
    x64r = x64.clone().requires_grad_()
    (g64,) = torch.autograd.grad(ref.roi_align(x64r, rois, 3, 3, 0.5, 2, True), x64r, grad.to(dtype).double())
    xl = x64.to(dtype).requires_grad_()
    (gl,) = torch.autograd.grad(ref.roi_align(xl, rois.to(dtype), 3, 3, 0.5, 2, True), xl, grad.to(dtype))
    lowp_close(gx, g64, gl, what="roi_align grad")


@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_input_keeps_float32_boxes(dtype):
    """float16 / bfloat16 features run in float32 with the boxes as given: coordinates beyond float16's
    integer range (2048) keep their fractions."""
    x = features(1, 3, 40, 1000, dtype)
    rois = torch.tensor([[0, 3000.3, 10.7, 3601.9, 100.2], [0, 2500.55, 3.3, 3999.1, 150.9]])
    got = run("cpp", ops.roi_align, x, rois, 3, 0.25, 2, True)
    want = run("cpp", ops.roi_align, x.float(), rois, 3, 0.25, 2, True).to(dtype)
    assert torch.equal(got, want)
    rounded = run("cpp", ops.roi_align, x.float(), rois.to(dtype).float(), 3, 0.25, 2, True).to(dtype)
    assert not torch.equal(got, rounded)  # the float16 boxes would sample elsewhere


@pytest.mark.parametrize("backend", ["reference"] + ALIGN_BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_nonpositive_spatial_scale_as_torchvision(scale, backend):
    """torchvision takes any finite spatial_scale: 0 (every box at the origin) and negative ones give its
    results, forward and gradient, for roi_align (both alignments, fixed and adaptive sampling) and roi_pool."""
    x = features(2, 3, 11, 14, torch.float64).requires_grad_()
    rois = random_rois(12, 2, 11, 14, 1.0, dtype=torch.float64)
    calls = [(ops.roi_align, torchvision.ops.roi_align, (3, scale, sr, aligned)) for sr in (2, -1)
             for aligned in (False, True)]
    calls.append((ops.roi_pool, torchvision.ops.roi_pool, (3, scale)))
    for ours, theirs, args in calls:
        if ours is ops.roi_pool and backend not in ["reference"] + POOL_BACKENDS:
            continue
        out = run(backend, ours, x, rois, *args)
        xt = x.detach().clone().requires_grad_()
        want = theirs(xt, rois, *args)
        assert torch.equal(out, want), (ours.__name__, args)
        grad = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(want, xt, grad)[0],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
def test_roi_pool_equals_torchvision(scale, dtype, channels_last, backend):
    x = features(3, 5, 13, 17, dtype, channels_last)
    x[0, :, 2:5, 3:6] = 1.0  # ties: the gradient must go to the first maximum
    x.requires_grad_()
    rois = random_rois(20, 3, 13, 17, scale, dtype=dtype)
    out = run(backend, ops.roi_pool, x, rois, (3, 4), scale)
    xt = x.detach().contiguous().requires_grad_()
    want = torchvision.ops.roi_pool(xt, rois, (3, 4), scale)
    assert torch.equal(out, want)
    grad = torch.randn_like(want)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gt,) = torch.autograd.grad(want, xt, grad)
    assert torch.equal(gx, gt)


@pytest.mark.parametrize("dtype", LOWP)
def test_roi_pool_low_precision(dtype):
    x = features(2, 4, 12, 15, dtype)
    rois = random_rois(16, 2, 12, 15, 0.5, dtype=dtype)
    out = run("cpp", ops.roi_pool, x, rois, 3, 0.5)
    # a maximum is one of the inputs: exact
    assert torch.equal(out, ref.roi_pool(x.float(), rois.float(), 3, 3, 0.5).to(dtype))


def test_nan_and_out_of_map_boxes():
    x = features(1, 3, 9, 9)
    x[0, 1, 4, 4] = float("nan")
    rois = torch.tensor([[0, float("nan"), 1, 5, 5], [0, -50, -50, -20, -20], [0, 20, 20, 40, 40],
                         [0, 2, 2, 7, 7], [0, 3, 3, 3, 3]])
    for backend in ALIGN_BACKENDS:
        out = run(backend, ops.roi_align, x, rois, 2, 1.0, -1, False)
        torch.testing.assert_close(out, ref.roi_align(x, rois, 2, 2, 1.0, -1, False), equal_nan=True, rtol=0, atol=0)
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # NaN box: no sample
        pooled = run(backend, ops.roi_pool, x, rois, 2, 1.0)
        torch.testing.assert_close(pooled, ref.roi_pool(x, rois, 2, 2, 1.0), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)])
def test_map_without_rows_or_columns(shape, channels_last):
    """Samples in [-1, 0] on an empty axis once clamped to pixel -1 and read out of bounds (a segfault): they
    read nothing, so every bin is 0 and the (empty) gradient is defined; CPU kernels, emulated CUDA kernels
    and the reference agree."""
    from fastnn._backend import _C

    x = features(1, 3, *shape, channels_last=channels_last).requires_grad_()
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, 1.0, 0.0], [0.0, -0.5, -0.5, 0.5, 0.5]])
    for aligned in (False, True):
        want = ref.roi_align(x.detach(), rois, 2, 2, 1.0, -1, aligned)
        assert torch.equal(want, torch.zeros(3, 3, 2, 2))
        for backend in ALIGN_BACKENDS:
            out = run(backend, ops.roi_align, x, rois, 2, 1.0, -1, aligned)
            assert torch.equal(out, want), backend
            (g,) = torch.autograd.grad(out.sum(), x)
            assert g.shape == x.shape
        args = ([x.detach()], rois, None, [1.0], 2, 2, 2, aligned, channels_last)
        assert torch.equal(_C.roi_align_forward_emulated(*args), want)
        grad = torch.randn(3, 3, 2, 2)
        gargs = (grad, rois, None, [1.0], list(x.shape), channels_last, 2, aligned)
        assert _C.roi_align_backward_emulated(*gargs)[0].shape == x.shape


def _one_bin_by_axes(x, roi, grid):
    """roi_align to 1 x 1 (scale 1, not aligned) with a grid x grid sampling, summed separably: the per-axis
    tap weights (reference._axis_taps), then rows^T plane cols / grid^2. Fast for grids the reference's
    sample loop would walk for hours."""
    start_h, start_w, bin_h, bin_w, _, _ = ref._align_geometry(roi, 1.0, 1, 1, grid, False)
    plane = x[int(roi[0])]

    def axis(start, size, extent):
        valid, low, high, w_low, w_high = ref._axis_taps(ref._sample_coords(start, size, 1, grid)[0], extent)
        m = torch.zeros(extent, dtype=x.dtype)
        m.index_add_(0, low[valid], w_low[valid])
        m.index_add_(0, high[valid], w_high[valid])
        return m

    rows, cols = axis(start_h, bin_h, x.shape[2]), axis(start_w, bin_w, x.shape[3])
    return torch.einsum("h,chw,w->c", rows, plane, cols) / float(grid) ** 2


def test_adaptive_grid_count_does_not_wrap():
    """Huge sample grids whose count (grid_h * grid_w) passed 2^31 wrapped in 32 bits, and the kernels divided
    the sum of the samples by 1: a 1e6-pixel box pooled to 1 x 1 (adaptive: 10^6 x 10^6 samples, ~9 x 9 of
    them on the map) and a 1e5-pixel box with sampling_ratio 46341 (46341^2 > 2^31)."""
    x = features(1, 2, 8, 8, torch.float64)
    for side, sr in ((1e6, -1), (1e5, 46341)):
        roi = torch.tensor([0.0, 0.0, 0.0, side, side], dtype=torch.float64)
        want = _one_bin_by_axes(x, roi, int(side) if sr <= 0 else sr)
        assert 0 < want.abs().max() < 1e-6
        for backend in ALIGN_BACKENDS:
            got = run(backend, ops.roi_align, x, roi[None], 1, 1.0, sr)
            torch.testing.assert_close(got[:, :, 0, 0], want[None], rtol=1e-10, atol=0, msg=backend)


def test_roi_pool_non_finite_corners_pool_nothing():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0, 0, 0, float("inf"), 3], [0, float("-inf"), 0, 3, 3], [0, 0, 0, 1e30, 3],
                         [0, 0, float("nan"), 3, 3]])
    want = ref.roi_pool(x, rois, 1, 1, 1.0)
    assert torch.equal(want[:, 0, 0, 0], torch.tensor([0.0, 0.0, 15.0, 0.0]))
    for backend in POOL_BACKENDS:
        assert torch.equal(run(backend, ops.roi_pool, x, rois, 1, 1.0), want), backend


@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_tables_built_in_chunks(channels_last):
    """With a tiny budget every RoI gets its own chunk of sample tables, and one image's RoIs span chunks:
    same bits, forward and backward (the backward continues each plane's sums across chunks)."""
    from fastnn._backend import _C

    x = features(2, 10, 40, 40, channels_last=channels_last).requires_grad_()
    rois = torch.tensor([[0, 0.0, 0.0, 39.0, 39.0]] * 5 + [[1, 5.0, 7.0, 30.0, 33.0]] * 5)
    rois[::3, 0] = 1 - rois[::3, 0]
    xt = x.detach().contiguous().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois, 7, 1.0, -1, False)
    grad = torch.randn_like(want)
    (gt,) = torch.autograd.grad(want, xt, grad)
    _C.set_roi_sample_budget(256)
    try:
        out = run("cpp", ops.roi_align, x, rois, 7, 1.0, -1, False)
        (gx,) = torch.autograd.grad(out, x, grad)
    finally:
        _C.set_roi_sample_budget(32 << 20)
    assert torch.equal(out, want) and torch.equal(gx, gt)


# ---------------------------------------------------------------- determinism, threads, channels-last

def test_backward_is_deterministic_and_thread_independent():
    x = features(2, 24, 30, 30).requires_grad_()
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    rois = random_rois(200, 2, 30, 30, 1.0)
    grad = torch.randn(200, 24, 7, 7)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, max(threads, 2), max(threads, 2)):
            torch.set_num_threads(t)
            for inp in (x, xc):
                out = run("cpp", ops.roi_align, inp, rois, 7, 1.0, 2, True)
                results.append(torch.autograd.grad(out, inp, grad)[0])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


# ---------------------------------------------------------------- the CUDA kernels, emulated on the CPU

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ALIGN_CASES[:3])
def test_cuda_kernels_emulated_equal_cpu_kernels(case, dtype, channels_last):
    """The CUDA kernels' per-thread bodies and glue (entries, stable sort, segment reduce), run on the CPU,
    give the CPU kernels' forward and gradient bit for bit, over two levels."""
    from fastnn._backend import _C

    size, scale, sr, aligned = case
    feats = [features(2, 6, 13, 17, dtype, channels_last), features(2, 6, 7, 9, dtype, channels_last)]
    rois = random_rois(30, 2, 13, 17, scale, dtype=dtype)
    levels = torch.randint(0, 2, (30,))
    scales = [scale, scale / 2]
    cl = roi_ops._is_channels_last(feats)
    args = (feats, rois, levels, scales, *size, sr, aligned, cl)
    want = _C.roi_align_forward_cpu(*args)
    got = _C.roi_align_forward_emulated(*args)
    assert got.stride() == want.stride() and torch.equal(got, want)
    grad = torch.randn(want.shape, dtype=dtype)
    shapes = [s for f in feats for s in f.shape]
    bargs = (grad, rois, levels, scales, shapes, cl, sr, aligned)
    for a, b in zip(_C.roi_align_backward_emulated(*bargs), _C.roi_align_backward_cpu(*bargs)):
        assert a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_roi_pool_emulated_equals_cpu_kernel(dtype, channels_last):
    from fastnn._backend import _C

    x = features(3, 5, 13, 17, dtype, channels_last)
    x[1, :, 4:8, 2:9] = 0.5  # ties
    rois = random_rois(25, 3, 13, 17, 0.5, dtype=dtype)
    want, want_arg = _C.roi_pool_forward_cpu(x, rois, 0.5, 3, 4, channels_last)
    got, got_arg = _C.roi_pool_forward_emulated(x, rois, 0.5, 3, 4, channels_last)
    assert torch.equal(got, want) and torch.equal(got_arg, want_arg) and got.stride() == want.stride()
    grad = torch.randn(want.shape, dtype=dtype)
    shape = list(x.shape)
    a = _C.roi_pool_backward_emulated(grad, rois, want_arg, shape, channels_last)
    b = _C.roi_pool_backward_cpu(grad, rois, want_arg, shape, channels_last)
    assert a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1.0, 2.0, 1e9, -1e9, float("nan")])
def test_cuda_kernels_emulated_check_batch_indices(bad):
    """The CUDA launchers check the RoIs' indices after launching the kernels, so the kernels themselves must
    skip a bad RoI: a batch index of 1e9 read unguarded is far outside the map. Forward, backward and
    roi_pool raise the check's error (and do not crash) on the emulated kernels."""
    from fastnn._backend import _C

    rois = random_rois(4, 2, 8, 8)
    rois[3, 0] = bad
    msg = r"boxes\[3, 0\] \(batch index\) is " + ("nan" if bad != bad else "")
    x = features(2, 3, 8, 8)
    for sr in (2, -1):
        expect_error(_C.roi_align_forward_emulated, ([x], rois, None, [1.0], 2, 2, sr, False, False), ValueError, msg)
        expect_error(_C.roi_align_backward_emulated, (torch.randn(4, 3, 2, 2), rois, None, [1.0], list(x.shape), False,
                                                      sr, False), ValueError, msg)
    expect_error(_C.roi_pool_forward_emulated, (x, rois, 1.0, 2, 2, False), ValueError, msg)


@pytest.mark.parametrize("bad", [-1, 2, 1 << 40])
def test_cuda_kernels_emulated_check_levels(bad):
    """As above for a level outside [0, L): the kernels must not index the level table with it."""
    from fastnn._backend import _C

    feats = [features(2, 3, 8, 8), features(2, 3, 4, 4)]
    rois = random_rois(5, 2, 8, 8)
    levels = torch.tensor([0, 1, 1, 0, 0])
    levels[2] = bad
    msg = rf"levels\[2\] is {bad}, expected a level in \[0, 2\)"
    for sr in (2, 0):
        expect_error(_C.roi_align_forward_emulated, (feats, rois, levels, [1.0, 0.5], 2, 2, sr, False, False),
                     ValueError, msg)
        expect_error(_C.roi_align_backward_emulated, (torch.randn(5, 3, 2, 2), rois, levels, [1.0, 0.5],
                                                      [2, 3, 8, 8, 2, 3, 4, 4], False, sr, False), ValueError, msg)


@pytest.mark.parametrize("sr", [2, 3, -1])
def test_cuda_kernels_emulated_nan_rois(sr):
    """With a fixed ratio the CUDA backward sizes its buffers without a host read: every RoI gets ratio^2
    samples a bin, and a NaN RoI's (it has no grid) are taps of no pixel. Bitwise the CPU kernel's gradient,
    NaN RoIs first, last and in the middle, on two levels."""
    from fastnn._backend import _C

    feats = [features(2, 4, 11, 13), features(2, 4, 6, 7)]
    rois = random_rois(9, 2, 11, 13)
    rois[0, 1] = rois[4, 4] = rois[8, 2] = float("nan")
    levels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1])
    args = (feats, rois, levels, [1.0, 0.5], 3, 2, sr, False, False)
    want = _C.roi_align_forward_cpu(*args)
    assert torch.equal(_C.roi_align_forward_emulated(*args), want)
    grad = torch.randn(want.shape)
    bargs = (grad, rois, levels, [1.0, 0.5], [s for f in feats for s in f.shape], False, sr, False)
    for a, b in zip(_C.roi_align_backward_emulated(*bargs), _C.roi_align_backward_cpu(*bargs)):
        assert torch.equal(a, b)
    rois[:, 1] = float("nan")  # no sample anywhere: zero gradients
    for g in _C.roi_align_backward_emulated(*bargs):
        assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------- multi-scale

def _pyramid(n=2, c=4, dtype=torch.float32, channels_last=False):
    x = OrderedDict()
    for name, s in (("p2", 64), ("p3", 32), ("p4", 16), ("p5", 8)):
        x[name] = features(n, c, s, s + s // 4, dtype, channels_last)
    return x


@pytest.mark.parametrize("names", [["p2", "p3", "p4", "p5"], ["p3", "p5"], ["p4"]])
@pytest.mark.parametrize("channels_last", [False, True])
def test_multiscale_roi_align_equals_torchvision(names, channels_last):
    x = _pyramid(channels_last=channels_last)
    for v in x.values():
        v.requires_grad_()
    image_shapes = [(256, 320), (240, 300)]
    g = torch.Generator().manual_seed(1)
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=g) * 250
        wh = torch.rand(30, 2, generator=g) ** 2 * 250 + 2
        boxes.append(torch.cat([xy, xy + wh], 1))
    boxes[0][3, 2] = boxes[0][3, 0] - 5  # negative area: no level, zeros in torchvision
    ours = fnn.MultiScaleRoIAlign(names, 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    out = ours(x, boxes, image_shapes)
    xt = OrderedDict((k, v.detach().contiguous().requires_grad_()) for k, v in x.items())
    want = theirs(xt, boxes, image_shapes)
    assert ours.scales == theirs.scales
    assert torch.equal(out, want)
    grad = torch.randn_like(want)
    used = [k for k in x if k in names]
    gx = torch.autograd.grad(out, [x[k] for k in used], grad)
    gt = torch.autograd.grad(want, [xt[k] for k in used], grad)
    for a, b in zip(gx, gt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert repr(ours) == repr(theirs)
    # map_levels is torchvision's callable LevelMapper (custom RoI heads call it); boxes of negative area
    # have no level in either (torchvision's is a cast of NaN), so they are left out of the comparison
    assert (ours.map_levels.k_min, ours.map_levels.k_max) == (theirs.map_levels.k_min, theirs.map_levels.k_max)
    positive = torch.cat(boxes)[:, 2] > torch.cat(boxes)[:, 0]
    assert torch.equal(ours.map_levels(boxes)[positive], theirs.map_levels(boxes)[positive])


def test_multi_scale_op_matches_reference_backend():
    feats = [features(2, 3, 20, 24), features(2, 3, 10, 12)]
    rois = random_rois(25, 2, 80, 96)
    levels = torch.randint(0, 2, (25,))
    got = run("cpp", ops.multi_scale_roi_align, feats, rois, levels, [0.25, 0.125], (2, 3), 2, True)
    want = run("reference", ops.multi_scale_roi_align, feats, rois, levels, [0.25, 0.125], (2, 3), 2, True)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- modules

def test_modules_match_torchvision_and_repr():
    x = features(2, 3, 16, 16)
    boxes = [random_rois(5, 1, 16, 16)[:, 1:], random_rois(4, 1, 16, 16, seed=3)[:, 1:]]
    a, b = fnn.RoIAlign((3, 3), 1.0, 2, aligned=True), torchvision.ops.RoIAlign((3, 3), 1.0, 2, aligned=True)
    assert torch.equal(a(x, boxes), b(x, boxes)) and repr(a) == repr(b)
    p, q = fnn.RoIPool(3, 0.5), torchvision.ops.RoIPool(3, 0.5)
    assert torch.equal(p(x, boxes), q(x, boxes)) and repr(p) == repr(q)


# ---------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_roi_align(aligned):
    x = features(2, 2, 6, 7, torch.float64).requires_grad_()
    rois = random_rois(5, 2, 6, 7, dtype=torch.float64)
    run_gradcheck(lambda t: ops.roi_align(t, rois, 2, 1.0, 2, aligned), (x,), ["reference"] + ALIGN_BACKENDS)


def test_gradcheck_roi_pool():
    x = torch.randperm(2 * 2 * 6 * 7).reshape(2, 2, 6, 7).double().requires_grad_()  # no ties
    rois = random_rois(5, 2, 6, 7, dtype=torch.float64)
    run_gradcheck(lambda t: ops.roi_pool(t, rois, 2, 1.0), (x,), ["reference"] + POOL_BACKENDS)


def test_multi_scale_module_pools_zeros_for_levels_without_a_map_as_torchvision():
    """A pyramid with a gap (p3, p5) or maps listed coarse to fine: torchvision's per-level loop pools nothing
    for a box whose level has no map. fastnn gives the same zeros (and gradients), not an error."""
    g = torch.Generator().manual_seed(5)
    cases = [({"p4": (16, 16), "p3": (32, 32)}, [[0.0, 0, 20, 20], [0, 0, 100, 100]], {}),
             ({"p3": (16, 16), "p5": (4, 4)}, [[0.0, 0, 10, 10], [0, 0, 120, 120], [0, 0, 140, 140]],
              dict(canonical_scale=64))]
    for sizes, box, kw in cases:
        x = OrderedDict((k, torch.randn(1, 2, *hw, generator=g, dtype=torch.float64, requires_grad=True))
                        for k, hw in sizes.items())
        boxes = [torch.tensor(box, dtype=torch.float64)]
        names = list(sizes)
        want = torchvision.ops.MultiScaleRoIAlign(names, 2, 2, **kw)(x, boxes, [(128, 128)])
        got = fnn.MultiScaleRoIAlign(names, 2, 2, **kw)(x, boxes, [(128, 128)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert (want.flatten(1) == 0).all(1).any()  # some box pooled nothing
        for a, b in zip(torch.autograd.grad(got.sum(), list(x.values())), torch.autograd.grad(want.sum(), list(x.values()))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_roi_align_arguments_typed_as_torchvision():
    x, boxes = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 6, 6]])
    with pytest.raises(TypeError, match="aligned must be a bool"):
        fnn.RoIAlign(2, 1.0, 2, aligned="yes")(x, boxes)
    want = torchvision.ops.roi_align(x, boxes, 2, 0.5, 2)
    torch.testing.assert_close(fnn.RoIAlign(2, torch.tensor(0.5), 2)(x, boxes), want, rtol=0, atol=0)


def test_gradcheck_multi_scale():
    feats = [features(1, 2, 8, 8, torch.float64).requires_grad_(), features(1, 2, 4, 4, torch.float64).requires_grad_()]
    rois = random_rois(6, 1, 32, 32, dtype=torch.float64)
    levels = torch.tensor([0, 1, 0, 1, 1, 0])
    run_gradcheck(lambda a, b: ops.multi_scale_roi_align([a, b], rois, levels, [0.25, 0.125], 2, 2), tuple(feats),
                  ALIGN_BACKENDS)


@pytest.mark.parametrize("backend", ALIGN_BACKENDS)
def test_opcheck(backend):
    x = features(2, 3, 9, 10).requires_grad_()
    xc = features(2, 3, 9, 10, channels_last=True).requires_grad_()
    rois = random_rois(7, 2, 9, 10)
    levels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    with fastnn.use_backend(backend):
        run_opcheck(torch.ops.fastnn.roi_align, [([x], rois, None, [1.0], 2, 3, 2, False),
                                                  ([xc], rois, None, [0.5], 3, 3, -1, True),
                                                  ([x, features(2, 3, 5, 5).requires_grad_()], rois, levels,
                                                   [1.0, 0.5], 2, 2, 2, False)])
        run_opcheck(torch.ops.fastnn.roi_align_backward,
                    [(torch.randn(7, 3, 2, 3), rois, None, [1.0], [2, 3, 9, 10], False, 2, False)])
        run_opcheck(torch.ops.fastnn.roi_pool, [(x, rois, 1.0, 2, 3), (xc, rois, 0.5, 3, 3)])
        out, arg = torch.ops.fastnn.roi_pool(x.detach(), rois, 1.0, 2, 3)
        run_opcheck(torch.ops.fastnn.roi_pool_backward, [(torch.randn(7, 3, 2, 3), rois, arg, [2, 3, 9, 10], False)])


def test_compile_fullgraph():
    x = features(2, 3, 12, 12)
    rois = random_rois(9, 2, 12, 12)
    check_compiles(lambda a, r: ops.roi_align(a, r, 3, 0.5, 2, True) + 0, (x, rois))
    check_compiles(lambda a, r: ops.roi_pool(a, r, 3, 0.5) * 2, (x, rois))
    feats = _pyramid()
    boxes = [random_rois(8, 1, 256, 320)[:, 1:].abs() + 1, random_rois(5, 1, 256, 320, seed=2)[:, 1:].abs() + 1]
    m = fnn.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 3, 2)
    check_compiles(lambda f, b0, b1: m(f, [b0, b1], [(256, 320)]), (feats, *boxes))


# ---------------------------------------------------------------- empty and bad inputs

def test_empty_rois_and_channels():
    x = features(2, 3, 8, 8).requires_grad_()
    for backend in ALIGN_BACKENDS:
        out = run(backend, ops.roi_align, x, torch.zeros(0, 5), 2)
        assert out.shape == (0, 3, 2, 2)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(g, torch.zeros_like(x))
        assert run(backend, ops.roi_pool, x, [torch.zeros(0, 4), torch.zeros(0, 4)], 2).shape == (0, 3, 2, 2)
        assert run(backend, ops.roi_align, features(2, 0, 8, 8), random_rois(3, 2, 8, 8), 2).shape == (3, 0, 2, 2)


def test_bad_inputs():
    x = features(2, 3, 8, 8)
    rois = random_rois(4, 2, 8, 8)
    bad_batch = rois.clone()
    bad_batch[2, 0] = 2
    for backend in ["reference"] + ALIGN_BACKENDS:
        with fastnn.use_backend(backend):
            expect_error(ops.roi_align, (x, bad_batch, 2), ValueError, r"boxes\[2, 0\] \(batch index\)")
            expect_error(ops.roi_pool, (x, bad_batch, 2), ValueError, r"boxes\[2, 0\] \(batch index\)")
    expect_error(ops.roi_align, (x[0], rois, 2), ValueError, r"input must have shape \(N, C, H, W\)")
    expect_error(ops.roi_align, (x, rois[:, :4], 2), ValueError, r"boxes must have shape \(\*, 5\)")
    expect_error(ops.roi_align, (x, [rois], 2), ValueError, r"boxes\[0\] must have shape \(\*, 4\)")
    expect_error(ops.roi_align, (x, rois, -1), ValueError, "output_size must be non-negative")
    expect_error(ops.roi_align, (x, rois, (2, 2.5)), TypeError, "output_size must be an int or a pair")
    expect_error(ops.roi_align, (x, rois, 2, float("inf")), ValueError, "spatial_scale must be a finite number")
    expect_error(ops.roi_align, (x, rois, 2, 1.0, 1.5), TypeError, "sampling_ratio must be an int")
    expect_error(ops.roi_align, (x, rois, 2, 1.0, 2 ** 32 + 2), ValueError, "sampling_ratio must fit in 32 bits")
    expect_error(ops.roi_align, (x.long(), rois, 2), TypeError, "input must have dtype")
    expect_error(ops.roi_align, (x, rois.to("meta"), 2), ValueError, "boxes is on meta but input is on cpu")
    feats = [x, features(2, 4, 4, 4)]
    expect_error(ops.multi_scale_roi_align, (feats, rois, torch.zeros(4, dtype=torch.long), [1.0, 0.5], 2),
                 ValueError, r"features\[1\] is \(2, 4, 4, 4\)")
    feats = [x, features(2, 3, 4, 4)]
    expect_error(ops.multi_scale_roi_align, (feats, rois, None, [1.0, 0.5], 2), ValueError, "levels is required")
    expect_error(ops.multi_scale_roi_align, (feats, rois, torch.zeros(3, dtype=torch.long), [1.0, 0.5], 2),
                 ValueError, r"levels must have shape \(4,\)")
    expect_error(ops.multi_scale_roi_align, (feats, rois, torch.zeros(4, dtype=torch.long), [1.0], 2),
                 ValueError, "scales must be a list of 2 numbers")
    bad_level = torch.tensor([0, 1, 2, 0])
    expect_error(run, ("cpp", ops.multi_scale_roi_align, feats, rois, bad_level, [1.0, 0.5], 2), ValueError,
                 r"levels\[2\] is 2")
    # MultiScaleRoIAlign infers its scales from image_shapes and the maps' heights: log2 of 0 or of a negative
    box = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
    for shapes, height in (([(0, 0)], 8), ([(-4, 8)], 8), ([(32, 32)], 0)):
        m = fnn.MultiScaleRoIAlign(["p2"], 2, 2)
        expect_error(m, (OrderedDict(p2=features(1, 3, height, 8)), box, shapes), ValueError,
                     r"image_shapes must hold positive|at least one row")


# ---------------------------------------------------------------- tier 5: CUDA (make gpu-check)

@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu_kernel(dtype, channels_last):
    feats = [features(2, 8, 40, 50, dtype, channels_last), features(2, 8, 20, 25, dtype, channels_last)]
    rois = random_rois(300, 2, 40, 50, 0.5, dtype=dtype)
    levels = torch.randint(0, 2, (300,))
    grad = torch.randn(300, 8, 7, 7, dtype=dtype)
    results = {}
    for dev, backend in (("cpu", "cpp"), ("cuda", "cuda")):
        fs = [f.to(dev).requires_grad_() for f in feats]
        out = run(backend, ops.multi_scale_roi_align, fs, rois.to(dev), levels.to(dev), [0.5, 0.25], 7, -1, True)
        gs = torch.autograd.grad(out, fs, grad.to(dev))
        gs2 = torch.autograd.grad(run(backend, ops.multi_scale_roi_align, fs, rois.to(dev), levels.to(dev),
                                      [0.5, 0.25], 7, -1, True), fs, grad.to(dev))
        assert all(torch.equal(a, b) for a, b in zip(gs, gs2)), f"{backend} backward is not deterministic"
        pooled = run(backend, ops.roi_pool, fs[0], rois.to(dev), 5, 0.5)
        (gp,) = torch.autograd.grad(pooled, fs[0], torch.ones_like(pooled))
        results[dev] = [out, *gs, pooled, gp]
    for a, b in zip(results["cpu"], results["cuda"]):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOWP)
def test_cuda_low_precision(dtype):
    x64 = features(2, 4, 12, 15, torch.float64)
    rois = random_rois(16, 2, 12, 15, 0.5, dtype=dtype).double()
    out = run("cuda", ops.roi_align, x64.to(dtype).cuda(), rois.cuda(), (3, 3), 0.5, 2, True)
    lowp_close(out.cpu(), ref.roi_align(x64, rois, 3, 3, 0.5, 2, True),
               ref.roi_align(x64.to(dtype), rois.to(dtype), 3, 3, 0.5, 2, True), what="roi_align cuda")


def test_modules_trace_with_torch_fx():
    """torch.fx.symbolic_trace (and so torchvision's create_feature_extractor) goes through RoIAlign, RoIPool and
    MultiScaleRoIAlign as through torchvision's: the ops are wrapped, recorded as single calls; the traced
    modules give the eager modules' outputs. MultiScaleRoIAlign traced before its first eager call sets its
    scales up in the traced call, as torchvision's does."""
    x = features(2, 3, 16, 20)
    rois = random_rois(9, 2, 16, 20, 0.5)
    for m in (fnn.RoIAlign(3, 0.5, 2), fnn.RoIPool((2, 3), 0.5)):
        traced = torch.fx.symbolic_trace(m)
        assert torch.equal(traced(x, rois), m(x, rois))
    pyramid = _pyramid()
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(12, 2, generator=g) * 200
    boxes = [torch.cat([xy, xy + torch.rand(12, 2, generator=g) * 100 + 2], 1)[:7],
             torch.cat([xy, xy + 40], 1)[7:]]
    shapes = [(256, 320), (256, 320)]
    names = ["p2", "p3", "p4", "p5"]
    want = torchvision.ops.MultiScaleRoIAlign(names, 3, 2)(pyramid, boxes, shapes)
    fresh = fnn.MultiScaleRoIAlign(names, 3, 2)
    traced = torch.fx.symbolic_trace(fresh)  # before any eager call: no scales yet
    assert fresh.scales is None
    assert torch.equal(traced(pyramid, boxes, shapes), want)
    used = fnn.MultiScaleRoIAlign(names, 3, 2)
    assert torch.equal(used(pyramid, boxes, shapes), want)
    assert torch.equal(torch.fx.symbolic_trace(used)(pyramid, boxes, shapes), want)


@pytest.mark.parametrize("size", [0, (0, 3), (2, 0)])
def test_zero_output_size_gives_empty_outputs_as_torchvision(size):
    """An output size of 0 (either side) gives an empty (K, C, PH, PW) result and zero gradients, as
    torchvision's ops do, on every backend, the emulated CUDA kernels and MultiScaleRoIAlign."""
    from fastnn._backend import _C

    x = features(2, 3, 8, 8).requires_grad_()
    rois = random_rois(5, 2, 8, 8)
    ph, pw = (size, size) if isinstance(size, int) else size
    for sr in (2, -1):
        want = torchvision.ops.roi_align(x, rois, size, 1.0, sr)
        for backend in ["reference"] + ALIGN_BACKENDS:
            got = run(backend, ops.roi_align, x, rois, size, 1.0, sr)
            assert got.shape == want.shape == (5, 3, ph, pw)
            (g,) = torch.autograd.grad(got.sum(), x)
            assert torch.equal(g, torch.zeros_like(x))
        emulated = _C.roi_align_forward_emulated([x.detach()], rois, None, [1.0], ph, pw, sr, False, False)
        assert emulated.shape == want.shape
        grads = _C.roi_align_backward_emulated(torch.randn(want.shape), rois, None, [1.0], list(x.shape), False, sr,
                                               False)
        assert torch.equal(grads[0], torch.zeros_like(x))
    want = torchvision.ops.roi_pool(x, rois, size)
    for backend in ["reference"] + POOL_BACKENDS:
        got = run(backend, ops.roi_pool, x, rois, size)
        assert got.shape == want.shape
        (g,) = torch.autograd.grad(got.sum(), x)
        assert torch.equal(g, torch.zeros_like(x))
    pyramid = _pyramid()
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [1.0, 1.0, 200.0, 150.0]])] * 2
    shapes = [(256, 320)] * 2
    got = fnn.MultiScaleRoIAlign(["p2", "p3"], size, 2)(pyramid, boxes, shapes)
    assert got.shape == torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], size, 2)(pyramid, boxes, shapes).shape


def test_review_findings_bad_indices_and_argmax():
    """A review of the CUDA launchers found (each crashed the process before its fix):
    - an empty batch (N = 0) with a batch index in (-1, 0): every check passed it and it truncated to image 0;
    - roi_pool's backward with an argmax past H * W (its input is the op's, so a direct call can pass one);
    - the emulated (CUDA) roi_pool backward dropped a bad batch index where the CPU kernel raises;
    - a roi_pool backward input_shape of fewer than 4 sizes."""
    from fastnn._backend import _C

    empty = features(0, 3, 8, 8)
    rois = torch.tensor([[-0.5, 0.0, 0.0, 4.0, 4.0]])
    msg = r"boxes\[0, 0\] \(batch index\) is -0.5, expected an integer in \[0, 0\)"
    for backend in ["reference"] + ALIGN_BACKENDS:
        with fastnn.use_backend(backend):
            expect_error(ops.roi_align, (empty, rois, 2, 1.0, 2), ValueError, msg)
            expect_error(ops.roi_pool, (empty, rois, 2), ValueError, msg)
    for sr in (2, -1):
        expect_error(_C.roi_align_forward_emulated, ([empty], rois, None, [1.0], 2, 2, sr, False, False), ValueError,
                     msg)
        expect_error(_C.roi_align_backward_emulated, (torch.randn(1, 3, 2, 2), rois, None, [1.0], [0, 3, 8, 8], False,
                                                      sr, False), ValueError, msg)
    expect_error(_C.roi_pool_forward_emulated, (empty, rois, 1.0, 2, 2, False), ValueError, msg)
    x = features(2, 3, 8, 8)
    good = random_rois(4, 2, 8, 8)
    for channels_last in (False, True):
        out, arg = _C.roi_pool_forward_cpu(x, good, 1.0, 2, 2, channels_last)
        arg = arg.clone()
        arg[0, 1, 1, 0] = 1 << 30  # past H * W: no pixel
        grad = torch.randn(out.shape)
        a = _C.roi_pool_backward_cpu(grad, good, arg, list(x.shape), channels_last)
        b = _C.roi_pool_backward_emulated(grad, good, arg, list(x.shape), channels_last)
        assert torch.equal(a, b)
    bad = good.clone()
    bad[1, 0] = 5
    args = (torch.randn(4, 3, 2, 2), bad, torch.zeros(4, 3, 2, 2, dtype=torch.int32), list(x.shape), False)
    expect_error(_C.roi_pool_backward_cpu, args, ValueError, r"boxes\[1, 0\] \(batch index\) is 5")
    expect_error(_C.roi_pool_backward_emulated, args, ValueError, r"boxes\[1, 0\] \(batch index\) is 5")
    expect_error(_C.roi_pool_backward_emulated, (args[0], good, args[2], [1, 3], False), RuntimeError,
                 "the input shape must have 4 sizes")
