"""Mamba convolution and decode ops against their peers on the same device.

  causal_conv1d_fn (activation silu), forward and forward+backward, against F.conv1d(padding W - 1,
  groups=D) sliced to L, then F.silu: B=2, D=1536/3072, L=1024/4096, W=4; CPU fp32 and bf16, CUDA bf16 and
  fp32. Bytes floor: x and out moved once (forward); x, out, dout, dx once each (forward+backward).
  Decode step (causal_conv1d_update + selective_state_update, mamba-1 shapes: D=3072, N=16, W=4) against the
  reference ops (fastnn.reference.ssm), B = 1, 4, 16. Bytes floor: both states read and written, x / z /
  dt / B / C read, A / weight read once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastnn
from fastnn import ops
from fastnn.reference import ssm as ref

from ..harness import Case


def _close(tol):
    def check(a, b):
        a, b = a.float(), b.float()
        return bool((a - b).abs().max() <= tol * (b.abs().max() + 1))
    return check


def _backend(device):
    return "cpp" if device == "cpu" else "triton"


def _conv_cases(device, quick, dtype):
    out = []
    backend = _backend(device)
    shapes = [(2, D, L) for D in (1536, 3072) for L in (1024, 4096)]
    if quick:
        shapes = [(2, 1536, 1024), (2, 3072, 4096)]
    dname = str(dtype).replace("torch.", "")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for B, D, L in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, D, L, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(D, 4, generator=g) * 0.5).to(device=device, dtype=dtype)
        b = torch.randn(D, generator=g).to(device=device, dtype=dtype)
        dout = torch.randn(B, D, L, generator=g).to(device=device, dtype=dtype)
        nbytes = x.numel() * x.element_size()

        def ours(x_=x, w_=w, b_=b):
            with fastnn.use_backend(backend):
                return ops.causal_conv1d_fn(x_, w_, b_, activation="silu")

        def peer(x_=x, w_=w, b_=b):
            return F.silu(F.conv1d(x_, w_.unsqueeze(1), b_, padding=w_.shape[1] - 1, groups=x_.shape[1])
                          [..., :x_.shape[2]])

        shape = f"B={B},D={D},L={L},W=4"
        out.append(Case("ssm_conv", f"causal_conv1d fwd[{backend}]", shape, dname, ours, "F.conv1d+silu", peer,
                        work=2 * nbytes, check=_close(tol)))
        xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))

        def fwd_bwd(fn, xl=xl, wl=wl, bl=bl, dout=dout):
            # this shape's tensors bound now: a plain closure would see the loop's last shape at call time
            return lambda: torch.autograd.grad(fn(xl, wl, bl), (xl, wl, bl), dout)[0]

        out.append(Case("ssm_conv", f"causal_conv1d fwd+bwd[{backend}]", shape, dname, fwd_bwd(ours),
                        "F.conv1d+silu", fwd_bwd(peer), work=4 * nbytes, check=_close(tol)))
        # The peer's fwd+bwd takes 1-40 s on the CPU, so the harness keeps its warm-up call as a sample for
        # both sides: run ours once here so that sample is not a first call (one-time lazy imports in torch).
        out[-1].ours()
        out[-2].ours()
    return out


def _decode_cases(device, quick):
    out = []
    backend = _backend(device)
    D, N, W = 3072, 16, 4
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for B in ((1, 16) if quick else (1, 4, 16)):
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
        x, z, dt = r(B, D).to(dtype), r(B, D).to(dtype), (r(B, D) * 0.5 - 1).to(dtype)
        Bm, Cm = r(B, N).to(dtype), r(B, N).to(dtype)
        A = -torch.rand(D, N, generator=g).to(device)
        Dskip, dt_bias = r(D), r(D) * 0.3
        w, bias = r(D, W).to(dtype), r(D).to(dtype)
        conv0, ssm0 = r(B, D, W - 1).to(dtype), r(B, D, N)  # mamba keeps the ssm state in fp32
        states = {name: (conv0.clone(), ssm0.clone()) for name in ("ours", "peer")}

        def step(update, ssu, name, x=x, w=w, bias=bias, dt=dt, A=A, Bm=Bm, Cm=Cm, Dskip=Dskip, z=z, dt_bias=dt_bias,
                 states=states):
            conv_state, ssm_state = states[name]  # each side steps its own copy of the same states

            def call():
                xc = update(x, conv_state, w, bias, "silu")
                return ssu(ssm_state, xc, dt, A, Bm, Cm, Dskip, z, dt_bias, True)
            return call

        def ours_update(*a):
            with fastnn.use_backend(backend):
                return ops.causal_conv1d_update(*a)

        def ours_ssu(*a):
            with fastnn.use_backend(backend):
                return ops.selective_state_update(*a)

        nbytes = (2 * (conv0.numel() * conv0.element_size() + ssm0.numel() * 4) + A.numel() * 4
                  + w.numel() * w.element_size() + 6 * x.numel() * x.element_size())
        out.append(Case("ssm_conv", f"decode step[{backend}]", f"B={B},D={D},N={N},W={W}",
                        str(dtype).replace("torch.", ""), step(ours_update, ours_ssu, "ours"),
                        "reference ops",
                        step(lambda *a: ref.causal_conv1d_update(*a), ref.selective_state_update, "peer"),
                        work=nbytes, check=_close(1e-3 if dtype == torch.float32 else 5e-2)))
    return out


def cases(device: str, quick: bool):
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16, torch.float32)
    if quick and device == "cuda":
        dtypes = (torch.bfloat16,)
    out = []
    for dt in dtypes:
        out += _conv_cases(device, quick, dt)
    dec = _decode_cases(device, quick)
    for c in dec:  # warm both sides (first-call costs): each side's states move on by the same one step
        c.ours()
        c.peer_fn()
    return out + dec
