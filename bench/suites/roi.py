"""RoIAlign, RoIPool and MultiScaleRoIAlign against torchvision on the same device and inputs.

  roi_align fwd       512 RoIs, 256 channels, 7x7, sampling 2, on a 2x256x200x200 map (stride 4 of 800x800
                      images): the issue's CPU target case; also channels-last input and adaptive sampling
  roi_align bwd       the backward op alone (ours: deterministic; torchvision's CUDA one uses atomics)
  roi_align fwd+bwd   forward, then the gradient of a random cotangent
  roi_pool fwd        same RoIs and map
  MultiScaleRoIAlign  4 FPN levels (200, 100, 50, 25 for 800x800 images), 1000 boxes: ours pools every
                      level in one call, torchvision one roi_align per level plus a scatter
Floor (GB/s column): the output written once plus, per sample, its four taps read once per channel
(K * C * bins * samples * 4 * 4 bytes): the gather traffic if nothing were cached.
"""
from __future__ import annotations

import torch
import torchvision

import fastnn
from fastnn import nn as fnn
from fastnn import ops

from ..harness import Case


def make_rois(k: int, n_images: int, image: int, device: str, seed: int = 0) -> torch.Tensor:
    """Detector-like proposals: centres uniform in the image, sides log-uniform in [16, 512] pixels."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(k, 2, generator=g) * image
    side = torch.exp(torch.rand(k, 2, generator=g) * (torch.log(torch.tensor(512.0)) - torch.log(torch.tensor(16.0)))
                     + torch.log(torch.tensor(16.0)))
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1).clamp(0, image)
    batch = torch.randint(0, n_images, (k, 1), generator=g).float()
    return torch.cat([batch, boxes], 1).to(device)


def _close(x, y):
    return bool(torch.allclose(x, y, rtol=1e-4, atol=1e-5))


def _checker(device: str, cpu_peer):
    """The agreement check of a case. On the CPU: ours against the timed peer. On CUDA: ours against
    torchvision on CPU copies of the inputs (cpu_peer(), run once), the exact-rounding oracle: torchvision's
    CUDA build contracts multiply-adds, so near coordinate 200 (ulp 1.5e-5) its samples move and its
    outputs differ from its own CPU result by up to 7.5e-5 (measured on an H100, tools/gpu_diag.py), while
    ours on CUDA equals torchvision's CPU result bit for bit."""
    if device == "cpu":
        return _close
    return lambda ours, _peer_on_gpu: _close(_to_cpu(ours), cpu_peer())


def _to_cpu(t):
    return [v.cpu() for v in t] if isinstance(t, (list, tuple)) else t.cpu()


def _gather_bytes(k, c, bins, samples):
    return k * c * bins * (samples * 16 + 4)


def cases(device: str, quick: bool):
    cpu = device == "cpu"
    backend = "cpp" if cpu else "cuda"
    if backend not in fastnn.usable_backends(device):
        return []
    out = []
    n, c, hw, k = 2, 256, 200, 512
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(device)
    rois = make_rois(k, n, 800, device)
    scale = 0.25

    def ours_fn(fn, *args):
        def call():
            with fastnn.use_backend(backend):
                return fn(*args)
        return call

    work = _gather_bytes(k, c, 49, 4)
    x_cpu, rois_cpu = x.cpu(), rois.cpu()
    fwd_check = _checker(device, lambda: torchvision.ops.roi_align(x_cpu, rois_cpu, 7, scale, 2))
    out.append(Case("roi", "roi_align fwd", f"K={k},C={c},7x7,sr=2,map={n}x{hw}x{hw}", "float32",
                    ours_fn(ops.roi_align, x, rois, 7, scale, 2), "torchvision.roi_align",
                    lambda: torchvision.ops.roi_align(x, rois, 7, scale, 2), work=work, check=fwd_check))
    xcl = x.contiguous(memory_format=torch.channels_last)
    out.append(Case("roi", "roi_align fwd channels-last", f"K={k},C={c},7x7,sr=2", "float32",
                    ours_fn(ops.roi_align, xcl, rois, 7, scale, 2), "torchvision.roi_align",
                    lambda: torchvision.ops.roi_align(xcl, rois, 7, scale, 2), work=work, check=fwd_check))
    if not quick:
        out.append(Case("roi", "roi_align fwd adaptive", f"K={k},C={c},7x7,sr=-1", "float32",
                        ours_fn(ops.roi_align, x, rois, 7, scale, -1), "torchvision.roi_align",
                        lambda: torchvision.ops.roi_align(x, rois, 7, scale, -1), work=work,
                        check=_checker(device, lambda: torchvision.ops.roi_align(x_cpu, rois_cpu, 7, scale, -1))))

    grad = torch.randn(k, c, 7, 7, generator=g).to(device)
    shape = list(x.shape)

    def ours_bwd():
        with fastnn.use_backend(backend):
            return torch.ops.fastnn.roi_align_backward(grad, rois, None, [scale], shape, False, 2, False)[0]

    def tv_bwd():
        return torch.ops.torchvision._roi_align_backward(grad, rois, scale, 7, 7, n, c, hw, hw, 2, False)

    grad_cpu = grad.cpu()
    tv_bwd_cpu = lambda: torch.ops.torchvision._roi_align_backward(  # noqa: E731
        grad_cpu, rois_cpu, scale, 7, 7, n, c, hw, hw, 2, False)
    out.append(Case("roi", "roi_align bwd", f"K={k},C={c},7x7,sr=2", "float32", ours_bwd,
                    "torchvision._roi_align_backward", tv_bwd, work=work, check=_checker(device, tv_bwd_cpu)))
    xg = x.clone().requires_grad_()

    def fwd_bwd(fn, inp=xg, boxes=rois, dy=grad):
        def call():
            y = fn(inp, boxes, 7, scale, 2)
            return torch.autograd.grad(y, inp, dy)[0]
        return call

    out.append(Case("roi", "roi_align fwd+bwd", f"K={k},C={c},7x7,sr=2", "float32",
                    ours_fn(fwd_bwd(ops.roi_align)), "torchvision.roi_align", fwd_bwd(torchvision.ops.roi_align),
                    work=2 * work, check=_checker(device, fwd_bwd(torchvision.ops.roi_align,
                                                                   x_cpu.clone().requires_grad_(), rois_cpu,
                                                                   grad_cpu))))
    out.append(Case("roi", "roi_pool fwd", f"K={k},C={c},7x7", "float32", ours_fn(ops.roi_pool, x, rois, 7, scale),
                    "torchvision.roi_pool", lambda: torchvision.ops.roi_pool(x, rois, 7, scale),
                    work=k * c * 49 * 4, check=_close))

    # MultiScaleRoIAlign over an FPN (P2-P5 of two 800x800 images)
    feats = {f"p{i}": torch.randn(n, c, 800 >> i, 800 >> i, generator=g).to(device) for i in (2, 3, 4, 5)}
    boxes = [make_rois(500, 1, 800, device, seed=s)[:, 1:] for s in (1, 2)]
    shapes = [(800, 800), (800, 800)]
    ours_m = fnn.MultiScaleRoIAlign(list(feats), 7, 2)
    theirs_m = torchvision.ops.MultiScaleRoIAlign(list(feats), 7, 2)
    feats_cpu = {name: v.cpu() for name, v in feats.items()}
    boxes_cpu = [b.cpu() for b in boxes]
    out.append(Case("roi", "MultiScaleRoIAlign fwd", f"K=1000,C={c},4 levels,7x7,sr=2", "float32",
                    ours_fn(ours_m, feats, boxes, shapes), "torchvision.MultiScaleRoIAlign",
                    lambda: theirs_m(feats, boxes, shapes), work=_gather_bytes(1000, c, 49, 4),
                    check=_checker(device, lambda: theirs_m(feats_cpu, boxes_cpu, shapes))))
    feats_g = {name: v.clone().requires_grad_() for name, v in feats.items()}
    mgrad = torch.randn(1000, c, 7, 7, generator=g).to(device)

    def multi_fwd_bwd(m, inputs=feats_g, bxs=boxes, dy=mgrad):
        def call():
            y = m(inputs, bxs, shapes)
            return torch.autograd.grad(y, list(inputs.values()), dy)[0]
        return call

    feats_g_cpu = {name: v.clone().requires_grad_() for name, v in feats_cpu.items()}
    out.append(Case("roi", "MultiScaleRoIAlign fwd+bwd", f"K=1000,C={c},4 levels,7x7,sr=2", "float32",
                    ours_fn(multi_fwd_bwd(ours_m)), "torchvision.MultiScaleRoIAlign", multi_fwd_bwd(theirs_m),
                    work=2 * _gather_bytes(1000, c, 49, 4),
                    check=_checker(device, multi_fwd_bwd(theirs_m, feats_g_cpu, boxes_cpu, mgrad.cpu()))))
    return out
