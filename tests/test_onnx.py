"""ONNX export of the detection ops (fastnn/ops/_onnx.py): torch.onnx.export(..., dynamo=True) of models built
from fastnn's layers, run in onnxruntime against fastnn's eager result on the same inputs."""
import io
from collections import OrderedDict

import pytest
import torch

import fastnn
from fastnn import nn as fnn
from fastnn import ops
from fastnn.ops import _onnx
from fastnn.reference.detect import heatmap_peak_scores

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.filterwarnings("ignore")


def _session(model, args, dynamic_shapes=None):
    program = torch.onnx.export(model, args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes)
    return ort.InferenceSession(program.model_proto.SerializeToString())


def _run(session, *inputs):
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _rois(k, n_images=2, extent=70.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * extent - 5
    wh = torch.rand(k, 2, generator=g) * 30
    wh[: k // 8] *= 0.02  # boxes smaller than a pixel
    batch = torch.randint(0, n_images, (k, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], 1)


def _boxes(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 60 - 10
    return torch.cat([xy, xy + torch.rand(k, 2, generator=g) * 25 + 0.5], 1)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1])
def test_roi_align_exports(aligned, sampling_ratio):
    x = torch.randn(2, 8, 40, 40)
    model = fnn.RoIAlign((7, 5), 0.5, sampling_ratio, aligned)
    session = _session(model, (x, _rois(64)), dynamic_shapes=({}, {0: "rois"}))
    for k in (64, 9, 1):  # the number of RoIs is an input dimension of the graph
        rois = _rois(k, seed=k)
        (got,) = _run(session, x, rois)
        torch.testing.assert_close(got, model(x, rois), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])  # (onnxruntime's Python API takes no bfloat16)
def test_roi_align_exports_in_its_compute_dtype(dtype):
    x = torch.randn(1, 4, 24, 24).to(dtype)
    rois = _rois(16, n_images=1, extent=40)
    model = _Fn(lambda f, r: ops.roi_align(f, r, 3, 1.0, 2, True))
    (got,) = _run(_session(model, (x, rois)), x, rois)
    assert got.dtype == dtype
    # the graph pools float16 / bfloat16 in float32 and rounds once, as the kernels do
    torch.testing.assert_close(got, model(x, rois), rtol=0, atol=1e-12 if dtype == torch.float64 else 0)
    if dtype == torch.float16:  # (roi_pool: float64 is refused, test_roi_export_edge_boxes)
        _assert_exports_like_eager(_Fn(lambda f, r: ops.roi_pool(f, r, 3, 0.37)), x, rois)


def test_roi_align_exports_box_lists():
    x = torch.randn(2, 4, 30, 30)
    b0, b1 = _boxes(5)[:, :4], _boxes(3, seed=4)[:, :4]
    model = _Fn(lambda f, a, b: ops.roi_align(f, [a, b], 4, 0.5, -1))
    (got,) = _run(_session(model, (x, b0, b1)), x, b0, b1)
    torch.testing.assert_close(got, model(x, b0, b1), rtol=1e-6, atol=1e-6)


def test_roi_pool_exports():
    x = torch.randn(2, 6, 32, 32)
    model = fnn.RoIPool((4, 3), 0.5)
    session = _session(model, (x, _rois(48)), dynamic_shapes=({}, {0: "rois"}))
    for k in (48, 7):
        rois = _rois(k, seed=k)  # partly outside the map, some smaller than a pixel
        (got,) = _run(session, x, rois)
        torch.testing.assert_close(got, model(x, rois), rtol=0, atol=0)


def test_multi_scale_roi_align_and_fpn_export():
    torch.manual_seed(0)
    fpn = fnn.FeaturePyramidNetwork([4, 6, 8], 8, extra_blocks=None).eval()
    pool = fnn.MultiScaleRoIAlign(["0", "1", "2"], 5, 2)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fpn, self.pool = fpn, pool

        def forward(self, c3, c4, c5, boxes0, boxes1):
            maps = self.fpn(OrderedDict([("0", c3), ("1", c4), ("2", c5)]))
            return self.pool(maps, [boxes0, boxes1], [(256, 256), (256, 256)])

    c = (torch.randn(2, 4, 64, 64), torch.randn(2, 6, 32, 32), torch.randn(2, 8, 16, 16))
    g = torch.Generator().manual_seed(3)
    corner = torch.rand(40, 2, generator=g) * 200
    boxes = torch.cat([corner, corner + torch.rand(40, 2, generator=g) * 320 + 4], 1)  # every level gets boxes
    model = Head()
    session = _session(model, (*c, boxes[:25], boxes[25:]))
    small = torch.cat([corner, corner + torch.rand(40, 2, generator=g) * 20 + 1], 1)  # the finest level only
    for run_boxes, n_levels in ((boxes, 3), (small, 1)):
        levels = fastnn.reference.roi.map_levels(run_boxes, 2, 4, 224, 4, 1e-6)[0]
        assert len(set(levels.tolist())) == n_levels
        (got,) = _run(session, *c, run_boxes[:25], run_boxes[25:])
        want = model(*c, run_boxes[:25], run_boxes[25:]).detach()
        # the convolutions run in onnxruntime, whose algorithms round differently (1.4e-6 at values ~5 seen here)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Nms(torch.nn.Module):
    def forward(self, boxes, scores, idxs):
        return ops.nms(boxes, scores, 0.5), ops.batched_nms(boxes, scores, idxs, 0.4)


def test_nms_and_batched_nms_export():
    model = _Nms()
    k = 80
    boxes, scores = _boxes(k), torch.rand(k)
    idxs = torch.randint(-1, 3, (k,))
    session = _session(model, (boxes, scores, idxs), dynamic_shapes=({0: "n"}, {0: "n"}, {0: "n"}))
    g = torch.Generator().manual_seed(7)
    for k in (80, 33, 1, 150):
        boxes, scores = _boxes(k, seed=k), torch.rand(k, generator=g)
        idxs = torch.randint(-1, 3, (k,), generator=g)
        scores[: k // 4] = scores[k // 4: 2 * (k // 4)]  # ties, which both order by index
        if k > 8:
            scores[3] = float("nan")  # never kept, suppresses nothing
            boxes[5, 2] = float("nan")
            boxes[6] = torch.tensor([1e4, 1e4, float("inf"), 1e4 + 5])
            # a NaN score ahead of an equal box scored -inf, which it must not suppress
            scores[7], scores[8], boxes[8], idxs[8] = float("nan"), float("-inf"), boxes[7], idxs[7]
        got_nms, got_batched = _run(session, boxes, scores, idxs)
        assert torch.equal(got_nms, ops.nms(boxes, scores, 0.5))
        assert torch.equal(got_batched, ops.batched_nms(boxes, scores, idxs, 0.4))


def test_spp_sppf_and_box_iou_export():
    x = torch.randn(2, 3, 13, 11)
    model = _Fn(lambda t, b: (ops.spp_pool(t, (1, 2, 3)), ops.spp_pool(t, (1, 4), "avg"), ops.sppf_pool(t, 5),
                              ops.box_iou(b, b[:7]), ops.generalized_box_iou(b, b[:7])))
    b = _boxes(12)
    got = _run(_session(model, (x, b)), x, b)
    for g, w in zip(got, model(x, b)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_torchscript_exporter_is_refused_by_name():
    x, rois = torch.randn(1, 2, 8, 8), _rois(3, n_images=1, extent=6)
    with pytest.raises(RuntimeError, match="dynamo=True"):
        torch.onnx.export(fnn.RoIAlign(2, 1.0, 2), (x, rois), io.BytesIO(), dynamo=False)


def test_other_tracing_still_records_the_custom_ops():
    x, rois = torch.randn(1, 2, 8, 8), _rois(3, n_images=1, extent=6)
    program = torch.export.export(fnn.RoIAlign(2, 1.0, 2), (x, rois))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fastnn.roi_align.default" in targets


class _Rnn(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0):
        return self.rnn(x, h0)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_rnn_exports(mode):
    torch.manual_seed(0)
    kinds = {"LSTM": fnn.LSTM, "GRU": fnn.GRU}
    plain = kinds[mode](6, 8, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = torch.randn(3, 7, 6)
    got = _run(_session(_Fn(plain), (x,)), x)
    want = plain(x)
    want = [want[0], *want[1]] if mode == "LSTM" else list(want)
    for g, w in zip(got, want):  # onnxruntime's LSTM / GRU against fastnn's kernels (<= 5e-7 apart seen here)
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    unbatched = kinds[mode](6, 5).eval()
    x1 = torch.randn(4, 6)
    h1 = torch.randn(1, 5)
    hx = (h1, torch.randn(1, 5)) if mode == "LSTM" else h1
    model = _Rnn(unbatched)
    flat = (x1, *hx) if mode == "LSTM" else (x1, hx)
    session = _session(_Fn(lambda x, *h: model(x, tuple(h) if mode == "LSTM" else h[0])), flat)
    got = _run(session, *flat)
    want = model(x1, hx)
    want = [want[0], *want[1]] if mode == "LSTM" else list(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)


def test_rnn_cells_export():
    torch.manual_seed(0)
    x, h, c = torch.randn(3, 6), torch.randn(3, 5), torch.randn(3, 5)
    lstm, gru = fnn.LSTMCell(6, 5), fnn.GRUCell(6, 5)
    model = _Fn(lambda x, h, c: (*lstm(x, (h, c)), gru(x, h)))
    got = _run(_session(model, (x, h, c)), x, h, c)
    for g, w in zip(got, model(x, h, c)):
        torch.testing.assert_close(g, w.detach(), rtol=2e-6, atol=2e-6)


def test_rnn_export_refuses_what_onnx_cannot_express():
    x = torch.randn(5, 2, 6)
    with pytest.raises(Exception, match="proj_size"):
        torch.onnx.export(fnn.LSTM(6, 8, proj_size=4), (x,), dynamo=True, verbose=False)
    packed = _Fn(lambda x: fnn.GRU(6, 4)(torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3]))[1])
    with pytest.raises(Exception, match="PackedSequence"):
        torch.onnx.export(packed, (x,), dynamo=True, verbose=False)


def test_attention_exports():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    keep = torch.rand(9, 11) > 0.4
    keep[4] = False  # a row that sees no key: zeros in fastnn (torch's softmax would give NaN)
    add = torch.randn(2, 4, 9, 11)
    model = _Fn(lambda q, k, v, keep, add: (
        ops.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True),
        ops.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=0.3, enable_gqa=True),
        ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))
    got = _run(_session(model, (q, k, v, keep, add)), q, k, v, keep, add)
    want = model(q, k, v, keep, add)
    assert torch.equal(want[0][:, :, 4], torch.zeros_like(want[0][:, :, 4]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    mha = fnn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    model = _Fn(lambda x, pad: mha(x, x, x, key_padding_mask=pad, need_weights=False)[0])
    (got,) = _run(_session(model, (x, pad)), x, pad)
    torch.testing.assert_close(got, model(x, pad), rtol=2e-6, atol=2e-6)


class _Postprocess(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, boxes, scores):
        return ops.detection_postprocess(boxes, scores, **self.options)


def _detections(per_class, b=3, n=120, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(b, n, 2, generator=g) * 80
    size = torch.rand(b, n, 2, generator=g) * 30 + 1
    if per_class:
        jitter = torch.rand(b, n, c, 4, generator=g) * 6
        boxes = torch.cat([corner, corner + size], -1)[:, :, None] + jitter
    else:
        boxes = torch.cat([corner, corner + size], -1)
    scores = torch.rand(b, n, c, generator=g)
    if n >= 16:
        scores[0, :8] = scores[0, 8:16]  # equal scores: ranked by flat index n * C + c
        scores[1, 3, 1] = float("nan")  # never a candidate
        boxes[1, 5] = float("nan")
    return boxes, scores


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("pre_nms_top_k", [None, 30])
def test_detection_postprocess_exports(per_class, class_agnostic, pre_nms_top_k):
    model = _Postprocess(score_threshold=0.25, iou_threshold=0.45, max_detections=50,
                         class_agnostic=class_agnostic, pre_nms_top_k=pre_nms_top_k)
    boxes, scores = _detections(per_class)
    session = _session(model, (boxes, scores))
    for seed in (0, 1):
        boxes, scores = _detections(per_class, seed=seed)
        got = _run(session, boxes, scores)
        want = model(boxes, scores)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_detection_postprocess_export_edges():
    boxes, scores = _detections(False, b=2, n=40, c=3)
    boxes16, scores16 = boxes.half(), scores.half()
    for model, args in ((_Postprocess(score_threshold=0.9, iou_threshold=0.5, max_detections=60), (boxes, scores)),
                        (_Postprocess(score_threshold=0.2, iou_threshold=0.5, max_detections=5, pre_nms_top_k=0),
                         (boxes, scores)),
                        (_Postprocess(score_threshold=0.2, iou_threshold=0.3, max_detections=20),
                         (boxes16, scores16))):
        got = _run(_session(model, args), *args)
        for g, w in zip(got, model(*args)):
            assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_heatmap_peaks_export(dtype):
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(2, 3, 12, 10, generator=g)
    heat[0, 1, 4:6, 4:6] = 0.97  # a plateau: every pixel of it is a peak, equal scores by index
    heat[1, 0, :5, 1:7] = 0.1
    heat[1, 0, 2, 3] = float("nan")  # its window has no peak
    heat[1, 0, 2, 4] = 0.995  # the best pixel of its window but for the NaN beside it: no peak either
    heat[1, 2] = 0.0  # an empty class
    heat = heat.to(dtype)
    model = _Fn(lambda h: ops.heatmap_peaks(h, 90, 3))
    got = _run(_session(model, (heat,)), heat)
    for g_, w in zip(got, model(heat)):
        assert g_.dtype == w.dtype and torch.equal(g_, w)
    # the composition in eager against the reference: it must not count on the runtime's MaxPool treating NaN
    # as torch's does
    assert torch.equal(_onnx.peak_scores(heat.float(), 3), heatmap_peak_scores(heat.float(), 3))


def _assert_exports_like_eager(model, *args, dynamic_shapes=None, runs=None):
    """Export once (with `args`), then run each argument tuple of `runs` (default: `args`) in onnxruntime and
    compare with eager: equal values and dtypes."""
    session = _session(model, args, dynamic_shapes=dynamic_shapes)
    for run_args in runs or (args,):
        got = _run(session, *run_args)
        want = model(*run_args)
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), (g, w)


def test_nms_export_exact_where_float32_offsets_are_not():
    # categories far apart as numbers, and small boxes at large coordinates: an offset per category in float32
    # would merge the first two and move IoUs in the rest
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    _assert_exports_like_eager(_Fn(lambda b, s, i: ops.batched_nms(b, s, i, 0.5)), boxes, torch.tensor([0.9, 0.8]),
                               torch.tensor([2 ** 24, 2 ** 24 + 1]))
    g = torch.Generator().manual_seed(5)
    corner = torch.rand(300, 2, generator=g) * 1e4
    boxes = torch.cat([corner, corner + torch.rand(300, 2, generator=g) * 4 + 2], 1)
    boxes[150:] = boxes[:150] + torch.rand(150, 4, generator=g)  # near-duplicates
    _assert_exports_like_eager(_Fn(lambda b, s, i: ops.batched_nms(b, s, i, 0.5)), boxes,
                               torch.rand(300, generator=g), torch.randint(0, 5000, (300,), generator=g))


def test_nms_export_thresholds_and_float64_scores():
    # IoU exactly float32(0.1), which is above 0.1: not suppressed at 0.1 (the eager ops compare with the double)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    _assert_exports_like_eager(_Fn(lambda b, s: (ops.nms(b, s, 0.1), ops.nms(b, s, 1.5))), boxes, scores)
    # float64 scores apart by less than float32 resolves: ranked in float64
    same = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
    _assert_exports_like_eager(_Fn(lambda b, s: ops.nms(b, s, 0.5)), same,
                               torch.tensor([0.5, 0.5 + 1e-12], dtype=torch.float64))
    with pytest.raises(Exception, match="iou_threshold >= 0"):
        torch.onnx.export(_Fn(lambda b, s: ops.nms(b, s, -0.5)), (boxes, scores), dynamo=True, verbose=False)


def test_detection_postprocess_export_per_class_boxes_far_out_and_float64():
    # 91 classes, a box at 20000 px: two class-90 boxes with IoU 0.5013 at threshold 0.5 (suppressed)
    b, n, c = 1, 3, 91
    boxes = torch.zeros(b, n, c, 4)
    boxes[0, :, :] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    boxes[0, 0, 90] = torch.tensor([100.0, 100.0, 120.0, 120.0])
    boxes[0, 1, 90] = torch.tensor([100.0, 100.0, 120.0, 110.0275])
    boxes[0, 2, 0] = torch.tensor([20000.0, 20000.0, 20010.0, 20010.0])
    scores = torch.zeros(b, n, c)
    scores[0, 0, 90], scores[0, 1, 90], scores[0, 2, 0] = 0.9, 0.8, 0.7
    model = _Postprocess(score_threshold=0.1, iou_threshold=0.5, max_detections=5)
    assert model(boxes, scores)[0].item() == 2
    _assert_exports_like_eager(model, boxes, scores)
    shared = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [10.0, 0.0, 14.0, 4.0]]])
    scores64 = torch.tensor([[[0.5, 0.2], [0.5 + 1e-12, 0.2]]], dtype=torch.float64)
    _assert_exports_like_eager(_Postprocess(score_threshold=0.1, iou_threshold=0.5, max_detections=1),
                               shared, scores64)


def test_detection_postprocess_export_dynamic_boxes_with_top_k():
    model = _Postprocess(score_threshold=0.2, iou_threshold=0.5, max_detections=10, pre_nms_top_k=30)
    big, small = _detections(False, b=2, n=120, c=4), _detections(False, b=2, n=5, c=4, seed=3)
    _assert_exports_like_eager(model, *big, dynamic_shapes=({1: "n"}, {1: "n"}), runs=(big, small))


def test_roi_export_edge_boxes():
    x = torch.randn(2, 3, 16, 16)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0], [1, float("nan"), 2.0, 5.0, 5.0], [0, 0.0, 0.0, float("inf"), 8.0],
                         [1, -3.0, 2.0, 1e10, 6.0], [0, 2.0, 2.0, 7.5, 3.0]])
    # (not the adaptive sampling with the 1e10 box: its sample grid does not fit in memory, in onnxruntime)
    _assert_exports_like_eager(_Fn(lambda f, r: (ops.roi_align(f, r, 3, 0.5, 2),
                                                 ops.roi_align(f, r[:3], 2, 1.0, -1, True),
                                                 ops.roi_pool(f, r, 3, 0.5))), x, rois)
    with pytest.raises(Exception, match="float64"):
        torch.onnx.export(fnn.RoIPool(2, 1.0), (x.double(), rois[:1]), dynamo=True, verbose=False)


def test_fpn_and_spp_export_any_size_ratio():
    g = torch.Generator().manual_seed(2)
    for (H, W), (h, w) in (((32, 17), (14, 9)), ((16, 16), (14, 3)), ((9, 30), (5, 15))):
        lateral, top = torch.randn(1, 3, H, W, generator=g), torch.randn(1, 3, h, w, generator=g)
        _assert_exports_like_eager(_Fn(ops.fpn_topdown_add), lateral, top)
    x = torch.randn(1, 4, 11, 13, generator=g).half()
    _assert_exports_like_eager(_Fn(lambda t: (ops.spp_pool(t, (1, 3, 5), "avg"), ops.spp_pool(t, (2, 4)))), x)


def test_attention_export_half_with_a_float32_mask():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g).half() for _ in range(3))
    mask = torch.randn(6, 6, generator=g)
    mask[2] = torch.finfo(torch.float32).min  # a finite mask: the row attends (uniformly), no zeros
    mask[4] = float("-inf")  # every key masked: zeros
    model = _Fn(lambda q, k, v, m: ops.scaled_dot_product_attention(q, k, v, attn_mask=m))
    (got,) = _run(_session(model, (q, k, v, mask)), q, k, v, mask)
    want = model(q, k, v, mask)
    assert got.dtype == torch.float16 and torch.equal(want[:, :, 4], torch.zeros_like(want[:, :, 4]))
    assert want[:, :, 2].abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # (float16 outputs: one rounding apart at most)


def test_matrix_nms_exports():
    boxes, scores = _boxes(30, seed=6), torch.rand(30, generator=torch.Generator().manual_seed(6))
    scores[:5] = scores[5:10]  # ties: ordered by index in both
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(7))
    model = _Fn(lambda b, s, l: (ops.matrix_nms(b, s, l), ops.matrix_nms(b, s, kernel="linear")))
    session = _session(model, (boxes, scores, labels))
    for got, want in zip(_run(session, boxes, scores, labels), model(boxes, scores, labels)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # (exp / division in onnxruntime)
