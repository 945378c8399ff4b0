"""FPN: the fused top-down op fpn_topdown_add (reference, C++ CPU, Triton under the interpreter), the
FeaturePyramidNetwork module against torchvision's, and multi-scale detection (multiscale_detect /
ImagePyramid) with a toy deterministic detector; through every tier of DESIGN.md section 5."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import feature_pyramid_network as tv_fpn

import fastnn
from fastnn import ops
from fastnn.ops import fpn as fpn_ops
from fastnn.reference import fpn as ref

from _tiers import (
    backends_under_test,
    check_compiles,
    cuda_param,
    expect_error,
    lowp_close,
    run_gradcheck,
    run_opcheck,
)

IMPLS = tuple(fpn_ops._IMPLS)
CPU_BACKENDS = backends_under_test("cpu", IMPLS)
# (lateral H, W, top h, w): the 2x pyramid, odd sizes (25x38 -> 13x19: non-integer ratios), a top larger
# than the lateral along one axis (downsampling), equal sizes, and a 1x1 top.
SHAPES = [(8, 10, 4, 5), (25, 38, 13, 19), (7, 5, 3, 9), (6, 6, 6, 6), (5, 3, 1, 1)]


def _dtypes(backend):
    # the Triton interpreter mishandles bf16 (bf16 runs on CUDA)
    return [torch.float16] + ([torch.bfloat16] if backend != "triton" else [])


def make_pair(shape, n=2, c=3, dtype=torch.float32, channels_last=False, device="cpu"):
    hl, wl, ht, wt = shape
    lat = torch.randn(n, c, hl, wl, dtype=torch.float64).to(dtype=dtype, device=device)
    top = torch.randn(n, c, ht, wt, dtype=torch.float64).to(dtype=dtype, device=device)
    if channels_last:
        lat, top = lat.to(memory_format=torch.channels_last), top.to(memory_format=torch.channels_last)
    return lat, top


def _format_ok(out, channels_last):
    if channels_last:
        return out.is_contiguous(memory_format=torch.channels_last)
    return out.is_contiguous()


# ---------------------------------------------------------------- tier 1: the reference

def _loop_upsample(top, hl, wl):
    """Nearest upsample by torch's rule, one index at a time with numpy float32 (independent of the
    reference's tensor formulation)."""
    import numpy as np

    ht, wt = top.shape[-2:]
    sh, sw = np.float32(ht) / np.float32(hl), np.float32(wt) / np.float32(wl)
    ys = [min(int(np.floor(np.float32(y) * sh)), ht - 1) for y in range(hl)]
    xs = [min(int(np.floor(np.float32(x) * sw)), wt - 1) for x in range(wl)]
    return top[:, :, ys][:, :, :, xs]


@pytest.mark.parametrize("shape", SHAPES + [(37, 53, 10, 7), (64, 64, 32, 32)])
def test_reference_matches_interpolate_and_autograd(shape):
    lat, top = make_pair(shape, dtype=torch.float64)
    hl, wl = shape[:2]
    want = lat + F.interpolate(top, size=(hl, wl), mode="nearest")
    assert torch.equal(ref.fpn_topdown_add(lat, top), want)
    assert torch.equal(_loop_upsample(top, hl, wl), F.interpolate(top, size=(hl, wl), mode="nearest"))
    topg = top.clone().requires_grad_()
    g = torch.randn(want.shape, dtype=torch.float64)
    (want_gt,) = torch.autograd.grad(F.interpolate(topg, size=(hl, wl), mode="nearest"), topg, g)
    torch.testing.assert_close(ref.fpn_topdown_add_backward(g, shape[2:]), want_gt, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- tiers 2-3: kernels vs reference

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_fp32(backend, channels_last, shape):
    lat, top = make_pair(shape, channels_last=channels_last)
    with fastnn.use_backend(backend):
        out = ops.fpn_topdown_add(lat, top)
    want = ref.fpn_topdown_add(lat, top)
    assert _format_ok(out, channels_last)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # an add of the same two float32 values
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.randn(out.shape).contiguous(memory_format=fmt)
    with fastnn.use_backend(backend):
        gt = torch.ops.fastnn.fpn_topdown_add_backward(g, list(shape[2:]), channels_last)
    assert _format_ok(gt, channels_last)
    torch.testing.assert_close(gt, ref.fpn_topdown_add_backward(g, shape[2:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpp"])
def test_cpp_float64_and_layout_independence(backend):
    lat, top = make_pair((25, 38, 13, 19), n=3, c=5, dtype=torch.float64)
    g = torch.randn(3, 5, 25, 38, dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = ops.fpn_topdown_add(lat, top)
        gt = torch.ops.fastnn.fpn_topdown_add_backward(g, [13, 19], False)
        gt_cl = torch.ops.fastnn.fpn_topdown_add_backward(g.to(memory_format=torch.channels_last), [13, 19], True)
    assert torch.equal(out, ref.fpn_topdown_add(lat, top))
    torch.testing.assert_close(gt, ref.fpn_topdown_add_backward(g, (13, 19)), rtol=1e-14, atol=1e-14)
    assert torch.equal(gt, gt_cl)  # the same summation order in both layouts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(25, 38, 13, 19), (16, 16, 8, 8)])
def test_kernel_low_precision(backend, shape):
    for dtype in _dtypes(backend):
        for cl in (False, True):
            lat, top = make_pair(shape, dtype=dtype, channels_last=cl)
            # scale the gradient so its preimage sums are not exact in the low precision
            g = (torch.randn(lat.shape, dtype=torch.float64) * 3.1).to(dtype)
            with fastnn.use_backend(backend):
                out = ops.fpn_topdown_add(lat, top)
                gt = torch.ops.fastnn.fpn_topdown_add_backward(g, list(shape[2:]), cl)
            assert out.dtype == dtype and gt.dtype == dtype
            lowp_close(out, ref.fpn_topdown_add(lat.double(), top.double()), ref.fpn_topdown_add(lat, top),
                       what=f"{dtype} forward")
            lowp_close(gt, ref.fpn_topdown_add_backward(g.double(), shape[2:]),
                       ref.fpn_topdown_add_backward(g, shape[2:]), what=f"{dtype} grad_top")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_dense_inputs_and_mixed_layouts(backend):
    lat, top = make_pair((12, 14, 6, 7), n=2, c=4)
    lat_view = torch.randn(2, 4, 12, 28)[..., ::2]       # strided: copied once into NCHW
    top_cl = top.to(memory_format=torch.channels_last)    # a layout other than lateral's
    with fastnn.use_backend(backend):
        a = ops.fpn_topdown_add(lat_view, top)
        b = ops.fpn_topdown_add(lat, top_cl)
    assert torch.equal(a, ref.fpn_topdown_add(lat_view, top))
    assert torch.equal(b, ref.fpn_topdown_add(lat, top))


@pytest.mark.parametrize("backend", IMPLS)
def test_empty_inputs(backend):
    if backend != "reference" and backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} cannot run here")
    lat, top = make_pair((4, 4, 2, 2), n=0)
    lat.requires_grad_()
    top.requires_grad_()
    with fastnn.use_backend(backend):
        out = ops.fpn_topdown_add(lat, top)
        assert out.shape == (0, 3, 4, 4)
        out.sum().backward()
    assert top.grad.shape == top.shape
    with fastnn.use_backend(backend):
        empty_space = ops.fpn_topdown_add(torch.randn(1, 2, 0, 3), torch.randn(1, 2, 2, 2))
        assert empty_space.shape == (1, 2, 0, 3)
        gt = torch.ops.fastnn.fpn_topdown_add_backward(torch.randn(1, 2, 0, 3), [2, 2], False)
    assert torch.equal(gt, torch.zeros(1, 2, 2, 2))


def test_gradcheck():
    backends = [b for b in ("reference", "cpp") if b == "reference" or b in CPU_BACKENDS]
    for shape in [(5, 7, 3, 4), (4, 6, 2, 3)]:
        for cl in (False, True):
            lat, top = make_pair(shape, n=1, c=2, dtype=torch.float64, channels_last=cl)
            run_gradcheck(ops.fpn_topdown_add, (lat.requires_grad_(), top.requires_grad_()), backends)
    if "triton" in CPU_BACKENDS:
        lat, top = make_pair((5, 7, 3, 4), n=1, c=2, dtype=torch.float64)
        run_gradcheck(ops.fpn_topdown_add, (lat.requires_grad_(), top.requires_grad_()), ["triton"])


def test_opcheck():
    lat, top = make_pair((25, 38, 13, 19), n=1, c=2)
    lat_cl, top_cl = make_pair((8, 8, 4, 4), n=2, c=3, channels_last=True)
    run_opcheck(torch.ops.fastnn.fpn_topdown_add.default,
                [(lat, top), (lat.requires_grad_(), top.requires_grad_()), (lat_cl, top_cl), (lat[:0], top[:0])])
    g = torch.randn(2, 3, 8, 8)
    run_opcheck(torch.ops.fastnn.fpn_topdown_add_backward.default,
                [(g, [4, 4], False), (g.to(memory_format=torch.channels_last), [3, 5], True)], skip_autograd=True)


def test_bad_inputs():
    lat, top = make_pair((8, 8, 4, 4), n=2, c=3)
    expect_error(ops.fpn_topdown_add, (lat, torch.randn(2, 5, 4, 4)), ValueError,
                 r"top has 5 channels but lateral has 3")
    expect_error(ops.fpn_topdown_add, (lat, torch.randn(1, 3, 4, 4)), ValueError, r"top has batch size 1 but lateral")
    expect_error(ops.fpn_topdown_add, (lat[0], top), ValueError, r"lateral must be a 4-d")
    expect_error(ops.fpn_topdown_add, (lat, top[0]), ValueError, r"top must be a 4-d")
    expect_error(ops.fpn_topdown_add, (lat, top.double()), TypeError, r"top has dtype torch.float64 but lateral")
    expect_error(ops.fpn_topdown_add, (lat.long(), top), TypeError, r"lateral must have dtype")
    expect_error(ops.fpn_topdown_add, (lat, top.numpy()), TypeError, r"top must be a torch.Tensor")
    expect_error(ops.fpn_topdown_add, (lat, torch.randn(2, 3, 0, 4)), ValueError, r"top must have a non-empty")


# ---------------------------------------------------------------- the module against torchvision

def _extra(module, kind):
    return {"none": None, "maxpool": module.LastLevelMaxPool(), "p6p7_p5": module.LastLevelP6P7(8, 8),
            "p6p7_c5": module.LastLevelP6P7(12, 8)}[kind]


def _pair_modules(kind, norm=None, dtype=torch.float32):
    torch.manual_seed(1)
    tv = torchvision.ops.FeaturePyramidNetwork([4, 6, 12], 8, extra_blocks=_extra(tv_fpn, kind), norm_layer=norm)
    ours = fastnn.nn.FeaturePyramidNetwork([4, 6, 12], 8, extra_blocks=_extra(fastnn.nn, kind), norm_layer=norm)
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict())  # strict: the same names and shapes
    return tv.to(dtype), ours.to(dtype)


def _features(n=2, dtype=torch.float32, channels_last=False):
    # non-power-of-two sizes: 25x38 -> 13x19 -> 7x10, the ratios are not integers
    x = OrderedDict(c2=torch.randn(n, 4, 25, 38, dtype=dtype), c3=torch.randn(n, 6, 13, 19, dtype=dtype),
                    c4=torch.randn(n, 12, 7, 10, dtype=dtype))
    if channels_last:
        x = OrderedDict((k, v.to(memory_format=torch.channels_last)) for k, v in x.items())
    return x


MODULE_BACKENDS = ["reference"] + CPU_BACKENDS


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("kind", ["none", "maxpool", "p6p7_p5", "p6p7_c5"])
def test_module_matches_torchvision(backend, kind):
    tv, ours = _pair_modules(kind)
    x = _features()
    want = tv(x)
    with fastnn.use_backend(backend):
        got = ours(x)
    assert isinstance(got, OrderedDict) and list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_module_batchnorm_float64_forward_backward(backend):
    # BatchNorm2d in training mode (batch statistics) and in eval mode, float64: ~1e-12 agreement, and the
    # same gradients for the inputs and every parameter.
    tv, ours = _pair_modules("maxpool", norm=torch.nn.BatchNorm2d, dtype=torch.float64)
    for train in (True, False):
        tv.train(train)
        ours.train(train)
        x = OrderedDict((k, v.requires_grad_()) for k, v in _features(dtype=torch.float64).items())
        want = tv(x)
        with fastnn.use_backend(backend):
            got = ours(x)
            loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in got.values())
            grads = torch.autograd.grad(loss, list(x.values()) + list(ours.parameters()))
        loss_tv = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in want.values())
        grads_tv = torch.autograd.grad(loss_tv, list(x.values()) + list(tv.parameters()))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
        for g, gw in zip(grads, grads_tv):
            torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-10)
    for name, buf in tv.named_buffers():  # the running statistics moved the same way
        torch.testing.assert_close(dict(ours.named_buffers())[name], buf, rtol=1e-12, atol=1e-12)


def test_module_channels_last_and_legacy_state_dict():
    tv, ours = _pair_modules("none")
    x = _features(channels_last=True)
    want = tv(x)
    got = ours(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    # version-1 checkpoints kept the convs at inner_blocks.N.weight: renamed on load, as torchvision does
    sd = tv.state_dict()
    legacy = OrderedDict((k.replace(".0.", ".", 1) if k.startswith(("inner_blocks", "layer_blocks")) else k, v)
                         for k, v in sd.items())
    legacy._metadata = OrderedDict({"": {"version": 1}})
    fresh = fastnn.nn.FeaturePyramidNetwork([4, 6, 12], 8)
    fresh.load_state_dict(legacy)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_module_compiles_fullgraph():
    # the whole module through dynamo + AOT autograd with one graph (aot_eager: inductor's codegen of the
    # convolutions adds a minute here and nothing about the op); the op itself through inductor below.
    _, ours = _pair_modules("p6p7_p5")
    x = _features(n=1)

    def run(a, b, c):
        return tuple(ours(OrderedDict(c2=a, c3=b, c4=c)).values())

    check_compiles(run, tuple(x.values()), backend="aot_eager")
    lat, top = make_pair((25, 38, 13, 19), n=1, c=4)
    check_compiles(lambda a, b: ops.fpn_topdown_add(a * 2, b).relu(), (lat, top))


def test_module_bad_arguments():
    expect_error(fastnn.nn.FeaturePyramidNetwork, ([4, 0], 8), ValueError, r"in_channels=0")
    expect_error(fastnn.nn.FeaturePyramidNetwork, ([4, 6], 8, torch.nn.ReLU()), TypeError, r"extra_blocks must be")
    m = fastnn.nn.FeaturePyramidNetwork([4, 6], 8)
    expect_error(m, (OrderedDict(a=torch.randn(1, 4, 8, 8)),), ValueError, r"x has 1 feature maps")
    # torchvision's own extra blocks are accepted
    fastnn.nn.FeaturePyramidNetwork([4, 6], 8, extra_blocks=tv_fpn.LastLevelMaxPool())


# ---------------------------------------------------------------- multi-scale detection

class ToyDetector(torch.nn.Module):
    """Deterministic detector: for each image and channel c, one box of label c around the pixels above
    0.5, scored by the batch's height (so a larger scale scores higher); and a box of label 7 over the
    top-left tenth of the batch (the same region of the original image at every scale), scored 0.01."""

    def forward(self, images):
        out = []
        h = images.shape[-2]
        for img in images:
            boxes, scores, labels = [], [], []
            for c in range(img.shape[0]):
                ys, xs = torch.nonzero(img[c] > 0.5, as_tuple=True)
                if ys.numel():
                    boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
                    scores.append(h / 1000.0)
                    labels.append(c)
            boxes.append(torch.tensor([0.0, 0.0, 0.1 * images.shape[-1], 0.1 * h]))
            scores.append(0.01)
            labels.append(7)
            out.append({"boxes": torch.stack(boxes), "scores": torch.tensor(scores),
                        "labels": torch.tensor(labels)})
        return out


def _toy_images():
    img = torch.zeros(2, 2, 40, 60)
    img[0, 0, 10:30, 20:44] = 1.0   # image 0, class 0
    img[0, 1, 12:28, 22:40] = 1.0   # image 0, class 1: overlaps class 0's box, not suppressed by it
    img[1, 0, 4:16, 8:52] = 1.0     # image 1, class 0 only
    return img


def test_multiscale_detect_merges_scales():
    images = _toy_images()
    scales = (0.5, 1.0, 1.5)
    det = ToyDetector()
    got = ops.multiscale_detect(det, images, scales, iou_threshold=0.5)
    # independent merge: the same detections mapped back by hand, torchvision's batched_nms
    for i in range(2):
        boxes, scores, labels = [], [], []
        for s in scales:
            h, w = round(40 * s), round(60 * s)
            batch = images if s == 1.0 else F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
            d = det(batch)[i]
            boxes.append(d["boxes"] * torch.tensor([60 / w, 40 / h, 60 / w, 40 / h]))
            scores.append(d["scores"])
            labels.append(d["labels"])
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        boxes = torch.stack([boxes[:, 0].clamp(0, 60), boxes[:, 1].clamp(0, 40), boxes[:, 2].clamp(0, 60),
                             boxes[:, 3].clamp(0, 40)], 1)
        keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(got[i]["boxes"], boxes[keep])
        assert torch.equal(got[i]["scores"], scores[keep])
        assert torch.equal(got[i]["labels"], labels[keep])
    # what the merge means: one box per object (the 1.5x one, highest score), near the true rectangle
    assert got[0]["labels"].tolist() == [0, 1, 7]
    assert got[1]["labels"].tolist() == [0, 7]
    torch.testing.assert_close(got[0]["boxes"][0], torch.tensor([20.0, 10.0, 44.0, 30.0]), atol=1.0, rtol=0)
    torch.testing.assert_close(got[1]["boxes"][0], torch.tensor([8.0, 4.0, 52.0, 16.0]), atol=1.0, rtol=0)
    assert got[0]["scores"][0].item() == pytest.approx(0.06)


def test_image_pyramid_module():
    images = _toy_images()
    pyr = fastnn.nn.ImagePyramid(ToyDetector(), scales=(1.0, 2.0), iou_threshold=0.5, detections_per_img=2)
    assert "scales=(1.0, 2.0)" in repr(pyr)
    out = pyr(images)
    want = ops.multiscale_detect(ToyDetector(), images, (1.0, 2.0), 0.5, detections_per_img=2)
    assert len(out) == 2
    for o, w in zip(out, want):
        assert o["boxes"].shape[0] == 2
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(o[k], w[k])


def test_multiscale_bad_inputs():
    det = ToyDetector()
    images = _toy_images()
    expect_error(ops.multiscale_detect, (det, images[0], (1.0,)), ValueError, r"images must be a 4-d")
    expect_error(ops.multiscale_detect, (det, images, ()), TypeError, r"scales must be a non-empty")
    expect_error(ops.multiscale_detect, (det, images, (1.0, -2.0)), ValueError, r"scales must hold positive")
    expect_error(ops.multiscale_detect, (det, images, (1.0,), float("nan")), ValueError, r"iou_threshold")
    expect_error(ops.multiscale_detect, (lambda x: [], images, (1.0,)), ValueError, r"detector must return a list of 2")
    expect_error(ops.multiscale_detect, ("det", images, (1.0,)), TypeError, r"detector must be callable")
    flat = lambda x: [{"boxes": torch.zeros(4), "scores": torch.zeros(1), "labels": torch.zeros(1)}] * 2  # noqa: E731
    expect_error(ops.multiscale_detect, (flat, images, (1.0,)), ValueError, r"must hold boxes \(M, 4\)")
    short = lambda x: [{"boxes": torch.zeros(3, 4), "scores": torch.zeros(2), "labels": torch.zeros(3)}] * 2  # noqa
    expect_error(ops.multiscale_detect, (short, images, (1.0,)), ValueError, r"got \(3, 4\), \(2,\), \(3,\)")


# ---------------------------------------------------------------- tier 5: CUDA

@pytest.mark.parametrize("device", [cuda_param("cuda")])
def test_cuda_triton_matches_reference(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cl in (False, True):
            lat, top = make_pair((100, 152, 50, 76), n=2, c=64, dtype=dtype, channels_last=cl, device=device)
            g = torch.randn(lat.shape, device=device).to(dtype)
            out = ops.fpn_topdown_add(lat, top)
            gt = torch.ops.fastnn.fpn_topdown_add_backward(g, [50, 76], cl)
            assert _format_ok(out, cl) and _format_ok(gt, cl)
            assert torch.equal(out, ref.fpn_topdown_add(lat, top))
            lowp_close(gt, ref.fpn_topdown_add_backward(g.double(), (50, 76)),
                       ref.fpn_topdown_add_backward(g.float(), (50, 76)).to(dtype), what=f"{dtype} grad_top")


@pytest.mark.parametrize("device", [cuda_param("cuda")])
def test_cuda_module_matches_torchvision(device):
    tv, ours = _pair_modules("p6p7_p5", norm=torch.nn.BatchNorm2d)
    tv, ours = tv.to(device).eval(), ours.to(device).eval()
    x = OrderedDict((k, v.to(device)) for k, v in _features().items())
    want = tv(x)
    got = ours(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_call_equals_the_op(channels_last, monkeypatch):
    """In plain eager mode fpn_topdown_add runs the op's body (or an autograd.Function with the op's
    setup_context and backward) without torch.library's dispatch (fastnn/ops/_direct.py): output and both
    gradients bitwise the op's; tracing still records the op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lateral = torch.randn(2, 5, 9, 7).contiguous(memory_format=fmt)
    top = torch.randn(2, 5, 5, 4).contiguous(memory_format=fmt)
    results = []
    for direct in (True, False):
        monkeypatch.setattr(fpn_ops._direct, "plain_eager", (lambda *a: True) if direct else (lambda *a: False))
        a, b = lateral.clone().requires_grad_(), top.clone().requires_grad_()
        out = ops.fpn_topdown_add(a, b)
        grads = torch.autograd.grad((out * out).sum(), [a, b])
        with torch.no_grad():
            again = ops.fpn_topdown_add(lateral, top)
        results.append([out.detach(), *grads, again])
        assert out.stride() == again.stride()
    for x, y in zip(*results):
        assert x.stride() == y.stride() and torch.equal(x, y)
    monkeypatch.undo()
    assert "fastnn.fpn_topdown_add" in str(make_fx(ops.fpn_topdown_add)(lateral, top).code)


def test_module_traces_with_torch_fx_and_keeps_torchvision_methods():
    """torchvision's create_feature_extractor (torch.fx) goes through fastnn's FPN as through torchvision's,
    with the same outputs; get_result_from_inner_blocks / get_result_from_layer_blocks and the extra blocks'
    argument names are torchvision's."""
    from torchvision.models.feature_extraction import create_feature_extractor

    tv, ours = _pair_modules("p6p7_c5")

    class Net(torch.nn.Module):
        def __init__(self, fpn):
            super().__init__()
            self.fpn = fpn

        def forward(self, a, b, c):
            return self.fpn(OrderedDict([("c2", a), ("c3", b), ("c4", c)]))

    x = _features()
    want = ours(x)
    got = torch.fx.symbolic_trace(Net(ours))(*x.values())
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # (torchvision's own FPN is a leaf of create_feature_extractor's tracer; fastnn's is traced into)
    extractor = create_feature_extractor(Net(ours), return_nodes={"fpn.layer_blocks.0.0": "p2"})
    assert torch.equal(extractor(*x.values())["p2"], want["c2"])
    assert torch.equal(want["c2"], tv(x)["c2"])
    feats = list(x.values())
    for idx in (0, -1, 2):
        assert torch.equal(ours.get_result_from_inner_blocks(feats[idx], idx),
                           tv.get_result_from_inner_blocks(feats[idx], idx))
    inner = tv.get_result_from_inner_blocks(feats[1], 1)
    assert torch.equal(ours.get_result_from_layer_blocks(inner, -2), tv.get_result_from_layer_blocks(inner, -2))
    p = [torch.randn(1, 5, 8, 8)]
    got, names = fastnn.nn.LastLevelMaxPool()(x=list(p), y=[], names=["a"])
    want, want_names = tv_fpn.LastLevelMaxPool()(x=list(p), y=[], names=["a"])
    assert names == want_names and all(torch.equal(a, b) for a, b in zip(got, want))
    p6p7 = fastnn.nn.LastLevelP6P7(5, 5)
    assert p6p7(p=list(p), c=list(p), names=["a"])[1] == ["a", "p6", "p7"]


def test_raw_backward_refuses_a_top_size_of_another_length():
    """fpn_topdown_add_backward's top_hw is [height, width]: a list of another length is refused."""
    with pytest.raises(ValueError, match="top_hw must be"):
        torch.ops.fastnn.fpn_topdown_add_backward(torch.randn(1, 2, 8, 8), [4, 4, 1], False)
