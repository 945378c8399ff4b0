"""A short way from a public function to its op's body, for ops whose calls are small and frequent (the
decode steps): torch.library's dispatch of a custom op costs ~15-20 us of host time a call (its
ADInplaceOrView, autograd and backend layers run in Python), several times the kernel of one decode step.

When nothing could observe the difference, the public function runs the op's body itself: plain eager
execution on plain, non-meta tensors, with no torch.compile / export / jit tracing, no Python dispatch mode (fake,
proxy, functional, flop counters), no functorch transform (vmap, grad), no forward-AD level. In every other
case it calls the custom op, which then runs the same body (under a transform or forward AD through run_op's
Functions, below).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)


def _transforming() -> bool:
    """A torch.func transform is active, or a forward-mode AD level (torch.autograd.forward_ad.dual_level): the
    ops' tensors may carry tangents, which neither an op's body nor torch.library's custom-op autograd sees (it
    would drop them silently)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """True when a call with these tensors (None for an absent optional) may skip the custom op's dispatch
    and run its body directly: the dispatcher would reach the same body and nothing would record the call."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0 or _transforming()
            or torch._C._get_tracing_state() is not None):
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
    transforms, which need the newer form, take the op's transformable Function instead: register_autograd)."""
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
        return run_op(op, *args)
    if function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return function.apply(*args)
    return body(*args)


# ---------------------------------------------------------------- torch.func (functorch) transforms
# torch.library's custom_op implements register_autograd with an autograd.Function of the older form (forward
# takes ctx), which torch.func.grad / vjp / jacrev / vmap refuse (pytorch/pytorch#168393, #170834, #179652,
# open in torch 2.14). torch.nn.LSTM, scaled_dot_product_attention and torchvision's box_iou work under those
# transforms, so their drop-ins must too: while a transform is active, an op with autograd is called through a
# Function of the newer form (a separate setup_context, generate_vmap_rule) that calls the op and reuses the
# op's own setup_context and backward. Its backward's op is called through a Function too: one with the backward
# op's own derivatives (the RNNs', box IoU's: through the reference), or one whose backward raises, because
# torch.func.grad differentiates with create_graph=True, so the backward op's custom-op autograd would refuse
# even a first derivative, and a gradient without history would make a second derivative silently zero.
# A forward-AD level (torch.autograd.forward_ad) takes the same Functions: an op's body, and torch.library's
# custom-op autograd, would drop the tangents silently.

_TRANSFORMABLE: Dict[str, Tuple[Optional[type], type]] = {}  # op name -> (plain Function, flattening Function)


def _op_name(op) -> str:
    """'ns::name' of a CustomOpDef, an OpOverloadPacket or an OpOverload."""
    name = getattr(op, "_qualname", None) or getattr(op, "_qualified_op_name", None)
    if name is None:  # an OpOverload
        name = op._schema.name
    return name


class _Lengths(tuple):
    """The structure _flat removed. (A tuple subclass that torch's pytree does not open: as a plain tuple among
    a Function's arguments, functorch's vmap of its jvp would count its items as arguments.)"""


def _flat(args) -> tuple:
    """(lengths, flat): lists of tensors (Tensor[] in a schema) spread out, so that autograd sees their tensors;
    lengths[i] is None for an argument kept whole, else its list's length."""
    lengths = _Lengths(len(a) if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) for t in a) else None
                       for a in args)
    flat = []
    for a, n in zip(args, lengths):
        flat.extend(a if n is not None else (a,))
    return lengths, flat


def _unflat(lengths, flat) -> list:
    args, i = [], 0
    for n in lengths:
        if n is None:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


class _RecordingContext:
    """A Function's ctx as an op's setup_context sees it, recording what it saves for backward."""

    def __init__(self, ctx):
        object.__setattr__(self, "ctx", ctx)
        object.__setattr__(self, "saved", ())

    def save_for_backward(self, *tensors):
        object.__setattr__(self, "saved", tensors)
        self.ctx.save_for_backward(*tensors)

    def __getattr__(self, name):
        return getattr(self.ctx, name)

    def __setattr__(self, name, value):
        setattr(self.ctx, name, value)


def _function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
              jvp: Optional[Callable] = None) -> type:
    """An autograd.Function of the newer form, vmap by generate_vmap_rule. jvp(ctx, *tangents) -> the outputs'
    tangents (forward mode; ctx.saved_tensors there are those setup_context saved for backward); without
    one, forward mode is refused by name."""
    if jvp is None:
        def forward_mode(ctx, *tangents):
            raise RuntimeError(f"{name} has no forward-mode derivative in fastnn (torch.func.jvp, jacfwd, "
                               "torch.autograd.forward_ad); reverse mode works: torch.func.vjp, grad, jacrev")
        setup = setup_context
    else:
        forward_mode = jvp

        def setup(ctx, inputs, output):
            recording = _RecordingContext(ctx)
            setup_context(recording, inputs, output)
            # jvp's tensors go through save_for_forward, as functorch requires; the same ones as for backward,
            # because under vmap the last of the two calls sets the batch dimensions both are read with
            ctx.save_for_forward(*recording.saved)

    return type(f"{name.split('::')[-1]}_transformable", (torch.autograd.Function,),
                {"generate_vmap_rule": True, "forward": staticmethod(forward),
                 "setup_context": staticmethod(setup), "backward": staticmethod(backward),
                 "jvp": staticmethod(forward_mode)})


def _run(op, *args):
    output = op(*args)
    # (a Function's tensors must be returned as a tuple: a list would reach the caller untracked)
    return tuple(output) if isinstance(output, list) else output


def _flattening(name: str, op, setup_context: Callable, backward: Callable) -> type:
    """The Function for calls with a Tensor[] argument: apply(lengths, *flat) (_flat), each list's gradients
    spread out the same way."""
    def setup(ctx, inputs, output):
        ctx.fastnn_lengths = inputs[0]
        setup_context(ctx, tuple(_unflat(inputs[0], inputs[1:])), output)

    def backward_flat(ctx, *grads):
        flat = [None]  # (lengths)
        for g, n in zip(backward(ctx, *grads), ctx.fastnn_lengths):
            flat.extend((g if g is not None else (None,) * n) if n is not None else (g,))
        return tuple(flat)

    return _function(name, lambda lengths, *flat: _run(op, *_unflat(lengths, flat)), setup, backward_flat)


def register_autograd(op, backward: Callable, setup_context: Callable, jvp: Optional[Callable] = None) -> None:
    """op.register_autograd(backward, setup_context=setup_context), and the Functions that run_op calls under a
    torch.func transform. backward(ctx, *grads) returns one gradient per op argument (a list of them for a
    Tensor[] argument); for a call with a Tensor[] argument, ctx.needs_input_grad counts the list's tensors one
    by one under a transform, so such an op's backward must not index it. jvp(ctx, *tangents), if given, is the
    forward mode under a transform or forward AD (torch.func.jvp, jacfwd, hessian, forward_ad) of calls without a
    Tensor[] argument: the outputs' tangents (None for a non-differentiable one) from the arguments' tangents
    (None for a non-tensor, or a tensor without one) and what setup_context saved in ctx."""
    op.register_autograd(backward, setup_context=setup_context)
    name = _op_name(op)
    plain = _function(name, lambda *args: _run(op, *args), setup_context, backward, jvp)
    _TRANSFORMABLE[name] = (plain, _flattening(name, op, setup_context, backward))


def register_backward_op(op) -> None:
    """Marks op as a backward op without a derivative of its own: under a torch.func transform run_op calls it
    through a Function whose backward raises, naming the op (a gradient of a gradient is not supported)."""
    name = _op_name(op)

    def refuse(ctx, *grads):
        raise RuntimeError(f"{name} has no derivative: fastnn does not differentiate this op's gradient again "
                           "(a second derivative through it, e.g. torch.func.grad of torch.func.grad)")

    _TRANSFORMABLE[name] = (None, _flattening(name, op, lambda ctx, inputs, output: None, refuse))


# ---------------------------------------------------------------- derivatives through a differentiable reference

class _Restricted:
    """fn(*primals) as a function of its present (not None) primals only, returning its results that are not
    None: the form torch.func.vjp takes. After a call, kept lists those results' positions among count."""

    def __init__(self, fn, primals):
        self.fn, self.primals = fn, list(primals)
        self.present = [i for i, p in enumerate(primals) if p is not None]
        self.kept, self.count = [], 0

    def __call__(self, *given):
        full = list(self.primals)
        for i, p in zip(self.present, given):
            full[i] = p
        out = self.fn(*full)
        self.kept, self.count = [k for k, o in enumerate(out) if o is not None], len(out)
        return tuple(out[k] for k in self.kept)

    def vjp(self):
        return torch.func.vjp(self, *(self.primals[i] for i in self.present))


def _spread(values, positions, count: int) -> list:
    """values placed at positions of a list of count (None elsewhere)."""
    result = [None] * count
    for k, v in zip(positions, values):
        result[k] = v
    return result


def second_order(first_order, primals, cotangents):
    """The vector-Jacobian product of first_order (a differentiable reference's gradients, a list with None
    for an absent one) at primals (None for an absent one) with the cotangents of its results (None, or an
    empty tensor where the kernel's result was not asked for: zeros): a backward op's own backward, so that
    create_graph=True and torch.func.grad of a grad differentiate the fast kernels' gradients."""
    f = _Restricted(first_order, primals)
    outs, pullback = f.vjp()
    cots = []
    for k, out in zip(f.kept, outs):
        c = cotangents[k] if k < len(cotangents) else None
        cots.append(torch.zeros_like(out) if c is None or c.shape != out.shape else c)
    return _spread(pullback(tuple(cots)), f.present, len(primals))


def linearised(fn, primals, tangents):
    """The Jacobian-vector product of fn (a differentiable reference; None among its results for an absent one)
    at primals (None for an absent one) along tangents (None: zero): the results' tangents, None where a
    result is None. Forward mode for an op without a forward-mode kernel."""
    f = _Restricted(fn, primals)
    outs, pullback = f.vjp()
    # J t as the vjp of the (linear) vjp: reverse mode only, because torch.func.jvp inside a
    # torch.autograd.forward_ad level is nested forward mode, which torch refuses
    _, pullback_of_pullback = torch.func.vjp(lambda *u: pullback(u), *(torch.zeros_like(o) for o in outs))
    along = tuple(torch.zeros_like(primals[i]) if tangents[i] is None else tangents[i] for i in f.present)
    return _spread(pullback_of_pullback(along), f.kept, f.count)


def register_loop_vmap(op) -> None:
    """A torch.vmap rule for op that runs it once per batch entry and stacks the results, for an op whose
    schema functorch's own fallback (the same loop) refuses: a Tensor[] argument or result."""
    def select(arg, dim, b):
        if dim is None:
            return arg
        if isinstance(arg, (list, tuple)):
            return [a if d is None else a.select(d, b) for a, d in zip(arg, dim)]
        return arg.select(dim, b)

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            raise ValueError(f"{_op_name(op)} under torch.vmap needs a batch of at least one entry, got 0")
        results = [op(*(select(a, d, b) for a, d in zip(args, in_dims))) for b in range(info.batch_size)]
        if isinstance(results[0], Tensor):
            return torch.stack(results), 0
        stacked = [torch.stack(parts) for parts in zip(*results)]
        return stacked, [0] * len(stacked)

    torch.library.register_vmap(op, rule)


def vmapped(t: Tensor) -> bool:
    """Whether t is (or wraps) a tensor batched by torch.vmap: its memory format cannot be queried there (a
    setup_context run by generate_vmap_rule sees such tensors), so layout choices take the contiguous one."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def run_op(op, *args):
    """op(*args) (a custom op's OpOverloadPacket, all arguments positional); while a torch.func transform or a
    forward-AD level is active, through the op's transformable Function (register_autograd /
    register_backward_op), if it has one.
    Returns what the op returns (a tuple for a Tensor[] result under a transform)."""
    if not torch.compiler.is_compiling() and _transforming():
        fns = _TRANSFORMABLE.get(_op_name(op))
        if fns is not None:
            plain, flat = fns
            lengths, flat_args = _flat(args)
            if plain is not None and all(n is None for n in lengths):
                return plain.apply(*args)
            return flat.apply(lengths, *flat_args)
    return op(*args)
