"""ONNX export: what fastnn's ops become inside ``torch.onnx.export(..., dynamo=True)``.

torch's ONNX exporter knows aten and torchvision ops, not fastnn's custom ops. So while an export is tracing
(``torch.onnx.is_in_onnx_export()``), the public functions build their result from standard ONNX operators
instead of calling the custom op: RoiAlign (opset 16), MaxRoiPool and NonMaxSuppression through
``torch.onnx.ops.symbolic`` (detection_postprocess: NonMaxSuppression between dense top-k's); plain aten
compositions for the FPN top-down add, SPP / SPPF pooling, box IoU and heatmap peaks; torch's own ops for the LSTM / GRU layers and cells and for scaled_dot_product_attention,
whose parameters and semantics fastnn's share. The exporter translates the aten ops itself. A plain
``torch.onnx.export(model, args)`` of a model built from fastnn's layers then needs nothing else, as with
torch.nn's and torchvision's.

The graphs compute what the eager ops compute (tests/test_onnx.py runs them in onnxruntime against fastnn on
the same inputs); the differences are named where they are made: floating-point inputs are computed in float32
(float64 stays float64 where ONNX allows), and batched_nms separates categories by offsetting the boxes, as
torchvision's own batched_nms does for export.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def _exporter_flag() -> bool:
    # torch.onnx.is_in_onnx_export() reads this flag too, but under the exporter's strict (dynamo) capture, its
    # second try, that call reads False under dynamo; the flag itself reads as it is
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return bool(getattr(_flags, "_is_onnx_exporting", False))


def exporting() -> bool:
    """True while torch.onnx.export traces a model. Outside any tracing (plain eager calls) it returns False
    without asking torch.onnx, whose check costs ~3 us."""
    if not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._get_tracing_state() is not None):
        return False
    if not (_exporter_flag() or torch.onnx.is_in_onnx_export()):
        return False
    if torch._C._get_tracing_state() is not None:  # (the TorchScript-based exporter traces with torch.jit)
        raise RuntimeError("fastnn's ops export to ONNX through torch.onnx.export(..., dynamo=True), the default; "
                           "the TorchScript-based exporter (dynamo=False) cannot take them")
    return True


def _float32_or_64(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def roi_align(features: List[Tensor], rois: Tensor, levels: Optional[Tensor], scales: List[float], pooled_h: int,
              pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """fastnn.ops.roi_align / multi_scale_roi_align as ONNX RoiAlign nodes: one per level over every RoI, each
    RoI then taking its own level's result (ONNX has no per-RoI level, so a graph of L levels pools L times)."""
    dtype = features[0].dtype
    compute = _float32_or_64(features[0])
    coords = rois[:, 1:].to(compute)
    batch = rois[:, 0].to(torch.int64)
    attrs = dict(coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel", mode="avg",
                 output_height=pooled_h, output_width=pooled_w,
                 sampling_ratio=max(sampling_ratio, 0))  # ONNX's 0 is the adaptive count that <= 0 means here
    out = None
    for level, (feature, scale) in enumerate(zip(features, scales)):
        pooled = torch.onnx.ops.symbolic(
            "::RoiAlign", (feature.to(compute), coords, batch), dict(attrs, spatial_scale=float(scale)),
            dtype=compute, shape=(rois.shape[0], feature.shape[1], pooled_h, pooled_w), version=16)
        out = pooled if out is None else torch.where((levels == level)[:, None, None, None], pooled, out)
    return out.to(dtype)


def roi_pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int) -> Tensor:
    """fastnn.ops.roi_pool as an ONNX MaxRoiPool node (Fast R-CNN's rounding and bins, empty bins 0)."""
    compute = _float32_or_64(input)
    out = torch.onnx.ops.symbolic(
        "::MaxRoiPool", (input.to(compute), rois.to(compute)),
        dict(pooled_shape=[pooled_h, pooled_w], spatial_scale=float(spatial_scale)),
        dtype=compute, shape=(rois.shape[0], input.shape[1], pooled_h, pooled_w))
    return out.to(input.dtype)


def spp_pool(x: Tensor, levels: List[int], mode: str) -> Tensor:
    """fastnn.ops.spp_pool from slices: the exporter has no ONNX form for adaptive pooling where a level does
    not divide the map, so each bin (torch's adaptive bins, fastnn.reference.spp.adaptive_bins) is a slice
    reduced by ReduceMax / ReduceMean, in the eager layout (level blocks; channel-major inside a level)."""
    from ..reference.spp import adaptive_bins

    blocks = []
    for level in levels:
        rows, cols = adaptive_bins(x.shape[2], level), adaptive_bins(x.shape[3], level)
        bins = [x[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]
        pooled = [b.amax((2, 3)) if mode == "max" else b.mean((2, 3)) for b in bins]
        blocks.append(torch.stack(pooled, 2).flatten(1))
    return torch.cat(blocks, 1)


def _data_dependent_size(like: Tensor):
    """A size the tracer knows nothing about (an unbacked SymInt), for an output whose length only the data
    decides: NonMaxSuppression's. The nonzero that makes it is not an output of the graph, so the exporter
    drops it."""
    return torch.ones_like(like, dtype=torch.bool).nonzero().shape[0]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor] = None) -> Tensor:
    """fastnn.ops.nms (idxs None) or batched_nms as an ONNX NonMaxSuppression node, in float32.

    A box with a NaN coordinate or score is neither kept nor suppresses anything, as in the eager op: its
    coordinates become NaN (every IoU with it is NaN, never above the threshold) and it is dropped from the
    result. Categories are kept apart by offsetting each category's boxes past all others' (torchvision's
    batched_nms does the same for export)."""
    boxes = boxes.to(torch.float32)
    scores = scores.to(torch.float32)
    bad = torch.isnan(scores) | torch.isnan(boxes).any(1)
    if idxs is not None:
        # the span of the finite coordinates and 0 (an infinite box stays infinite, and no box count is empty)
        finite = torch.cat([torch.where(torch.isfinite(boxes), boxes, 0.0).flatten(), boxes.new_zeros(1)])
        span = finite.max() - finite.min() + 1
        boxes = boxes + (idxs.to(torch.float32) * span)[:, None]
    boxes = torch.where(bad[:, None], torch.full_like(boxes, float("nan")), boxes)
    scores = torch.where(bad, torch.full_like(scores, float("-inf")), scores)
    selected = torch.onnx.ops.symbolic(
        "::NonMaxSuppression",
        (boxes[None], scores[None, None], torch.tensor([boxes.shape[0]], dtype=torch.int64),
         torch.tensor([iou_threshold], dtype=torch.float32)),
        None, dtype=torch.int64, shape=(_data_dependent_size(scores), 3))
    keep = selected[:, 2]
    return keep[~bad[keep]]


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
    """fastnn.ops.scaled_dot_product_attention as torch's, which the exporter decomposes, with fastnn's one
    difference kept: a query row whose keys are all masked gives zeros (torch's softmax gives NaN)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:  # (torch's takes the query's dtype only)
        attn_mask = attn_mask.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                           scale=scale, enable_gqa=enable_gqa)
    if attn_mask is None:
        return out
    masked = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == float("-inf")
    dead = masked.all(-1, keepdim=True)
    return torch.where(dead, torch.zeros((), dtype=out.dtype), out)


def detection_postprocess(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                          max_detections: int, class_agnostic: bool, pre_nms_top_k: int):
    """fastnn.ops.detection_postprocess from an ONNX NonMaxSuppression node and dense top-k's.

    The candidates (score > threshold, no NaN) keep their scores in a (B, N * C) matrix indexed n * C + c, the
    rest -inf; a top-k per image applies pre_nms_top_k; NonMaxSuppression runs with ONNX's class dimension
    for boxes shared by the classes, else over the flattened (box, class) pairs (classes apart by a box offset
    unless class_agnostic); the survivors' scores go back into a dense matrix, whose top max_detections per
    image are the outputs. Equal scores rank by the lower flat index in ONNX's TopK, as in the eager op. IoU is
    computed in float32 (ONNX's NonMaxSuppression takes no other type)."""
    bsz, n, c = scores.shape
    compute = _float32_or_64(scores)
    shared = boxes.dim() == 3
    box_nan = torch.isnan(boxes).any(-1)
    valid = (scores.to(compute) > score_threshold) & ~(box_nan[:, :, None] if shared else box_nan)
    ranked = torch.where(valid, scores.to(torch.float32), float("-inf")).reshape(bsz, n * c)
    if 0 <= pre_nms_top_k < n * c:
        top = torch.topk(ranked, pre_nms_top_k, dim=1).indices
        kept = torch.zeros_like(ranked, dtype=torch.bool).scatter(1, top, True)
        ranked = torch.where(kept, ranked, float("-inf"))
    every = torch.tensor([n * c], dtype=torch.int64)
    nms_args = (torch.tensor([iou_threshold], dtype=torch.float32), torch.tensor([float("-inf")]))
    flat_boxes = (boxes[:, :, None, :].expand(bsz, n, c, 4) if shared else boxes).reshape(bsz, n * c, 4)
    if shared and not class_agnostic:  # ONNX's own classes: scores (B, C, N), results (image, class, box)
        selected = torch.onnx.ops.symbolic(
            "::NonMaxSuppression", (boxes.to(torch.float32), ranked.reshape(bsz, n, c).transpose(1, 2), every,
                                    *nms_args),
            None, dtype=torch.int64, shape=(_data_dependent_size(ranked), 3))
        flat = selected[:, 2] * c + selected[:, 1]
    else:
        nms_boxes = flat_boxes.to(torch.float32)
        if not class_agnostic:
            finite = torch.cat([torch.where(torch.isfinite(nms_boxes), nms_boxes, 0.0).flatten(),
                                nms_boxes.new_zeros(1)])
            classes = (torch.arange(n * c) % c).to(torch.float32)
            nms_boxes = nms_boxes + (classes * (finite.max() - finite.min() + 1))[None, :, None]
        selected = torch.onnx.ops.symbolic(
            "::NonMaxSuppression", (nms_boxes, ranked[:, None, :], every, *nms_args),
            None, dtype=torch.int64, shape=(_data_dependent_size(ranked), 3))
        flat = selected[:, 2]
    image = selected[:, 0]
    survived = ranked[image, flat] > float("-inf")  # (whatever NonMaxSuppression does with -inf scores)
    image, flat = image[survived], flat[survived]
    pad = max_detections  # columns of -inf, so that the top-k has max_detections columns to take
    dense = torch.full((bsz, n * c + pad), float("-inf"))
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
    heat = heatmap.to(_float32_or_64(heatmap))
    scores, order = torch.topk(peak_scores(heat, kernel).reshape(b, c * h * w), k, dim=1)
    return scores.to(heatmap.dtype), order // (h * w), (order % (h * w)) // w, order % w
