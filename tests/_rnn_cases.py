"""Cases and checks shared by the Triton recurrent-layer tests (tests/test_rnn_triton.py under the
interpreter, tests/test_rnn_triton_cuda.py on the GPU): fastnn.kernels.rnn's launchers against
fastnn.reference.rnn.rnn_layer, forward and backward (autograd of the reference in float64)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from fastnn.reference import rnn as ref

from _tiers import lowp_close

FWD_NAMES = ("y", "h_n", "c_n")
GRAD_NAMES = ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr", "dh0", "dc0")


@dataclass(frozen=True)
class Case:
    mode: str = "lstm"
    batch_sizes: Tuple[int, ...] = (3, 3, 3, 3)
    I: int = 5
    H: int = 8
    proj: int = 0          # proj_size (LSTM only); 0 for none
    bias: bool = True
    reverse: bool = False

    @property
    def B(self) -> int:
        return self.batch_sizes[0] if self.batch_sizes else 0

    @property
    def rows(self) -> int:
        return sum(self.batch_sizes)

    @property
    def P(self) -> int:
        return self.proj or self.H


def make_inputs(case: Case, seed: int = 0) -> dict:
    """float64 inputs on the CPU: weights uniform in +-1/sqrt(H) (torch.nn's init), the rest normal."""
    g = torch.Generator().manual_seed(seed)
    G = ref.gates_per_unit(case.mode)
    k = case.H ** -0.5

    def u(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k

    def n(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    t = dict(x=n(case.rows, case.I), w_ih=u(G * case.H, case.I), w_hh=u(G * case.H, case.P),
             b_ih=u(G * case.H) if case.bias else None, b_hh=u(G * case.H) if case.bias else None,
             w_hr=u(case.proj, case.H) if case.proj else None, h0=n(case.B, case.P, scale=0.5),
             c0=n(case.B, case.H, scale=0.5) if case.mode == "lstm" else None,
             dy=n(case.rows, case.P), dh_n=n(case.B, case.P), dc_n=n(case.B, case.H) if case.mode == "lstm" else None)
    return t


_PARAMS = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0")


def reference(case: Case, t: dict, dtype: torch.dtype, device: str = "cpu"):
    """(y, h_n, c_n) and the gradients (as GRAD_NAMES, None where absent) of the reference layer run in
    dtype on device, for the loss <y, dy> + <h_n, dh_n> + <c_n, dc_n>."""
    leaves = {k: (t[k].to(device, dtype).requires_grad_() if t[k] is not None else None) for k in _PARAMS}
    y, h, c = ref.rnn_layer(case.mode, leaves["x"], list(case.batch_sizes), leaves["w_ih"], leaves["w_hh"],
                            leaves["b_ih"], leaves["b_hh"], leaves["w_hr"], leaves["h0"], leaves["c0"],
                            reverse=case.reverse)
    loss = (y * t["dy"].to(device, dtype)).sum() + (h * t["dh_n"].to(device, dtype)).sum()
    if c is not None:
        loss = loss + (c * t["dc_n"].to(device, dtype)).sum()
    wrt = [leaves[k] for k in _PARAMS if leaves[k] is not None]
    grads = iter(torch.autograd.grad(loss, wrt))
    return [v.detach() if v is not None else None for v in (y, h, c)], \
        [next(grads) if leaves[k] is not None else None for k in _PARAMS]


def run_launchers(case: Case, t: dict, dtype: torch.dtype, device: str = "cpu", train: bool = True,
                  want_dx: bool = True, want_dweights: bool = True, forward=None, backward=None):
    """fastnn.kernels.rnn: forward with train, then backward. Returns (forward outputs [y, h_n, c_n, gates,
    aux, r], backward outputs [dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0, dc0]). `forward` / `backward`
    replace the launchers (same arguments and outputs) to check another kernel, or one against the other's
    workspace."""
    from fastnn.kernels import rnn as kr

    forward = forward or kr.rnn_layer_forward
    backward = backward or kr.rnn_layer_backward
    d = {k: (v.to(device, dtype).contiguous() if v is not None else None) for k, v in t.items()}
    bsz = torch.tensor(case.batch_sizes, dtype=torch.int64)
    fwd = forward(case.mode, d["x"], bsz, d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], d["w_hr"], d["h0"], d["c0"],
                  case.reverse, train)
    if not train:
        return fwd, None
    y, _, _, gates, aux, r = fwd
    bwd = backward(case.mode, d["dy"], d["dh_n"], d["dc_n"], d["x"], bsz, d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                   d["w_hr"], d["h0"], d["c0"], y, gates, aux, r, case.reverse, want_dx, want_dweights)
    return fwd, bwd


def check_layout(case: Case, fwd, bwd, dtype: torch.dtype) -> None:
    """Shapes and dtypes of every output as csrc/families/rnn.h gives them (aux in float32)."""
    G = ref.gates_per_unit(case.mode)
    lstm = case.mode == "lstm"
    want = [(case.rows, case.P), (case.B, case.P), (case.B, case.H) if lstm else (0,), (case.rows, G * case.H),
            (case.rows, case.H), (case.rows, case.H) if case.proj else (0,)]
    for name, v, shape in zip(FWD_NAMES + ("gates", "aux", "r"), fwd, want):
        assert tuple(v.shape) == shape, f"{name}: shape {tuple(v.shape)}, expected {shape}"
        assert v.dtype == (torch.float32 if name == "aux" else dtype), f"{name}: dtype {v.dtype}"
    if bwd is None:
        return
    shapes = [(case.rows, case.I), (G * case.H, case.I), (G * case.H, case.P),
              (G * case.H,) if case.bias else (0,), (G * case.H,) if case.bias else (0,),
              (case.P, case.H) if case.proj else (0,), (case.B, case.P), (case.B, case.H) if lstm else (0,)]
    for name, v, shape in zip(GRAD_NAMES, bwd, shapes):
        assert tuple(v.shape) == shape and v.dtype == dtype, f"{name}: {tuple(v.shape)} {v.dtype}, expected {shape}"


def _fp32_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float) -> None:
    # absolute floor scaled by the tensor's magnitude: gradients of weights sum rows x steps terms
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def check_against_reference(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                            fp32_rtol: Optional[float] = 1e-5, lowp_floor: float = 1e-4, forward=None,
                            backward=None) -> None:
    """Forward and backward of the launchers on `device` vs the float64 reference (inputs rounded to dtype
    first; run on `device`). float32 with fp32_rtol: close within fp32_rtol (relative, and absolute scaled
    by the tensor's magnitude). float16 / bfloat16, and float32 with fp32_rtol None: DESIGN tier-2 rule,
    error <= 2x that of the reference run in dtype on `device` + lowp_floor x the tensor's magnitude.
    forward / backward: as run_launchers."""
    t = make_inputs(case, seed)
    fwd, bwd = run_launchers(case, t, dtype, device, forward=forward, backward=backward)
    check_layout(case, fwd, bwd, dtype)
    rounded = {k: (v.to(dtype).double() if v is not None else None) for k, v in t.items()}
    want_fwd, want_grads = reference(case, rounded, torch.float64, device)
    want_fwd = [v.cpu() if v is not None else None for v in want_fwd]
    want_grads = [v.cpu() if v is not None else None for v in want_grads]
    tight = dtype == torch.float32 and fp32_rtol is not None
    low = None if tight else reference(case, t, dtype, device)
    got = list(fwd[:3]) + list(bwd)
    want = want_fwd + want_grads
    names = FWD_NAMES + GRAD_NAMES
    lows = (low[0] + low[1]) if low is not None else [None] * len(names)
    for name, g, w, lo in zip(names, got, want, lows):
        if w is None:
            assert g.numel() == 0, f"{name}: expected an empty tensor, got {tuple(g.shape)}"
            continue
        g = g.cpu()
        if tight:
            _fp32_close(g, w, name, fp32_rtol)
        else:
            scale = max(1.0, w.abs().max().item())
            lowp_close(g, w, lo.cpu(), floor=lowp_floor * scale, what=name)


def random_packed_lengths(B: int, T: int, seed: int) -> Tuple[int, ...]:
    """batch_sizes of B sequences of random lengths in [1, T], the longest T."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    return packed_lengths(lengths)


def packed_lengths(lengths: Sequence[int]) -> Tuple[int, ...]:
    """batch_sizes of sequences with these lengths (sorted non-increasing)."""
    lengths = sorted(lengths, reverse=True)
    return tuple(sum(1 for v in lengths if v > s) for s in range(lengths[0]))
