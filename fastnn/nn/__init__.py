"""Drop-in modules: same constructor arguments and state_dict as their torch / torchvision counterparts."""
from .attention import MultiheadAttention
from .mamba import InferenceParams, Mamba
from .rnn import GRU, LSTM, GRUCell, LSTMCell
from .rnn_ln import LayerNormLSTM
from .spp import SPP, SPPF

__all__ = ["MultiheadAttention", "Mamba", "InferenceParams", "LSTM", "GRU", "LSTMCell", "GRUCell", "LayerNormLSTM", "SPP", "SPPF"]
