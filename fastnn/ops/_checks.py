"""Input validation shared by every op: each check names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SizeMismatchError(ValueError, RuntimeError):
    """A size that disagrees with another argument's. A ValueError, and a RuntimeError too, since torch.nn
    raises RuntimeError for these in the layers fastnn replaces: code that catches either keeps working."""


class DtypeMismatchError(TypeError, ValueError, RuntimeError):
    """A dtype that disagrees with another argument's. A TypeError, and what torch.nn raises for it in the
    layers fastnn replaces (ValueError or RuntimeError)."""


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x, name: str, *, dtypes: Optional[Sequence[torch.dtype]] = None, integer: bool = False,
           shape: Optional[Sequence[Optional[int]]] = None) -> Tensor:
    """Checks that `x` is a tensor on a supported device with an accepted dtype and shape.

    dtypes: accepted dtypes; integer=True accepts any integer dtype (not bool). shape: expected sizes,
    None for a free size; its length is the expected number of dimensions.
    """
    # Written for speed (a decode step runs ~10 of these): the device flags, not x.device.type (~0.4 us),
    # and a plain loop over the sizes, not a generator.
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_cpu or x.is_cuda or x.is_meta):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {x.device}")
    if integer:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    elif dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}; got {x.dtype}")
    if shape is not None:
        sizes = x.shape
        ok = len(sizes) == len(shape)
        if ok:
            for want, got in zip(shape, sizes):
                if want is not None and want != got:
                    ok = False
                    break
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return x


def same_device(reference_name: str, reference: Tensor, **others: Tensor) -> None:
    """Checks that every tensor in `others` is on the device of `reference`."""
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                             "expected the same device")


def real_number(x, name: str, *, allow_nan: bool = False) -> float:
    """Checks that `x` is a real Python number (not bool), finite or infinite, NaN only if allowed."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    # x != x, not math.isnan: under torch.compile(dynamic=True) a module's float attribute arrives as a
    # SymFloat, which math.isnan cannot trace.
    if not allow_nan and x != x:
        raise ValueError(f"{name} must not be NaN")
    return x


def values(ok: Tensor, message: Callable[[], str]) -> None:
    """A check of a tensor's values: ok is a 0-d bool tensor computed from them. Eager, a false ok raises
    ValueError(message()) (a host read). Under torch.compile, where the host cannot branch on data, the
    check is traced as torch._assert_async, which raises a RuntimeError with the message's text when the
    compiled graph runs."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message())
    elif not bool(ok):
        raise ValueError(message())


def size_text(n, name: str) -> str:
    """A size for an error message of values(): the number itself eagerly, `name` under torch.compile (the
    assert's message is a constant of the graph: formatting the size there would specialise the graph to it)."""
    return name if torch.compiler.is_compiling() else f"{n}"


def shown(t: Tensor, most: int = 8) -> str:
    """The first values of a 1-D tensor for an error message (the values themselves outside torch.compile;
    there, the message is a constant of the graph, so it names no size that may be symbolic)."""
    if torch.compiler.is_compiling():
        return f"a {t.dim()}-D tensor"
    flat = t.reshape(-1)
    return f"{flat[:most].tolist()}{'...' if flat.numel() > most else ''}"
