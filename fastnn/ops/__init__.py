"""Functional ops (custom ops ``torch.ops.fastnn.*`` with public, validated wrappers)."""
from .boxes import batched_nms, box_iou, generalized_box_iou, nms

__all__ = ["nms", "batched_nms", "box_iou", "generalized_box_iou"]
