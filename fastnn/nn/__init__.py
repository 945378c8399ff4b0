"""Drop-in modules: same constructor arguments and state_dict as their torch / torchvision counterparts."""
from .attention import MultiheadAttention
from .fpn import ExtraFPNBlock, FeaturePyramidNetwork, ImagePyramid, LastLevelMaxPool, LastLevelP6P7
from .mamba import InferenceParams, Mamba
from .rnn import GRU, LSTM, GRUCell, LSTMCell
from .rnn_ln import LayerNormLSTM
from .roi import MultiScaleRoIAlign, RoIAlign, RoIPool
from .spp import SPP, SPPF

__all__ = ["MultiheadAttention", "Mamba", "InferenceParams", "LSTM", "GRU", "LSTMCell", "GRUCell", "LayerNormLSTM",
           "RoIAlign", "RoIPool", "MultiScaleRoIAlign", "FeaturePyramidNetwork", "ExtraFPNBlock", "LastLevelMaxPool",
           "LastLevelP6P7", "ImagePyramid", "SPP", "SPPF"]
