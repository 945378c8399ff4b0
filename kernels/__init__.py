"""Triton kernels and their launchers (installed as fastnn.kernels). No autograd, no module state.

Each module exposes its launchers and `aot_specs()`, the kernel configurations it launches, which the
ahead-of-time compile test (tests/test_triton_aot.py) builds for sm_90 and sm_80.
"""
import importlib

KERNEL_MODULES = ("attention", "boxes", "detect", "fpn", "rnn", "rnn_ln", "spp", "ssm")


def all_aot_specs():
    """(module, kernel, signature, constexprs, num_warps[, options]) for every Triton kernel configuration
    used; options may give "num_stages" and "archs" (the compute capabilities, e.g. (90,), whose launches
    use this configuration; default both sm_90 and sm_80)."""
    specs = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        specs += [(name,) + spec for spec in mod.aot_specs()]
    return specs
