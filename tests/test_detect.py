"""Detection post-processing: heatmap_peaks, decode_fcos / decode_yolo, detection_postprocess, soft_nms,
matrix_nms, through the tiers of DESIGN.md section 5 (reference vs independent formulations / torchvision,
kernels vs reference, opcheck, compile, export, bad inputs)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastnn
from fastnn import ops
from fastnn.ops import detect as det_ops
from fastnn.reference import detect as ref

from _tiers import (
    HAS_CUDA,
    backends_under_test,
    check_compiles,
    expect_error,
    run,
    run_gradcheck,
    run_opcheck,
)

INTERP = not HAS_CUDA and "triton" in fastnn.usable_backends("cpu")


# ---------------------------------------------------------------- inputs

def make_boxes(shape, *, image=200.0, size=(6.0, 50.0), dtype=torch.float32):
    centre = torch.rand(*shape, 2, dtype=torch.float64) * image
    wh = torch.empty(*shape, 2, dtype=torch.float64).uniform_(*size)
    return torch.cat([centre - wh / 2, centre + wh / 2], -1).to(dtype)


def make_scores(shape, *, ties=False, dtype=torch.float32):
    if ties:  # few distinct values: equal scores everywhere
        return (torch.randint(0, 9, shape).to(torch.float64) / 8).to(dtype)
    n = math.prod(shape)
    return (torch.randperm(n).to(torch.float64) / n).reshape(shape).to(dtype)


def make_heat(shape, *, ties=False, negative=False, nan=False, dtype=torch.float32):
    h = torch.randint(0, 6, shape).to(torch.float64) / 4 if ties else torch.rand(shape, dtype=torch.float64)
    if negative:
        h = h - 0.7
    if nan:
        h.view(-1)[:: max(1, h.numel() // 5)] = math.nan
    return h.to(dtype)


# ---------------------------------------------------------------- heatmap peaks

def naive_peaks(heat, k, kernel):
    """Independent formulation: explicit window max over a -inf padded copy, then a Python sort."""
    b, c, h, w = heat.shape
    p = kernel // 2
    x = heat.double()
    padded = F.pad(x, (p, p, p, p), value=-math.inf)
    windows = torch.stack([padded[:, :, dy:dy + h, dx:dx + w] for dy in range(kernel) for dx in range(kernel)], -1)
    hmax = windows.amax(-1)  # amax propagates NaN
    v = torch.where(hmax == x, x, torch.zeros_like(x)).reshape(b, -1)
    out = []
    for i in range(b):
        vals = v[i].tolist()
        order = sorted(range(len(vals)), key=lambda j: (-vals[j], j))[:k]
        out.append(order)
    order = torch.tensor(out, dtype=torch.long).reshape(b, k)
    return torch.gather(v, 1, order).to(heat.dtype), order // (h * w), (order % (h * w)) // w, order % w


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_reference_peaks_match_naive(kernel):
    for kw in ({}, {"ties": True}, {"negative": True}, {"nan": True}):
        heat = make_heat((2, 3, 9, 11), **kw)
        for k in (1, 7, 3 * 9 * 11):
            for g, w in zip(ref.heatmap_peaks(heat, k, kernel), naive_peaks(heat, k, kernel)):
                assert torch.equal(g, w), (kernel, kw, k)


def _peak_backends(device="cpu"):
    return backends_under_test(device, tuple(det_ops._PEAKS_IMPLS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_peaks_match_reference(dtype):
    for shape in ((1, 1, 1, 1), (2, 3, 16, 16), (3, 4, 7, 30), (1, 80, 32, 24)):
        for kw in ({}, {"ties": True}, {"negative": True}, {"nan": True}):
            heat = make_heat(shape, dtype=dtype, **kw)
            total = shape[1] * shape[2] * shape[3]
            for kernel in (1, 3, 5):
                for k in sorted({0, 1, min(total, 100), total}):
                    want = ref.heatmap_peaks(heat, k, kernel)
                    got = run("cpp", ops.heatmap_peaks, heat, k, kernel)
                    for g, w, name in zip(got, want, ("scores", "classes", "ys", "xs")):
                        assert g.dtype == w.dtype and torch.equal(g, w), (shape, kw, kernel, k, name)


@pytest.mark.skipif(not INTERP, reason="interpreter tier")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_triton_interpreted_peaks_match_reference(dtype):
    for kw in ({}, {"ties": True}, {"nan": True}):
        heat = make_heat((2, 3, 13, 37), dtype=dtype, **kw)
        for kernel, k in ((3, 20), (5, 3 * 13 * 37), (1, 5)):
            want = ref.heatmap_peaks(heat, k, kernel)
            got = run("triton", ops.heatmap_peaks, heat, k, kernel)
            for g, w in zip(got, want):
                assert torch.equal(g, w), (kw, kernel, k)


@pytest.mark.cuda
def test_gpu_peaks_match_cpu():
    heat = make_heat((4, 80, 128, 128))
    want = run("cpp", ops.heatmap_peaks, heat, 100, 3)
    got = ops.heatmap_peaks(heat.cuda(), 100, 3)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


# ---------------------------------------------------------------- box decoding

def test_decode_fcos_matches_loop():
    pts = torch.rand(3, 7, 2, dtype=torch.float64) * 100
    dist = torch.rand(3, 7, 4, dtype=torch.float64) * 5
    got = ops.decode_fcos(pts, dist, 8.0)
    for i in range(3):
        for j in range(7):
            px, py = pts[i, j].tolist()
            l, t, r, b = dist[i, j].tolist()
            want = torch.tensor([px - 8 * l, py - 8 * t, px + 8 * r, py + 8 * b], dtype=torch.float64)
            torch.testing.assert_close(got[i, j], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.decode_fcos(pts, dist, 8.0), got, rtol=0, atol=1e-12)


def _sig(v):
    return 1 / (1 + math.exp(-v))


def loop_yolo(pred, anchors, stride, version, reg_max=16):
    """Cell-by-cell decoding from the papers' formulas, in Python floats."""
    if version == 8:
        b, _, h, w = pred.shape
        out = torch.empty(b, h, w, 4, dtype=torch.float64)
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    d = []
                    for s in range(4):
                        logits = pred[i, s * reg_max:(s + 1) * reg_max, y, x].tolist()
                        mx = max(logits)
                        e = [math.exp(v - mx) for v in logits]
                        d.append(sum(j * ej for j, ej in enumerate(e)) / sum(e))
                    ax, ay = x + 0.5, y + 0.5
                    out[i, y, x] = torch.tensor([(ax - d[0]) * stride, (ay - d[1]) * stride,
                                                 (ax + d[2]) * stride, (ay + d[3]) * stride], dtype=torch.float64)
        return out
    b, a, h, w, _ = pred.shape
    out = torch.empty(b, a, h, w, 4, dtype=torch.float64)
    for i in range(b):
        for k in range(a):
            for y in range(h):
                for x in range(w):
                    t0, t1, t2, t3 = pred[i, k, y, x, :4].tolist()
                    if version == 1:
                        cx, cy = (x + t0) * stride, (y + t1) * stride
                        bw, bh = t2 * t2 * w * stride, t3 * t3 * h * stride
                    elif version in (2, 3):
                        aw, ah = anchors[k].tolist()
                        cx, cy = (_sig(t0) + x) * stride, (_sig(t1) + y) * stride
                        bw, bh = aw * math.exp(t2), ah * math.exp(t3)
                    else:
                        aw, ah = anchors[k].tolist()
                        cx, cy = (2 * _sig(t0) - 0.5 + x) * stride, (2 * _sig(t1) - 0.5 + y) * stride
                        bw, bh = (2 * _sig(t2)) ** 2 * aw, (2 * _sig(t3)) ** 2 * ah
                    out[i, k, y, x] = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2],
                                                   dtype=torch.float64)
    return out


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 7, 8])
def test_decode_yolo_matches_loop(version):
    anchors = torch.tensor([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]], dtype=torch.float64)
    if version == 8:
        pred = torch.randn(2, 4 * 16, 3, 5, dtype=torch.float64) * 2
        anchors = None
    else:
        pred = torch.randn(2, 3, 4, 5, 7, dtype=torch.float64)
        if version == 1:
            anchors = None
    want = loop_yolo(pred, anchors, 8.0, version)
    got = ops.decode_yolo(pred, anchors, 8.0, version)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ref.decode_yolo(pred, anchors, 8.0, version), want, rtol=1e-12, atol=1e-10)
    p32 = pred.float()
    a32 = None if anchors is None else anchors.float()
    torch.testing.assert_close(ops.decode_yolo(p32, a32, 8.0, version).double(), want, rtol=1e-5, atol=1e-4)


def test_decode_gradcheck_and_compile():
    anchors = torch.tensor([[10.0, 13.0], [16.0, 30.0]], dtype=torch.float64)
    pred = torch.randn(1, 2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: ops.decode_yolo(p, anchors, 4.0, 5), (pred,))
    p8 = torch.randn(1, 4 * 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: ops.decode_yolo(p, None, 4.0, 8, reg_max=4), (p8,))
    pts = torch.rand(5, 2, dtype=torch.float64)
    d = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.decode_fcos(pts, x, 2.0), (d,))
    check_compiles(lambda p: ops.decode_yolo(p, None, 8.0, 8), (torch.randn(2, 64, 4, 4),))
    check_compiles(lambda p: ops.decode_yolo(p, anchors.float(), 8.0, 7), (torch.randn(2, 2, 4, 4, 6),),
                   backend="aot_eager")


# ---------------------------------------------------------------- detection_postprocess

def torchvision_loop(boxes, scores, score_threshold, iou_threshold, max_det, class_agnostic=False):
    """Score filter + torchvision batched_nms (or nms) per image + truncate: the peer formulation."""
    b, n, c = scores.shape
    out = []
    for i in range(b):
        s = scores[i].reshape(-1)
        idx = torch.nonzero(s > score_threshold).flatten()
        bx = boxes[i].reshape(-1, 4)[idx] if boxes.dim() == 4 else boxes[i][idx // c]
        if class_agnostic:
            keep = torchvision.ops.nms(bx.float(), s[idx].float(), iou_threshold)
        else:
            keep = torchvision.ops.batched_nms(bx.float(), s[idx].float(), idx % c, iou_threshold)
        keep = keep[:max_det]
        out.append((bx[keep], s[idx][keep], (idx % c)[keep]))
    return out


def _assert_padded_equal(got, want):
    for g, w, name in zip(got, want, ("num_detections", "boxes", "scores", "classes")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
def test_reference_postprocess_matches_torchvision_loop(per_class, agnostic):
    shape = (3, 300, 6)
    boxes = make_boxes(shape[:3] if per_class else shape[:2])
    scores = make_scores(shape)
    for thr, iou, max_det in ((0.5, 0.5, 50), (0.9, 0.3, 100), (0.2, 0.7, 7)):
        num, ob, os_, oc = ref.detection_postprocess(boxes, scores, thr, iou, max_det, agnostic)
        for i, (bw, sw, cw) in enumerate(torchvision_loop(boxes, scores, thr, iou, max_det, agnostic)):
            k = bw.shape[0]
            assert num[i] == k
            assert torch.equal(ob[i, :k], bw) and torch.equal(os_[i, :k], sw) and torch.equal(oc[i, :k], cw)
            assert (ob[i, k:] == 0).all() and (os_[i, k:] == 0).all() and (oc[i, k:] == -1).all()


def _post_cases():
    """(name, boxes, scores, kwargs) covering ties, few candidates, none above threshold, NaN, per-class."""
    cases = []
    b = make_boxes((3, 300))
    cases.append(("plain", b, make_scores((3, 300, 6)), dict(score_threshold=0.3, iou_threshold=0.5,
                                                            max_detections=100)))
    cases.append(("ties", b, make_scores((3, 300, 6), ties=True), dict(score_threshold=0.2, iou_threshold=0.4,
                                                                      max_detections=300)))
    cases.append(("few", b, make_scores((3, 300, 6)), dict(score_threshold=0.995, iou_threshold=0.5,
                                                          max_detections=100)))
    cases.append(("none", b, make_scores((3, 300, 6)), dict(score_threshold=1.5, iou_threshold=0.5,
                                                           max_detections=10)))
    cases.append(("agnostic", b, make_scores((3, 300, 6), ties=True),
                  dict(score_threshold=0.1, iou_threshold=0.5, max_detections=60, class_agnostic=True)))
    cases.append(("topk", b, make_scores((3, 300, 6)), dict(score_threshold=0.1, iou_threshold=0.5,
                                                           max_detections=50, pre_nms_top_k=70)))
    cases.append(("topk-ties", b, make_scores((3, 300, 6), ties=True),
                  dict(score_threshold=0.1, iou_threshold=0.6, max_detections=500, pre_nms_top_k=300)))
    cases.append(("per-class", make_boxes((3, 200, 5)), make_scores((3, 200, 5), ties=True),
                  dict(score_threshold=0.3, iou_threshold=0.5, max_detections=80)))
    nb, ns = make_boxes((2, 300)), make_scores((2, 300, 4))
    nb[0, ::7, 1] = math.nan
    ns[1, ::5, 2] = math.nan
    cases.append(("nan", nb, ns, dict(score_threshold=0.2, iou_threshold=0.5, max_detections=100)))
    # > 8 * max_det candidates: the C++ kernel's bounded first pass (prefix of the ranking) suffices ...
    mb, ms = make_boxes((1, 1000)), make_scores((1, 1000, 8), ties=True)
    cases.append(("bounded", mb, ms, dict(score_threshold=0.1, iou_threshold=0.0, max_detections=100)))
    # ... or NMS runs out of the prefix before max_det and the kernel collects every candidate
    cases.append(("bounded-fallback", mb, ms, dict(score_threshold=0.1, iou_threshold=0.0, max_detections=600)))
    cases.append(("bounded-topk", mb, ms, dict(score_threshold=0.1, iou_threshold=0.0, max_detections=600,
                                               pre_nms_top_k=3000)))
    cases.append(("zero-det", b, make_scores((3, 300, 6)), dict(score_threshold=0.3, iou_threshold=0.5,
                                                               max_detections=0)))
    cases.append(("one-class", make_boxes((1, 50)), make_scores((1, 50, 1)),
                  dict(score_threshold=0.0, iou_threshold=0.0, max_detections=5)))
    return cases


def _ref_post(boxes, scores, kw):
    kw = dict(kw)
    top_k = kw.pop("pre_nms_top_k", None)
    return ref.detection_postprocess(boxes, scores, pre_nms_top_k=-1 if top_k is None else top_k, **kw)


@pytest.mark.parametrize("case", _post_cases(), ids=lambda c: c[0])
def test_cpp_postprocess_matches_reference(case):
    name, boxes, scores, kw = case
    want = _ref_post(boxes, scores, kw)
    _assert_padded_equal(_call("cpp", boxes, scores, kw), want)


def _call(backend, boxes, scores, kw):
    with fastnn.use_backend(backend):
        return ops.detection_postprocess(boxes, scores, **kw)


@pytest.mark.parametrize("case", _post_cases(), ids=lambda c: c[0])
def test_composed_postprocess_matches_reference(case):
    """The CUDA path's composition (one batched_nms over (image, class) groups), run here with the C++
    NMS underneath."""
    name, boxes, scores, kw = case
    want = _ref_post(boxes, scores, kw)
    top_k = kw.get("pre_nms_top_k")
    args = (kw["score_threshold"], kw["iou_threshold"], kw["max_detections"], kw.get("class_agnostic", False),
            -1 if top_k is None else top_k)
    with fastnn.use_backend("cpp"):
        got = det_ops._postprocess_composed(boxes, scores, *args)
    _assert_padded_equal(got, want)


def test_cpp_postprocess_dense_matches_torchvision_loop():
    """Many candidates (~20k per image, distinct scores): C++ kernel, the composed path and the
    torchvision loop agree."""
    boxes, scores = make_boxes((2, 2000), image=500.0), make_scores((2, 2000, 20))
    for thr, iou, max_det, agnostic in ((0.5, 0.6, 300, False), (0.5, 0.5, 1000, True)):
        kw = dict(score_threshold=thr, iou_threshold=iou, max_detections=max_det, class_agnostic=agnostic)
        got = _call("cpp", boxes, scores, kw)
        with fastnn.use_backend("cpp"):
            _assert_padded_equal(det_ops._postprocess_composed(boxes, scores, thr, iou, max_det, agnostic, -1), got)
        for i, (bw, sw, cw) in enumerate(torchvision_loop(boxes, scores, thr, iou, max_det, agnostic)):
            k = bw.shape[0]
            assert got[0][i] == k
            assert torch.equal(got[1][i, :k], bw) and torch.equal(got[2][i, :k], sw) and torch.equal(got[3][i, :k], cw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_postprocess_dtypes(dtype):
    boxes = make_boxes((3, 400), dtype=dtype)
    for sdt in (dtype, torch.float32):
        scores = make_scores((3, 400, 5), ties=True, dtype=sdt)
        kw = dict(score_threshold=0.25, iou_threshold=0.5, max_detections=120)
        got = _call("cpp", boxes, scores, kw)
        _assert_padded_equal(got, _ref_post(boxes, scores, kw))
        assert got[1].dtype == dtype and got[2].dtype == sdt


@pytest.mark.skipif(not INTERP, reason="interpreter tier")
def test_triton_interpreted_postprocess_matches_reference():
    boxes, scores = make_boxes((2, 40)), make_scores((2, 40, 3), ties=True)
    for kw in (dict(score_threshold=0.2, iou_threshold=0.5, max_detections=30),
               dict(score_threshold=0.2, iou_threshold=0.5, max_detections=10, class_agnostic=True,
                    pre_nms_top_k=25)):
        _assert_padded_equal(_call("triton", boxes, scores, kw), _ref_post(boxes, scores, kw))


@pytest.mark.cuda
def test_gpu_postprocess_matches_cpu():
    boxes = make_boxes((16, 8400), image=640.0, size=(8.0, 160.0))
    scores = torch.sigmoid(torch.randn(16, 8400, 80) * 1.5 - 5)
    for kw in (dict(score_threshold=0.25, iou_threshold=0.45, max_detections=300),
               dict(score_threshold=0.001, iou_threshold=0.65, max_detections=300, pre_nms_top_k=30000)):
        want = _call("cpp", boxes, scores, kw)
        for b in backends_under_test("cuda", tuple(det_ops._POST_IMPLS)):
            got = _call(b, boxes.cuda(), scores.cuda(), kw)
            _assert_padded_equal(tuple(g.cpu() for g in got), want)


def test_postprocess_empty_shapes():
    for backend in ["reference"] + backends_under_test("cpu", tuple(det_ops._POST_IMPLS)):
        for b, n, c in ((0, 10, 3), (2, 0, 3), (2, 5, 0)):
            got = _call(backend, torch.zeros(b, n, 4), torch.zeros(b, n, c),
                        dict(score_threshold=0.1, iou_threshold=0.5, max_detections=4))
            assert [tuple(t.shape) for t in got] == [(b,), (b, 4, 4), (b, 4), (b, 4)]
            assert (got[0] == 0).all() and (got[1] == 0).all() and (got[3] == -1).all()


class _Detector(torch.nn.Module):
    def forward(self, pred, cls_logits):
        boxes = ops.decode_yolo(pred, None, 8.0, 8).flatten(1, 2)      # (B, H*W, 4)
        scores = torch.sigmoid(cls_logits).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return ops.detection_postprocess(boxes, scores, 0.3, 0.5, 20)


def test_postprocess_exports_and_compiles():
    pred, logits = torch.randn(2, 64, 8, 8), torch.randn(2, 5, 8, 8)
    model = _Detector()
    eager = model(pred, logits)
    ep = torch.export.export(model, (pred, logits))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("fastnn.detection_postprocess" in t for t in targets)
    out_shapes = [tuple(s.meta["val"].shape) for s in ep.graph.output_node().args[0]]
    assert out_shapes == [(2,), (2, 20, 4), (2, 20), (2, 20)]  # static: no data-dependent sizes
    _assert_padded_equal(ep.module()(pred, logits), eager)
    pred2, logits2 = torch.randn(2, 64, 8, 8), torch.randn(2, 5, 8, 8)
    _assert_padded_equal(ep.module()(pred2, logits2), model(pred2, logits2))
    check_compiles(model, (pred, logits))


def test_opcheck_detect_ops():
    boxes, scores = make_boxes((2, 60)), make_scores((2, 60, 3))
    run_opcheck(torch.ops.fastnn.detection_postprocess.default,
                [(boxes, scores, 0.3, 0.5, 10, False, -1), (make_boxes((2, 60, 3)), scores, 0.3, 0.5, 10, True, 20)],
                skip_autograd=True)
    heat = make_heat((2, 3, 8, 8))
    run_opcheck(torch.ops.fastnn.heatmap_peaks.default, [(heat, 10, 3), (heat, 0, 3)], skip_autograd=True)
    b1, s1 = make_boxes((50,)), make_scores((50,))
    run_opcheck(torch.ops.fastnn.soft_nms.default, [(b1, s1, 0.3, 0.5, 0.001, False), (b1, s1, 0.3, 0.5, 0.1, True)],
                skip_autograd=True)


def test_compile_fullgraph_peaks_and_soft_nms():
    check_compiles(lambda h: ops.heatmap_peaks(h, 12, 3), (make_heat((2, 3, 10, 10)),))
    check_compiles(lambda b, s: ops.soft_nms(b, s, 0.3, 0.5, 0.01, "gaussian"), (make_boxes((40,)), make_scores((40,))),
                   backend="aot_eager")


def test_non_contiguous_inputs():
    heat = make_heat((2, 3, 12, 9)).transpose(2, 3)
    boxes, scores = make_boxes((3, 50)), make_scores((3, 6, 50)).transpose(1, 2)
    assert not heat.is_contiguous() and not scores.is_contiguous()
    for backend in backends_under_test("cpu", ("cpp",)):
        for g, w in zip(run(backend, ops.heatmap_peaks, heat, 30, 3), ref.heatmap_peaks(heat, 30, 3)):
            assert torch.equal(g, w)
        kw = dict(score_threshold=0.3, iou_threshold=0.5, max_detections=20)
        _assert_padded_equal(_call(backend, boxes[:, ::1], scores, kw), _ref_post(boxes, scores, kw))
        sb, ss = make_boxes((60,))[::2], make_scores((60,))[::2]
        for g, w in zip(run(backend, ops.soft_nms, sb, ss, 0.3), ref.soft_nms(sb, ss, 0.3)):
            assert torch.equal(g, w)


# ---------------------------------------------------------------- Soft-NMS

def mmcv_style_soft_nms(boxes, scores, iou_threshold, sigma, min_score, method):
    """mmcv's CPU loop (swap the maximum to the front, decay the rest, swap dropped boxes to the end),
    in Python floats, with IoU as torchvision computes it (offset 0)."""
    bx = boxes.tolist()
    sc = scores.tolist()
    ids = list(range(len(sc)))
    n = len(sc)
    keep, kept = [], []
    i = 0
    while i < n:
        m = max(range(i, n), key=lambda j: sc[j])
        for lst in (bx, sc, ids):
            lst[i], lst[m] = lst[m], lst[i]
        keep.append(ids[i])
        kept.append(sc[i])
        x1, y1, x2, y2 = bx[i]
        area = (x2 - x1) * (y2 - y1)
        pos = i + 1
        while pos < n:
            a1, b1, a2, b2 = bx[pos]
            iw = max(min(x2, a2) - max(x1, a1), 0.0)
            ih = max(min(y2, b2) - max(y1, b1), 0.0)
            inter = iw * ih
            ov = inter / (area + (a2 - a1) * (b2 - b1) - inter)
            if method == "linear":
                w = 1 - ov if ov > iou_threshold else 1.0
            else:
                w = math.exp(-(ov * ov) / sigma)
            sc[pos] *= w
            if sc[pos] < min_score:
                n -= 1
                for lst in (bx, sc, ids):
                    lst[pos], lst[n] = lst[n], lst[pos]
            else:
                pos += 1
        i += 1
    return torch.tensor(keep, dtype=torch.long), torch.tensor(kept, dtype=torch.float64)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_reference_soft_nms_matches_mmcv_style_loop(method):
    boxes = make_boxes((150,), image=120.0, dtype=torch.float64)
    scores = make_scores((150,), dtype=torch.float64) * 0.9 + 0.05  # distinct, all above the threshold
    for thr, min_score in ((0.3, 0.001), (0.5, 0.2)):
        want_i, want_s = mmcv_style_soft_nms(boxes, scores, thr, 0.5, min_score, method)
        got_i, got_s = ref.soft_nms(boxes, scores, thr, 0.5, min_score, method)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_s, want_s, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cpp_soft_nms_matches_reference(method, dtype):
    for n, ties in ((1, False), (7, False), (300, False), (300, True), (1000, False)):
        boxes = make_boxes((n,), image=150.0, dtype=dtype)
        scores = make_scores((n,), ties=ties, dtype=dtype)
        if n == 300 and not ties:
            boxes[::31, 0] = math.nan
            scores[::37] = math.nan
        for thr, sthr in ((0.3, 0.001), (0.6, 0.3)):
            wi, ws = ref.soft_nms(boxes, scores, thr, 0.5, sthr, method)
            gi, gs = run("cpp", ops.soft_nms, boxes, scores, thr, 0.5, sthr, method)
            assert gs.dtype == dtype
            if method == "linear":
                assert torch.equal(gi, wi) and torch.equal(gs, ws), (n, ties, thr)
            else:  # std::exp vs torch's exp: last-bit differences in the weights
                assert torch.equal(gi, wi), (n, ties, thr)
                torch.testing.assert_close(gs, ws, rtol=1e-5 if dtype != torch.float16 else 2e-3, atol=0)


@pytest.mark.skipif(not INTERP, reason="interpreter tier")
@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_triton_interpreted_soft_nms_matches_reference(method):
    for dtype in (torch.float32, torch.float64):
        boxes = make_boxes((70,), image=90.0, dtype=dtype)
        scores = make_scores((70,), ties=True, dtype=dtype)
        boxes[::17, 2] = math.nan
        wi, ws = ref.soft_nms(boxes, scores, 0.3, 0.5, 0.05, method)
        gi, gs = run("triton", ops.soft_nms, boxes, scores, 0.3, 0.5, 0.05, method)
        assert torch.equal(gi, wi), dtype
        torch.testing.assert_close(gs, ws, rtol=0 if method == "linear" else 1e-5, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_gpu_soft_nms_matches_cpu(method):
    boxes, scores = make_boxes((3000,), image=600.0), make_scores((3000,))
    wi, ws = run("cpp", ops.soft_nms, boxes, scores, 0.3, 0.5, 0.001, method)
    gi, gs = ops.soft_nms(boxes.cuda(), scores.cuda(), 0.3, 0.5, 0.001, method)
    assert torch.equal(gi.cpu(), wi)
    torch.testing.assert_close(gs.cpu(), ws, rtol=0 if method == "linear" else 1e-5, atol=0)


def test_soft_nms_empty_and_all_below():
    for backend in ["reference"] + backends_under_test("cpu", tuple(det_ops._SOFT_IMPLS)):
        i, s = run(backend, ops.soft_nms, torch.zeros(0, 4), torch.zeros(0), 0.3)
        assert i.shape == (0,) and s.shape == (0,)
        i, s = run(backend, ops.soft_nms, make_boxes((5,)), torch.full((5,), 1e-4), 0.3)
        assert i.shape == (0,) and s.shape == (0,)


# ---------------------------------------------------------------- Matrix NMS

@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
@pytest.mark.parametrize("labelled", [False, True])
def test_matrix_nms_matches_loop(kernel, labelled):
    boxes = make_boxes((60,), image=100.0, dtype=torch.float64)
    scores = make_scores((60,), dtype=torch.float64)
    labels = torch.randint(0, 3, (60,)) if labelled else None
    want = ref.matrix_nms(boxes, scores, labels, kernel, 2.0)
    got = ops.matrix_nms(boxes, scores, labels, kernel, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got32 = ops.matrix_nms(boxes.float(), scores.float(), labels, kernel, 2.0)
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)
    assert (got <= scores + 1e-12).all()


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_matrix_nms_duplicate_boxes(kernel):
    """Exact duplicates (a box wholly covered by a higher one, comp = 1): the copies decay to 0 (linear) and
    nothing is NaN; a third box apart from them keeps its decay by the first copy only."""
    box = [0.0, 0.0, 10.0, 10.0]
    boxes = torch.tensor([box, box, box, [5.0, 0.0, 15.0, 10.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    got = ops.matrix_nms(boxes, scores, None, kernel)
    want = ref.matrix_nms(boxes, scores, None, kernel)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    iou = 1 / 3  # of the fourth box with each copy
    first = 1 - iou if kernel == "linear" else math.exp(-2.0 * iou ** 2)
    copies = [0.0, 0.0] if kernel == "linear" else [0.8 * math.exp(-2.0), 0.7 * math.exp(-2.0)]
    torch.testing.assert_close(got, torch.tensor([0.9, *copies, 0.6 * first], dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_matrix_nms_undefined_iou_is_no_overlap(kernel):
    """Two empty boxes (padding) have IoU 0 / 0, and a box with a NaN coordinate NaN IoUs: such pairs
    overlap nothing, as in the reference, instead of spreading NaN through comp's max to every score. The
    gradients of the other boxes and of every score stay finite (the linear kernel's untaken branch divided
    by 1 - comp = 0)."""
    boxes = torch.tensor([[0, 0, 10, 10.0], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 0, 0], [0, 0, 0, 0]],
                         dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.05, 0.05], dtype=torch.float64)
    with_nan = boxes.clone()
    with_nan[2, 0] = float("nan")
    for b in (boxes, with_nan):
        got = ops.matrix_nms(b, scores, None, kernel)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref.matrix_nms(b, scores, None, kernel), rtol=1e-12, atol=1e-12)
    dup = torch.tensor([[0, 0, 10, 10.0], [0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 0, 0], [0, 0, 0, 0]],
                       dtype=torch.float64, requires_grad=True)
    s = scores.clone().requires_grad_()
    ops.matrix_nms(dup, s, None, kernel).sum().backward()
    assert torch.isfinite(dup.grad[:3]).all() and torch.isfinite(s.grad).all()  # the empty boxes' own: 0 / 0


def test_matrix_nms_gradcheck():
    boxes = make_boxes((6,), image=30.0, dtype=torch.float64).requires_grad_()
    scores = make_scores((6,), dtype=torch.float64).requires_grad_()
    run_gradcheck(lambda b, s: ops.matrix_nms(b, s, None, "gaussian"), (boxes, scores), ["reference", "cpp"])


# ---------------------------------------------------------------- bad inputs

BAD_INPUTS = [
    (ops.heatmap_peaks, (torch.rand(2, 3, 4), 3), ValueError, r"heatmap must have shape"),
    (ops.heatmap_peaks, (torch.rand(1, 2, 3, 3), 19), ValueError, r"k \(19\) must be at most"),
    (ops.heatmap_peaks, (torch.rand(1, 2, 3, 3), -1), ValueError, "k must be >= 0"),
    (ops.heatmap_peaks, (torch.rand(1, 2, 3, 3), 2.0), TypeError, "k must be an int"),
    (ops.heatmap_peaks, (torch.rand(1, 2, 3, 3), 2, 4), ValueError, "kernel must be odd"),
    (ops.heatmap_peaks, (torch.zeros(1, 2, 3, 3, dtype=torch.long), 2), TypeError, "heatmap must have dtype"),
    (ops.detection_postprocess, (torch.zeros(2, 5, 4), torch.zeros(2, 5), 0.1, 0.5, 3), ValueError,
     r"scores must have shape"),
    (ops.detection_postprocess, (torch.zeros(2, 6, 4), torch.zeros(2, 5, 3), 0.1, 0.5, 3), ValueError,
     r"boxes must have shape \(B, N, 4\)"),
    (ops.detection_postprocess, (torch.zeros(2, 5, 4), torch.zeros(2, 5, 3), 0.1, 0.5, -1), ValueError,
     "max_detections must be >= 0"),
    (ops.detection_postprocess, (torch.rand(2, 5, 4), torch.rand(2, 5, 3), 0.1, 0.5, 2 ** 61), ValueError,
     r"max_detections must be at most 2147483647"),
    (ops.heatmap_peaks, (torch.rand(1, 2, 5, 5), 3, 2 ** 63 + 1), ValueError, r"kernel must be at most"),
    (ops.detection_postprocess, (torch.zeros(2, 5, 4), torch.zeros(2, 5, 3), math.nan, 0.5, 3), ValueError,
     "score_threshold must not be NaN"),
    (ops.detection_postprocess, (torch.zeros(2, 5, 4), torch.zeros(2, 5, 3), 0.1, 0.5, 3, 1), TypeError,
     "class_agnostic must be a bool"),
    (ops.detection_postprocess, (torch.zeros(2, 5, 4, dtype=torch.int32), torch.zeros(2, 5, 3), 0.1, 0.5, 3),
     TypeError, "boxes must have dtype"),
    (ops.soft_nms, (torch.zeros(3, 4), torch.zeros(2), 0.3), ValueError, r"scores must have shape \(3,\)"),
    (ops.soft_nms, (torch.zeros(3, 4), torch.zeros(3), 0.3, 0.5, 0.001, "hard"), ValueError, "method must be"),
    (ops.soft_nms, (torch.zeros(3, 4), torch.zeros(3), 0.3, 0.0), ValueError, "sigma must be > 0"),
    (ops.matrix_nms, (torch.zeros(3, 4), torch.zeros(3), torch.zeros(3)), TypeError, "labels must have an integer"),
    (ops.matrix_nms, (torch.zeros(3, 4), torch.zeros(3), None, "box"), ValueError, "kernel must be"),
    (ops.matrix_nms, (torch.zeros(3, 4), torch.zeros(3), None, "gaussian", -1.0), ValueError,
     "sigma must be a positive finite number"),
    (ops.matrix_nms, (torch.zeros(3, 4), torch.zeros(3), None, "gaussian", 0.0), ValueError, "sigma must be"),
    (ops.decode_yolo, (torch.zeros(1, 3, 2, 2, 5), None, 8.0, 5), ValueError, "anchors .* are required"),
    (ops.decode_yolo, (torch.zeros(1, 3, 2, 2, 5), torch.ones(2, 2), 8.0, 5), ValueError, "anchors must have shape"),
    (ops.decode_yolo, (torch.zeros(1, 3, 2, 2, 5), None, 8.0, 6), ValueError, "version must be one of"),
    (ops.decode_yolo, (torch.zeros(1, 3, 2, 2, 5), torch.rand(3, 2), 8.0, 5.0), ValueError, "version must be one of"),
    (ops.decode_yolo, (torch.zeros(1, 60, 2, 2), None, 8.0, 8), ValueError, r"pred must have shape \(B, 4 \* reg_max"),
    (ops.decode_fcos, (torch.zeros(3, 3), torch.zeros(3, 4)), ValueError, r"points must have shape \(\.\.\., 2\)"),
]


@pytest.mark.parametrize("fn,args,exc,match", BAD_INPUTS, ids=[b[3][:30] for b in BAD_INPUTS])
def test_bad_inputs(fn, args, exc, match):
    expect_error(fn, args, exc, match)


def test_raw_ops_refuse_boxes_that_do_not_match_the_scores():
    """The raw detection_postprocess and soft_nms ops index boxes by the scores' sizes: boxes of another batch,
    count or class count (a (1, 1, 4) box tensor for 4M scores segfaulted) and scores of another length (which
    read past their end) are refused with a named error."""
    from fastnn._backend import _C
    scores = torch.rand(2, 50, 3)
    for boxes in (torch.rand(1, 50, 4), torch.rand(2, 1, 4), torch.rand(2, 50, 2, 4), torch.rand(2, 50, 5)):
        with pytest.raises(RuntimeError, match="boxes must be"):
            torch.ops.fastnn.detection_postprocess(boxes, scores, 0.1, 0.5, 10, False, -1)
        with pytest.raises(RuntimeError, match="boxes must be"):  # the C++ kernel's own check
            _C.detection_postprocess_cpu(boxes, scores, 0.1, 0.5, 10, False, -1)
    for boxes in (torch.rand(2, 50, 4), torch.rand(2, 50, 3, 4)):
        num, *_ = torch.ops.fastnn.detection_postprocess(boxes, scores, 0.1, 0.5, 10, False, -1)
        assert num.shape == (2,)
    boxes = torch.rand(20, 4) * 10
    boxes[:, 2:] += boxes[:, :2]
    for bad in (torch.rand(1), torch.rand(4, 5), torch.rand(21)):
        with pytest.raises(RuntimeError, match=r"scores \(N,\), one per box"):
            torch.ops.fastnn.soft_nms(boxes, bad, 0.3, 0.5, 0.001, False)
        with pytest.raises(RuntimeError, match="scores must be"):
            _C.soft_nms_cpu(boxes, bad, 0.3, 0.5, 0.001, False)
