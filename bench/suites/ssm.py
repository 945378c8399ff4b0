"""Selective scan and the Mamba block against plain PyTorch on the same device.

  scan forward / forward+backward: selective_scan_fn against the reference (mamba's selective_scan_ref
      structure: materialise exp(dt A) and dt B u, loop over L), Mamba's configuration (per-step B / C, one
      group, D, z, delta_bias, softplus), N = 16. Two floors:
        CPU  Gexp/s against the machine's exp rate: the forward evaluates exp(dt A) once per state element
             (B D L N); forward+backward twice (the backward recomputes it: storing it is O(B D L N)). The
             harness also times that many exps alongside each case (bench.harness.exp_floor_fn) and reports
             ours / that as "x the exp floor timed alongside": on this VM the exp rate itself swings
             between 8.6 and 18 G/s from one minute to the next.
        CUDA GB/s against the copy bandwidth: u, delta, z, B, C read and out written once (forward); the
             backward also reads dout and writes du, ddelta, dz, dB, dC.
  Mamba block forward+backward (tokens/s): fastnn.nn.Mamba against the same block computed with
      F.conv1d and the reference scan (fastnn.reference.ssm.mamba_forward).
"""
from __future__ import annotations

import torch

import fastnn
from fastnn import ops
from fastnn.reference import ssm as ref

from ..harness import Case


def _inputs(B, D, L, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = rn(B, D, L).to(device, dtype)
    delta = (rn(B, D, L) * 0.5 - 1.0).to(device, dtype)
    A = -torch.exp(rn(D, N) * 0.5).to(device)
    Bm, Cm = rn(B, 1, N, L).to(device), rn(B, 1, N, L).to(device)
    Dv, bias = rn(D).to(device), (rn(D) * 0.5 - 2.0).to(device)
    z = rn(B, D, L).to(device, dtype)
    return u, delta, A, Bm, Cm, Dv, z, bias


def _fwd(fn, args):
    u, delta, A, Bm, Cm, Dv, z, bias = args
    return lambda: fn(u, delta, A, Bm, Cm, Dv, z, bias, True)


def _fwd_bwd(fn, args):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    g = torch.Generator().manual_seed(1)  # the same dout for ours and the peer
    dout = torch.randn(args[0].shape, generator=g).to(args[0])

    def call():
        for t in leaves:
            t.grad = None
        out = fn(*leaves, True)
        out.backward(dout)
        return leaves[0].grad
    return call


def _reference_scan(u, delta, A, Bm, Cm, Dv, z, bias, softplus):
    return ref.selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, softplus)[0]


def _close(rtol, atol):
    def check(x, y):
        scale = y.float().abs().max().item()
        return bool(((x.float() - y.float()).abs() <= atol * scale + rtol * y.float().abs()).all())
    return check


def scan_shapes(device: str, quick: bool):
    """(B, D, L, N, peer for the forward, peer for forward+backward). The reference's backward is
    autograd through its L-step loop, and every step's slice of the (B, D, L, N) tensors backpropagates
    into a full-size zero tensor: O(L^2 B D N), 176 s at the issue's shape (bench/NOTES.md). So the
    forward+backward peer runs at a smaller shape only."""
    if device == "cpu":
        shapes = [(2, 1536, 1024, 16, True, False),  # the CPU target shape
                  (1, 256, 512, 16, True, True)]
        if not quick:  # the ranges (B up to 8, D 1536-5120, L 512-8192) at their corners, kept small
            shapes += [(1, 2048, 4096, 16, False, False), (4, 1536, 512, 16, False, False),
                       (8, 5120, 512, 16, False, False), (1, 1536, 8192, 16, False, False)]
        return shapes
    shapes = [(8, 1536, 2048, 16, True, False), (1, 256, 512, 16, True, True), (4, 2560, 4096, 16, False, False),
              (2, 5120, 8192, 16, False, False)]
    return shapes[:3] if quick else shapes


def cases(device: str, quick: bool):
    out = []
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16, torch.float32)
    for (B, D, L, N, fwd_peer, bwd_peer) in scan_shapes(device, quick):
        for dtype in dtypes:
            args = _inputs(B, D, L, N, dtype, device)
            isz = torch.tensor([], dtype=dtype).element_size()
            shape = f"B={B},D={D},L={L},N={N}"
            dname = str(dtype).replace("torch.", "")
            if device == "cpu":
                metric, fwd_work, bwd_work = "Gexp/s", B * D * L * N, 2 * B * D * L * N
            else:
                io, bc = B * D * L * isz, 2 * B * N * L * 4
                metric, fwd_work, bwd_work = "GB/s", 4 * io + bc, (4 * io + bc) + (7 * io + 2 * bc)
            tol = _close(2e-2, 2e-2) if dtype == torch.bfloat16 else _close(1e-3, 1e-3)
            out.append(Case("ssm", "selective_scan fwd", shape, dname, _fwd(ops.selective_scan_fn, args),
                            "reference (PyTorch)", _fwd(_reference_scan, args) if fwd_peer else None, metric=metric,
                            work=fwd_work, check=tol))
            out.append(Case("ssm", "selective_scan fwd+bwd", shape, dname, _fwd_bwd(ops.selective_scan_fn, args),
                            "reference (PyTorch)", _fwd_bwd(_reference_scan, args) if bwd_peer else None, metric=metric,
                            work=bwd_work, check=tol, peak_memory=True))
            if quick and device == "cpu":
                break  # one dtype
    out += _mamba_cases(device, quick)
    return out


def _mamba_cases(device: str, quick: bool):
    if not hasattr(ops, "causal_conv1d_fn"):
        return []
    # CPU: short enough for the reference block's O(L^2) backward (see scan_shapes)
    B, L, d_model = (2, 256, 512) if device == "cpu" else (8, 512, 1024)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    block = fastnn.nn.Mamba(d_model, device=device, dtype=dtype)
    x = torch.randn(B, L, d_model, device=device, dtype=dtype)
    dout = torch.randn_like(x)

    def fwd_bwd(fn):
        xi = x.clone().requires_grad_()

        def call():
            block.zero_grad(set_to_none=True)
            xi.grad = None
            fn(xi).backward(dout)
            return xi.grad
        return call

    return [Case("ssm", "Mamba block fwd+bwd", f"B={B},L={L},d_model={d_model}", str(dtype).replace("torch.", ""),
                 fwd_bwd(block), "F.conv1d + reference scan", fwd_bwd(lambda t: ref.mamba_forward(block, t)),
                 metric="tokens/s", work=B * L, check=_close(3e-2, 3e-2), peak_memory=True)]
