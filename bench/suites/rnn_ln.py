"""LayerNormLSTM (with and without zoneout) against its reference composition.

torch.nn has no layer-normalised LSTM, so the peer is fastnn.reference.rnn.layer_norm_lstm (plain PyTorch: a
per-step loop of matmuls, layer norms and gate math, differentiated by autograd) on the same parameters and
input: the code one would otherwise write.
  fwd      under torch.no_grad, as inference runs it (eval: zoneout is the constant blend)
  fwd+bwd  training, backward of a random cotangent of the output with respect to the input and every
           parameter; with zoneout the module draws its masks as in training (reseeded before each call, so
           they equal the masks the reference is given)
Floor: the GEMM flops, 2 * rows * 4H * (I + H) for the forward (input projection + recurrence) and 3x that for
forward+backward, against the machine's matmul rate; the layer norms and gates add O(rows * H) work.
On CUDA the module runs the Triton cells (kernels/rnn_ln.py); float32 only, as they compute (fp16 / bf16 are
lifted to float32 by the op, on both devices).
"""
from __future__ import annotations

import torch

import fastnn
from fastnn.ops import rnn_ln as rnn_ln_ops
from fastnn.reference import rnn as ref

from ..harness import Case


def _close(rtol):
    def check(x, y):
        x, y = x.float(), y.float()
        return bool(((x - y).abs() <= rtol * (y.abs().max() + 1e-6)).all())
    return check


def _module(I, H, zoneout, dtype):
    torch.manual_seed(0)
    m = fastnn.nn.LayerNormLSTM(I, H, zoneout=zoneout).to(dtype)
    with torch.no_grad():  # gains and biases away from 1 and 0, as after some training
        for name, p in m.named_parameters():
            if name.startswith("ln_") or name.startswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def _reference(m, x, masks):
    """The reference composition on m's parameters: padded (T, B, I) -> output (T, B, H)."""
    T, B, I = x.shape
    zeros = x.new_zeros(1, B, m.hidden_size)
    keep = masks if m.training and masks is not None else (m.zoneout if m.zoneout else None)
    y, _, _ = ref.layer_norm_lstm(x.reshape(T * B, I), [B] * T, m.layer_weights(), zeros, zeros, 1, False,
                                  zoneout_keep=keep)
    return y.reshape(T, B, -1)


def _ours(m, x, masks):
    """The module as a user runs it (it draws its own zoneout masks: reseeded so they equal `masks`)."""
    if masks is not None:
        torch.manual_seed(_MASK_SEED)
    return m(x)[0]


_MASK_SEED = 7


def _draw_masks(rows, H, zoneout, dtype, device):
    """The masks the module draws after torch.manual_seed(_MASK_SEED) (one layer: one draw)."""
    torch.manual_seed(_MASK_SEED)
    return [rnn_ln_ops.draw_zoneout_mask(rows, H, zoneout, device, dtype)]


def _fwd(run, m, x):
    def call():
        m.eval()
        with torch.no_grad():
            return run(m, x, None)
    return call


def _fwd_bwd(run, m, x, masks, seed=1):
    leaf = x.detach().clone().requires_grad_()
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(x.shape[0], x.shape[1], m.hidden_size, generator=g).to(x)

    def call():
        m.train()
        m.zero_grad(set_to_none=True)
        leaf.grad = None
        run(m, leaf, masks).backward(dout)
        return leaf.grad
    return call


def cases(device: str, quick: bool):
    B, H, T, I = (16, 256, 64, 256) if device == "cpu" else (64, 512, 64, 512)
    dtype = torch.float32
    shape = f"B={B},H={H},T={T},I={I}"
    flops = 2 * T * B * 4 * H * (I + H)
    x = torch.randn(T, B, I, dtype=dtype, device=device)
    out = []
    for zoneout in ((0.0,) if quick else (0.0, 0.1)):
        m = _module(I, H, zoneout, dtype).to(device)
        masks = _draw_masks(T * B, H, zoneout, dtype, device) if zoneout else None
        label = "LayerNormLSTM" + (f" z={zoneout}" if zoneout else "")
        peer = "reference (torch ops)"
        out.append(Case("rnn_ln", f"{label} fwd", shape, "float32", _fwd(_ours, m, x), peer, _fwd(_reference, m, x),
                        metric="TFLOP/s", work=flops, check=_close(1e-4)))
        out.append(Case("rnn_ln", f"{label} fwd+bwd", shape, "float32", _fwd_bwd(_ours, m, x, masks), peer,
                        _fwd_bwd(_reference, m, x, masks), metric="TFLOP/s", work=3 * flops, check=_close(1e-3)))
    return out
