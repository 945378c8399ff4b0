"""Backend selection: which implementation an op runs for a given device.

Backends: "reference" (plain PyTorch, fastnn.reference), "cpp" (C++ CPU kernels in fastnn._C),
"triton" (fastnn.kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda" (CUDA C++ in
fastnn._C). Each op lists the backends it implements and its preference per device.
"""
from __future__ import annotations

import contextvars
import logging
import os
from typing import Callable, Mapping, Optional, Sequence

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
_log = logging.getLogger("fastnn")
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastnn_backend", default=None)
_warned: set = set()

try:
    from . import _C  # type: ignore[attr-defined]

    _C_ERROR: Optional[str] = None
except ImportError as exc:  # not built: only the reference and Triton backends remain
    _C = None
    _C_ERROR = str(exc)


def triton_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


class use_backend:
    """Force one backend for every fastnn op, as a call or as a context manager.

    ``fastnn.use_backend("cpp")`` forces it from then on; ``with fastnn.use_backend("reference"): ...``
    forces it inside the block only; ``fastnn.use_backend(None)`` returns to automatic choice. An op that
    has no kernel for the forced backend, or whose kernel cannot run on the input's device, raises.
    """

    def __init__(self, name: Optional[str]):
        if name is not None and name not in BACKENDS:
            raise ValueError(f"use_backend: name must be one of {BACKENDS} or None, got {name!r}")
        self.name = name
        self._token = _forced.set(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _forced.reset(self._token)


def forced_backend() -> Optional[str]:
    """The backend forced by use_backend, or None."""
    return _forced.get()


def unusable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device` in this process, or None when it can."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return "the cpp backend runs on CPU tensors only"
        return None if _C is not None else f"fastnn._C is not built ({_C_ERROR})"
    if name == "cuda":
        if device.type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if _C is None:
            return f"fastnn._C is not built ({_C_ERROR})"
        return None if _C.with_cuda else "fastnn._C was built without CUDA kernels (FASTNN_CUDA=0 or no nvcc)"
    if name == "triton":
        err = _triton_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return "Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
    return f"unknown backend {name!r}"


def usable_backends(device_type: str) -> list:
    """Backends that can run on this device type in this process."""
    return [b for b in BACKENDS if unusable_reason(b, torch.device(device_type)) is None]


# Picks that cannot change within a process (whether fastnn._C is built does not; Triton's interpreter
# setting may), remembered: a small op's call spent ~2 us choosing its kernel.
_STATIC_BACKENDS = ("cpp", "cuda")
_static_picks: dict = {}


def pick(op: str, device: torch.device, impls: Mapping[str, Callable], preference: Sequence[str]) -> Callable:
    """The implementation of `op` to run on `device`: the forced backend, else the first usable one
    in `preference` (the benchmark's choice), else the reference, logged once."""
    forced = _forced.get()
    if forced is None:
        key = (op, device.type, tuple(preference))
        hit = _static_picks.get(key)
        if hit is not None and hit[0] is impls and hit[1] in impls:
            return impls[hit[1]]
    if forced is not None:
        if forced not in impls:
            raise NotImplementedError(
                f"fastnn.{op}: backend {forced!r} has no kernel for this op (it has {sorted(impls)})")
        why = unusable_reason(forced, device)
        if why:
            raise RuntimeError(f"fastnn.{op}: backend {forced!r} cannot run here: {why}")
        return impls[forced]
    for name in preference:
        if name in impls and unusable_reason(name, device) is None:
            # (only the first preference: an earlier one unusable now, Triton's interpreter, may become usable)
            if forced is None and name in _STATIC_BACKENDS and name == preference[0]:
                _static_picks[key] = (impls, name)
            return impls[name]
    key = (op, device.type)
    if key not in _warned:
        _warned.add(key)
        reasons = "; ".join(f"{n}: {unusable_reason(n, device)}" for n in preference if n in impls)
        _log.warning("fastnn.%s on %s runs the slow reference implementation (%s)", op, device.type, reasons)
    return impls["reference"]


def dense_copies(tensors: Sequence[Optional[torch.Tensor]]) -> list:
    """Row-major copies of a reference backend's results (None stays None). A custom op may not return an
    input or a view of one (with no steps, a state out is the state in), and its fake kernel promises dense
    outputs, while torch.func.vjp gives gradients in their inputs' layouts."""
    return [None if t is None else t.clone(memory_format=torch.contiguous_format) for t in tensors]
