"""Selective scan (selective_scan_fn) through the tiers of DESIGN.md section 5: the reference against an
independent scalar loop, the C++ CPU kernel (and the CUDA one on a GPU) against the reference in float64
and in the input precision, gradients of every input, chunk states, determinism, opcheck, gradcheck,
torch.compile and bad inputs."""
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import fastnn
from fastnn import ops
from fastnn.ops import ssm as ssm_ops
from fastnn.reference import ssm as ref

from _tiers import (backends_under_test, check_compiles, check_fake_layout, cuda_param, expect_error, run_gradcheck,
                    run_opcheck)

IMPLS = tuple(ssm_ops._FORWARD_IMPLS)
CPU_BACKENDS = backends_under_test("cpu", IMPLS)
# mamba_ssm's test tolerances (rtol, atol) against an fp32 reference: ours are checked against fp64 at
# these or tighter.
MAMBA_TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


@dataclass(frozen=True)
class Case:
    batch: int = 2
    dim: int = 24
    length: int = 37
    nstate: int = 8
    bc: str = "step"          # "fixed" (D, N), "step" (B, G, N, L), "3d" (B, N, L)
    groups: int = 1
    skip: bool = True         # D
    gate: bool = True         # z
    bias_softplus: bool = True
    init: bool = False
    seq: Optional[str] = None  # None, "seq_idx" (per row), "cu_seqlens" (per sequence)


CASES = {
    "plain": Case(skip=False, gate=False, bias_softplus=False),
    "mamba": Case(),
    "groups": Case(dim=40, groups=4, nstate=5),
    "groups_odd": Case(dim=42, groups=2, nstate=3),  # 21 channels per group: slabs end mid-vector
    "fixed_bc": Case(bc="fixed", init=True),
    "bc_3d": Case(bc="3d", nstate=16),
    "init": Case(init=True, nstate=16),
    "seq_idx": Case(init=True, seq="seq_idx"),
    "cu_seqlens": Case(batch=1, length=53, init=True, seq="cu_seqlens"),
    "len1": Case(length=1, init=True),
    "len7": Case(length=7, nstate=4),
    "len2049": Case(batch=1, dim=16, length=2049, nstate=4, init=True),
    "n64": Case(batch=1, dim=20, length=40, nstate=64),
    "n256": Case(batch=1, dim=17, length=20, nstate=256),
    # N = 16 has its own CPU instantiation (states in registers, synced at sequence boundaries)
    "seq_idx_n16": Case(init=True, seq="seq_idx", nstate=16),
    "cu_seqlens_n16": Case(batch=1, length=53, init=True, seq="cu_seqlens", nstate=16),
    "fixed_bc_n16": Case(dim=21, bc="fixed", init=True, nstate=16),
}


def make_inputs(c: Case, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random inputs in Mamba's ranges: dt ~ softplus(delta + bias) in (0.001, 0.1)-ish, A < 0."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    B_, D_, L_, N_ = c.batch, c.dim, c.length, c.nstate
    kw = {}
    u = rn(B_, D_, L_)
    if c.bias_softplus:
        delta = rn(B_, D_, L_) * 0.5 - 1.0
        kw["delta_bias"] = rn(D_) * 0.5 - 2.0
        kw["delta_softplus"] = True
    else:
        delta = torch.rand(B_, D_, L_, generator=g, dtype=torch.float64) * 0.2 + 0.01
    A = -torch.exp(rn(D_, N_) * 0.5)
    if c.bc == "fixed":
        Bm, Cm = rn(D_, N_), rn(D_, N_)
    elif c.bc == "3d":
        Bm, Cm = rn(B_, N_, L_), rn(B_, N_, L_)
    else:
        Bm, Cm = rn(B_, c.groups, N_, L_), rn(B_, c.groups, N_, L_)
    if c.skip:
        kw["D"] = rn(D_)
    if c.gate:
        kw["z"] = rn(B_, D_, L_)
    if c.seq == "seq_idx":
        cuts = sorted(torch.randperm(L_ - 1, generator=g)[:3].add(1).tolist())
        seq = torch.zeros(B_, L_, dtype=torch.int32)
        for k, t in enumerate(cuts):
            seq[0, t:] = k + 1
        seq[1:, L_ // 2:] = 7  # another row, another pattern (values need not start at 0)
        kw["seq_idx"] = seq
    nrows = B_
    if c.seq == "cu_seqlens":
        cuts = sorted(torch.randperm(L_ - 1, generator=g)[:4].add(1).tolist())
        kw["cu_seqlens"] = torch.tensor([0] + cuts + [L_], dtype=torch.int32)
        nrows = len(cuts) + 1
    if c.init:
        kw["initial_state"] = rn(nrows, D_, N_)
    io = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    f32 = lambda t: t.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)  # noqa: E731
    args = [io(u), io(delta), f32(A), f32(Bm), f32(Cm)]
    for k in list(kw):
        if k == "z":
            kw[k] = io(kw[k])
        elif torch.is_tensor(kw[k]):
            kw[k] = f32(kw[k]) if kw[k].is_floating_point() else kw[k].to(device)
    return args, kw


def _reference_kwargs(kw):
    """selective_scan_fn keywords -> reference.selective_scan keywords."""
    r = {k: v for k, v in kw.items() if k != "cu_seqlens"}
    if "cu_seqlens" in kw:
        r["seq_idx"] = ssm_ops.cu_seqlens_to_seq_idx(kw["cu_seqlens"], int(kw["cu_seqlens"][-1]))
        r["per_sequence_states"] = True
    return r


def _float64(args, kw):
    cast = lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    return [cast(a) for a in args], {k: cast(v) for k, v in kw.items()}


# ---------------------------------------------------------------- tier 1: the reference

@pytest.mark.parametrize("name", ["plain", "mamba", "groups_odd", "fixed_bc", "bc_3d", "seq_idx", "cu_seqlens",
                                  "len1"])
def test_reference_matches_scalar_loop(name):
    c = replace(CASES[name], dim=min(CASES[name].dim, 6), length=min(CASES[name].length, 23),
                nstate=min(CASES[name].nstate, 4))
    if c.groups > 1:
        c = replace(c, dim=2 * c.groups)
    args, kw = _float64(*make_inputs(c))
    rkw = _reference_kwargs(kw)
    out, last = ref.selective_scan(*args, **rkw)
    out2, last2 = ref.selective_scan_loop(*args, **rkw)
    torch.testing.assert_close(out, out2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last2, rtol=1e-12, atol=1e-12)


def test_reference_chunk_states_are_prefix_states():
    c = replace(CASES["seq_idx"], length=29)
    args, kw = _float64(*make_inputs(c))
    out, last, chunks = ref.selective_scan(*args, **kw, chunk_size=8)
    assert chunks.shape == (c.batch, c.dim, 4, c.nstate)
    torch.testing.assert_close(chunks[:, :, 0], kw["initial_state"])
    u, delta, A, Bm, Cm = args
    for k in (1, 2, 3):
        t0 = 8 * k
        _, prefix_last = ref.selective_scan(u[..., :t0], delta[..., :t0], A, Bm[..., :t0], Cm[..., :t0],
                                            delta_bias=kw["delta_bias"], delta_softplus=True,
                                            initial_state=kw["initial_state"], seq_idx=kw["seq_idx"][:, :t0])
        torch.testing.assert_close(chunks[:, :, k], prefix_last, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- tiers 2 and 5: kernels against the reference

def _scan(backend, args, kw, grad=False, weights_seed=1):
    """Forward (and backward of a weighted sum of out and last_state) with `backend` forced."""
    leaves = [a.detach().clone().requires_grad_(grad and a.is_floating_point()) for a in args]
    kwl = {k: (v.detach().clone().requires_grad_(grad) if torch.is_tensor(v) and v.is_floating_point() else v)
           for k, v in kw.items()}
    fastnn.set_poison(True)
    with fastnn.use_backend(backend):  # the backward too runs on `backend`
        out, last = ops.selective_scan_fn(*leaves, return_last_state=True, **kwl)
        if not grad:
            return out, last, None
        g = torch.Generator().manual_seed(weights_seed)
        w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
        w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last)
        ((out * w_out).sum().float() + (last * w_last).sum().float()).backward()
    names = ["u", "delta", "A", "B", "C"] + list(kwl)
    tensors = leaves + list(kwl.values())
    return out, last, {n: t.grad for n, t in zip(names, tensors) if torch.is_tensor(t) and t.grad is not None}


def _assert_close_scaled(got, want, rtol, atol, what):
    """|got - want| <= atol * max|want| + rtol * |want|: the tolerances relative to the tensor's scale
    (gradient magnitudes grow with L; mamba's atol is for O(1) outputs)."""
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs()
    bound = atol * scale + rtol * want.abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} beyond rtol={rtol}, atol={atol} x scale {scale:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_float64_matches_reference(backend, name):
    args, kw = _float64(*make_inputs(CASES[name]))
    grad = CASES[name].length <= 300
    out, last, grads = _scan(backend, args, kw, grad=grad)
    rout, rlast, rgrads = _scan("reference", args, kw, grad=grad)
    torch.testing.assert_close(out, rout, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, rlast, rtol=1e-10, atol=1e-10)
    if grad:
        assert grads.keys() == rgrads.keys()
        for k in grads:
            _assert_close_scaled(grads[k], rgrads[k], 1e-9, 1e-10, f"d{k}")


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mamba", "groups_odd", "fixed_bc", "init", "seq_idx", "cu_seqlens", "len1",
                                  "len2049", "n64", "n256", "seq_idx_n16", "cu_seqlens_n16", "fixed_bc_n16"])
def test_kernel_matches_float64_reference_at_mamba_tolerance(device, dtype, name):
    if device == "cpu" and "cpp" not in CPU_BACKENDS:
        pytest.skip("fastnn._C not built")
    backend = "cpp" if device == "cpu" else "cuda"
    args, kw = make_inputs(CASES[name], dtype=dtype, device=device)
    out, last, grads = _scan(backend, args, kw, grad=True)
    a64, k64 = _float64(args, kw)
    a64 = [a.cpu() for a in a64]
    k64 = {k: v.cpu() if torch.is_tensor(v) else v for k, v in k64.items()}
    rout, rlast, rgrads = _scan("reference", a64, k64, grad=True)
    rtol, atol = MAMBA_TOL[dtype]
    assert out.dtype == dtype and last.dtype == torch.float32
    _assert_close_scaled(out, rout, rtol, atol, "out")
    _assert_close_scaled(last, rlast, rtol, atol, "last_state")
    # Gradients: u, delta, z are stored in the input precision; parameters accumulate in fp32.
    gt = {torch.float32: (1e-3, 2e-3), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}[dtype]
    for k in rgrads:
        _assert_close_scaled(grads[k], rgrads[k], *gt, f"d{k}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_states_match_reference(backend):
    c = replace(CASES["seq_idx"], length=300)
    args, kw = _float64(*make_inputs(c))
    N = c.nstate
    chunk = ssm_ops.chunk_size_for("cpu", N)
    a = [t.contiguous() for t in args]
    with fastnn.use_backend(backend):
        _, last, chunks = torch.ops.fastnn.selective_scan_forward(
            a[0], a[1], a[2], a[3], a[4], kw["D"], kw["z"], kw["delta_bias"], True, kw["initial_state"],
            kw["seq_idx"], False, c.batch, chunk)
    _, rlast, rchunks = ref.selective_scan(*args, **kw, chunk_size=chunk)
    assert chunks.shape == (rchunks.shape[0], rchunks[0].numel())  # flattened per batch row
    torch.testing.assert_close(chunks.view_as(rchunks), rchunks, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, rlast, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_deterministic_across_thread_counts(backend):
    args, kw = make_inputs(replace(CASES["groups"], dim=256, length=300, nstate=16))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, g1 = _scan(backend, args, kw, grad=True)
        torch.set_num_threads(max(2, threads))
        _, _, g2 = _scan(backend, args, kw, grad=True)
    finally:
        torch.set_num_threads(threads)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"d{k} differs between 1 and {max(2, threads)} threads"


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_empty_inputs(backend):
    for shape in ((2, 3, 0), (0, 3, 5), (2, 0, 5)):
        B_, D_, L_ = shape
        u = torch.randn(shape, requires_grad=True)
        delta = torch.rand(shape, requires_grad=True)
        A = (-torch.rand(D_, 4)).requires_grad_()
        Bm, Cm = torch.randn(B_, 1, 4, L_), torch.randn(B_, 1, 4, L_)
        init = torch.randn(B_, D_, 4, requires_grad=True)
        with fastnn.use_backend(backend):
            out, last = ops.selective_scan_fn(u, delta, A, Bm, Cm, return_last_state=True, initial_state=init)
        assert out.shape == shape and last.shape == (B_, D_, 4)
        if L_ == 0:
            torch.testing.assert_close(last, init.detach())
        (out.sum() + last.sum()).backward()
        assert u.grad.shape == shape and A.grad.shape == A.shape
    # no steps, only the initial state differentiated: its gradient is the final state's (the reference's vjp
    # returned that cotangent itself, which a custom op may not: an output aliasing an input)
    u, A = torch.randn(2, 3, 0), -torch.rand(3, 4)
    init = torch.randn(2, 3, 4, requires_grad=True)
    with fastnn.use_backend(backend):  # (the backward too)
        _, last = ops.selective_scan_fn(u, u.abs(), A, A, A, return_last_state=True, initial_state=init)
        dlast = torch.randn_like(last)
        last.backward(dlast)
    torch.testing.assert_close(init.grad, dlast, rtol=0, atol=0)


def test_noncontiguous_inputs_match_contiguous():
    args, kw = make_inputs(CASES["mamba"])
    u, delta, A, Bm, Cm = args
    nc = [u.transpose(1, 2).contiguous().transpose(1, 2), delta.transpose(1, 2).contiguous().transpose(1, 2), A.t().contiguous().t(),
          Bm[..., None].expand(*Bm.shape, 2)[..., 0], Cm]
    assert not nc[0].is_contiguous()
    out1 = ops.selective_scan_fn(*args, **kw)
    out2 = ops.selective_scan_fn(*nc, **kw)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)


def test_nan_input_propagates():
    args, kw = make_inputs(CASES["mamba"])
    args[0] = args[0].clone()
    args[0][0, 3, 5] = float("nan")
    out = ops.selective_scan_fn(*args, **kw)
    assert torch.isnan(out[0, 3, 5:]).all()  # the state carries it forward...
    assert torch.isfinite(out[0, 3, :5]).all() and torch.isfinite(out[1]).all()  # ...and nowhere else


# ---------------------------------------------------------------- opcheck, gradcheck, compile

def test_opcheck_forward_and_backward():
    args, kw = make_inputs(replace(CASES["init"], length=9, dim=5, nstate=3))
    u, delta, A, Bm, Cm = [a.contiguous() for a in args]
    chunk = ssm_ops.chunk_size_for("cpu", 3)
    fwd = (u, delta, A, Bm, Cm, kw["D"], kw["z"], kw["delta_bias"], True, kw["initial_state"], None, False, 2,
           chunk)
    # the raw op reads every input as a dense array (selective_scan_fn passes dense copies)
    run_opcheck(torch.ops.fastnn.selective_scan_forward.default, [fwd], strided_inputs=False)
    _, _, chunks = torch.ops.fastnn.selective_scan_forward(*fwd)
    bwd = (torch.randn_like(u), torch.randn(2, 5, 3), chunks, u, delta, A, Bm, Cm, kw["D"], kw["z"],
           kw["delta_bias"], True, kw["initial_state"], None, False, chunk, True)
    run_opcheck(torch.ops.fastnn.selective_scan_backward.default, [bwd], skip_autograd=True, strided_inputs=False)
    with fastnn.use_backend("reference"):  # torch.func.vjp: gradients in their inputs' layouts before dense_copies
        check_fake_layout(torch.ops.fastnn.selective_scan_backward.default, bwd, {})


@pytest.mark.parametrize("name", ["mamba", "fixed_bc", "seq_idx", "cu_seqlens"])
def test_gradcheck_float64(name):
    c = replace(CASES[name], dim=3, length=min(CASES[name].length, 11), nstate=2)
    if name == "cu_seqlens":
        c = replace(c, length=11)
    args, kw = _float64(*make_inputs(c))
    names = ["u", "delta", "A", "B", "C"] + [k for k, v in kw.items() if torch.is_tensor(v) and v.is_floating_point()]
    fixed = {k: v for k, v in kw.items() if not (torch.is_tensor(v) and v.is_floating_point())}
    inputs = tuple(a.requires_grad_() for a in args) + tuple(kw[k].requires_grad_() for k in names[5:])

    def fn(*xs):
        kws = dict(zip(names[5:], xs[5:]), **fixed)
        return ops.selective_scan_fn(*xs[:5], return_last_state=True, **kws)

    run_gradcheck(fn, inputs, ["reference"] + CPU_BACKENDS, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_compiles_fullgraph():
    args, kw = make_inputs(CASES["init"])
    kw.pop("initial_state")

    def fn(u, delta, A, Bm, Cm, D, z, bias):
        return ops.selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias, True, return_last_state=True)

    check_compiles(fn, (*args, kw["D"], kw["z"], kw["delta_bias"]))

    leaves = [a.detach().clone().requires_grad_() for a in args]
    compiled = torch.compile(fn, fullgraph=True)
    out, last = compiled(*leaves, kw["D"], kw["z"], kw["delta_bias"])
    (out.sum() + last.sum()).backward()
    eager = [a.detach().clone().requires_grad_() for a in args]
    o2, l2 = fn(*eager, kw["D"], kw["z"], kw["delta_bias"])
    (o2.sum() + l2.sum()).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_compiles_fullgraph_packed():
    """cu_seqlens (its values checked inside the graph) and an initial state per sequence compile whole; a bad
    table still raises when the compiled graph runs."""
    args, _ = make_inputs(CASES["mamba"])
    u, delta, A, Bm, Cm = [a if a is args[2] else a[:1] for a in args]  # batch 1 (A is (D, N))
    L = u.shape[2]
    cu = torch.tensor([0, 3, L], dtype=torch.int32)
    init = torch.randn(2, u.shape[1], A.shape[1])

    def fn(u, cu):
        return ops.selective_scan_fn(u, delta, A, Bm, Cm, initial_state=init, cu_seqlens=cu, return_last_state=True)

    check_compiles(fn, (u, cu))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        compiled(u, torch.tensor([0, 5, 3], dtype=torch.int32))
    seq_idx = (torch.arange(L) >= 3).long()[None]  # int64, range-checked in the graph
    check_compiles(lambda u, s: ops.selective_scan_fn(u, delta, A, Bm, Cm, seq_idx=s), (u, seq_idx))


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_argument():
    args, kw = make_inputs(CASES["mamba"])
    u, delta, A, Bm, Cm = args
    f = ops.selective_scan_fn
    expect_error(f, ("x", delta, A, Bm, Cm), TypeError, "u must be a torch.Tensor")
    expect_error(f, (u[0], delta, A, Bm, Cm), ValueError, r"u must be \(B, D, L\)")
    expect_error(f, (u, delta[..., :-1], A, Bm, Cm), ValueError, "delta must have shape")
    expect_error(f, (u, delta.double(), A, Bm, Cm), TypeError, "delta must have u's dtype")
    expect_error(f, (u.int(), delta, A, Bm, Cm), TypeError, "u must have dtype")
    expect_error(f, (u, delta, A[:-1], Bm, Cm), ValueError, r"A must be \(D, N\)")
    expect_error(f, (u, delta, torch.zeros(u.shape[1], 300), Bm, Cm), ValueError, "state size N")
    expect_error(f, (u, delta, A, Bm[..., :-1], Cm), ValueError, "B must be")
    expect_error(f, (u, delta, A, Bm, torch.randn(2, 5, A.shape[1], u.shape[2])), ValueError, "groups")
    expect_error(lambda: f(u, delta, A, Bm, Cm, D=torch.randn(3)), (), ValueError, "D must have shape")
    expect_error(lambda: f(u, delta, A, Bm, Cm, z=kw["z"].double()), (), TypeError, "z must have")
    expect_error(lambda: f(u, delta, A, Bm, Cm, initial_state=torch.randn(1, 2, 3)), (), ValueError,
                 "initial_state must have shape")
    expect_error(lambda: f(u, delta, A, Bm, Cm, seq_idx=torch.zeros(2, 3, dtype=torch.int32)), (), ValueError,
                 "seq_idx must have shape")
    expect_error(lambda: f(u, delta, A, Bm, Cm, cu_seqlens=torch.tensor([0, u.shape[2]])), (), ValueError,
                 "batch size must be 1")
    u1, d1, b1, c1 = u[:1], delta[:1], Bm[:1], Cm[:1]
    for bad in ([0, 5, 5, u.shape[2]], [0, 5, u.shape[2] - 1], [1, u.shape[2]]):
        expect_error(lambda: f(u1, d1, A, b1, c1, cu_seqlens=torch.tensor(bad)), (), ValueError, "cu_seqlens must")
    expect_error(lambda: f(u1, d1, A, b1, c1, cu_seqlens=torch.tensor([0, u.shape[2]]),
                           seq_idx=torch.zeros(1, u.shape[2], dtype=torch.int32)), (), ValueError, "either")
    # int64 seq_idx is taken, but not wrapped into int32 (2^32 would read as 0 and merge two sequences)
    L = u.shape[2]
    wide = torch.zeros(u.shape[0], L, dtype=torch.int64)
    wide[:, L // 2:] = 2 ** 32
    expect_error(lambda: f(u, delta, A, Bm, Cm, seq_idx=wide), (), ValueError, r"seq_idx must fit in int32")
    torch.testing.assert_close(f(u, delta, A, Bm, Cm, seq_idx=(wide > 0).long()),
                               f(u, delta, A, Bm, Cm, seq_idx=(wide > 0).int()), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_raw_scan_op_refuses_sizes_and_sequence_ids_the_kernel_would_overrun(backend):
    """torch.ops.fastnn.selective_scan_forward / _backward skip the public function's checks: a short D,
    delta_bias or initial state, or a sequence id naming no state, must fail rather than read or write past
    a tensor's end."""
    g = torch.Generator().manual_seed(13)
    u, A, Bm = torch.randn(2, 4, 6, generator=g), -torch.rand(4, 3, generator=g), torch.randn(4, 3, generator=g)
    fwd = torch.ops.fastnn.selective_scan_forward
    with fastnn.use_backend(backend):
        with pytest.raises(RuntimeError, match=r"D must be a contiguous \(4,\) tensor"):
            fwd(u, u, A, Bm, Bm, torch.randn(1), None, None, False, None, None, False, 2, 8)
        with pytest.raises(RuntimeError, match=r"delta_bias must be"):
            fwd(u, u, A, Bm, Bm, None, None, torch.randn(5), False, None, None, False, 2, 8)
        with pytest.raises(RuntimeError, match=r"initial_state must be"):
            fwd(u, u, A, Bm, Bm, None, None, None, False, torch.randn(1, 4, 3), None, False, 2, 8)
        one = u[:1]
        for ids in ([[-3, -3, -1, -1, 0, 0]], [[0, 0, 1, 1, 2, 2]]):  # negative; 2 past the 2 states given
            with pytest.raises(RuntimeError, match=r"seq_idx must be in \[0, 2\)"):
                fwd(one, one, A, Bm, Bm, None, None, None, False, torch.randn(2, 4, 3),
                    torch.tensor(ids, dtype=torch.int32), True, 2, 8)
        out, last, chunks = fwd(u, u, A, Bm, Bm, None, None, None, False, None, None, False, 2, 8)
        with pytest.raises(RuntimeError, match=r"chunk_states must be"):
            torch.ops.fastnn.selective_scan_backward(torch.randn_like(u), None, chunks[:1], u, u, A, Bm, Bm, None, None,
                                                     None, False, None, None, False, 8, True)
        with pytest.raises(RuntimeError, match=r"dlast_state must be"):
            torch.ops.fastnn.selective_scan_backward(torch.randn_like(u), torch.randn(1, 4, 3), chunks, u, u, A, Bm, Bm,
                                                     None, None, None, False, torch.randn(2, 4, 3), None, False, 8, True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_D_means_no_D_u_term(backend):
    """Without D the output has no D u term at all (mamba's reference adds none): an infinite u must give
    the reference's inf, not 0 * inf = NaN."""
    g = torch.Generator().manual_seed(14)
    u, delta = torch.randn(2, 20, 9, generator=g), torch.rand(2, 20, 9, generator=g)
    A, Bm, C = -torch.rand(20, 16, generator=g), torch.rand(20, 16, generator=g), torch.rand(20, 16, generator=g)
    z = torch.randn(2, 20, 9, generator=g)
    u[0, 3, 4] = float("inf")
    u[1, 7, 2] = float("-inf")
    for gate in (None, z):
        with fastnn.use_backend(backend):
            out = ops.selective_scan_fn(u, delta, A, Bm, C, z=gate)
        want = ref.selective_scan(u, delta, A, Bm, C, z=gate)[0]
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
        finite = want.isfinite()
        torch.testing.assert_close(out[finite], want[finite], rtol=1e-5, atol=1e-5)
