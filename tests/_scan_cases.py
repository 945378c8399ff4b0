"""Selective-scan test cases shared by the CUDA kernel tests (tests/test_ssm_scan_cuda.py) and their CPU
emulation (tests/test_ssm_scan_emu.py): inputs scaled as in mamba's test_selective_scan, the fp64
reference (fastnn.reference.ssm.selective_scan) with its autograd gradients, and mamba's tolerances."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from fastnn.reference.ssm import selective_scan

CHUNK = 2048  # the CUDA kernel's chunk (kScanChunk)

# mamba's test_selective_scan tolerances for the output (rtol, atol), against the fp64 reference
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


@dataclass
class Case:
    dtype: torch.dtype = torch.float32
    B: int = 2
    D: int = 4
    L: int = 7
    N: int = 4
    G: int = 1
    var_B: bool = False
    var_C: bool = False
    z: bool = False
    D_skip: bool = False
    bias: bool = False
    softplus: bool = False
    init: bool = False
    seq: bool = False
    per_seq: bool = False
    dlast: bool = True
    deterministic: bool = True
    seed: int = 0
    t: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)

    def id(self) -> str:
        dt = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[self.dtype]
        flags = [n for n in ("var_B", "var_C", "z", "D_skip", "bias", "softplus", "init", "seq", "per_seq",
                             "deterministic") if getattr(self, n)]
        return f"{dt}-B{self.B}D{self.D}L{self.L}N{self.N}G{self.G}-" + "+".join(flags)


def seq_index(B: int, L: int, per_seq: bool, gen: torch.Generator) -> torch.Tensor:
    """(B, L) int32, non-decreasing per row: a few segments, some of length 1; per_seq numbers them 0..S-1."""
    rows = []
    for _ in range(B):
        k = min(max(L - 1, 0), 4)
        cuts = torch.randperm(max(L - 1, 1), generator=gen)[:k] + 1 if L > 1 else torch.zeros(0, dtype=torch.long)
        if L > 3:  # a length-1 segment at the very end and a boundary right after step 0
            cuts = torch.cat([cuts, torch.tensor([1, L - 1])])
        starts = torch.zeros(L, dtype=torch.int32)
        starts[cuts.unique()] = 1
        rows.append(torch.cumsum(starts, 0).to(torch.int32))
    s = torch.stack(rows)
    if not per_seq:
        s = s + torch.randint(0, 3, (B, 1), generator=gen, dtype=torch.int32)  # ids need not start at 0
    return s


def build(c: Case, device: str) -> Case:
    """Fills c.t with the inputs (u, delta, z, dout in c.dtype; the rest float32; seq int32) on device."""
    gen = torch.Generator().manual_seed(c.seed)
    f32 = torch.float32

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f32)

    def ru(*shape):
        return torch.rand(*shape, generator=gen, dtype=f32)

    B, D, L, N, G = c.B, c.D, c.L, c.N, c.G
    t: Dict[str, Optional[torch.Tensor]] = {}
    t["u"] = rn(B, D, L).to(c.dtype)
    t["delta"] = (0.5 * ru(B, D, L) - (0.25 if c.bias else 0.0)).to(c.dtype)
    t["A"] = -0.5 * ru(D, N)
    t["B"] = rn(B, G, N, L) if c.var_B else rn(D, N)
    t["C"] = rn(B, G, N, L) if c.var_C else rn(D, N)
    t["D"] = rn(D) if c.D_skip else None
    t["z"] = rn(B, D, L).to(c.dtype) if c.z else None
    t["bias"] = 0.5 * ru(D) if c.bias else None
    t["seq"] = seq_index(B, L, c.per_seq, gen) if c.seq else None
    S = int(t["seq"].max()) + 1 if (c.per_seq and c.seq) else B
    t["init"] = rn(S, D, N) if c.init else None
    t["dout"] = rn(B, D, L).to(c.dtype)
    t["dlast"] = rn(S, D, N) if c.dlast else None
    c.t = {k: (None if v is None else v.to(device)) for k, v in t.items()}
    return c


def reference(c: Case) -> Dict[str, Optional[torch.Tensor]]:
    """fp64 reference on the CPU from the (rounded) inputs: out, last, chunks and the gradients of
    sum(out * dout) + sum(last * dlast)."""
    t = {k: (None if v is None else v.detach().cpu()) for k, v in c.t.items()}
    leaves = {}
    for k in ("u", "delta", "A", "B", "C", "D", "z", "bias", "init"):
        if t[k] is not None:
            leaves[k] = t[k].double().requires_grad_(True)
    g = leaves.get
    out, last, chunks = selective_scan(g("u"), g("delta"), g("A"), g("B"), g("C"), g("D"), g("z"), g("bias"),
                                       c.softplus, g("init"), t["seq"], c.per_seq, chunk_size=CHUNK)
    loss = (out * t["dout"].double()).sum()
    if t["dlast"] is not None:
        loss = loss + (last * t["dlast"].double()).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    r = {"out": out.detach(), "last": last.detach(), "chunks": chunks.detach()}
    for k, gr in zip(names, grads):
        r["d" + k] = torch.zeros_like(leaves[k]) if gr is None else gr
    return r


def tolerances(c: Case) -> Dict[str, tuple]:
    """mamba's test_selective_scan: out at (rtol, atol); du x2; ddelta rtol x5, atol x10; the float32
    weight gradients at max(1e-3, .) (dA's atol x5), the per-step dB / dC at the input tolerance."""
    rtol, atol = TOL[c.dtype]
    rtolw, atolw = max(1e-3, rtol), max(1e-3, atol)
    return {
        "out": (rtol, atol), "last": (rtol, atol), "chunks": (rtol, atol),
        "du": (2 * rtol, 2 * atol), "ddelta": (5 * rtol, 10 * atol), "dz": (2 * rtol, 2 * atol),
        "dA": (rtolw, 5 * atolw), "dD": (rtolw, atolw), "dbias": (rtolw, atolw), "dinit": (rtolw, atolw),
        "dB": (rtol, atol) if c.var_B else (rtolw, atolw), "dC": (rtol, atol) if c.var_C else (rtolw, atolw),
    }


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    ok = torch.isclose(got, want, rtol=rtol, atol=atol)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        err = (got - want).abs().max().item()
        raise AssertionError(f"{name}: {int((~ok).sum())}/{ok.numel()} outside rtol={rtol} atol={atol}; "
                             f"max abs err {err:.3g}; first bad {bad}: got {got[tuple(bad)].item():.6g} "
                             f"want {want[tuple(bad)].item():.6g}")
