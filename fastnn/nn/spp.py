"""Spatial pyramid pooling layers: SPP (He et al.) and YOLOv5's SPPF, on fastnn's fused pooling kernels."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import spp as spp_ops


class SPP(nn.Module):
    """Spatial pyramid pooling (He et al., 2014): (N, C, H, W) of any H, W -> (N, C * sum(l * l)).

    Equals ``torch.cat([torch.flatten(F.adaptive_{max,avg}_pool2d(x, l), 1) for l in levels], 1)``: level
    blocks in the order of ``levels``, channel-major inside a level (see :func:`fastnn.ops.spp_pool`).

    Args:
        levels: pyramid levels, positive ints (default (1, 2, 4): 21 bins per channel).
        mode: "max" (default) or "avg".
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> None:
        super().__init__()
        self.levels = tuple(spp_ops.check_levels(levels))
        self.mode = spp_ops.check_mode(mode)

    def output_size(self, channels: int) -> int:
        """Length of the output vector for `channels` input channels."""
        return channels * sum(lv * lv for lv in self.levels)

    def forward(self, x: Tensor) -> Tensor:
        return spp_ops.spp_pool(x, self.levels, self.mode)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"


class ConvBNSiLU(nn.Module):
    """YOLOv5's ``Conv``: Conv2d(c1, c2, k, s, padding k // 2, bias=False) + BatchNorm2d + SiLU, with its
    submodule names (``conv``, ``bn``, ``act``) so YOLOv5 state_dicts load."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SPPF(nn.Module):
    """YOLOv5's SPPF block: ``cv2(cat([x, m(x), m(m(x)), m(m(m(x)))], 1))`` with ``x = cv1(input)``.

    Same layout and parameter names as ``models.common.SPPF`` in YOLOv5: ``cv1`` = Conv(c1, c1 // 2, 1x1),
    ``cv2`` = Conv(4 * (c1 // 2), c2, 1x1), each conv (no bias) + BatchNorm2d + SiLU, and ``m`` =
    MaxPool2d(k, stride 1, padding k // 2), so a YOLOv5 SPPF state_dict loads and gives the same outputs. The
    pooling and the concatenation run as one fused kernel (:func:`fastnn.ops.sppf_pool`); ``m`` is kept for
    structure and repr only.

    Args:
        c1: input channels. c2: output channels. k: pool size, a positive odd int (default 5).
    """

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        self.k = spp_ops.check_kernel_size(k)
        c_ = c1 // 2
        self.cv1 = ConvBNSiLU(c1, c_, 1, 1)
        self.cv2 = ConvBNSiLU(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=self.k, stride=1, padding=self.k // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(spp_ops.sppf_pool(self.cv1(x), self.k))
