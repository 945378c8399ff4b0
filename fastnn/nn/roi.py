"""Drop-in RoI modules: RoIAlign, RoIPool and MultiScaleRoIAlign with torchvision's arguments and repr."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.roi import roi_align, roi_pool
from ..reference import roi as ref

# torch.fx (symbolic_trace, torchvision's create_feature_extractor) records these calls as single nodes instead
# of tracing into their argument checks, as torchvision wraps its own
torch.fx.wrap("roi_align")
torch.fx.wrap("roi_pool")


class RoIAlign(nn.Module):
    """See :func:`fastnn.ops.roi_align`; a drop-in for ``torchvision.ops.RoIAlign``."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class RoIPool(nn.Module):
    """See :func:`fastnn.ops.roi_pool`; a drop-in for ``torchvision.ops.RoIPool``."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


class LevelMapper:
    """torchvision's LevelMapper: ``mapper(boxlists)`` gives each box's pyramid level minus k_min (int64), by
    eq. 1 of the FPN paper clamped to [k_min, k_max]; a box of negative or NaN area gets 0. Attributes
    k_min, k_max, s0 (canonical scale), lvl0 (canonical level) and eps as torchvision names them."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6):
        self.k_min, self.k_max, self.s0, self.lvl0, self.eps = k_min, k_max, canonical_scale, canonical_level, eps

    def levels(self, boxes: Tensor) -> Tuple[Tensor, Tensor]:
        """(levels, defined) of (K, 4) boxes: defined is False where the area is negative or NaN."""
        return ref.map_levels(boxes, self.k_min, self.k_max, self.s0, self.lvl0, self.eps)

    def __call__(self, boxlists: List[Tensor]) -> Tensor:
        """Levels (minus k_min, int64) of the boxes of every image, concatenated, as torchvision's mapper."""
        return self.levels(torch.cat(list(boxlists), 0))[0]


class MultiScaleRoIAlign(nn.Module):
    """Multi-scale RoIAlign for feature pyramids, a drop-in for ``torchvision.ops.MultiScaleRoIAlign``.

    Each box is pooled from the pyramid level given by eq. 1 of the FPN paper,
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`` clamped to [k_min, k_max], the
    levels of the first and last maps; the levels' scales are inferred (powers of two) from the feature sizes
    and the largest image size on the first call and kept, as torchvision does. As in torchvision, a box
    whose level has no map (a pyramid with a gap, or maps not listed fine to coarse) pools zeros. Unlike
    torchvision, which runs one roi_align per level and scatters the results, every level is pooled in one
    kernel call (:func:`fastnn.ops.multi_scale_roi_align`) and the backward is deterministic.

    Args:
        featmap_names: names of the feature maps of ``x`` to pool from (in ``x``'s order).
        output_size: int or (height, width).
        sampling_ratio: as in :func:`fastnn.ops.roi_align`.
        canonical_scale, canonical_level: s0 and k0 of the level mapping (keyword only).
    """

    def __init__(self, featmap_names: List[str], output_size: Union[int, Tuple[int], List[int]], sampling_ratio: int,
                 *, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales: Optional[List[float]] = None
        self.map_levels: Optional[LevelMapper] = None  # set up on the first call, as torchvision's
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        """Pools ``boxes`` (a list of (L_i, 4) per-image boxes in image coordinates) from the maps of ``x``
        named in featmap_names; ``image_shapes`` are the images' (height, width) before the backbone.
        Returns (sum L_i, C, output_size[0], output_size[1])."""
        # Scales are set up on the first eager call and kept, as torchvision does. Under torch.fx the maps are
        # proxies with no sizes: the traced call then sets them up in _multi_scale_pool each time.
        if (self.scales is None or self.map_levels is None) and isinstance(x, dict):
            features = _selected_maps(x, self.featmap_names)
            if all(isinstance(f, Tensor) for f in features):
                scales, k_min, k_max = ref.setup_scales([f.shape[-2:] for f in features], image_shapes)
                self.scales = scales
                self.map_levels = LevelMapper(k_min, k_max, self.canonical_scale, self.canonical_level)
        m = self.map_levels
        mapping = ((self.canonical_scale, self.canonical_level, None, None, 1e-6) if m is None
                   else (m.s0, m.lvl0, m.k_min, m.k_max, m.eps))
        return _multi_scale_pool(x, self.featmap_names, boxes, image_shapes, self.scales, mapping, self.output_size,
                                 self.sampling_ratio)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})")


def _selected_maps(x: Dict[str, Tensor], featmap_names: List[str]) -> List[Tensor]:
    """The maps of x named in featmap_names, in x's order."""
    features = [v for k, v in x.items() if k in featmap_names]
    if not features:
        raise ValueError(f"x has none of the feature maps {featmap_names}")
    return features


@torch.fx.wrap
def _multi_scale_pool(x: Dict[str, Tensor], featmap_names: List[str], boxes: List[Tensor],
                      image_shapes: List[Tuple[int, int]], scales: Optional[List[float]], mapping: tuple,
                      output_size: Tuple[int, int], sampling_ratio: int) -> Tensor:
    """MultiScaleRoIAlign's pooling of the maps of x named in featmap_names: boxes to levels by ``mapping`` =
    (canonical scale, canonical level, k_min, k_max, eps), then one multi-level roi_align. scales None (or
    k_min None): scales and k_min / k_max set up from the maps and image_shapes here, as a torch.fx-traced call
    does. Wrapped for torch.fx: a traced module records it as one call."""
    features = _selected_maps(x, featmap_names)
    canonical_scale, canonical_level, k_min, k_max, eps = mapping
    if scales is None or k_min is None:
        scales, k_min, k_max = ref.setup_scales([f.shape[-2:] for f in features], image_shapes)
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a list of (L, 4) tensors, got {type(boxes).__name__}")
    rois = ops.roi.boxes_to_rois(boxes, features[0])
    if len(features) == 1:
        return ops.multi_scale_roi_align(features, rois, None, scales, output_size, sampling_ratio)
    # levels from the boxes in their own dtype, as torchvision computes them (float16 / bfloat16 in float32)
    box_levels, defined = ref.map_levels(torch.cat(list(boxes), 0), k_min, k_max, canonical_scale, canonical_level,
                                         eps)
    # a level with no map (a pyramid with a gap, or maps not listed fine to coarse, so that k_min > k_max)
    # pools nothing in torchvision's per-level loop: zeros, like a box of negative area
    present = (box_levels >= 0) & (box_levels < len(features))
    defined = defined & present
    box_levels = torch.where(present, box_levels, torch.zeros_like(box_levels))
    out = ops.multi_scale_roi_align(features, rois, box_levels, scales, output_size, sampling_ratio)
    # boxes of negative area have no level: zeros and no gradient, as torchvision gives
    return torch.where(defined[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
