"""Functional ops (custom ops ``torch.ops.fastnn.*`` with public, validated wrappers)."""
from .attention import attention_decode, flash_attention, scaled_dot_product_attention
from .boxes import batched_nms, box_iou, generalized_box_iou, nms
from .ssm import selective_scan_fn

__all__ = ["nms", "batched_nms", "box_iou", "generalized_box_iou", "scaled_dot_product_attention",
           "flash_attention", "attention_decode", "selective_scan_fn"]
