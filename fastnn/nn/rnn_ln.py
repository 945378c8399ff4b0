"""fastnn.nn.LayerNormLSTM: haste's layer-normalised LSTM with zoneout, beyond torch.nn.

Inputs and outputs follow fastnn.nn.LSTM (hence torch.nn.LSTM) exactly: padded (batch_first or not),
unbatched, or PackedSequence (lengths in any order); hx = (h0, c0) optional; dropout between layers in
training. The math and its choices (zoneout on h only; the output is the zoned-out h):
fastnn.reference.rnn.layer_norm_lstm_layer.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch.nn import Parameter

from ..ops import rnn_ln as rnn_ln_ops
from ..reference.rnn import LayerNormLSTMWeights
from .rnn import check_rnn_arguments


class LayerNormLSTM(torch.nn.Module):
    """A stacked (bi)directional LSTM with layer norm on the input and recurrent pre-activations and on the
    cell, and zoneout on h.

    Arguments as torch.nn.LSTM's (no proj_size) plus haste's ``zoneout`` (z in [0, 1]): in training each unit of h
    keeps its previous value with probability z at every step; in evaluation h' = z h + (1 - z) h_new; and
    haste's ``forget_bias`` (default 1.0, as haste): the forget gate's part of ``bias`` starts at this value
    (no effect with bias=False).
    Parameters per layer k and direction (suffix ``_l{k}``, ``_reverse`` for the reverse direction):
    weight_ih (4H, I), weight_hh (4H, H), bias (4H,) when bias=True, ln_ih_weight / ln_ih_bias (4H,),
    ln_hh_weight / ln_hh_bias (4H,), ln_cell_weight / ln_cell_bias (H,). Gate order i, f, g, o.
    Initialisation: weights U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.LSTM; bias 0 but forget_bias on the forget gate
    (units H..2H); layer-norm biases 0; gains 1.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, zoneout: float = 0.0,
                 forget_bias: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        check_rnn_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, stacklevel=3,
                            bidirectional=bidirectional)
        zoneout = rnn_ln_ops._check_zoneout(zoneout)
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float)) or not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        self.forget_bias = float(forget_bias)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.zoneout = bidirectional, zoneout
        factory = {"device": device, "dtype": dtype}
        G, H = 4 * hidden_size, hidden_size
        directions = 2 if bidirectional else 1
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else H * directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (G, layer_input)), ("weight_hh", (G, H))]
                if bias:
                    shapes.append(("bias", (G,)))
                shapes += [("ln_ih_weight", (G,)), ("ln_ih_bias", (G,)), ("ln_hh_weight", (G,)),
                           ("ln_hh_bias", (G,)), ("ln_cell_weight", (H,)), ("ln_cell_bias", (H,))]
                names = []
                for name, shape in shapes:
                    setattr(self, name + suffix, Parameter(torch.empty(shape, **factory)))
                    names.append(name + suffix)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) (torch.nn.LSTM's); biases 0 but the forget gate's
        part of ``bias``, forget_bias (haste's); layer-norm gains 1."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        H = self.hidden_size
        for name, p in self.named_parameters():
            if name.startswith("weight_"):
                torch.nn.init.uniform_(p, -stdv, stdv)
            elif name.startswith(("ln_ih_weight", "ln_hh_weight", "ln_cell_weight")):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.zeros_(p)
                if name.startswith("bias_"):  # gate order i, f, g, o
                    torch.nn.init.constant_(p[H:2 * H], self.forget_bias)

    @property
    def all_weights(self) -> List[List[Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def layer_weights(self) -> List[LayerNormLSTMWeights]:
        """The parameters of each layer and direction (layer-major, forward then reverse)."""
        out = []
        directions = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            for d in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
                get = lambda name: getattr(self, name + suffix, None)  # noqa: E731 (bias may be absent)
                out.append(LayerNormLSTMWeights(get("weight_ih"), get("weight_hh"), get("bias"),
                                                *(get(name) for name in LayerNormLSTMWeights._fields[3:])))
        return out

    def forward(self, input, hx=None):
        """input: (T, B, I) (batch_first: (B, T, I)), unbatched (T, I) or a PackedSequence; hx: None or (h0, c0),
        each (num_layers * directions, B, H). -> (output, (h_n, c_n)) as torch.nn.LSTM."""
        return rnn_ln_ops.layer_norm_lstm(input, hx, self.layer_weights(), num_layers=self.num_layers,
                                          bidirectional=self.bidirectional, batch_first=self.batch_first,
                                          dropout=self.dropout, zoneout=self.zoneout, training=self.training)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0),
                              ("bidirectional", False), ("zoneout", 0), ("forget_bias", 1.0)):
            value = getattr(self, name)
            if value != default:
                s += f", {name}={value}"
        return s
