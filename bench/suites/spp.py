"""Spatial pyramid pooling against eager torch on the same device.

  sppf_pool (k=5) vs YOLOv5's eager chain: three F.max_pool2d(5, 1, 2) + torch.cat; forward, and
  forward+backward (gradient of x for a given output gradient). YOLOv5 SPPF sizes: C = 256 / 512 (cv1
  output of a 512 / 1024-channel SPPF), 20 x 20 (640 px input) and 40 x 40 (1280 px), N = 1 and 8; NCHW and
  one channels_last case; fp32 (CPU), fp32 and fp16 (CUDA).
  spp_pool (levels 1, 2, 4) max and avg vs adaptive_{max,avg}_pool2d per level + flatten + cat, same shapes.

Bytes floors (GB/s column): SPPF forward reads x and writes 4x (5 |x|); forward+backward adds reading the
(N, 4C, H, W) output gradient and x again and writing the gradient of x (+6 |x|). SPP forward reads x once
(the output is 21 values per plane); forward+backward adds reading x again and writing its gradient (3 |x|).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastnn
from fastnn import ops

from ..harness import Case


def _eager_sppf(x):
    y1 = F.max_pool2d(x, 5, 1, 2)
    y2 = F.max_pool2d(y1, 5, 1, 2)
    return torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1)


def _eager_spp(mode):
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d

    def fn(x):
        return torch.cat([torch.flatten(pool(x, lv), 1) for lv in (1, 2, 4)], 1)
    return fn


def _with_backend(backend, fn):
    def call(*a):
        with fastnn.use_backend(backend):
            return fn(*a)
    return call


def _fwd_bwd(fn, x, grad):
    xr = x.detach().clone().requires_grad_()

    def call():
        (g,) = torch.autograd.grad(fn(xr), xr, grad)
        return g
    return call


def _close(tol):
    return lambda a, b: bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


def cases(device: str, quick: bool):
    backend = "cpp" if device == "cpu" else "triton"
    if backend not in fastnn.usable_backends(device):
        return []
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16]
    shapes = [(1, 256, 20, 20), (8, 256, 20, 20), (1, 512, 20, 20), (8, 512, 20, 20), (1, 256, 40, 40),
              (8, 256, 40, 40)]
    if quick:
        shapes = [(1, 256, 20, 20), (8, 256, 40, 40)] if device == "cpu" else [(1, 256, 20, 20)]
    out = []
    sppf = _with_backend(backend, lambda t: ops.sppf_pool(t, 5))
    spp = {m: _with_backend(backend, lambda t, m=m: ops.spp_pool(t, (1, 2, 4), m)) for m in ("max", "avg")}
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for shape in shapes:
            x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            sx = f"N={shape[0]},C={shape[1]},{shape[2]}x{shape[3]}"
            xb = x.numel() * x.element_size()
            grad = torch.randn(shape[0], 4 * shape[1], *shape[2:], generator=g).to(device=device, dtype=dtype)
            exact = lambda a, b: torch.equal(a, b)  # noqa: E731
            out.append(Case("spp", f"sppf_pool[{backend}]", sx, dname, lambda x=x: sppf(x), "3x max_pool2d+cat",
                            lambda x=x: _eager_sppf(x), work=5 * xb, check=exact))
            out.append(Case("spp", f"sppf_pool fwd+bwd[{backend}]", sx, dname, _fwd_bwd(sppf, x, grad),
                            "3x max_pool2d+cat", _fwd_bwd(_eager_sppf, x, grad), work=11 * xb, check=_close(tol)))
            if shape == (8, 256, 20, 20) or (quick and shape == shapes[-1]):
                xc = x.contiguous(memory_format=torch.channels_last)
                out.append(Case("spp", f"sppf_pool ch_last[{backend}]", sx, dname, lambda x=xc: sppf(x),
                                "3x max_pool2d+cat", lambda x=xc: _eager_sppf(x), work=5 * xb, check=exact))
                out.append(Case("spp", f"sppf fwd+bwd ch_last[{backend}]", sx, dname,
                                _fwd_bwd(sppf, xc, grad.contiguous(memory_format=torch.channels_last)),
                                "3x max_pool2d+cat", _fwd_bwd(_eager_sppf, xc, grad), work=11 * xb,
                                check=_close(tol)))
            sgrad = torch.randn(shape[0], shape[1] * 21, generator=g).to(device=device, dtype=dtype)
            for mode in ("max", "avg"):
                out.append(Case("spp", f"spp_pool {mode}[{backend}]", sx, dname, lambda x=x, m=mode: spp[m](x),
                                f"adaptive_{mode}_pool2d+cat", lambda x=x, m=mode: _eager_spp(m)(x), work=xb,
                                check=_close(tol)))
                out.append(Case("spp", f"spp {mode} fwd+bwd[{backend}]", sx, dname, _fwd_bwd(spp[mode], x, sgrad),
                                f"adaptive_{mode}_pool2d+cat", _fwd_bwd(_eager_spp(mode), x, sgrad), work=3 * xb,
                                check=_close(tol)))
    return out
