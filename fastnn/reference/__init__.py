"""Plain-PyTorch oracles for every fastnn op: readable, slow, float64-capable. Tests compare kernels here."""
from . import attention, boxes, detect, fpn, rnn, roi, spp, ssm

__all__ = ["attention", "boxes", "detect", "fpn", "rnn", "roi", "spp", "ssm"]
