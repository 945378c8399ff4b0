"""fastnn: hand-written Triton, CUDA C++ and C++ CPU kernels for PyTorch, as drop-in ops and layers."""
from __future__ import annotations

import torch  # noqa: F401  (fastnn._C links against torch's libraries)

from . import _backend
from ._alloc import set_poison
from ._backend import use_backend, usable_backends
from . import nn, ops, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["nn", "ops", "reference", "use_backend", "usable_backends", "build_info", "set_poison", "__version__"]


def build_info() -> dict:
    """How this fastnn was built and what can run in this process.

    Returns a dict: fastnn, torch and triton versions; whether the CUDA C++ kernels were compiled, for
    which architectures, with which compiler flags and CUDA toolkit; the GPU seen (if any); and the
    backends usable for CPU and CUDA tensors here.
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    c = _backend._C
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "fastnn": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension_built": c is not None,
        "extension_error": _backend._C_ERROR,
        "extension_built_with_torch": getattr(c, "built_with_torch", None),
        "cuda_compiled": bool(c is not None and c.with_cuda),
        "cuda_archs": [a for a in getattr(c, "cuda_archs", "").split(",") if a],
        "cuda_home": getattr(c, "cuda_home", None) or None,
        "cxx_flags": getattr(c, "cxx_flags", None),
        "nvcc_flags": getattr(c, "nvcc_flags", None) or None,
        "gpu": gpu,
        "triton_interpreter": _backend.triton_interpreting(),
        "backends": {"cpu": usable_backends("cpu"), "cuda": usable_backends("cuda") if gpu else []},
    }
