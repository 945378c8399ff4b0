"""Plain-PyTorch oracles for spatial pyramid pooling: SPP (He et al.) and YOLOv5's SPPF pooling.

spp_pool: for each level l, flatten(adaptive_{max,avg}_pool2d(x, l), 1), concatenated along dim 1 in the
order of `levels`, so the output is (N, C * sum(l * l)) with, inside a level's block, index c * l * l + i * l + j
for channel c and bin (i, j).

sppf_pool: YOLOv5 SPPF's pooling: y1 = m(x), y2 = m(y1), y3 = m(y2) with m = max_pool2d(k, stride 1,
padding k // 2), returning cat([x, y1, y2, y3], 1), (N, 4C, H, W).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def spp_pool(x: Tensor, levels: Sequence[int], mode: str) -> Tensor:
    """(N, C, H, W) -> (N, C * sum(l * l for l in levels)) by adaptive max or average pools + flatten + cat."""
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([torch.flatten(pool(x, int(l)), 1) for l in levels], 1)


def sppf_pool(x: Tensor, k: int) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H, W): cat([x, y1, y2, y3], 1) of three chained k x k stride-1 max pools."""
    y1 = F.max_pool2d(x, k, 1, k // 2)
    y2 = F.max_pool2d(y1, k, 1, k // 2)
    y3 = F.max_pool2d(y2, k, 1, k // 2)
    return torch.cat([x, y1, y2, y3], 1)


def adaptive_bins(size: int, level: int) -> list:
    """[(start, end)] of the `level` adaptive-pooling bins over `size`: (floor(i*size/l), ceil((i+1)*size/l))."""
    return [((i * size) // level, -(-((i + 1) * size) // level)) for i in range(level)]
