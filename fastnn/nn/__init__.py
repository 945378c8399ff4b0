"""Drop-in modules: same constructor arguments and state_dict as their torch / torchvision counterparts."""
from .attention import MultiheadAttention

__all__ = ["MultiheadAttention"]
