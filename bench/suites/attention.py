"""Attention against torch SDPA on the same device, each SDPA backend the device has as its own peer
(CUDA: flash, cuDNN, efficient, math; CPU: flash (torch's CPU kernel) and math).

Forward, backward and forward+backward in TFLOP/s (forward 4 B H Lq Lk D flops, halved when causal; backward
2.5x the forward, as flash-attention counts), decode in GB/s of KV cache read, peak memory of
forward+backward at the longest sequence (CUDA).
  CUDA: bf16, head dim 64 and 128, causal and not, sequence 512 to 16k at 16k tokens per batch.
  CPU:  fp32 and bf16, B=4, H=8, L=1024, D=64 (the issue's reference shape), causal and not.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fastnn
from fastnn import ops

from ..harness import Case

_SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def _sdpa_backends(device: str, quick: bool):
    """SDPA backends to use as peers here, by name."""
    from torch.nn.attention import SDPBackend

    names = ("flash", "cudnn", "efficient", "math") if device == "cuda" else ("flash", "math")
    if quick:
        names = ("flash", "cudnn") if device == "cuda" else ("flash",)
    return {n: getattr(SDPBackend, _SDPA[n]) for n in names if hasattr(SDPBackend, _SDPA[n])}


def _peer_ctx(backend):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()


def _close(a, b) -> bool:
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= 2e-2 * b.abs().max() + 1e-3)


def _modes(q, k, v, dout, ours, peer):
    """{mode: (ours_fn, peer_fn)} for fwd, bwd (graph kept, gradients only) and fwd+bwd."""
    leaves = (q, k, v)
    out_o, out_p = ours(), peer()

    def bwd(out):
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)[0]

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), leaves, dout)[0]

    return {"fwd": (ours, peer), "bwd": (bwd(out_o), bwd(out_p)), "fwd+bwd": (fwd_bwd(ours), fwd_bwd(peer))}


def _attention_cases(device, quick, dtype, B, H, L, D, causal, modes, peers, peak_memory=False):
    cases = []
    dt = str(dtype).replace("torch.", "")
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, L, D, device=device, dtype=dtype)
    fwd_flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}

    def ours():
        return ops.scaled_dot_product_attention(q, k, v, is_causal=causal)

    for pname, pbackend in peers.items():
        def peer(pb=pbackend):
            with _peer_ctx(pb):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            with torch.no_grad():
                peer()
        except RuntimeError:  # this SDPA backend does not take these inputs on this machine
            continue
        fns = _modes(q, k, v, dout, ours, peer)
        for mode in modes:
            o, p = fns[mode]
            cases.append(Case("attention", f"{mode} {'causal' if causal else 'full'}", f"B{B} H{H} L{L} D{D}", dt, o,
                              f"sdpa[{pname}]", p, metric="TFLOP/s", work=flops[mode], check=_close,
                              peak_memory=peak_memory and mode == "fwd+bwd"))
    return cases


def _decode_cases(device, quick, dtype):
    B, H, Hkv, D, cache = (8, 32, 8, 128, 8192) if device == "cuda" else (4, 16, 4, 64, 4096)
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    kc, vc = (torch.randn(B, cache, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    lens = torch.full((B,), cache, dtype=torch.int32, device=device)
    qs, ks, vs = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    work = 2 * B * cache * Hkv * D * kc.element_size()
    dt = str(dtype).replace("torch.", "")
    return [Case("attention", "decode", f"B{B} H{H}/{Hkv} cache{cache} D{D}", dt,
                 lambda: ops.attention_decode(q, kc, vc, lens).transpose(1, 2), "sdpa(enable_gqa)",
                 lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True), metric="GB/s", work=work,
                 check=_close)]


def cases(device: str, quick: bool):
    peers = _sdpa_backends(device, quick)
    out = []
    if device == "cuda":
        tokens = 16384
        seqs = (1024, 4096, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        for D in (64, 128):
            H = 2048 // D
            for L in seqs:
                if D == 64 and quick and L != 4096:
                    continue
                for causal in (False, True):
                    p = {n: b for n, b in peers.items() if not (n == "math" and L > 2048)}
                    modes = ("fwd", "fwd+bwd") if quick else ("fwd", "bwd", "fwd+bwd")
                    out += _attention_cases(device, quick, torch.bfloat16, max(tokens // L, 1), H, L, D, causal,
                                            modes, p, peak_memory=(L == seqs[-1]))
        out += _decode_cases(device, quick, torch.bfloat16)
    else:
        if "cpp" not in fastnn.usable_backends("cpu"):
            return out
        for dtype in (torch.float32, torch.bfloat16):
            for causal in (False, True):
                out += _attention_cases(device, quick, dtype, 4, 8, 1024, 64, causal,
                                        ("fwd",) if quick else ("fwd", "fwd+bwd"), peers)
        out += _decode_cases(device, quick, torch.float32)
    return out
