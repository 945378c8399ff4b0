"""Recurrent layers in plain PyTorch: the oracles for fastnn's LSTM / GRU kernels.

Gate order and formulas are torch.nn's:
  LSTM  i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh, 4)
        c' = sigmoid(f) c + sigmoid(i) tanh(g);  r = sigmoid(o) tanh(c');  h' = r W_hr^T (proj_size) or r
  GRU   r, z, n: r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r (h W_hn^T + b_hn)),
        h' = (1 - z) n + z h
A layer runs over a time-major *packed* batch, the layout of torch.nn.utils.rnn.PackedSequence.data: the
rows of step t are the first batch_sizes[t] sequences (batch_sizes non-increasing), stored one step after
the other. A padded (T, B, I) input is the case batch_sizes = [B] * T. The forward direction stops each
sequence at its own length; the reverse direction starts each one at its own last step, from h0.

Everything here is differentiable by autograd and runs in float64.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

MODES = ("lstm", "gru")


def gates_per_unit(mode: str) -> int:
    """Rows of W_ih per hidden unit: 4 for the LSTM (i, f, g, o), 3 for the GRU (r, z, n)."""
    return {"lstm": 4, "gru": 3}[mode]


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, w_hr: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step: (h', c') from x (B, I), h (B, P), c (B, H). w_hr (P, H) projects h' when given."""
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """One GRU step: h' from x (B, I) and h (B, H)."""
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=-1)
    hr, hz, hn = _linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def step_offsets(batch_sizes: Sequence[int]) -> List[int]:
    """Row offset of each step in the packed layout (length T + 1; the last is the row count)."""
    offsets = [0]
    for b in batch_sizes:
        offsets.append(offsets[-1] + int(b))
    return offsets


def rnn_layer(mode: str, x: Tensor, batch_sizes: Sequence[int], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], w_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
              reverse: bool = False) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction over a packed batch: (y (rows, P), h_n (B, P), c_n (B, H) or None).

    x: (rows, I) packed time-major; batch_sizes: the rows of each step (non-increasing, first = B);
    h0 (B, P), c0 (B, H) for the LSTM (None for the GRU).
    """
    offsets = step_offsets(batch_sizes)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    h, c = h0, c0
    ys: List[Optional[Tensor]] = [None] * len(batch_sizes)
    for t in steps:
        bs = int(batch_sizes[t])
        xt = x[offsets[t]:offsets[t + 1]]
        if mode == "lstm":
            h_new, c_new = lstm_cell(xt, h[:bs], c[:bs], w_ih, w_hh, b_ih, b_hh, w_hr)
            c = torch.cat([c_new, c[bs:]])
        else:
            h_new = gru_cell(xt, h[:bs], w_ih, w_hh, b_ih, b_hh)
        h = torch.cat([h_new, h[bs:]])
        ys[t] = h_new
    y = torch.cat(ys) if ys else x.new_empty(0, h0.shape[-1])
    return y, h, c


def rnn(mode: str, x: Tensor, batch_sizes: Sequence[int], weights: Sequence[Sequence[Optional[Tensor]]], h0: Tensor,
        c0: Optional[Tensor], num_layers: int, bidirectional: bool,
        dropout_masks: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """A stacked (bi)directional LSTM / GRU over a packed batch, as torch.nn.LSTM / GRU computes it.

    weights: per layer and direction (layer-major, forward then reverse) the tuple (w_ih, w_hh, b_ih, b_hh,
    w_hr) with None for absent ones; h0 (num_layers * directions, B, P), c0 likewise with H.
    dropout_masks: one (rows, features) multiplier per layer but the last, applied to its output (the
    masks torch's dropout would draw, scaled by 1 / (1 - p)); None for no dropout.
    Returns (y (rows, directions * P), h_n, c_n).
    """
    directions = 2 if bidirectional else 1
    hs, cs = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            k = layer * directions + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            y, h, c = rnn_layer(mode, layer_in, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0[k],
                                None if c0 is None else c0[k], reverse=d == 1)
            outs.append(y)
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
        if dropout_masks is not None and layer < num_layers - 1:
            layer_in = layer_in * dropout_masks[layer]
    return layer_in, torch.stack(hs), (torch.stack(cs) if mode == "lstm" else None)


def pad_to_packed(x: Tensor, lengths: Optional[Sequence[int]] = None) -> Tuple[Tensor, List[int]]:
    """(T, B, I) time-major padded, lengths sorted non-increasing (all T when None) -> (packed rows,
    batch_sizes)."""
    T, B = x.shape[0], x.shape[1]
    lengths = [T] * B if lengths is None else [int(v) for v in lengths]
    batch_sizes = [sum(1 for v in lengths if v > t) for t in range(T)]
    while batch_sizes and batch_sizes[-1] == 0:
        batch_sizes.pop()
    rows = [x[t, :bs] for t, bs in enumerate(batch_sizes)]
    return (torch.cat(rows) if rows else x.new_empty(0, *x.shape[2:])), batch_sizes


def packed_to_pad(y: Tensor, batch_sizes: Sequence[int], total_length: int, batch: int) -> Tensor:
    """Packed rows -> (total_length, batch, F) padded with zeros."""
    out = y.new_zeros(total_length, batch, y.shape[-1])
    offsets = step_offsets(batch_sizes)
    for t, bs in enumerate(batch_sizes):
        out[t, :bs] = y[offsets[t]:offsets[t + 1]]
    return out
