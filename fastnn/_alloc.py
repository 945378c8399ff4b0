"""Output allocation. In poison mode (tests) new outputs are filled with NaN (float) or -1 (integer) so a
kernel that leaves an element unwritten is caught by the comparison with the reference."""
from __future__ import annotations

import os

import torch

_poison = os.environ.get("FASTNN_POISON", "0") == "1"


def set_poison(on: bool) -> None:
    """Turn output poisoning on or off, for the Python launchers and the C++ ones."""
    global _poison
    _poison = bool(on)
    from ._backend import _C

    if _C is not None:
        _C.set_poison(_poison)


def poisoning() -> bool:
    """Whether new outputs are poisoned."""
    return _poison


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, poisoned in poison mode."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
