"""A short way from a public function to its op's body, for ops whose calls are small and frequent (the
decode steps): torch.library's dispatch of a custom op costs ~15-20 us of host time a call (its
ADInplaceOrView, autograd and backend layers run in Python), several times the kernel of one decode step.

When nothing could observe the difference, the public function runs the op's body itself: plain eager
execution on plain, non-meta tensors, with no torch.compile / export / jit tracing, no Python dispatch mode (fake,
proxy, functional, flop counters), no functorch transform (vmap, grad). In every other case it calls the
custom op, which then runs the same body.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """True when a call with these tensors (None for an absent optional) may skip the custom op's dispatch
    and run its body directly: the dispatcher would reach the same body and nothing would record the call."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None):
        return False
    for t in tensors:  # (meta tensors: the op's fake gives their shapes; a body may read data)
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


def run_mutating(body: Callable, mutated: Tensor, *args):
    """body(*args) without grad recording, as the custom op's no-grad call would run it, then the version
    counter of `mutated` (the tensor the body updates in place) moved on as the op's in-place dispatch
    moves it, so that autograd still notices a saved tensor that changed."""
    grad = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        return body(*args)
    finally:
        torch._C._set_grad_enabled(grad)
        torch.autograd.graph.increment_version(mutated)


def autograd_function(body: Callable, setup_context: Callable, backward: Callable) -> type:
    """A torch.autograd.Function that runs an op's body with the op's own setup_context and backward (those its
    register_autograd was given): the direct call's path when a gradient is wanted.

    It is a Function of the older form, whose forward takes ctx and calls setup_context itself. For the form
    with a separate setup_context, Function.apply binds the arguments to forward's signature through
    inspect.signature on every call: ~90 us a call with torch 2.14, as much as a small cell step's kernel.
    The direct path runs in plain eager mode only, where the older form behaves the same (functorch
    transforms, which need the newer form, take the custom op instead)."""
    params = inspect.signature(body).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in positional for p in params):
        raise TypeError(f"autograd_function: {body.__name__} must take positional parameters only (the op's "
                        "arguments, in the schema's order)")
    defaults = tuple(p.default for p in params if p.default is not inspect.Parameter.empty)
    n_params = len(params)

    def forward(ctx, *inputs):
        if len(inputs) < n_params:  # the op's setup_context reads every argument, defaults included
            inputs = inputs + defaults[len(defaults) - (n_params - len(inputs)):]
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(f"{body.__name__}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def call(op: Callable, body: Callable, function: Optional[type], *args):
    """op(*args) (the custom op), or in plain eager mode body(*args) itself: through `function` (from
    autograd_function) when grad mode is on and a tensor argument requires grad; `function` is None for an op
    without autograd."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not plain_eager(*tensors):
        return op(*args)
    if function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return function.apply(*args)
    return body(*args)
