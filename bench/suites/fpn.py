"""FPN: the fused top-down step (fpn_topdown_add) against torch's interpolate + add at each level of a
ResNet-50 FPN at 512 x 512 input (C2..C5 = 256/512/1024/2048 channels at 128/64/32/16, 256 out), and the
whole FeaturePyramidNetwork forward and forward+backward against torchvision's with the same weights."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision

import fastnn
from fastnn import ops

from ..harness import Case

IN_CHANNELS = (256, 512, 1024, 2048)
SIDES = (128, 64, 32, 16)  # stride 4..32 at 512 x 512
OUT = 256


def _features(n: int, device: str, channels_last: bool = False):
    g = torch.Generator().manual_seed(0)
    x = OrderedDict()
    for i, (c, s) in enumerate(zip(IN_CHANNELS, SIDES)):
        t = torch.randn(n, c, s, s, generator=g).to(device)
        x[f"c{i + 2}"] = t.to(memory_format=torch.channels_last) if channels_last else t
    return x


def _conv_flops(n: int) -> float:
    """Multiply-adds x 2 of the FPN's convolutions (1x1 laterals, 3x3 outputs): its compute floor."""
    return sum(2 * n * s * s * OUT * (c + 9 * OUT) for c, s in zip(IN_CHANNELS, SIDES))


def _close(rtol, atol):
    def check(a, b):
        a = a if isinstance(a, (tuple, list)) else (a,)
        b = b if isinstance(b, (tuple, list)) else (b,)
        return all(bool(torch.allclose(x, y, rtol=rtol, atol=atol)) for x, y in zip(a, b))
    return check


def cases(device: str, quick: bool):
    backend = "cpp" if device == "cpu" else "triton"
    if backend not in fastnn.usable_backends(device):
        return []
    out = []
    batches = (1,) if quick else (1, 2)
    for n in batches:
        # the fused add at each top-down level: floor = read lateral + read top + write out, float32
        layouts = (False, True) if n == 1 else (False,)
        for cl in layouts:
            fmt = torch.channels_last if cl else torch.contiguous_format
            for s in SIDES[:-1]:
                g = torch.Generator().manual_seed(s)
                lat = torch.randn(n, OUT, s, s, generator=g).to(device).contiguous(memory_format=fmt)
                top = torch.randn(n, OUT, s // 2, s // 2, generator=g).to(device).contiguous(memory_format=fmt)
                floor = 4 * (2 * lat.numel() + top.numel())

                def ours(lat=lat, top=top):
                    with fastnn.use_backend(backend):
                        return ops.fpn_topdown_add(lat, top)

                def peer(lat=lat, top=top):
                    return lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")

                out.append(Case("fpn", f"topdown_add[{backend}]" + (",cl" if cl else ""),
                                f"N={n},C={OUT},{s}<-{s // 2}", "float32", ours, "interpolate+add", peer,
                                work=floor, check=_close(0, 0)))
        if quick and device == "cuda":
            continue
        # whole FPN, same weights: forward, and forward + backward (grads of every parameter and input)
        torch.manual_seed(0)
        tv = torchvision.ops.FeaturePyramidNetwork(list(IN_CHANNELS), OUT).to(device)
        ours_m = fastnn.nn.FeaturePyramidNetwork(list(IN_CHANNELS), OUT).to(device)
        ours_m.load_state_dict(tv.state_dict())
        x = _features(n, device)

        def fwd(m, x=x):
            def call():
                with torch.no_grad(), fastnn.use_backend(backend):
                    return tuple(m(x).values())
            return call

        xg = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())

        def fwd_bwd(m, xg=xg):
            params = list(m.parameters()) + list(xg.values())

            def call():
                with fastnn.use_backend(backend):
                    outs = m(xg)
                    loss = sum(o.sum() for o in outs.values())
                    return torch.autograd.grad(loss, params)
            return call

        flops = _conv_flops(n)
        out.append(Case("fpn", "FPN forward", f"R50@512,N={n}", "float32", fwd(ours_m), "torchvision FPN",
                        fwd(tv), metric="TFLOP/s", work=flops, check=_close(1e-5, 1e-5)))
        out.append(Case("fpn", "FPN fwd+bwd", f"R50@512,N={n}", "float32", fwd_bwd(ours_m), "torchvision FPN",
                        fwd_bwd(tv), metric="TFLOP/s", work=3 * flops, check=_close(1e-4, 1e-3)))
    return out
