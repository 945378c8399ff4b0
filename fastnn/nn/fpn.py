"""Feature pyramid network, drop-in for torchvision.ops.FeaturePyramidNetwork, and an image-pyramid wrapper.

FeaturePyramidNetwork has torchvision's constructor arguments, parameter names (inner_blocks.N.0.weight,
layer_blocks.N.0.bias, inner_blocks.N.1.* for a norm layer, extra_blocks.p6.weight, ...), state_dict version
and forward contract (OrderedDict in, OrderedDict out), so torchvision's state_dict loads unchanged and
gives the same outputs. The top-down step at each level (nearest upsample of the coarser result to the
lateral's size, plus the lateral) is one fused kernel, fastnn.ops.fpn_topdown_add; the 1x1 lateral and 3x3
output convolutions (and the optional norm layers, and the P6/P7 convolutions) are torch's own modules.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.fpn import fpn_topdown_add
from ..ops.multiscale import _check_scales, multiscale_detect

# torch.fx (symbolic_trace, torchvision's create_feature_extractor) records this call as one node instead of
# tracing into its argument checks, as torchvision's ops are wrapped
torch.fx.wrap("fpn_topdown_add")


class ExtraFPNBlock(nn.Module):
    """Base class of the blocks that extend the pyramid (torchvision's ExtraFPNBlock contract).

    ``forward(results, x, names)`` takes the FPN outputs (finest first), the FPN inputs and their names, and
    returns the extended lists ``(results, names)``.
    """

    def forward(self, results: list, x: list, names: list) -> tuple:
        raise NotImplementedError


class LastLevelMaxPool(ExtraFPNBlock):
    """Adds a "pool" level: the last FPN output subsampled by 2 (max_pool2d with kernel 1, stride 2),
    as torchvision.ops.feature_pyramid_network.LastLevelMaxPool. No parameters."""

    def forward(self, x: list, y: list, names: list) -> tuple:  # (torchvision's argument names)
        names.append("pool")
        x.append(F.max_pool2d(x[-1], kernel_size=1, stride=2, padding=0))
        return x, names


class LastLevelP6P7(ExtraFPNBlock):
    """RetinaNet's extra levels, as torchvision's LastLevelP6P7: ``p6 = conv3x3/2(P5 if in_channels ==
    out_channels else C5)``, ``p7 = conv3x3/2(relu(p6))``, named "p6" and "p7".

    Args:
        in_channels: channels of the map p6 reads (the last FPN output when equal to out_channels, else the
            last FPN input).
        out_channels: channels of p6 and p7.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)
        self.use_P5 = in_channels == out_channels

    def forward(self, p: list, c: list, names: list) -> tuple:  # (torchvision's argument names)
        source = p[-1] if self.use_P5 else c[-1]
        p6 = self.p6(source)
        p7 = self.p7(F.relu(p6))
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int,
               norm_layer: Optional[Callable[..., nn.Module]]) -> nn.Sequential:
    """Conv (bias only without a norm layer) then the norm layer: torchvision's Conv2dNormActivation
    layout (keys "0.weight", "0.bias", "1.*") with no activation."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    return nn.Sequential(*layers)


def _is_extra_block(m) -> bool:
    if isinstance(m, ExtraFPNBlock):
        return True
    try:  # torchvision's own extra blocks work too (same call contract)
        from torchvision.ops.feature_pyramid_network import ExtraFPNBlock as TVExtraFPNBlock
    except ImportError:
        return False
    return isinstance(m, TVExtraFPNBlock)


class FeaturePyramidNetwork(nn.Module):
    """Feature pyramid network (Lin et al., 2017), a drop-in for ``torchvision.ops.FeaturePyramidNetwork``.

    For inputs C_1..C_L (finest first): ``inner_L = lateral_L(C_L)``, then for l = L-1..1
    ``inner_l = fpn_topdown_add(lateral_l(C_l), inner_{l+1})`` (one fused kernel: nearest upsample of the
    coarser result to C_l's size plus the lateral, F.interpolate "nearest" semantics, non-integer size
    ratios included), and ``P_l = output_l(inner_l)``. The laterals are 1x1 convolutions and the outputs
    3x3 convolutions, each optionally followed by ``norm_layer``: these stay torch modules (nn.Conv2d and
    the norm), only the top-down pathway is fastnn's kernel.

    Args:
        in_channels_list: channels of each input map, finest first (0 is not allowed).
        out_channels: channels of every output map.
        extra_blocks: optional ExtraFPNBlock (fastnn's LastLevelMaxPool / LastLevelP6P7, or torchvision's)
            that appends levels.
        norm_layer: optional norm module constructor (e.g. nn.BatchNorm2d), applied after every conv, which
            then has no bias (torchvision's rule).

    Forward: an OrderedDict (or dict) name -> (N, C_l, H_l, W_l) tensor, finest first; returns an
    OrderedDict name -> (N, out_channels, H_l, W_l), plus the extra blocks' levels. NCHW or channels_last;
    any float dtype the convolutions accept. The state_dict is torchvision's (version 2; the version-1 keys
    ``inner_blocks.N.weight`` are renamed on load as torchvision does).
    """

    _version = 2

    def __init__(self, in_channels_list: Sequence[int], out_channels: int,
                 extra_blocks: Optional[nn.Module] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for in_channels in in_channels_list:
            if in_channels == 0:
                raise ValueError("in_channels_list: in_channels=0 is not supported")
            self.inner_blocks.append(_conv_norm(in_channels, out_channels, 1, norm_layer))
            self.layer_blocks.append(_conv_norm(out_channels, out_channels, 3, norm_layer))
        for m in self.modules():  # before the extra blocks, which keep their own initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        if extra_blocks is not None and not _is_extra_block(extra_blocks):
            raise TypeError(f"extra_blocks must be an ExtraFPNBlock (fastnn's or torchvision's), "
                            f"got {type(extra_blocks).__name__}")
        self.extra_blocks = extra_blocks

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            # version 1 kept the conv directly at inner_blocks.N / layer_blocks.N
            for block in ("inner_blocks", "layer_blocks"):
                for i in range(len(self.inner_blocks)):
                    for kind in ("weight", "bias"):
                        old = f"{prefix}{block}.{i}.{kind}"
                        if old in state_dict:
                            state_dict[f"{prefix}{block}.{i}.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_result_from_inner_blocks(self, x: Tensor, idx: int) -> Tensor:
        """inner_blocks[idx](x) (idx may be negative), as torchvision's method; x itself for an idx out of range."""
        idx = idx + len(self.inner_blocks) if idx < 0 else idx
        return self.inner_blocks[idx](x) if 0 <= idx < len(self.inner_blocks) else x

    def get_result_from_layer_blocks(self, x: Tensor, idx: int) -> Tensor:
        """layer_blocks[idx](x) (idx may be negative), as torchvision's method; x itself for an idx out of range."""
        idx = idx + len(self.layer_blocks) if idx < 0 else idx
        return self.layer_blocks[idx](x) if 0 <= idx < len(self.layer_blocks) else x

    def forward(self, x: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """Runs the pyramid over the maps of ``x`` (finest first); returns an OrderedDict, finest first."""
        names = list(x.keys())
        feats = list(x.values())
        if len(feats) != len(self.inner_blocks):
            raise ValueError(f"x has {len(feats)} feature maps but the FPN was built for "
                             f"{len(self.inner_blocks)} (in_channels_list)")
        last = len(feats) - 1
        inner = self.inner_blocks[last](feats[last])
        results = [self.layer_blocks[last](inner)]
        for idx in range(last - 1, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            inner = fpn_topdown_add(lateral, inner)
            results.insert(0, self.layer_blocks[idx](inner))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


class ImagePyramid(nn.Module):
    """Multi-scale inference around a detector: :func:`fastnn.ops.multiscale_detect` as a module.

    Runs ``detector`` on the image batch resized (bilinear) to each scale, maps the boxes back to the
    original size and merges the detections of all scales per image with class-wise NMS
    (fastnn.ops.batched_nms).

    Args:
        detector: callable (B, C, h, w) -> list of B dicts {"boxes", "scores", "labels"} (torchvision's
            detector output); registered as a submodule when it is an nn.Module.
        scales: positive resize factors, e.g. (0.5, 1.0, 1.5).
        iou_threshold: NMS IoU threshold for merging.
        detections_per_img: keep at most this many per image (None: all).
        clip_boxes: clamp mapped boxes to the original image before NMS.

    Forward: (B, C, H, W) images -> list of B dicts {"boxes", "scores", "labels"} by decreasing score.
    """

    def __init__(self, detector: Callable, scales: Sequence[float], iou_threshold: float = 0.5,
                 detections_per_img: Optional[int] = None, clip_boxes: bool = True):
        super().__init__()
        self.detector = detector
        self.scales = tuple(_check_scales(scales))
        self.iou_threshold = float(iou_threshold)
        self.detections_per_img = detections_per_img
        self.clip_boxes = clip_boxes

    def forward(self, images: Tensor) -> list:
        """Detections of the merged pyramid, one dict per image."""
        return multiscale_detect(self.detector, images, self.scales, self.iou_threshold,
                                 detections_per_img=self.detections_per_img, clip_boxes=self.clip_boxes)

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, iou_threshold={self.iou_threshold}, "
                f"detections_per_img={self.detections_per_img}, clip_boxes={self.clip_boxes}")
