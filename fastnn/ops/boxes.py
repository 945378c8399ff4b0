"""Box ops, drop-in for torchvision.ops: nms, batched_nms, box_iou, generalized_box_iou.

Custom ops (``torch.ops.fastnn.*``): nms, batched_nms, pairwise_box_iou (+ its backward). Kernels:
  CPU   C++ (csrc/cpu): one sort, grid-bucketed greedy sweep with early exit, O(N) memory; fused IoU.
  CUDA  CUDA C++ (csrc/cuda) or Triton (kernels/boxes.py): suppression bitmask over 64-box tiles and the
        keep-sweep on the GPU, over a layout where every class is its own 64-aligned segment (built by
        _nms_layout here for Triton, in one C++ call in csrc/cuda/nms_cuda.cu for CUDA C++, the default:
        faster at every size measured, bench/NOTES.md).
Coordinates are (x1, y1, x2, y2). IoU is computed in float32 for float16/bfloat16/float32 boxes and in
float64 for float64 boxes, with torchvision's formula, so decisions match torchvision bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import _C, pick
from ..reference import boxes as ref
from . import _checks, _direct, _onnx

# Dispatch preference per device (first usable wins; use_backend overrides). On an H100 the CUDA C++ NMS
# beats the Triton one at 1k-100k boxes (0.95 vs 2.07 ms at 10k, bench/NOTES.md); IoU has Triton only.
_NMS_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
_IOU_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_BLOCK = 64


def _triton_boxes():
    from fastnn.kernels import boxes as kb  # imported on first use: importing triton costs ~1 s

    return kb


# ---------------------------------------------------------------- NMS on the GPU (Triton or CUDA C++)

def _nms_layout(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor]):
    """Sorted, class-segmented, 64-padded layout of the Triton NMS kernels (nms_cuda.cu builds the same
    one in C++ for the CUDA kernels).

    Returns a dict: boxes (P, 4) in compute dtype, valid_words (B,), block_segment (B,), seg_first_block,
    seg_num_blocks, seg_mask_offset (S,), max_blocks, total_words, order (rank -> box index) and
    pos_rank ((P,) rank held at each position, -1 for padding; None when positions are ranks).
    Syncs with the host only for grouped input (to size the class segments).
    """
    n = boxes.shape[0]
    dev = boxes.device
    ct = ref.compute_dtype(boxes.dtype)
    order = torch.sort(scores, descending=True, stable=True).indices
    i64 = dict(dtype=torch.long, device=dev)
    if idxs is None:
        nb = -(-n // _BLOCK)
        total_blocks, max_blocks, total_words = nb, nb, _BLOCK * nb * (nb + 1) // 2
        seg_first_block = torch.zeros(1, **i64)
        seg_num_blocks = torch.full((1,), nb, **i64)
        seg_mask_offset = torch.zeros(1, **i64)
        block_segment = torch.zeros(nb, **i64)
        pos_box = torch.full((nb * _BLOCK,), -1, **i64)
        pos_box[:n] = order
        pos_rank = None
    else:
        cls_sorted, perm = torch.sort(idxs[order], stable=True)  # k -> rank perm[k], grouped by class
        is_start = torch.ones(n, dtype=torch.bool, device=dev)
        is_start[1:] = cls_sorted[1:] != cls_sorted[:-1]
        seg_id = torch.cumsum(is_start, 0) - 1
        starts = torch.nonzero(is_start).flatten()
        counts = torch.diff(starts, append=torch.full((1,), n, **i64))
        seg_num_blocks = (counts + _BLOCK - 1) // _BLOCK
        seg_first_block = torch.cumsum(seg_num_blocks, 0) - seg_num_blocks
        words = _BLOCK * seg_num_blocks * (seg_num_blocks + 1) // 2
        seg_mask_offset = torch.cumsum(words, 0) - words
        total_blocks, max_blocks, total_words = (
            torch.stack([seg_num_blocks.sum(), seg_num_blocks.max(), words.sum()]).tolist())
        block_segment = torch.repeat_interleave(torch.arange(starts.numel(), **i64), seg_num_blocks,
                                                output_size=total_blocks)
        pos = seg_first_block[seg_id] * _BLOCK + (torch.arange(n, **i64) - starts[seg_id])
        pos_box = torch.full((total_blocks * _BLOCK,), -1, **i64)
        pos_box[pos] = order[perm]
        pos_rank = torch.full((total_blocks * _BLOCK,), -1, **i64)
        pos_rank[pos] = perm
    at = pos_box.clamp(min=0)
    laid = boxes[at].to(ct)
    valid = (pos_box >= 0) & ~torch.isnan(laid).any(1) & ~torch.isnan(scores[at])
    laid = torch.where(valid[:, None], laid, torch.zeros((), dtype=ct, device=dev)).contiguous()
    shifts = torch.arange(_BLOCK, **i64)
    valid_words = (valid.view(total_blocks, _BLOCK).long() << shifts).sum(1)
    return dict(boxes=laid, valid_words=valid_words, block_segment=block_segment,
                seg_first_block=seg_first_block, seg_num_blocks=seg_num_blocks, seg_mask_offset=seg_mask_offset,
                max_blocks=max_blocks, total_words=total_words, order=order, pos_rank=pos_rank, n=n)


def _nms_triton(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor], iou_threshold: float) -> Tensor:
    """NMS through the Triton bitmask and sweep kernels over the layout above."""
    kb = _triton_boxes()
    lay = _nms_layout(boxes, scores, idxs)
    thr = ref.threshold_below(iou_threshold, lay["boxes"].dtype)
    tables = (lay["seg_first_block"], lay["seg_num_blocks"], lay["seg_mask_offset"])
    mask = kb.nms_mask(lay["boxes"], lay["block_segment"], *tables, lay["max_blocks"], lay["total_words"], thr)
    keep_words = kb.nms_sweep(mask, lay["valid_words"], *tables, lay["max_blocks"])
    shifts = torch.arange(_BLOCK, device=boxes.device)
    keep_pos = ((keep_words[:, None] >> shifts) & 1).bool().flatten()
    n = lay["n"]
    if lay["pos_rank"] is None:  # positions are ranks
        return lay["order"][torch.nonzero(keep_pos[:n]).flatten()]
    pos_rank = lay["pos_rank"]
    keep_rank = torch.zeros(n + 1, dtype=torch.bool, device=boxes.device)
    keep_rank.scatter_(0, torch.where(pos_rank >= 0, pos_rank, n), keep_pos)
    return lay["order"][torch.nonzero(keep_rank[:n]).flatten()]


def _nms_cpp(boxes, scores, idxs, iou_threshold):
    return _C.nms_cpu(boxes, scores, idxs, iou_threshold)


def _nms_reference(boxes, scores, idxs, iou_threshold):
    if idxs is None:
        return ref.nms(boxes, scores, iou_threshold)
    return ref.batched_nms(boxes, scores, idxs, iou_threshold)


_NMS_IMPLS = {
    "reference": _nms_reference,
    "cpp": _nms_cpp,
    # the whole CUDA C++ path is one call (csrc/cuda/nms_cuda.cu): a few launches, no Python glue
    "cuda": lambda b, s, i, t: _C.nms_cuda(b, s, i, t),
    "triton": _nms_triton,
}


def _run_nms(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor], iou_threshold: float) -> Tensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    impl = pick("nms", boxes.device, _NMS_IMPLS, _NMS_PREFERENCE.get(boxes.device.type, ()))
    return impl(boxes.contiguous(), scores.contiguous(), None if idxs is None else idxs.contiguous(), iou_threshold)


def _index_output_like(boxes: Tensor) -> Tensor:
    ctx = torch.library.get_ctx()
    new_size = getattr(ctx, "new_dynamic_size", None) or ctx.create_unbacked_symint  # torch < 2.6 name
    return boxes.new_empty((new_size(),), dtype=torch.long)


@torch.library.custom_op("fastnn::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _run_nms(boxes, scores, None, iou_threshold)


@_nms_op.register_fake
def _nms_fake(boxes, scores, iou_threshold):
    return _index_output_like(boxes)


@torch.library.custom_op("fastnn::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return _run_nms(boxes, scores, idxs.long(), iou_threshold)


@_batched_nms_op.register_fake
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    return _index_output_like(boxes)


def _check_nms_inputs(boxes, scores, iou_threshold) -> float:
    _checks.tensor(boxes, "boxes", dtypes=_checks.FLOAT_DTYPES, shape=(None, 4))
    _checks.tensor(scores, "scores", dtypes=_checks.FLOAT_DTYPES, shape=(boxes.shape[0],))
    _checks.same_device("boxes", boxes, scores=scores)
    return _checks.real_number(iou_threshold, "iou_threshold")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, a drop-in for ``torchvision.ops.nms``.

    Visits boxes by decreasing score and drops every box whose IoU with an already kept box is greater
    than ``iou_threshold``.

    Args:
        boxes: (N, 4) boxes as (x1, y1, x2, y2) with 0 <= x1 < x2 and 0 <= y1 < y2; float16, bfloat16,
            float32 or float64, on the CPU or a CUDA device. IoU is computed in float32 (float64 for
            float64 boxes).
        scores: (N,) scores, any of those float dtypes, on the same device.
        iou_threshold: discard boxes with IoU > iou_threshold (a real number, not NaN).

    Returns:
        int64 tensor with the indices of the kept boxes, by decreasing score. Equal scores are ordered
        by index (torchvision leaves their order unspecified).

    Boxes with a NaN coordinate or a NaN score are never kept and suppress nothing. N = 0 gives an empty
    result. On CUDA (default CUDA C++ kernels) the only host synchronisation is reading the number of
    kept boxes.
    """
    thr = _check_nms_inputs(boxes, scores, iou_threshold)
    if _onnx.exporting():
        return _onnx.nms(boxes.detach(), scores.detach(), thr)
    return torch.ops.fastnn.nms(boxes.detach(), scores.detach(), thr)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS done independently per category, a drop-in for ``torchvision.ops.batched_nms``.

    Boxes of different categories (``idxs``) never suppress each other, at every size; there is no
    per-category Python loop: each category is a segment processed in parallel by the kernels.

    Args:
        boxes: (N, 4) boxes (x1, y1, x2, y2), as in :func:`nms`.
        scores: (N,) scores.
        idxs: (N,) integer category of each box.
        iou_threshold: discard boxes with IoU > iou_threshold.

    Returns:
        int64 indices of the kept boxes by decreasing score (ties by index). NaN boxes or scores are
        never kept. On CUDA (default CUDA C++ kernels) three small host reads happen: the number of
        categories, their sizes and the kept count.
    """
    thr = _check_nms_inputs(boxes, scores, iou_threshold)
    _checks.tensor(idxs, "idxs", integer=True, shape=(boxes.shape[0],))
    _checks.same_device("boxes", boxes, idxs=idxs)
    if _onnx.exporting():
        return _onnx.nms(boxes.detach(), scores.detach(), thr, idxs)
    return torch.ops.fastnn.batched_nms(boxes.detach(), scores.detach(), idxs, thr)


# ---------------------------------------------------------------- pairwise IoU / GIoU

def _iou_triton(boxes1, boxes2, generalized):
    return _triton_boxes().pairwise_iou(boxes1.contiguous(), boxes2.contiguous(), generalized)


# Measured here, at import: inside an op body autograd is off. (The kernels follow the running torch so
# gradients at touching boxes equal torchvision's.)
_CLAMP_AT_ZERO = ref.clamp_grad_at_zero()


def _iou_backward_triton(grad, boxes1, boxes2, generalized):
    g1, g2 = _triton_boxes().pairwise_iou_backward(grad.contiguous(), boxes1.contiguous(), boxes2.contiguous(),
                                                   generalized, _CLAMP_AT_ZERO)
    return g1, g2


def _iou_backward_reference(grad, boxes1, boxes2, generalized):
    # torch.func.vjp works inside the op body, where the autograd dispatch keys are already excluded.
    _, vjp = torch.func.vjp(lambda a, b: ref.pairwise_box_iou(a, b, generalized), boxes1, boxes2)
    return vjp(grad)


_IOU_IMPLS = {
    "reference": ref.pairwise_box_iou,
    "cpp": lambda a, b, g: _C.pairwise_box_iou_cpu(a, b, g),
    "triton": _iou_triton,
}
_IOU_BACKWARD_IMPLS = {
    "reference": _iou_backward_reference,
    "cpp": lambda grad, a, b, g: tuple(_C.pairwise_box_iou_backward_cpu(grad, a, b, g, _CLAMP_AT_ZERO)),
    "triton": _iou_backward_triton,
}


def _check_box_rows(boxes1: Tensor, boxes2: Tensor) -> None:
    """The ops' own check (their kernels read rows of 4 coordinates): a direct call of the op skips _pairwise's."""
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() != 2 or b.shape[1] != 4:
            raise _checks.SizeMismatchError(f"{name} must be (N, 4); got {tuple(b.shape)}")


@torch.library.custom_op("fastnn::pairwise_box_iou", mutates_args=())
def _pairwise_box_iou_op(boxes1: Tensor, boxes2: Tensor, generalized: bool) -> Tensor:
    _check_box_rows(boxes1, boxes2)
    impl = pick("box_iou", boxes1.device, _IOU_IMPLS, _IOU_PREFERENCE.get(boxes1.device.type, ()))
    ct = ref.compute_dtype(boxes1.dtype)
    return impl(boxes1.to(ct).contiguous(), boxes2.to(ct).contiguous(), generalized)


@_pairwise_box_iou_op.register_fake
def _pairwise_box_iou_fake(boxes1, boxes2, generalized):
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]), dtype=ref.compute_dtype(boxes1.dtype))


@torch.library.custom_op("fastnn::pairwise_box_iou_backward", mutates_args=())
def _pairwise_box_iou_backward_op(grad: Tensor, boxes1: Tensor, boxes2: Tensor,
                                  generalized: bool) -> tuple[Tensor, Tensor]:
    _check_box_rows(boxes1, boxes2)
    if tuple(grad.shape) != (boxes1.shape[0], boxes2.shape[0]):
        raise _checks.SizeMismatchError(f"grad must be ({boxes1.shape[0]}, {boxes2.shape[0]}), one value per pair of "
                                        f"boxes; got {tuple(grad.shape)}")
    impl = pick("box_iou_backward", boxes1.device, _IOU_BACKWARD_IMPLS,
                _IOU_PREFERENCE.get(boxes1.device.type, ()))
    ct = ref.compute_dtype(boxes1.dtype)
    g1, g2 = impl(grad.to(ct).contiguous(), boxes1.to(ct).contiguous(), boxes2.to(ct).contiguous(), generalized)
    return g1.to(boxes1.dtype), g2.to(boxes2.dtype)


@_pairwise_box_iou_backward_op.register_fake
def _pairwise_box_iou_backward_fake(grad, boxes1, boxes2, generalized):
    return boxes1.new_empty(boxes1.shape), boxes2.new_empty(boxes2.shape)  # dense, as the kernels write them


def _iou_setup_context(ctx, inputs, output):
    boxes1, boxes2, generalized = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.generalized = generalized


def _iou_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    g1, g2 = _direct.run_op(torch.ops.fastnn.pairwise_box_iou_backward, grad, boxes1, boxes2, ctx.generalized)
    return g1, g2, None


def _iou_jvp(ctx, *tangents):
    """Forward mode through the reference, whose torch ops are torchvision's (which has it)."""
    boxes1, boxes2 = ctx.saved_tensors
    (tangent,) = _direct.linearised(lambda b1, b2: (ref.pairwise_box_iou(b1, b2, ctx.generalized),),
                                    [boxes1, boxes2], tangents[:2])
    return tangent


def _iou_reference_grads(generalized: bool):
    """The reference's (d boxes1, d boxes2) as a function of (grad, boxes1, boxes2): torchvision's torch ops,
    differentiable again."""
    def first_order(grad, boxes1, boxes2):
        _, pullback = torch.func.vjp(lambda b1, b2: ref.pairwise_box_iou(b1, b2, generalized), boxes1, boxes2)
        return list(pullback(grad.to(ref.compute_dtype(boxes1.dtype))))
    return first_order


def _iou_backward_setup_context(ctx, inputs, output):
    grad, boxes1, boxes2, generalized = inputs
    ctx.save_for_backward(grad, boxes1, boxes2)
    ctx.generalized = generalized


def _iou_backward_backward(ctx, grad_g1, grad_g2):
    """pairwise_box_iou_backward's own backward (second derivatives, as torchvision's box ops have), through the
    reference; the first derivative stays the kernel's."""
    first_order = _iou_reference_grads(ctx.generalized)
    return (*_direct.second_order(first_order, list(ctx.saved_tensors), (grad_g1, grad_g2)), None)


def _iou_backward_jvp(ctx, *tangents):
    """Its forward mode (forward over reverse: torch.func.hessian), through the reference."""
    first_order = _iou_reference_grads(ctx.generalized)
    return tuple(_direct.linearised(first_order, list(ctx.saved_tensors), tangents[:3]))


_direct.register_autograd(_pairwise_box_iou_op, _iou_backward, _iou_setup_context, _iou_jvp)
_direct.register_autograd(_pairwise_box_iou_backward_op, _iou_backward_backward, _iou_backward_setup_context,
                          _iou_backward_jvp)


def _pairwise(boxes1: Tensor, boxes2: Tensor, generalized: bool) -> Tensor:
    _checks.tensor(boxes1, "boxes1", dtypes=_checks.FLOAT_DTYPES, shape=(None, 4))
    _checks.tensor(boxes2, "boxes2", dtypes=_checks.FLOAT_DTYPES, shape=(None, 4))
    _checks.same_device("boxes1", boxes1, boxes2=boxes2)
    common = torch.promote_types(boxes1.dtype, boxes2.dtype)
    if _onnx.exporting():  # (its aten composition exports as it is)
        return ref.pairwise_box_iou(boxes1.to(common), boxes2.to(common), generalized)
    return _direct.run_op(torch.ops.fastnn.pairwise_box_iou, boxes1.to(common), boxes2.to(common), generalized)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection-over-union, a drop-in for ``torchvision.ops.box_iou``.

    Args:
        boxes1: (N, 4) boxes (x1, y1, x2, y2), float16/bfloat16/float32/float64, CPU or CUDA.
        boxes2: (M, 4) boxes on the same device (dtypes are promoted together).

    Returns:
        (N, M) IoU, float32 (float64 when either input is float64): the dtype torchvision returns.
        Differentiable with respect to both inputs (fused backward kernel, torch's gradient conventions).
    """
    return _pairwise(boxes1, boxes2, False)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU, a drop-in for ``torchvision.ops.generalized_box_iou``.

    Same arguments, dtypes and autograd support as :func:`box_iou`. Degenerate boxes (x2 < x1 or
    y2 < y1) give the same values as torchvision, NaN included.
    """
    return _pairwise(boxes1, boxes2, True)
