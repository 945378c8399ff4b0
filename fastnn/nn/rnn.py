"""Drop-in torch.nn.LSTM, GRU, LSTMCell and GRUCell running fastnn's recurrent kernels.

Constructor arguments, parameter names, shapes, registration order (hence initialisation from the same
seed), ``state_dict`` and ``repr`` are torch.nn's; inputs and outputs follow torch.nn exactly: padded
(batch_first or not), unbatched, or PackedSequence (lengths in any order, computed without padding
work); h0 / c0 optional; dropout between layers in training only.

LSTM and GRU are plain nn.Modules, not torch.nn.RNNBase subclasses: torch.compile refuses to trace any
RNNBase (a graph break, or an error with fullgraph=True), while fastnn's modules compile whole. The cells
subclass torch.nn.LSTMCell / GRUCell, which compile.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import Parameter

from ..ops import _onnx
from ..ops import rnn as rnn_ops


def check_rnn_arguments(input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                        dropout: float, proj_size: int = 0, stacklevel: int = 4, bidirectional: bool = False) -> None:
    """torch.nn.RNNBase's checks of its constructor arguments, with its messages and exception types.
    stacklevel: the warning's, pointing at the user's constructor call."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                         f"element being zeroed; got {dropout!r}")
    if dropout > 0 and num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                      f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                      stacklevel=stacklevel)
    # (bidirectional: torch.nn fails at forward on a non-bool; a truthy string would make two directions)
    for name, value, kind in (("bias", bias, bool), ("batch_first", batch_first, bool),
                              ("bidirectional", bidirectional, bool),
                              ("input_size", input_size, int), ("hidden_size", hidden_size, int),
                              ("num_layers", num_layers, int), ("proj_size", proj_size, int)):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    if proj_size < 0:
        raise ValueError(f"proj_size should be a positive integer or zero to disable projections, got {proj_size}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size, got {proj_size} >= {hidden_size}")


class _RNNBase(torch.nn.Module):
    """Parameters and arguments of torch.nn.RNNBase for the LSTM (4 gates) and GRU (3 gates)."""

    _GATES = {"LSTM": 4, "GRU": 3}

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_rnn_arguments(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size,
                            bidirectional=bidirectional)
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        factory = {"device": device, "dtype": dtype}
        gate_size = self._GATES[mode] * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        directions = 2 if bidirectional else 1
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                names = []
                for name, shape in shapes:  # torch's registration order: same init from the same seed
                    setattr(self, name + suffix, Parameter(torch.empty(shape, **factory)))
                    names.append(name + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every parameter, as torch.nn does."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            torch.nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op (torch's packs weights for cuDNN; fastnn's kernels read the parameters as they are)."""

    @property
    def all_weights(self) -> List[List[Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> List[Parameter]:
        """The parameters in torch.nn.RNNBase's flat order (code written against torch.nn reads this list)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("proj_size", 0), ("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0), ("bidirectional", False)):
            value = getattr(self, name)
            if value != default:
                s += f", {name}={value}"
        return s


def _layer_weights(module: _RNNBase) -> List[Tuple[Optional[Tensor], ...]]:
    """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, in torch's layer-major order."""
    directions = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
            get = lambda name: getattr(module, name + suffix, None)  # noqa: E731
            out.append((get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")))
    return out


class LSTM(_RNNBase):
    """torch.nn.LSTM with fastnn's kernels: same arguments (input_size, hidden_size, num_layers, bias,
    batch_first, dropout, bidirectional, proj_size, device, dtype), parameters and outputs.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)

    def forward(self, input, hx=None):  # noqa: D102 (torch.nn.LSTM's)
        if _onnx.exporting():
            return _onnx.rnn(self, input, hx)
        return rnn_ops.lstm(input, hx, _layer_weights(self), num_layers=self.num_layers,
                            bidirectional=self.bidirectional, batch_first=self.batch_first, dropout=self.dropout,
                            training=self.training)


class GRU(_RNNBase):
    """torch.nn.GRU with fastnn's kernels: same arguments (input_size, hidden_size, num_layers, bias,
    batch_first, dropout, bidirectional, device, dtype), parameters and outputs.

    ``forward(input, hx=None) -> (output, h_n)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx=None):  # noqa: D102 (torch.nn.GRU's)
        if _onnx.exporting():
            return _onnx.rnn(self, input, hx)
        return rnn_ops.gru(input, hx, _layer_weights(self), num_layers=self.num_layers,
                           bidirectional=self.bidirectional, batch_first=self.batch_first, dropout=self.dropout,
                           training=self.training)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell with fastnn's kernel: ``forward(input, hx=None) -> (h', c')``."""

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:  # noqa: D102
        if _onnx.exporting():  # (torch's cell, whose ops the exporter knows; the parameters are the same)
            return super().forward(input, hx)
        return rnn_ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell with fastnn's kernel: ``forward(input, hx=None) -> h'``."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:  # noqa: D102
        if _onnx.exporting():
            return super().forward(input, hx)
        return rnn_ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
