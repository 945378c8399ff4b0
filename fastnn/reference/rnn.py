"""Recurrent layers in plain PyTorch: the oracles for fastnn's LSTM / GRU kernels.

Gate order and formulas are torch.nn's:
  LSTM  i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh, 4)
        c' = sigmoid(f) c + sigmoid(i) tanh(g);  r = sigmoid(o) tanh(c');  h' = r W_hr^T (proj_size) or r
  GRU   r, z, n: r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r (h W_hn^T + b_hn)),
        h' = (1 - z) n + z h
  LayerNormLSTM (haste's, beyond torch.nn; same gate order, eps 1e-5 in every layer norm)
        gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + b  (each LN over the 4H pre-activations, own gain / bias)
        c' = sigmoid(f) c + sigmoid(i) tanh(g);  h_new = sigmoid(o) tanh(LN_cell(c'))  (LN over H)
        zoneout z on h only: training h' = m h + (1 - m) h_new, m ~ Bernoulli(z) per unit and step;
        evaluation h' = z h + (1 - z) h_new. Details and choices: layer_norm_lstm_layer.
A layer runs over a time-major *packed* batch, the layout of torch.nn.utils.rnn.PackedSequence.data: the
rows of step t are the first batch_sizes[t] sequences (batch_sizes non-increasing), stored one step after
the other. A padded (T, B, I) input is the case batch_sizes = [B] * T. The forward direction stops each
sequence at its own length; the reverse direction starts each one at its own last step, from h0.

Everything here is differentiable by autograd and runs in float64.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

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
    def run_layer(k, layer_in, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
        return rnn_layer(mode, layer_in, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, h0[k],
                         None if c0 is None else c0[k], reverse=reverse)

    y, hs, cs = stacked(x, num_layers, bidirectional, run_layer, dropout_masks)
    return y, torch.stack(hs), (torch.stack(cs) if mode == "lstm" else None)


def stacked(x: Tensor, num_layers: int, bidirectional: bool, run_layer,
            dropout_masks: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, List[Tensor], List[Optional[Tensor]]]:
    """Layers on top of each other, both directions of a layer side by side: run_layer(k, layer_in,
    reverse) -> (y, h_n, c_n) for layer-and-direction k (layer-major); the dropout masks multiply every
    layer's output but the last's. Returns (the last layer's output, the h_n list, the c_n list)."""
    directions = 2 if bidirectional else 1
    hs, cs = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            y, h, c = run_layer(layer * directions + d, layer_in, d == 1)
            outs.append(y)
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
        if dropout_masks is not None and layer < num_layers - 1:
            layer_in = layer_in * dropout_masks[layer]
    return layer_in, hs, cs


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


# ---------------------------------------------------------------- layer-normalised LSTM with zoneout

LAYER_NORM_EPS = 1e-5


class LayerNormLSTMWeights(NamedTuple):
    """One layer and direction of a LayerNormLSTM: w_ih (4H, I), w_hh (4H, H), bias (4H,) or None, and the
    gain / bias of each layer norm: ln_ih_* and ln_hh_* (4H,), ln_cell_* (H,)."""
    w_ih: Tensor
    w_hh: Tensor
    bias: Optional[Tensor]
    ln_ih_weight: Tensor
    ln_ih_bias: Tensor
    ln_hh_weight: Tensor
    ln_hh_bias: Tensor
    ln_cell_weight: Tensor
    ln_cell_bias: Tensor


def layer_norm(v: Tensor, weight: Tensor, bias: Tensor, eps: float = LAYER_NORM_EPS) -> Tensor:
    """Layer norm over the last dimension, written out: (v - mean) / sqrt(biased variance + eps) * weight +
    bias (torch.nn.functional.layer_norm's definition; the tests check the two agree)."""
    mean = v.mean(-1, keepdim=True)
    var = (v - mean).square().mean(-1, keepdim=True)
    return (v - mean) * torch.rsqrt(var + eps) * weight + bias


def zoneout(h_prev: Tensor, h_new: Tensor, keep: Union[float, Tensor]) -> Tensor:
    """keep * h_prev + (1 - keep) * h_new: keep is a 0 / 1 mask in training (1 = the unit keeps its previous
    value), the zoneout probability z in evaluation (the expectation of the training update)."""
    return keep * h_prev + (1 - keep) * h_new


def layer_norm_lstm_cell(x: Tensor, h: Tensor, c: Tensor, weights: LayerNormLSTMWeights,
                         keep: Union[None, float, Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One step of the layer-normalised LSTM: (h', c') from x (B, I), h (B, H), c (B, H).

    gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + bias, split into i, f, g, o (torch's order);
    c' = sigmoid(f) c + sigmoid(i) tanh(g);  h_new = sigmoid(o) tanh(LN_cell(c'));
    h' = zoneout(h, h_new, keep) when keep is given (see zoneout), else h_new. c' is never zoned out.
    """
    w = weights
    gates = (layer_norm(x @ w.w_ih.t(), w.ln_ih_weight, w.ln_ih_bias)
             + layer_norm(h @ w.w_hh.t(), w.ln_hh_weight, w.ln_hh_bias))
    if w.bias is not None:
        gates = gates + w.bias
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(layer_norm(c_new, w.ln_cell_weight, w.ln_cell_bias))
    if keep is not None:
        h_new = zoneout(h, h_new, keep)
    return h_new, c_new


def layer_norm_lstm_layer(x: Tensor, batch_sizes: Sequence[int], weights: LayerNormLSTMWeights, h0: Tensor,
                          c0: Tensor, zoneout_keep: Union[None, float, Tensor] = None,
                          reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction of the layer-normalised LSTM over a packed batch: (y (rows, H), h_n (B, H),
    c_n (B, H)), in the packed layout of rnn_layer.

    The LayerNormLSTM (haste's, with torch's gate order i, f, g, o; eps = 1e-5 in every layer norm):
      gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + bias     LN_ih / LN_hh over the 4H pre-activations, each
                                                           with its own gain and bias
      c' = sigmoid(f) c + sigmoid(i) tanh(g)
      h_new = sigmoid(o) tanh(LN_cell(c'))                 LN_cell over the H units, with gain and bias
      h' = m h + (1 - m) h_new                             zoneout, training: m ~ Bernoulli(z) per unit and step
      h' = z h + (1 - z) h_new                             zoneout, evaluation (the expected update)
    Choices: the cell state c is not zoned out (as in haste's LSTM); y is the zoned-out h' (the state the
    next step reads) rather than h_new; a sequence's finished steps carry h and c unchanged, as in rnn_layer.
    zoneout_keep: None (no zoneout), a float z (evaluation), or a (rows, H) tensor of per-step masks m in the
    packed layout of x (training; drawn by the caller so tests can choose them).
    """
    offsets = step_offsets(batch_sizes)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    h, c = h0, c0
    ys: List[Optional[Tensor]] = [None] * len(batch_sizes)
    for t in steps:
        bs = int(batch_sizes[t])
        rows = slice(offsets[t], offsets[t + 1])
        keep = zoneout_keep[rows] if isinstance(zoneout_keep, Tensor) else zoneout_keep
        h_new, c_new = layer_norm_lstm_cell(x[rows], h[:bs], c[:bs], weights, keep)
        h = torch.cat([h_new, h[bs:]])
        c = torch.cat([c_new, c[bs:]])
        ys[t] = h_new
    y = torch.cat(ys) if ys else x.new_empty(0, h0.shape[-1])
    return y, h, c


def layer_norm_lstm(x: Tensor, batch_sizes: Sequence[int], weights: Sequence[LayerNormLSTMWeights], h0: Tensor,
                    c0: Tensor, num_layers: int, bidirectional: bool,
                    dropout_masks: Optional[Sequence[Tensor]] = None,
                    zoneout_keep: Union[None, float, Sequence[Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """A stacked (bi)directional LayerNormLSTM over a packed batch (see layer_norm_lstm_layer).

    weights: per layer and direction (layer-major, forward then reverse); h0, c0 (num_layers * directions,
    B, H); dropout_masks as in rnn; zoneout_keep: None, a float z (evaluation) or one (rows, H) mask per layer
    and direction (training). Returns (y (rows, directions * H), h_n, c_n).
    """
    def run_layer(k, layer_in, reverse):
        keep = zoneout_keep if zoneout_keep is None or isinstance(zoneout_keep, float) else zoneout_keep[k]
        return layer_norm_lstm_layer(layer_in, batch_sizes, weights[k], h0[k], c0[k], keep, reverse=reverse)

    y, hs, cs = stacked(x, num_layers, bidirectional, run_layer, dropout_masks)
    return y, torch.stack(hs), torch.stack(cs)
