"""Drop-in modules: same constructor arguments and state_dict as their torch / torchvision counterparts."""
from .attention import MultiheadAttention
from .fpn import ExtraFPNBlock, FeaturePyramidNetwork, ImagePyramid, LastLevelMaxPool, LastLevelP6P7
from .mamba import InferenceParams, Mamba
from .rnn import GRU, LSTM, GRUCell, LSTMCell
from .rnn_ln import LayerNormLSTM

__all__ = ["MultiheadAttention", "Mamba", "InferenceParams", "LSTM", "GRU", "LSTMCell", "GRUCell", "LayerNormLSTM",
           "FeaturePyramidNetwork", "ExtraFPNBlock", "LastLevelMaxPool", "LastLevelP6P7", "ImagePyramid"]
