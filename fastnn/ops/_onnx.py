"""ONNX export: what fastnn's ops become inside ``torch.onnx.export(..., dynamo=True)``.

torch's ONNX exporter knows aten and torchvision ops, not fastnn's custom ops. So while an export traces (the
exporter's flag, read only when a tracing mode is active), the public functions build their result from
standard ONNX operators instead of calling the custom op:
- RoiAlign (opset 16), MaxRoiPool and NonMaxSuppression through ``torch.onnx.ops.symbolic`` (roi_align,
  roi_pool, nms, batched_nms; detection_postprocess as NonMaxSuppression between TopK's);
- aten compositions the exporter translates: the FPN top-down add, SPP / SPPF pooling, box IoU, heatmap peaks;
- torch's own ops on the same parameters: the LSTM / GRU layers and cells, scaled_dot_product_attention.
A plain ``torch.onnx.export(model, args)`` of a model built from fastnn's layers then needs nothing else, as
with torch.nn's and torchvision's.

The graphs compute what the eager ops compute: tests/test_onnx.py runs them in onnxruntime against fastnn on
the same inputs, edge cases included (NaN and infinite boxes, ties, thresholds, float64 scores, dynamic
counts). What differs is said where it is made: NonMaxSuppression computes IoU in float32; roi_pool in
float64, NMS with a negative IoU threshold, an LSTM with proj_size and a PackedSequence are refused by name.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..reference.boxes import compute_dtype, threshold_below
from ..reference.fpn import nearest_source


# torch's exporter flag module, imported with fastnn (~50 ms): imported at the first call made while tracing, a
# global filled in under torch.compile made every first compile of a fastnn op compile twice
try:
    from torch.onnx._internal.exporter import _flags as _exporter_flags
except ImportError:
    _exporter_flags = None


def _exporter_flag() -> bool:
    # torch.onnx.is_in_onnx_export() reads this flag too, but under the exporter's strict (dynamo) capture, its
    # second try, that call reads False; the flag itself reads as it is
    return bool(getattr(_exporter_flags, "_is_onnx_exporting", False))


def exporting() -> bool:
    """True while torch.onnx.export traces a model. Outside any tracing (plain eager calls) it returns False
    without asking torch.onnx."""
    if torch._C._get_tracing_state() is not None:  # (the TorchScript-based exporter traces with torch.jit)
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("fastnn's ops export to ONNX through torch.onnx.export(..., dynamo=True), the "
                               "default; the TorchScript-based exporter (dynamo=False) cannot take them")
        return False
    if not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0):
        return False
    return _exporter_flag()


def roi_align(features: List[Tensor], rois: Tensor, levels: Optional[Tensor], scales: List[float], pooled_h: int,
              pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """fastnn.ops.roi_align / multi_scale_roi_align as ONNX RoiAlign nodes, one per level over that level's RoIs
    (selected by NonZero, written back by ScatterND, as torchvision's export does). A RoI with a non-finite
    corner on the map pools zeros, as in the eager op (onnxruntime refuses such a RoI, so it reaches RoiAlign as
    an empty box)."""
    dtype = features[0].dtype
    compute = compute_dtype(features[0].dtype)
    coords = rois[:, 1:].to(compute)
    batch = rois[:, 0].to(torch.int64)
    attrs = dict(coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel", mode="avg",
                 output_height=pooled_h, output_width=pooled_w,
                 sampling_ratio=max(sampling_ratio, 0))  # ONNX's 0 is the adaptive count that <= 0 means here

    def pool(feature, scale, coords, batch):
        bad = ~torch.isfinite(coords * scale).all(1)
        pooled = torch.onnx.ops.symbolic(
            "::RoiAlign", (feature.to(compute), torch.where(bad[:, None], 0.0, coords), batch),
            dict(attrs, spatial_scale=float(scale)),
            dtype=compute, shape=(coords.shape[0], feature.shape[1], pooled_h, pooled_w), version=16)
        return torch.where(bad[:, None, None, None], 0.0, pooled)

    if levels is None:
        return pool(features[0], scales[0], coords, batch).to(dtype)
    out = torch.zeros((rois.shape[0], features[0].shape[1], pooled_h, pooled_w), dtype=compute)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        chosen = torch.nonzero(levels == level).squeeze(1)
        out = out.index_put((chosen,), pool(feature, scale, coords[chosen], batch[chosen]))
    return out.to(dtype)


def roi_pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int) -> Tensor:
    """fastnn.ops.roi_pool as an ONNX MaxRoiPool node (Fast R-CNN's rounding and bins, empty bins 0). The corners
    are scaled here, in the kernels' dtype, and treated as the kernels treat them: a non-finite one pools zeros,
    finite ones saturate at +-2^29 (onnxruntime's integer cast of a larger one is undefined)."""
    if input.dtype == torch.float64:
        raise RuntimeError("ONNX export of roi_pool in float64 is not supported (onnxruntime has no float64 "
                           "MaxRoiPool); convert the features to float32 first")
    corners = rois[:, 1:].to(torch.float32) * torch.tensor(spatial_scale, dtype=torch.float32)
    bad = ~torch.isfinite(corners).all(1)
    corners = torch.where(bad[:, None], 0.0, corners).clamp(-2.0 ** 29, 2.0 ** 29)
    scaled_rois = torch.cat([rois[:, :1].to(torch.float32), corners], 1)
    out = torch.onnx.ops.symbolic(
        "::MaxRoiPool", (input.to(torch.float32), scaled_rois),
        dict(pooled_shape=[pooled_h, pooled_w], spatial_scale=1.0),
        dtype=torch.float32, shape=(rois.shape[0], input.shape[1], pooled_h, pooled_w))
    return torch.where(bad[:, None, None, None], 0.0, out).to(input.dtype)


def spp_pool(x: Tensor, levels: List[int], mode: str) -> Tensor:
    """fastnn.ops.spp_pool from slices: the exporter has no ONNX form for adaptive pooling where a level does
    not divide the map, so each bin (torch's adaptive bins, fastnn.reference.spp.adaptive_bins) is a slice
    reduced by ReduceMax / ReduceMean, in the eager layout (level blocks; channel-major inside a level);
    float16 / bfloat16 are averaged in float32, as the kernels do."""
    from ..reference.spp import adaptive_bins

    compute = x.to(compute_dtype(x.dtype))
    blocks = []
    for level in levels:
        rows, cols = adaptive_bins(x.shape[2], level), adaptive_bins(x.shape[3], level)
        bins = [compute[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]
        pooled = [b.amax((2, 3)) if mode == "max" else b.mean((2, 3)) for b in bins]
        blocks.append(torch.stack(pooled, 2).flatten(1))
    return torch.cat(blocks, 1).to(x.dtype)


def fpn_topdown_add(lateral: Tensor, top: Tensor) -> Tensor:
    """fastnn.ops.fpn_topdown_add by index_select with torch's nearest rule (fastnn.reference.fpn.nearest_source):
    the exporter's Resize picks other rows for some size ratios."""
    up = top
    for dim in (2, 3):
        up = up.index_select(dim, nearest_source(top.shape[dim], lateral.shape[dim]))
    compute = compute_dtype(lateral.dtype)
    return (lateral.to(compute) + up.to(compute)).to(lateral.dtype)


def _data_dependent_size(like: Tensor):
    """A size the tracer knows nothing about (an unbacked SymInt), for an output whose length only the data
    decides: NonMaxSuppression's. The nonzero that makes it is not an output of the graph, so the exporter
    drops it."""
    return torch.ones_like(like, dtype=torch.bool).nonzero().shape[0]


def _iou_threshold(iou_threshold: float) -> Tensor:
    """The eager ops' ``IoU > iou_threshold`` for NonMaxSuppression's float32 IoU and its [0, 1] range."""
    if iou_threshold < 0:
        raise RuntimeError(f"ONNX export of NMS needs iou_threshold >= 0 (ONNX's NonMaxSuppression takes [0, 1] "
                           f"and never suppresses disjoint boxes), got {iou_threshold}")
    # the largest float32 not above the threshold (the eager ops compare with the double); above 1 nothing is
    # suppressed, as at 1
    return torch.tensor([min(threshold_below(iou_threshold, torch.float32), 1.0)], dtype=torch.float32)


def _rank_scores(values: Tensor, active: Tensor) -> Tensor:
    """float32 scores for NonMaxSuppression that order the active entries of each row as the eager ops do:
    count - rank in the row's descending order of `values` (any float dtype; no NaN), equal values by index
    (ONNX TopK's rule); -inf for the inactive. Exact below 2^24 entries a row."""
    count = values.shape[-1]
    order = torch.topk(values, count, dim=-1).indices
    positions = torch.arange(count).expand_as(order)
    rank = torch.empty_like(order).scatter(-1, order, positions)
    return torch.where(active, (count - rank).to(torch.float32), float("-inf"))


def _non_max_suppression(boxes: Tensor, scores: Tensor, iou_threshold: Tensor) -> Tensor:
    """ONNX NonMaxSuppression over (batches, boxes, 4) and (batches, classes, boxes): (selected, 3) rows of
    (batch, class, box); -inf scores never selected."""
    return torch.onnx.ops.symbolic(
        "::NonMaxSuppression", (boxes, scores, torch.tensor([scores.shape[-1]], dtype=torch.int64), iou_threshold,
                                torch.tensor([float("-inf")])),
        None, dtype=torch.int64, shape=(_data_dependent_size(scores), 3))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor] = None) -> Tensor:
    """fastnn.ops.nms (idxs None) or batched_nms as an ONNX NonMaxSuppression node.

    Boxes are ranked in the scores' own precision (float64 included) and NonMaxSuppression gets their ranks; a
    box with a NaN coordinate or score is neither kept nor suppresses anything, as in the eager op. Categories
    are ONNX's class dimension (one row of scores per distinct idxs value), so no box offsets are involved.
    IoU is computed in float32."""
    scores = scores.to(compute_dtype(scores.dtype))
    bad = torch.isnan(scores) | torch.isnan(boxes).any(1)
    rank = _rank_scores(torch.where(bad, float("-inf"), scores), ~bad)
    boxes = torch.where(bad[:, None], float("nan"), boxes.to(torch.float32))
    if idxs is None:
        table = rank[None]
    else:
        categories, category = torch.unique(idxs, return_inverse=True)
        table = torch.full((categories.shape[0], rank.shape[0]), float("-inf"))
        table = table.scatter(0, category[None], rank[None])
    selected = _non_max_suppression(boxes[None], table[None], _iou_threshold(iou_threshold))
    category, keep = selected[:, 1], selected[:, 2]
    keep = keep[table[category, keep] > float("-inf")]
    return keep[torch.argsort(rank[keep], descending=True)]  # by score across the categories, as eager


def rnn(module, input, hx):
    """fastnn.nn.LSTM / GRU as torch.lstm / torch.gru, which the exporter turns into ONNX LSTM / GRU nodes: the
    modules hold torch.nn's parameters in its flat order, so torch's own op computes what the kernels compute.
    Padded (batched or unbatched) input; a PackedSequence has no ONNX form here."""
    if isinstance(input, torch.nn.utils.rnn.PackedSequence):
        raise RuntimeError(f"ONNX export of fastnn.nn.{module.mode} takes a padded input, not a PackedSequence")
    if module.proj_size > 0:  # (torch.nn.LSTM's export produces an invalid graph there)
        raise RuntimeError("ONNX export of fastnn.nn.LSTM with proj_size > 0 is not supported: ONNX's LSTM operator "
                           "has no projection")
    lstm = module.mode == "LSTM"
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if module.batch_first else 1)
    states = module.num_layers * (2 if module.bidirectional else 1)
    batch = input.shape[0 if module.batch_first else 1]
    out_size = module.proj_size if module.proj_size > 0 else module.hidden_size
    if hx is None:
        h0 = input.new_zeros(states, batch, out_size)
        hx = (h0, input.new_zeros(states, batch, module.hidden_size)) if lstm else h0
    elif not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    args = (module._flat_weights, module.bias, module.num_layers, module.dropout, module.training,
            module.bidirectional, module.batch_first)
    if lstm:
        output, h_n, c_n = torch.lstm(input, hx, *args)
        state = (h_n, c_n) if batched else (h_n.squeeze(1), c_n.squeeze(1))
    else:
        output, h_n = torch.gru(input, hx, *args)
        state = h_n if batched else h_n.squeeze(1)
    if not batched:
        output = output.squeeze(0 if module.batch_first else 1)
    return output, state


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, scale: float, enable_gqa: bool) -> Tensor:
    """fastnn.ops.scaled_dot_product_attention as torch's, which the exporter decomposes: float16 / bfloat16 in
    float32 as the kernels compute them, and fastnn's one difference from torch kept: a query row whose keys
    are all masked (False, or -inf in a float mask) gives zeros, where torch's softmax gives NaN."""
    compute = compute_dtype(query.dtype)
    q, k, v = (t.to(compute) for t in (query, key, value))
    dead = None
    if attn_mask is not None:
        masked = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == float("-inf")
        dead = masked.all(-1, keepdim=True)
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(compute)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                           enable_gqa=enable_gqa)
    if dead is not None:
        out = torch.where(dead, 0.0, out)
    return out.to(query.dtype)


def detection_postprocess(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                          max_detections: int, class_agnostic: bool, pre_nms_top_k: int):
    """fastnn.ops.detection_postprocess from ONNX NonMaxSuppression and TopK nodes.

    The candidates (score > threshold, no NaN) keep their scores in a (B, N * C) matrix indexed n * C + c, the
    rest -inf, and are ranked per image in the scores' precision (equal scores by the lower flat index: ONNX
    TopK's rule and the eager op's); the first pre_nms_top_k ranks stay in. NonMaxSuppression gets the ranks,
    per class with ONNX's class dimension (boxes shared by the classes) or (image, class) as its batch
    dimension (a box per class), or over all (box, class) pairs of an image when class_agnostic. The survivors
    go back into a dense matrix, whose top max_detections per image are the outputs. IoU is computed in
    float32 (ONNX's NonMaxSuppression takes no other type)."""
    bsz, n, c = scores.shape
    compute = scores.to(compute_dtype(scores.dtype))
    shared = boxes.dim() == 3
    box_nan = torch.isnan(boxes).any(-1)
    valid = (compute > score_threshold) & ~(box_nan[:, :, None] if shared else box_nan)
    ranked = torch.where(valid, compute, float("-inf")).reshape(bsz, n * c)
    rank = _rank_scores(ranked, valid.reshape(bsz, n * c))
    if pre_nms_top_k >= 0:  # (rank n * c - r for the r-th best)
        rank = torch.where(rank > n * c - pre_nms_top_k, rank, float("-inf"))
    threshold = _iou_threshold(iou_threshold)
    flat_boxes = (boxes[:, :, None, :].expand(bsz, n, c, 4) if shared else boxes).reshape(bsz, n * c, 4)
    if class_agnostic:  # every (box, class) pair of an image in one race
        selected = _non_max_suppression(flat_boxes.to(torch.float32), rank[:, None, :], threshold)
        image, flat = selected[:, 0], selected[:, 2]
    elif shared:  # ONNX's classes: scores (B, C, N), results (image, class, box)
        selected = _non_max_suppression(boxes.to(torch.float32), rank.reshape(bsz, n, c).transpose(1, 2), threshold)
        image, flat = selected[:, 0], selected[:, 2] * c + selected[:, 1]
    else:  # a box per class: (image, class) as the batch, results (image * C + class, 0, box)
        per_class = boxes.to(torch.float32).permute(0, 2, 1, 3).reshape(bsz * c, n, 4)
        ranks = rank.reshape(bsz, n, c).permute(0, 2, 1).reshape(bsz * c, 1, n)
        selected = _non_max_suppression(per_class, ranks, threshold)
        image, flat = selected[:, 0] // c, selected[:, 2] * c + selected[:, 0] % c
    survived = rank[image, flat] > float("-inf")  # (whatever NonMaxSuppression does with -inf scores)
    image, flat = image[survived], flat[survived]
    pad = max_detections  # columns of -inf, so that the top-k has max_detections columns to take
    dense = torch.full((bsz, n * c + pad), float("-inf"), dtype=ranked.dtype)
    dense = dense.index_put((image, flat), ranked[image, flat])
    best, index = torch.topk(dense, max_detections, dim=1)
    filled = best > float("-inf")
    index = torch.where(filled, index, 0)
    out_boxes = torch.gather(flat_boxes, 1, index[:, :, None].expand(bsz, max_detections, 4))
    out_scores = torch.gather(scores.reshape(bsz, n * c), 1, index)
    return (filled.sum(1),
            torch.where(filled[:, :, None], out_boxes, torch.zeros((), dtype=boxes.dtype)),
            torch.where(filled, out_scores, torch.zeros((), dtype=scores.dtype)),
            torch.where(filled, index % c, -1))


def peak_scores(heat: Tensor, kernel: int) -> Tensor:
    """fastnn.reference.detect.heatmap_peak_scores without counting on how a runtime's MaxPool treats NaN
    (ONNX does not say): a NaN's window is found by a pool of its own and scores 0, as torch's max_pool2d
    makes it."""
    nan = torch.isnan(heat)
    pool = lambda t: torch.nn.functional.max_pool2d(t, kernel, stride=1, padding=kernel // 2)  # noqa: E731
    near_nan = pool(nan.to(heat.dtype)) > 0
    peak = (pool(torch.where(nan, float("-inf"), heat)) == heat) & ~near_nan
    return torch.where(peak, heat, 0.0)


def heatmap_peaks(heatmap: Tensor, k: int, kernel: int):
    """fastnn.ops.heatmap_peaks as MaxPool + TopK (whose equal values come lower index first, as the eager op
    orders them)."""
    b, c, h, w = heatmap.shape
    heat = heatmap.to(compute_dtype(heatmap.dtype))
    scores, order = torch.topk(peak_scores(heat, kernel).reshape(b, c * h * w), k, dim=1)
    return scores.to(heatmap.dtype), order // (h * w), (order % (h * w)) // w, order % w
