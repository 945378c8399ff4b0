"""Helpers for the five test tiers (DESIGN.md section 5). A kernel family gets every tier by calling these.

  tier 1-3  compare(...)/lowp_close(...): kernels vs fastnn.reference, fp32 tight, fp16/bf16 by the
            flash-attention rule; backends_under_test(device) lists what can run here
  tier 4    aot_compile(...): Triton kernels compiled for sm_90 / sm_80 with register, spill and shared
            memory reports; cuda_cxx_resource_usage() reads the same for the compiled CUDA C++ kernels
  tier 5    the same comparisons on CUDA tensors in tests marked `cuda`
  plus      run_opcheck, run_gradcheck, check_compiles, expect_error
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Callable, Iterable, Sequence

import pytest
import torch

import fastnn

HAS_CUDA = torch.cuda.is_available()
# Per-block shared memory limits (bytes) the AOT test enforces.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def backends_under_test(device: str, implemented: Sequence[str]) -> list:
    """Kernel backends (not the reference) of an op that can run on `device` in this process."""
    return [b for b in implemented if b != "reference" and b in fastnn.usable_backends(device)]


def cuda_param(value):
    """A pytest param for a CUDA-only case: marked `cuda`, so it is skipped without a GPU."""
    return pytest.param(value, marks=pytest.mark.cuda)


def device_params() -> list:
    """["cpu", "cuda" (marked cuda)] for parametrising over devices."""
    return ["cpu", cuda_param("cuda")]


def run(backend: str, fn: Callable, *args):
    """fn(*args) with backend `backend` forced."""
    with fastnn.use_backend(backend):
        return fn(*args)


def lowp_close(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, factor: float = 2.0,
               floor: float = 1e-6, what: str = "output") -> None:
    """flash-attention's rule for low precision: the kernel's max error against an fp64 reference is at
    most `factor` x the max error of the same reference math run in the low precision (+ a tiny floor)."""
    out, ref64, ref_lowp = out.double(), ref64.double(), ref_lowp.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out), finite), f"{what}: non-finite pattern differs from the reference"
    err = (out - ref64)[finite].abs().max().item() if finite.any() else 0.0
    base = (ref_lowp - ref64)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= factor * base + floor, f"{what}: error {err:.3g} > {factor} x reference low-precision error {base:.3g}"


def assert_same_nonfinite_and_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float,
                                    what: str = "output") -> None:
    """Same NaN/inf pattern, finite values close. (Poisoned unwritten outputs fail here.)"""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def run_opcheck(op, args: Iterable[tuple], kwargs: dict | None = None, skip_autograd: bool = False,
                strided_inputs: bool = True) -> None:
    """torch.library.opcheck on each argument tuple (schema, fake, autograd registration, AOT dispatch), and
    check_fake_layout. strided_inputs=False: the op refuses every non-dense input (its public function passes
    dense copies), so only the given layout is compared."""
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if not skip_autograd:
        tests = tests + ("test_autograd_registration",)
    for a in args:
        torch.library.opcheck(op, a, kwargs or {}, test_utils=tests)
        check_fake_layout(op, a, kwargs or {}, strided_inputs)


def _relaid(t, layout: str):
    """A copy of t with the same values in another storage layout: "reversed" (the dimensions' storage order
    reversed, so the first two and the last two are both swapped) or "sliced" (every other element of a
    buffer twice as long in the last dimension: not dense)."""
    if not isinstance(t, torch.Tensor) or t.numel() < 2 or t.dim() == 0:
        return t
    if layout == "reversed":
        if t.dim() < 2:
            return t
        out = t.new_empty(t.shape[::-1]).permute(*range(t.dim() - 1, -1, -1))
    else:
        out = t.new_empty(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
    return out.copy_(t).requires_grad_(t.requires_grad)


def check_fake_layout(op, args: tuple, kwargs: dict, strided_inputs: bool = True) -> None:
    """The fake kernel's outputs have the real kernel's sizes and strides, for the given inputs and, one tensor
    argument at a time, for re-laid copies of it (see _relaid). opcheck compares sizes only; a stride that
    differs makes a compiled graph fail its inductor-generated assert (or read an output in the wrong layout).
    A re-laid argument the op refuses is skipped (a raw op reads some inputs as dense arrays; its public
    function makes them so), but unless strided_inputs is False at least one must be accepted."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(args)

    def inputs(position=None, layout=None):
        # fresh copies each time: the mutating ops write into their inputs
        flat = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in leaves]
        if position is not None:
            flat[position] = _relaid(leaves[position].detach(), layout)
        return tree_unflatten(flat, spec)

    variants = [("given inputs", None, None)]
    for i, a in enumerate(leaves):
        for layout in ("reversed", "sliced"):
            if isinstance(a, torch.Tensor) and _relaid(a, layout) is not a:
                variants.append((f"argument {i} {layout}", i, layout))
    accepted = 0
    for what, position, layout in variants:
        real_args = inputs(position, layout)
        with torch.no_grad():
            try:
                real = op(*real_args, **kwargs)
            except (RuntimeError, ValueError):
                if position is None:
                    raise
                continue
            accepted += position is not None
            # data-dependent output sizes (nms, the peak counts) become symbols, compared only where concrete
            plain = tree_flatten(inputs(position, layout))[0]
            with FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)) as mode:
                fake = op(*tree_unflatten([mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor)
                                           else a for a in plain], spec), **kwargs)
        real_flat, fake_flat = tree_flatten(real)[0], tree_flatten(fake)[0]
        assert len(real_flat) == len(fake_flat)
        where = f"{op}, {what}"
        for i, (r, f) in enumerate(zip(real_flat, fake_flat)):
            if not isinstance(r, torch.Tensor):
                continue
            assert r.dim() == f.dim(), f"{where}: output {i} has {f.dim()} dims (fake), {r.dim()} (real)"
            for d in range(r.dim()):
                fs, fst = f.shape[d], f.stride(d)
                if isinstance(fs, int):
                    assert fs == r.shape[d], f"{where}: output {i} shape {tuple(f.shape)} (fake) != {tuple(r.shape)}"
                # a stride matters only along a dimension of more than one element, of a non-empty tensor
                if r.shape[d] > 1 and r.numel() and isinstance(fst, int):
                    assert fst == r.stride(d), (f"{where}: output {i} strides {f.stride()} (fake) != {r.stride()} "
                                                f"(real), shape {tuple(r.shape)}")
    assert accepted or not strided_inputs or len(variants) == 1, \
        f"{op}: refused every re-laid argument, so no layout was compared (strided_inputs=False if by design)"


def run_gradcheck(fn: Callable, inputs: tuple, backends: Sequence[str], **kw) -> None:
    """torch.autograd.gradcheck in float64 for each backend."""
    for b in backends:
        with fastnn.use_backend(b):
            assert torch.autograd.gradcheck(fn, inputs, **kw), f"gradcheck failed on backend {b}"


def check_compiles(fn: Callable, args: tuple, backend: str = "inductor", dynamic: bool | None = None) -> None:
    """fn compiled with torch.compile(fullgraph=True) gives the eager results (exactly, for index outputs)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    got, want = compiled(*args), fn(*args)
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w, equal_nan=True)
        else:
            assert torch.equal(g, w)


def expect_error(fn: Callable, args: tuple, exc: type, match: str) -> None:
    """fn(*args) raises `exc` whose message matches `match` (names the argument)."""
    with pytest.raises(exc, match=match):
        fn(*args)


# ---------------------------------------------------------------- tier 4: ahead-of-time compilation

def _triton_bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def parse_resource_usage(text: str) -> dict:
    """{function name: {"REG": int, "STACK": int, "SHARED": int, ...}} from cuobjdump --dump-resource-usage."""
    usage, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            current = None
    return usage


def spec_options(spec) -> dict:
    """The options of an AOT spec: {"num_stages": int or None, "archs": archs it is launched on}."""
    opts = dict(spec[5]) if len(spec) > 5 else {}
    opts.setdefault("num_stages", None)
    opts.setdefault("archs", (90, 80))
    return opts


def aot_compile(kernel, signature: dict, constexprs: dict, num_warps: int, arch: int,
                num_stages: int | None = None) -> dict:
    """Compiles a Triton kernel for sm_<arch> without a GPU and returns its resource report:
    {"REG", "STACK" (bytes spilled to local memory), "SHARED" (static), "dynamic_shared", "wgmma"}.
    Needs the compiler, so it cannot run under TRITON_INTERPRET=1: see aot_reports()."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    if num_stages is not None:
        options["num_stages"] = num_stages
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = parse_resource_usage(out)
    assert len(usage) == 1, f"expected one kernel in the cubin, got {list(usage)}"
    report = next(iter(usage.values()))
    report["dynamic_shared"] = compiled.metadata.shared
    report["wgmma"] = "wgmma" in compiled.asm["ptx"]
    return report


def spec_id(spec) -> str:
    """Readable id of an (module, kernel, signature, constexprs, num_warps[, options]) AOT spec."""
    module, kernel, signature, constexprs, num_warps = spec[:5]
    opts = spec_options(spec)
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    pointer_types = list(dict.fromkeys(t[1:] for t in signature.values() if t.startswith("*")))
    extra = "," + "/".join(pointer_types) if pointer_types else ""
    if opts["num_stages"] is not None:
        extra += f",stages={opts['num_stages']}"
    if tuple(opts["archs"]) != (90, 80):
        extra += ",sm=" + "/".join(str(a) for a in opts["archs"])
    return (f"{module}.{name}[" + ",".join(f"{k}={v}" for k, v in constexprs.items())
            + f",warps={num_warps}{extra}]")


_AOT_CACHE: dict = {}


def aot_reports(archs=(90, 80)) -> dict:
    """{spec_id: {arch: report}} for every spec in fastnn.kernels.all_aot_specs() and each of its archs
    among `archs`, compiled in child
    processes without TRITON_INTERPRET (the interpreter replaces @triton.jit functions), one per core,
    each taking every n-th spec. Cached."""
    key = tuple(archs)
    if key not in _AOT_CACHE:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        workers = max(1, min(os.cpu_count() or 1, 8))
        code = ("import json, sys; sys.path.insert(0, %r); import _tiers; "
                "from fastnn.kernels import all_aot_specs; "
                "print(json.dumps({_tiers.spec_id(s): {a: _tiers.aot_compile(*s[1:5], a, "
                "_tiers.spec_options(s)['num_stages']) for a in %r if a in _tiers.spec_options(s)['archs']} "
                "for s in all_aot_specs()[%d::%d]}))")
        here = os.path.dirname(os.path.abspath(__file__))
        procs = [subprocess.Popen([os.sys.executable, "-c", code % (here, list(archs), w, workers)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for w in range(workers)]
        merged = {}
        for proc in procs:
            out, err = proc.communicate()
            assert proc.returncode == 0, f"ahead-of-time compilation failed:\n{err[-4000:]}"
            merged.update(__import__("json").loads(out.strip().splitlines()[-1]))
        _AOT_CACHE[key] = {sid: {int(a): r for a, r in per.items()} for sid, per in merged.items()}
    return _AOT_CACHE[key]


def assert_fits(report: dict, arch: int, what: str) -> None:
    """No spills, shared memory (static + dynamic) within the chip's per-block limit."""
    assert report.get("STACK", 0) == 0, f"{what}: spills {report['STACK']} bytes to local memory on sm_{arch}"
    shared = report.get("SHARED", 0) + report["dynamic_shared"]
    assert shared <= SHARED_LIMIT[arch], f"{what}: {shared} bytes of shared memory > sm_{arch} limit"


def cuda_cxx_resource_usage() -> dict:
    """Resource usage of every kernel in the compiled fastnn._C, per architecture: {arch: {fn: report}}."""
    from fastnn import _backend

    so = _backend._C.__file__
    out = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", so], capture_output=True, text=True,
                         check=True).stdout
    per_arch, chunk, arch = {}, [], None
    for line in out.splitlines() + ["arch = end"]:
        m = re.search(r"arch = (\S+)", line)
        if m:
            if arch is not None:
                per_arch.setdefault(arch, {}).update(parse_resource_usage("\n".join(chunk)))
            arch, chunk = m.group(1), []
        else:
            chunk.append(line)
    return per_arch
