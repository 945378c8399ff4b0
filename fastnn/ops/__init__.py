"""Functional ops (custom ops ``torch.ops.fastnn.*`` with public, validated wrappers)."""
from .attention import attention_decode, flash_attention, scaled_dot_product_attention
from .boxes import batched_nms, box_iou, generalized_box_iou, nms
from .detect import decode_fcos, decode_yolo, detection_postprocess, heatmap_peaks, matrix_nms, soft_nms
from .fpn import fpn_topdown_add
from .multiscale import multiscale_detect
from .rnn import gru, gru_cell, lstm, lstm_cell
from .rnn_ln import layer_norm_lstm
from .roi import multi_scale_roi_align, roi_align, roi_pool
from .spp import spp_pool, sppf_pool
from .ssm import selective_scan_fn
from .ssm_conv import causal_conv1d_fn, causal_conv1d_update, selective_state_update

__all__ = ["nms", "batched_nms", "box_iou", "generalized_box_iou", "scaled_dot_product_attention",
           "flash_attention", "attention_decode", "selective_scan_fn", "causal_conv1d_fn", "causal_conv1d_update",
           "selective_state_update", "lstm", "gru", "lstm_cell", "gru_cell", "layer_norm_lstm",
           "heatmap_peaks", "decode_fcos", "decode_yolo", "detection_postprocess", "soft_nms", "matrix_nms",
           "roi_align", "roi_pool", "multi_scale_roi_align", "fpn_topdown_add", "multiscale_detect", "spp_pool",
           "sppf_pool"]
