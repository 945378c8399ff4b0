"""Drop-in torch.nn.LSTM, GRU, LSTMCell and GRUCell running fastnn's recurrent kernels.

Each class subclasses its torch.nn counterpart, so constructor arguments, parameter names, shapes,
initialisation, ``state_dict`` and ``repr`` are torch's own; only ``forward`` differs. Inputs and outputs
follow torch.nn exactly: padded (batch_first or not), unbatched, or PackedSequence (lengths in any order,
computed without padding work); h0 / c0 optional; dropout between layers in training only.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..ops import rnn as rnn_ops


def _layer_weights(module: torch.nn.RNNBase) -> List[Tuple[Optional[Tensor], ...]]:
    """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, in torch's layer-major order."""
    directions = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
            get = lambda name: getattr(module, name + suffix, None)  # noqa: E731
            out.append((get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")))
    return out


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM with fastnn's kernels: same arguments (input_size, hidden_size, num_layers, bias,
    batch_first, dropout, bidirectional, proj_size, device, dtype), parameters and outputs.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``.
    """

    def forward(self, input, hx=None):  # noqa: D102 (torch.nn.LSTM's)
        return rnn_ops.lstm(input, hx, _layer_weights(self), num_layers=self.num_layers,
                            bidirectional=self.bidirectional, batch_first=self.batch_first, dropout=self.dropout,
                            training=self.training)


class GRU(torch.nn.GRU):
    """torch.nn.GRU with fastnn's kernels: same arguments (input_size, hidden_size, num_layers, bias,
    batch_first, dropout, bidirectional, device, dtype), parameters and outputs.

    ``forward(input, hx=None) -> (output, h_n)``.
    """

    def forward(self, input, hx=None):  # noqa: D102 (torch.nn.GRU's)
        return rnn_ops.gru(input, hx, _layer_weights(self), num_layers=self.num_layers,
                           bidirectional=self.bidirectional, batch_first=self.batch_first, dropout=self.dropout,
                           training=self.training)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell with fastnn's kernel: ``forward(input, hx=None) -> (h', c')``."""

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:  # noqa: D102
        return rnn_ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell with fastnn's kernel: ``forward(input, hx=None) -> h'``."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:  # noqa: D102
        return rnn_ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
