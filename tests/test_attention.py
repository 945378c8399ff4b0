"""Attention: scaled_dot_product_attention, flash_attention, attention_decode and MultiheadAttention through
every tier of DESIGN.md section 5 (C++ on the CPU, Triton under the interpreter here, both on CUDA)."""
import math
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import ops
from fastnn.nn import MultiheadAttention
from fastnn.ops import attention as attn_ops
from fastnn.reference import attention as ref

from _tiers import (
    HAS_CUDA,
    backends_under_test,
    check_compiles,
    cuda_param,
    expect_error,
    lowp_close,
    run_gradcheck,
    run_opcheck,
)

IMPLS = tuple(attn_ops._FORWARD_IMPLS)
CPU_BACKENDS = backends_under_test("cpu", IMPLS)
INTERPRETED = fastnn._backend.triton_interpreting()


# ---------------------------------------------------------------- tier 1: the reference

def _fmix32_python(x: int) -> int:
    """MurmurHash3 fmix32 in plain Python integers: an independent formulation of the hash."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_fmix32_matches_plain_python_and_murmur3():
    xs = torch.randint(0, 2 ** 32, (2000,), dtype=torch.long)
    xs[:3] = torch.tensor([0, 1, 2 ** 32 - 1])
    got = ref.fmix32(xs).tolist()
    assert got == [_fmix32_python(x) for x in xs.tolist()]
    assert got[0] == 0 and got[1] == 0x514E28B7  # MurmurHash3's published finaliser value for 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    rows = torch.arange(512)[:, None] + 7 * 2 ** 31  # large row ids wrap mod 2^32 like the kernels'
    keep = ref.dropout_keep(1234, p, rows, torch.arange(512)[None, :]).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # neighbouring rows and columns are uncorrelated, and another seed gives another mask
    for a, b in ((keep[1:], keep[:-1]), (keep[:, 1:], keep[:, :-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.02
    other = ref.dropout_keep(1235, p, rows, torch.arange(512)[None, :]).double()
    assert abs(torch.corrcoef(torch.stack([keep.flatten(), other.flatten()]))[0, 1].item()) < 0.02


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_reference_matches_torch_sdpa(causal, mask):
    q = torch.randn(2, 4, 9, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 13, 16, dtype=torch.float64), torch.randn(2, 2, 13, 8, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 9, 13) > 0.4
        m[..., 0] = True  # torch's math gives NaN on fully masked rows; ours 0: compare where both agree
    elif mask == "float":
        m = torch.randn(1, 4, 9, 13, dtype=torch.float64)
    if causal and m is not None:
        pytest.skip("torch rejects attn_mask with is_causal")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(ref.sdpa(q, k, v, m, is_causal=causal, enable_gqa=True), want, rtol=1e-12, atol=1e-12)
    out, lse = ref.attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     bias=None if m is None else m.expand(2, 4, 9, 13), scale=0.25,
                                     window_right=0 if causal else -1, bottom_right=False)
    torch.testing.assert_close(out.transpose(1, 2), want, rtol=1e-12, atol=1e-12)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    if causal:
        s = s.masked_fill(~torch.ones(9, 13, dtype=torch.bool).tril(), -math.inf)
    if m is not None:
        s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_reference_sdpa_and_kernel_convention_share_dropout_rows():
    q, k, v = (torch.randn(3, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    a = ref.sdpa(q, k, v, dropout_p=0.4, seed=99)
    b, _ = ref.attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=8 ** -0.5,
                                 bottom_right=False, dropout_p=0.4, seed=99)
    torch.testing.assert_close(a, b.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_reference_varlen_equals_each_sequence_alone():
    lq, lk = [3, 0, 6], [5, 2, 4]
    cq = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    ck = torch.tensor([0, 5, 7, 11], dtype=torch.int32)
    q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float64) for n in (9, 11, 11))
    out, lse = ref.attention_forward(q, k, v, cq, ck, window_right=0, dropout_p=0.3, seed=5, scale=0.3)
    for b in range(3):
        if lq[b] == 0:
            continue
        qs, ks = int(cq[b]), int(ck[b])
        o, l_ = ref.attention_forward(q[:, qs:qs + lq[b]], k[:, ks:ks + lk[b]], v[:, ks:ks + lk[b]],
                                      window_right=0, scale=0.3)
        torch.testing.assert_close(lse[:, :, qs:qs + lq[b]], l_)
        if b == 0:  # no dropout in this one (dropout rows depend on the packed position): compare outputs too
            o_full, _ = ref.attention_forward(q, k, v, cq, ck, window_right=0, scale=0.3)
            torch.testing.assert_close(o_full[:, qs:qs + lq[b]], o)


# ---------------------------------------------------------------- tiers 2-3: kernels against the reference

@dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 2
    Hkv: int = 2
    Lq: int = 17
    Lk: int = 17
    D: int = 32
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    bias: Optional[str] = None     # None | "float" (full) | "broadcast" (1, H, 1, Lk) | "bool"
    dropout: float = 0.0
    varlen: Optional[tuple] = None  # ((lq, lk), ...) per sequence
    seqused: bool = False


CASES = {
    "basic": Case(),
    "len1": Case(Lq=1, Lk=1, D=64),
    "lq_lt_lk_causal": Case(Lq=9, Lk=23, D=64, causal=True),
    "lq_gt_lk_causal": Case(Lq=23, Lk=9, causal=True),  # bottom-right: the first 14 rows see no key
    "gqa": Case(H=4, Hkv=2),
    "mqa": Case(H=4, Hkv=1, causal=True),
    "window": Case(Lq=20, Lk=26, window=(5, 3)),
    "window_causal": Case(window=(4, 0)),
    "softcap": Case(softcap=2.5),
    "bias_full": Case(bias="float"),
    "bias_broadcast": Case(H=4, Hkv=2, bias="broadcast", causal=True),
    "mask_bool": Case(Lq=12, Lk=20, bias="bool"),
    "dropout": Case(Lq=20, Lk=24, dropout=0.25),
    "varlen": Case(B=1, varlen=((5, 9), (0, 3), (11, 7), (1, 1)), causal=True),
    "seqused": Case(Lk=24, seqused=True, causal=True),
    "everything": Case(H=4, Hkv=2, Lq=19, Lk=25, causal=True, window=(9, -1), softcap=4.0, bias="broadcast",
                       dropout=0.2),
    "d96": Case(D=96, causal=True), "d128": Case(D=128), "d192": Case(D=192, Lq=5, Lk=9),
    "d256": Case(D=256, Lq=5, Lk=9, causal=True),
}
LONG_CASES = {"long": Case(B=1, H=2, Lq=1000, Lk=1000, D=64), "long_causal": Case(B=1, H=2, Lq=1000, Lk=700,
                                                                                   D=64, causal=True)}


def make_inputs(case: Case, seed: int = 0):
    """fp64 q, k, v, dout (flash layout, or packed with cu_seqlens), bias and the flash_attention kwargs."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(causal=case.causal, window=case.window, softcap=case.softcap, dropout_p=case.dropout)
    if case.varlen:
        lqs, lks = zip(*case.varlen)
        kw["cu_seqlens_q"] = torch.tensor([0, *torch.tensor(lqs).cumsum(0).tolist()], dtype=torch.int32)
        kw["cu_seqlens_k"] = torch.tensor([0, *torch.tensor(lks).cumsum(0).tolist()], dtype=torch.int32)
        qshape, kshape = (sum(lqs), case.H, case.D), (sum(lks), case.Hkv, case.D)
    else:
        qshape, kshape = (case.B, case.Lq, case.H, case.D), (case.B, case.Lk, case.Hkv, case.D)
    q = torch.randn(qshape, generator=g, dtype=torch.float64)
    k = torch.randn(kshape, generator=g, dtype=torch.float64)
    v = torch.randn(kshape, generator=g, dtype=torch.float64)
    dout = torch.randn(qshape, generator=g, dtype=torch.float64)
    bias = None
    if case.bias == "float":
        bias = torch.randn(case.B, case.H, case.Lq, case.Lk, generator=g, dtype=torch.float64)
    elif case.bias == "broadcast":
        bias = torch.randn(1, case.H, 1, case.Lk, generator=g, dtype=torch.float64)
    elif case.bias == "bool":
        bias = torch.rand(case.B, 1, case.Lq, case.Lk, generator=g) > 0.5
        bias[:, :, 2] = False  # a fully masked row
    if case.seqused:
        kw["seqused_k"] = torch.randint(0, case.Lk + 1, (case.B,), generator=g, dtype=torch.int32)
        kw["seqused_k"][0] = 0  # a sequence with an empty cache
    return q, k, v, dout, bias, kw


def run_flash(backend, q, k, v, dout, bias, kw, dtype, grads=True, seed=7):
    """Forward (+ backward) through fastnn.ops.flash_attention with one backend forced, inputs cast to dtype
    (the bias keeps float32 unless dtype is float64). Returns [out, lse, dq, dk, dv, dbias]."""
    leaves = [t.to(dtype).requires_grad_(grads) for t in (q, k, v)]
    b = None
    if bias is not None:
        b = bias if bias.dtype == torch.bool else bias.to(torch.float64 if dtype == torch.float64 else torch.float32)
        b = b.requires_grad_(grads and b.is_floating_point())
    with fastnn.use_backend(backend):
        torch.manual_seed(seed)
        out, lse = ops.flash_attention(*leaves, bias=b, return_lse=True, **kw)
        res = [out, lse]
        if grads:
            wrt = leaves + ([b] if b is not None and b.requires_grad else [])
            res += list(torch.autograd.grad(out, wrt, dout.to(dtype)))
    return res


def check_against_reference(backend, case, dtype, grads=True):
    q, k, v, dout, bias, kw = make_inputs(case)
    qd, kd, vd = (t.to(dtype).double() for t in (q, k, v))  # the reference sees the rounded inputs
    got = run_flash(backend, q, k, v, dout, bias, kw, dtype, grads)
    want = run_flash("reference", qd, kd, vd, dout.to(dtype).double(), bias, kw, torch.float64, grads)
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    if dtype in (torch.float32, torch.float64):
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        for name, g, w in zip(names, got, want):
            assert g.dtype == dtype, f"{name}: dtype {g.dtype}"  # lse and the bias are float32 here
            torch.testing.assert_close(g.double(), w, rtol=tol * 10, atol=tol, msg=lambda m: f"{name}: {m}")
    else:
        lowp = run_flash("reference", q.to(dtype), k.to(dtype), v.to(dtype), dout, bias, kw, dtype, grads)
        for name, g, w, lp in zip(names, got, want, lowp):
            if name == "lse":  # stored in fp32 by every path: tight
                torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3)
            else:
                lowp_close(g, w, lp, floor=1e-3 if name.startswith("d") else 1e-4, what=name)
    return got, want


def _kernel_params(cases, lowp):
    params = []
    for backend in CPU_BACKENDS:
        dtypes = [torch.float32] + ([torch.float16] if lowp else [])
        if backend == "cpp" and lowp:
            dtypes.append(torch.bfloat16)  # the Triton interpreter mishandles bf16 (bf16 runs on CUDA)
        for name in cases:
            for dt in dtypes:
                params.append(pytest.param(backend, name, dt, id=f"{backend}-{name}-{str(dt)[6:]}"))
    return params


@pytest.mark.parametrize("backend,name,dtype", _kernel_params(CASES, lowp=True))
def test_kernel_matches_reference(backend, name, dtype):
    case = CASES[name]
    if backend == "triton" and dtype != torch.float32 and case.D >= 192:
        pytest.skip("fp16 at head dim >= 192 in the interpreter adds minutes; covered in fp32 and on CUDA")
    check_against_reference(backend, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LONG_CASES))
def test_cpp_long_sequences(name, dtype):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("fastnn._C not built")
    check_against_reference("cpp", LONG_CASES[name], dtype)


def test_cpp_float64_matches_reference():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("fastnn._C not built")
    check_against_reference("cpp", CASES["everything"], torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_are_zero_not_nan(backend):
    q, k, v = (torch.randn(1, 3, 2, 32) for _ in range(3))
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = False
    ninf = torch.zeros(1, 2, 3, 3).masked_fill(~mask, -math.inf)  # an all -inf float bias row as well
    with fastnn.use_backend(backend):
        for b in (mask, ninf):
            out, lse = ops.flash_attention(q, k, v, bias=b, return_lse=True)
            assert torch.equal(out[0, 1, 1], torch.zeros(32)) and lse[0, 1, 1] == -math.inf
            assert torch.isfinite(out).all()
        out = ops.flash_attention(q[:, :2], k[:, :1], v[:, :1], causal=True)  # Lq > Lk: row 0 sees nothing
        assert torch.equal(out[0, 0], torch.zeros(2, 32))


def _torch_math_sdpa(q, k, v, **kw):
    """torch's SDPA on its math backend in the inputs' dtype, with gradients (its CPU flash backward
    recomputes p from the float32 logsumexp and is wrong for the huge-score rows below). Not float64: a score
    plus a mask of -1e10 keeps the score in float64 but not in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    return out, torch.autograd.grad(out.sum(), (q, k, v))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_huge_finite_scores_stay_exact(backend):
    """Rows whose scores are huge but finite: a padding mask of finfo.min over a whole row (Hugging Face's
    value: torch averages v there), masks of -1e10 / -1e12 and +3e38, and scale 1e10. exp(s * sc - m) in
    one FMA lost the max there (NaN or zeros); the reference's exp(s - lse) made every weight 1; Triton's
    bias * log2(e) overflowed to -inf (a masked row: zeros) or +inf (NaN); the backward's p from the
    float32 lse was wrong (such calls on CPU tensors now run the reference's backward)."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 5, 32) for _ in range(3))
    cases = []
    for value in (torch.finfo(torch.float32).min, -1e10, -1e12):
        m = torch.zeros(1, 2, 5, 5)
        m[..., 3, :] = value
        m[..., 1, 2:] = value  # a partly masked row beside it
        cases.append(dict(attn_mask=m))
    cases += [dict(attn_mask=torch.full((5, 5), 3e38)), dict(scale=1e10)]
    for kw in cases:
        want, gwant = _torch_math_sdpa(q, k, v, **kw)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with fastnn.use_backend(backend):
            out = ops.scaled_dot_product_attention(qq, kk, vv, **kw)
            grads = torch.autograd.grad(out.sum(), (qq, kk, vv))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=lambda s: f"{kw.keys()}: {s}")
        for g, gw in zip(grads, gwant):
            torch.testing.assert_close(g, gw, rtol=1e-4, atol=1e-4, msg=lambda s: f"{kw.keys()}: {s}")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_head_dim_zero_averages_v(backend):
    q, k = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 7, 0)
    v = torch.randn(2, 3, 7, 8, requires_grad=True)
    want, (_, _, gv) = _torch_math_sdpa(q, k, v)
    with fastnn.use_backend(backend):
        out = ops.scaled_dot_product_attention(q, k, v)
        (g,) = torch.autograd.grad(out.sum(), v)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, gv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpp"])
def test_nan_inputs_propagate_like_the_reference(backend):
    q, k, v = (torch.randn(1, 6, 2, 32) for _ in range(3))
    q[0, 2, 1, 3] = math.nan
    k[0, 4, 0, 0] = math.nan
    bias = torch.zeros(1, 1, 6, 6)
    bias[0, 0, 1, 1] = math.nan
    for kw in (dict(causal=True), dict(bias=bias)):
        with fastnn.use_backend(backend):
            out = ops.flash_attention(q, k, v, **kw)
        with fastnn.use_backend("reference"):
            want = ops.flash_attention(q, k, v, **kw)
        assert torch.isnan(want).any()
        assert torch.equal(torch.isnan(out), torch.isnan(want))
        torch.testing.assert_close(out, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_cpu_screen(dtype):
    """The C++ input screen: exact per element (a sum would overflow on the largest finite values), any
    position, strided views (including transposed ones, scanned in storage order), None skipped."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("fastnn._C not built")
    from fastnn._backend import _C
    t = torch.randn(3, 70001, dtype=dtype)
    assert _C.all_finite_cpu([t, None, t.t(), t[:, ::3]])
    assert _C.all_finite_cpu([torch.full((9,), torch.finfo(dtype).max, dtype=dtype)])
    for bad in (math.nan, math.inf, -math.inf):
        for pos in (0, 4095, 4096, 70000 + 70001, 3 * 70001 - 1):
            u = t.clone()
            u.view(-1)[pos] = bad
            assert not _C.all_finite_cpu([t, u]), (bad, pos)
            assert not _C.all_finite_cpu([u.t()]) and not _C.all_finite_cpu([u.transpose(0, 1)[::1]])
    u = t.clone()
    u[1, 5] = math.nan
    assert _C.all_finite_cpu([u[:, 6::2]]) and not _C.all_finite_cpu([u[:, 5::2]])  # only what the view holds


def test_all_finite_cpu_screen_complex():
    """A complex tensor is finite when both parts are (it fell to a generic path that missed NaN)."""
    from fastnn._backend import _C
    z = torch.randn(5, dtype=torch.complex64)
    assert _C.all_finite_cpu([z])
    for bad in (complex(float("nan"), 0.0), complex(0.0, float("inf"))):
        w = z.clone()
        w[2] = bad
        assert not _C.all_finite_cpu([w])
        assert not _C.all_finite_cpu([w.conj()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_scores_with_a_moving_max(dtype, causal):
    """Row maxima that jump by far more than the kernel's stale-max margin from one key block to the next
    (keys scaled up along the sequence), and others set by the first block (keys scaled down): the
    rescale path and the lazy one, over several key blocks, 16-row groups with a tail, and causal edges."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("fastnn._C not built")
    g = torch.Generator().manual_seed(3)
    Lq, Lk, D = 301, 1100, 64
    q = torch.randn(1, Lq, 2, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, Lk, 2, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, Lk, 2, D, generator=g, dtype=torch.float64)
    ramp = torch.linspace(0.2, 6.0, Lk, dtype=torch.float64)
    k[:, :, 0] *= ramp[None, :, None]             # head 0: the max grows block after block
    k[:, :, 1] *= ramp.flip(0)[None, :, None]     # head 1: the first block holds the max
    dout = torch.randn(1, Lq, 2, D, generator=g, dtype=torch.float64)
    case = Case(B=1, H=2, Hkv=2, Lq=Lq, Lk=Lk, D=D, causal=causal)
    kw = dict(causal=causal, window=case.window, softcap=0.0, dropout_p=0.0)
    got = run_flash("cpp", q, k, v, dout, None, kw, dtype)
    want = run_flash("reference", *(t.to(dtype).double() for t in (q, k, v)), dout.to(dtype).double(), None, kw,
                     torch.float64)
    if dtype == torch.float32:
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want):
            torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    else:
        lowp = run_flash("reference", q.to(dtype), k.to(dtype), v.to(dtype), dout, None, kw, dtype)
        for name, a, b, lp in zip(["out", "lse", "dq", "dk", "dv"], got, want, lowp):
            if name == "lse":
                torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
            else:
                lowp_close(a, b, lp, floor=1e-3 if name.startswith("d") else 1e-4, what=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_statistics_and_consistency(backend):
    """With v the identity, out = dropped P: about p of the probabilities are zeroed, the rest scaled by
    1 / (1 - p); the same seed gives the same output, and the gradient is that of the same mask."""
    L, p = 32, 0.3
    q, k = torch.randn(1, L, 2, 32), torch.randn(1, L, 2, 32)
    v = torch.eye(L).view(1, L, 1, L).expand(1, L, 2, L).contiguous()
    with fastnn.use_backend(backend):
        torch.manual_seed(3)
        dropped = ops.flash_attention(q, k, v, dropout_p=p)
        torch.manual_seed(3)
        again = ops.flash_attention(q, k, v, dropout_p=p)
        plain = ops.flash_attention(q, k, v)
    assert torch.equal(dropped, again)
    zero = dropped == 0
    frac = zero.double().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / zero.numel())
    torch.testing.assert_close(dropped[~zero], plain[~zero] / (1 - p), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- public API semantics

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "float_mask", "gqa", "scale", "5d", "3d",
                                     "dv_differs"])
def test_sdpa_matches_torch(backend, variant):
    shape_q, shape_kv, dv = (2, 4, 11, 32), (2, 4, 15, 32), 32
    kw, mask = {}, None
    if variant == "gqa":
        shape_kv, kw = (2, 2, 15, 32), dict(enable_gqa=True)
    if variant == "5d":
        shape_q, shape_kv = (2, 3, 2, 11, 32), (2, 3, 2, 15, 32)
    if variant == "3d":
        shape_q, shape_kv = (4, 11, 32), (4, 15, 32)
    if variant == "dv_differs":
        if backend == "triton":
            pytest.skip("the Triton kernels have D == Dv (other shapes run the reference on CUDA)")
        dv = 16
    q = torch.randn(shape_q)
    k = torch.randn(shape_kv)
    v = torch.randn(*shape_kv[:-1], dv)
    if variant == "causal":
        kw["is_causal"] = True
    if variant == "bool_mask":
        mask = torch.rand(11, 15) > 0.3
        mask[:, 0] = True
    if variant == "float_mask":
        mask = torch.randn(2, 1, 11, 15)
    if variant == "scale":
        kw["scale"] = 0.05
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), **kw)
    with fastnn.use_backend(backend):
        got = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sdpa_gradients_match_torch(backend):
    q, k, v = (torch.randn(2, 2, 13, 32, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(13, 13, dtype=torch.float64, requires_grad=True)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    m32 = mask.detach().float().requires_grad_()
    with fastnn.use_backend(backend):
        out = ops.scaled_dot_product_attention(*leaves, attn_mask=m32)
    want = F.scaled_dot_product_attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), attn_mask=mask)
    dout = torch.randn_like(want)
    got_g = torch.autograd.grad(out, leaves + [m32], dout.float())
    want_g = torch.autograd.grad(want, [q, k, v, mask], dout)
    for g, w in zip(got_g, want_g):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flash_attention_lse_varlen_and_layouts(backend):
    case = CASES["varlen"]
    q, k, v, _, _, kw = make_inputs(case)
    q, k, v = q.float(), k.float(), v.float()
    with fastnn.use_backend(backend):
        out, lse = ops.flash_attention(q, k, v, return_lse=True, **kw)
        assert out.shape == q.shape and lse.shape == (case.H, q.shape[0]) and lse.dtype == torch.float32
        cq, ck = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
        for b in range(len(cq) - 1):
            if cq[b + 1] == cq[b]:
                continue
            o1, l1 = ops.flash_attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                                         causal=True, return_lse=True)
            torch.testing.assert_close(out[cq[b]:cq[b + 1]], o1[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[:, cq[b]:cq[b + 1]], l1[0], rtol=1e-5, atol=1e-6)
        # non-contiguous inputs (SDPA layout seen through a transpose, a strided slice) give the same numbers
        qb, kb, vb = (torch.randn(2, 3, 10, 64)[..., ::2] for _ in range(3))
        strided = ops.flash_attention(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2))
        dense = ops.flash_attention(*(t.transpose(1, 2).contiguous() for t in (qb, kb, vb)))
        torch.testing.assert_close(strided, dense, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lq,hkv,causal,window,softcap", [(1, 2, False, (-1, -1), 0.0), (1, 1, True, (-1, -1), 0.0),
                                                          (3, 2, True, (6, 0), 3.0), (4, 4, False, (-1, -1), 0.0)])
def test_decode_matches_flash_attention(backend, lq, hkv, causal, window, softcap):
    B, H, D, cache = 3, 4, 64, 37
    q = torch.randn(B, lq, H, D)
    kc, vc = torch.randn(B, cache, hkv, D), torch.randn(B, cache, hkv, D)
    lens = torch.tensor([cache, 2, 0], dtype=torch.int32)  # full, shorter than some causal rows need, empty
    with fastnn.use_backend(backend):
        out, lse = ops.attention_decode(q, kc, vc, lens, causal=causal, window=window, softcap=softcap,
                                        num_splits=3, return_lse=True)
        for b in range(B):
            n = int(lens[b])
            if n == 0:
                assert torch.equal(out[b], torch.zeros_like(out[b])) and bool((lse[b] == -math.inf).all())
                continue
            o1, l1 = ops.flash_attention(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal=causal, window=window,
                                         softcap=softcap, return_lse=True)
            torch.testing.assert_close(out[b:b + 1], o1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[b:b + 1], l1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_direct_calls_equal_the_op(backend, monkeypatch):
    """In plain eager mode flash_attention and scaled_dot_product_attention run the attention_forward op's body,
    through an autograd.Function with the op's setup_context and backward when a gradient is wanted
    (fastnn/ops/_direct.py): outputs and gradients (q, k, v, bias) bitwise the op's, dropout included."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, 4, 32, generator=g) for _ in range(3))
    bias = torch.randn(2, 4, 6, 6, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        torch.manual_seed(3)  # the dropout seed
        o1 = ops.flash_attention(*leaves[:3], bias=leaves[3], causal=True, dropout_p=0.25)
        o2 = ops.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves[:3]), is_causal=True)
        with torch.no_grad():
            o3 = ops.flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(o1.square().sum() + o2.square().sum(), leaves)
        return [o1.detach(), o2.detach(), o3, *grads]

    with fastnn.use_backend(backend):
        direct = run()
        monkeypatch.setattr(attn_ops._direct, "plain_eager", lambda *a: False)
        via_op = run()
    for a, b in zip(direct, via_op):
        assert torch.equal(a, b)


def test_direct_calls_keep_the_ops_limits():
    """What the direct calls (fastnn/ops/_direct.py) must not change: a double backward through attention raises
    as the op's does (the body would return gradients without history, silently), and meta tensors get the
    op's fake shapes (the body would read their data)."""
    q, k, v = (torch.randn(1, 4, 2, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g, = torch.autograd.grad(ops.flash_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.square().sum().backward()
    qm, km, vm = (torch.empty(2, 1, 4, 32, device="meta"), torch.empty(2, 9, 2, 32, device="meta"),
                  torch.empty(2, 9, 2, 32, device="meta"))
    out = ops.attention_decode(qm, km, vm, torch.empty(2, dtype=torch.int32, device="meta"))
    assert out.shape == (2, 1, 4, 32) and out.is_meta
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    assert ops.flash_attention(qm[0], km[0], vm[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1,
                               max_seqlen_k=9).is_meta


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_direct_call_equals_the_op(backend, monkeypatch):
    """In plain eager mode attention_decode runs the op's body without torch.library's dispatch
    (fastnn/ops/_direct.py): bitwise the op's outputs."""
    q, kc, vc = torch.randn(2, 1, 4, 64), torch.randn(2, 9, 2, 64), torch.randn(2, 9, 2, 64)
    lens = torch.tensor([9, 4], dtype=torch.int64)
    call = lambda q, kc, vc, lens: ops.attention_decode(q, kc, vc, lens, causal=True, return_lse=True)  # noqa: E731
    with fastnn.use_backend(backend):
        direct = call(q, kc, vc, lens)
        monkeypatch.setattr(attn_ops._direct, "plain_eager", lambda *a: False)
        via_op = call(q, kc, vc, lens)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_op))


@pytest.mark.parametrize("lq,hkv,causal,window", [(1, 2, False, (-1, -1)), (3, 2, True, (-1, -1)),
                                                  (2, 1, True, (700, 0)), (1, 8, False, (-1, -1))])
def test_cpp_decode_shaped_float32_matches_reference(lq, hkv, causal, window):
    """fp32 problems with few query rows per kv head run the C++ decode path (heads in M, K and V read in
    place): against the fp64 reference over caches of several key blocks with ragged lengths."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("fastnn._C not built")
    g = torch.Generator().manual_seed(11)
    B, H, D, cache = 4, 8, 64, 1300
    q = torch.randn(B, lq, H, D, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(B, cache, hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    kc[1] *= torch.linspace(0.1, 5.0, cache, dtype=torch.float64)[:, None, None]  # a row max moving across blocks
    lens = torch.tensor([cache, 1025, 513, 1], dtype=torch.int32)
    kw = dict(causal=causal, window=window, return_lse=True)
    with fastnn.use_backend("cpp"):
        out, lse = ops.attention_decode(q.float(), kc.float(), vc.float(), lens, **kw)
    with fastnn.use_backend("reference"):
        want, want_lse = ops.attention_decode(*(t.float().double() for t in (q, kc, vc)), lens, **kw)
    torch.testing.assert_close(out.double(), want, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_decode_carries_non_finite_cache_entries_as_torch(backend, bad):
    """A NaN or infinite key inside the valid cache gives torch's math (NaN where a score is NaN or +inf), not
    a row of zeros; one past cache_seqlens is never read. Positions in the first, a middle and the last key
    block, over caches of several blocks."""
    g = torch.Generator().manual_seed(12)
    B, H, D, cache = 3, 4, 32, 300
    q = torch.randn(B, 2, H, D, generator=g)
    kc, vc = torch.randn(B, cache, 2, D, generator=g), torch.randn(B, cache, 2, D, generator=g)
    lens = torch.tensor([cache, 150, 40], dtype=torch.int32)
    kc[0, 5, 0, 3] = bad
    kc[1, 149, 1, 0] = bad
    kc[2, 200, 0, 1] = bad  # past cache_seqlens: never read
    with fastnn.use_backend("reference"):
        want, want_lse = ops.attention_decode(q.double(), kc.double(), vc.double(), lens, causal=True, return_lse=True)
    with fastnn.use_backend(backend):
        out, lse = ops.attention_decode(q, kc, vc, lens, causal=True, return_lse=True)
    assert want[:2].isnan().any() or bad == -math.inf or bad == math.inf
    assert torch.equal(out.isnan(), want.isnan())
    # a row with a +inf score: torch's logsumexp gives +inf, the Triton kernel's m + log(l) NaN
    assert torch.equal(lse.isfinite(), want_lse.isfinite())
    finite = want.isfinite()
    torch.testing.assert_close(out.double()[finite], want[finite], rtol=2e-5, atol=2e-5)
    assert not want[2].isnan().any()


def test_decode_rows_that_see_no_key_are_predicted():
    """The C++ decode reruns a call on the reference when a row that sees keys has lse -inf (a non-finite
    key): the prediction of which rows see keys must agree with the kernels' lse on finite inputs, or finite
    calls would take the slow path (lens shorter than Lq under causal, windows, empty sequences)."""
    g = torch.Generator().manual_seed(14)
    q, kc, vc = torch.randn(3, 4, 2, 32, generator=g), torch.randn(3, 16, 2, 32, generator=g), torch.randn(3, 16, 2, 32,
                                                                                                          generator=g)
    lens = torch.tensor([2, 16, 0], dtype=torch.int32)
    for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (False, (1, 0)), (False, (0, 2)), (True, (2, 0)),
                           (False, (3, -1)), (False, (-1, 1))):
        with fastnn.use_backend("reference"):
            _, lse = ops.attention_decode(q, kc, vc, lens, causal=causal, window=window, return_lse=True)
        left, right = attn_ops._window_pair(window, causal)
        sees = attn_ops._decode_rows_see_keys(lens, 4, left, right)
        assert torch.equal(lse != -math.inf, sees.unsqueeze(1).expand_as(lse)), (causal, window)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])  # Triton: head dims 32..256
def test_head_dim_one_with_any_stride_and_no_heads_follow_torch(backend):
    """A head dim (or Dv) of 1 has no stride to speak of: a q sliced [..., ::2] is accepted, forward and
    backward equal torch's. Zero heads give an empty result, as torch's."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 3, 5, 2, generator=g, dtype=torch.float64)[..., ::2].requires_grad_()
    k = torch.randn(2, 3, 4, 2, generator=g, dtype=torch.float64)[..., ::2].requires_grad_()
    v = torch.randn(2, 3, 4, 2, generator=g, dtype=torch.float64)[..., 1:].requires_grad_()
    dout = torch.randn(2, 3, 5, 1, generator=g, dtype=torch.float64)
    with fastnn.use_backend(backend):
        got = ops.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        grads = torch.autograd.grad(got, (q, k, v), dout.float())
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    wgrads = torch.autograd.grad(want, (q, k, v), dout)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    none = torch.randn(1, 0, 3, 4, requires_grad=True)
    with fastnn.use_backend(backend):
        out = ops.scaled_dot_product_attention(none, torch.randn(1, 0, 5, 4), torch.randn(1, 0, 5, 4))
        assert out.shape == (1, 0, 3, 4)
        out.sum().backward()
        assert none.grad.shape == none.shape
        assert ops.flash_attention(torch.randn(1, 3, 0, 32), torch.randn(1, 5, 0, 32),
                                   torch.randn(1, 5, 0, 32)).shape == (1, 3, 0, 32)


# ---------------------------------------------------------------- MultiheadAttention

MHA_COMBOS = [
    dict(),
    dict(batch_first=True),
    dict(kdim=12, vdim=20),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, bias=False),
    dict(add_bias_kv=True, add_zero_attn=True, batch_first=True, kdim=8, vdim=8),
]
MHA_CALLS = [
    dict(need_weights=False),
    dict(need_weights=True),
    dict(need_weights=True, average_attn_weights=False),
    dict(need_weights=False, attn_mask="causal_bool", is_causal=True),
    dict(need_weights=True, attn_mask="bool"),
    dict(need_weights=False, attn_mask="float", key_padding_mask="float"),
    dict(need_weights=False, attn_mask="bool", key_padding_mask="bool"),
    dict(need_weights=True, attn_mask="heads_float", key_padding_mask="float"),
    dict(need_weights=False, key_padding_mask="bool", attn_mask="causal_bool", is_causal=True),
]


def _mha_masks(call, N, H, L, S):
    call = dict(call)
    m = call.pop("attn_mask", None)
    if m == "causal_bool":
        call["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
    elif m == "bool":
        call["attn_mask"] = torch.rand(L, S) > 0.6
        call["attn_mask"][:, 0] = False
    elif m == "float":
        call["attn_mask"] = torch.randn(L, S)
    elif m == "heads_float":
        call["attn_mask"] = torch.randn(N * H, L, S)
    kpm = call.pop("key_padding_mask", None)
    if kpm == "bool":
        call["key_padding_mask"] = torch.rand(N, S) > 0.6
        call["key_padding_mask"][:, 0] = False
    elif kpm == "float":
        call["key_padding_mask"] = torch.randn(N, S)
    return call


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ci", range(len(MHA_CALLS)))
@pytest.mark.parametrize("mi", range(len(MHA_COMBOS)))
def test_multihead_attention_matches_torch(backend, mi, ci):
    if backend == "triton" and mi % 2 != ci % 2:
        pytest.skip("the interpreter runs half the grid (the C++ backend runs all of it)")
    E, H, L, S, N = 64, 2, 7, 9, 3  # head dim 32: the Triton kernels' smallest
    cfg = MHA_COMBOS[mi]
    theirs = torch.nn.MultiheadAttention(E, H, **cfg)
    ours = MultiheadAttention(E, H, **cfg)
    ours.load_state_dict(theirs.state_dict())
    bf = cfg.get("batch_first", False)
    shape = lambda n, e: (N, n, e) if bf else (n, N, e)  # noqa: E731
    q = torch.randn(shape(L, E))
    k, v = torch.randn(shape(S, cfg.get("kdim") or E)), torch.randn(shape(S, cfg.get("vdim") or E))
    call = _mha_masks(MHA_CALLS[ci], N, H, L, S)
    with fastnn.use_backend(backend):
        out, w = ours(q, k, v, **call)
    out_t, w_t = theirs(q, k, v, **call)
    torch.testing.assert_close(out, out_t, rtol=1e-4, atol=2e-5)
    assert (w is None) == (w_t is None)
    if w is not None:
        torch.testing.assert_close(w, w_t, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    out_t.sum().backward()
    for (name, p), p_t in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, p_t.grad, rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")


def test_multihead_attention_state_dict_self_attention_eval_and_unbatched():
    theirs = torch.nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True).eval()
    ours = MultiheadAttention(32, 4, dropout=0.1, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())  # and back
    ours.eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():  # torch takes its fast path here
        torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0],
                                   rtol=1e-4, atol=2e-5)
    u = torch.randn(6, 32)
    o, w = ours(u, u, u)
    o_t, w_t = theirs(u, u, u)
    torch.testing.assert_close(o, o_t, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(w, w_t, rtol=1e-4, atol=1e-5)
    assert "MultiheadAttention" in repr(ours)
    pad = torch.tensor([False, False, True, False, False, True])
    torch.testing.assert_close(ours(u, u, u, key_padding_mask=pad)[0], theirs(u, u, u, key_padding_mask=pad)[0],
                               rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match=r"key_padding_mask must be 1-D \(key length,\) for unbatched input"):
        ours(u, u, u, key_padding_mask=pad[None])


@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
def test_multihead_attention_self_attention_projects_in_one_gemm(layout, monkeypatch):
    """Self-attention (one tensor as query, key and value) runs one in-projection GEMM, as torch's, also when the
    module first views the input (batch_first transposes it, unbatched input is unsqueezed); key is value, with
    another query, two (query; key and value)."""
    m = MultiheadAttention(32, 4, batch_first=layout == "batch_first").eval()
    x = torch.randn(6, 32) if layout == "unbatched" else torch.randn(2, 6, 32)
    y = torch.randn_like(x)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(a[1].shape[0]) or linear(*a, **k))
    with torch.no_grad():
        m(x, x, x, need_weights=False)
        m(y, x, x, need_weights=False)
    assert calls == [96, 32, 64, 32, 32]  # in-projection(s) (key and value first), then out_proj, each call


def test_multihead_attention_training_dropout_is_seeded_and_scaled():
    ours = MultiheadAttention(16, 2, dropout=0.5)
    x = torch.randn(5, 2, 16)
    torch.manual_seed(1)
    a, _ = ours(x, x, x, need_weights=False)
    torch.manual_seed(1)
    b, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(a, b)
    c, _ = ours.eval()(x, x, x, need_weights=False)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------- opcheck, gradcheck, torch.compile

def _op_args(case: Case, dtype=torch.float64, bias_grad=True):
    q, k, v, _, bias, kw = make_inputs(case)
    q4, k4, v4 = (t.to(dtype).requires_grad_() for t in (q, k, v))
    raw = None if bias is None else bias.to(dtype).requires_grad_(bias_grad)
    b4 = None if raw is None else raw.expand(case.B, case.H, case.Lq, case.Lk)
    left, right = attn_ops._window_pair(case.window, case.causal)
    seed = torch.tensor(11) if case.dropout else None
    return (q4, k4, v4, None, None, None, case.Lq, case.Lk, b4, 0.2, case.softcap, left, right, True, case.dropout,
            seed), raw


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_opcheck(backend):
    with fastnn.use_backend(backend):
        run_opcheck(torch.ops.fastnn.attention_forward, [_op_args(CASES["everything"], torch.float32)[0]])
        q, kc, vc = torch.randn(2, 1, 4, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)
        run_opcheck(torch.ops.fastnn.attention_decode,
                    [(q, kc, vc, torch.tensor([9, 4], dtype=torch.int32), 0.2, 0.0, -1, -1, 0)], skip_autograd=True)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in CPU_BACKENDS if b == "cpp"])
def test_gradcheck_float64(backend):
    case = Case(B=1, H=2, Hkv=1, Lq=5, Lk=7, D=8, causal=True, window=(4, -1), softcap=3.0, bias="broadcast",
                dropout=0.3)
    args, raw_bias = _op_args(case)

    def f(q, k, v, b):
        b = b.expand(case.B, case.H, case.Lq, case.Lk)
        return torch.ops.fastnn.attention_forward(q, k, v, *args[3:8], b, *args[9:])[0]

    run_gradcheck(f, (args[0], args[1], args[2], raw_bias), [backend])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiles_fullgraph(backend):
    q, k, v = (torch.randn(2, 4, 9, 32) for _ in range(3))
    qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with fastnn.use_backend(backend):
        check_compiles(lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v))
        check_compiles(lambda a, b, c: ops.flash_attention(a, b, c, window=(3, 1), return_lse=True), (qf, kf, vf))

        # the backward through a fullgraph-compiled forward (AOTAutograd traces the registered autograd)
        for p in (0.0, 0.2):
            torch._dynamo.reset()
            compiled = torch.compile(lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, dropout_p=p),
                                     fullgraph=True)
            a, c = q.clone().requires_grad_(), v.clone().requires_grad_()
            dout = torch.randn_like(q)
            loss = (compiled(a, k, c) * dout).sum()
            loss.backward()
            # out is linear in v, so loss == <v, dloss/dv>: the backward used the forward's dropout mask
            torch.testing.assert_close(loss, (c * c.grad).sum(), rtol=1e-4, atol=1e-4)
            if p == 0.0:
                a2 = q.clone().requires_grad_()
                (ops.scaled_dot_product_attention(a2, k, v) * dout).sum().backward()
                torch.testing.assert_close(a.grad, a2.grad)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_argument():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    sdpa = ops.scaled_dot_product_attention
    expect_error(sdpa, (q, k.double(), v), TypeError, "same dtype")
    expect_error(sdpa, (q.int(), k, v), TypeError, "query must have dtype")
    expect_error(sdpa, (q, torch.randn(2, 4, 8, 8), v), ValueError, "same head dim")
    expect_error(sdpa, (q, torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)), ValueError, "enable_gqa")
    expect_error(lambda: sdpa(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16), enable_gqa=True), (),
                 ValueError, "divisor")
    expect_error(lambda: sdpa(q, k, v, dropout_p=1.0), (), ValueError, "dropout_p")
    expect_error(lambda: sdpa(q, k, v, attn_mask=torch.ones(3, 8, 8, dtype=torch.bool)), (), ValueError, "attn_mask")
    expect_error(lambda: sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int32)), (), TypeError, "attn_mask")
    expect_error(lambda: sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), (), ValueError,
                 "is_causal")
    expect_error(lambda: sdpa(q, k, v, scale=float("nan")), (), ValueError, "scale")
    expect_error(sdpa, ([1.0], k, v), TypeError, "query must be a torch.Tensor")
    fa = ops.flash_attention
    qf = q.transpose(1, 2)
    expect_error(fa, (q[0], k[0], v[0]), ValueError, "q must be 4-D")
    expect_error(lambda: fa(qf, qf, qf, window=(2,)), (), TypeError, "window")
    expect_error(lambda: fa(qf, qf, qf, window=(-3, 0)), (), ValueError, "window")
    expect_error(lambda: fa(qf, qf, qf, softcap=-1.0), (), ValueError, "softcap")
    expect_error(lambda: fa(qf, qf, qf, scale=math.inf), (), ValueError, "scale must be finite")
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    expect_error(lambda: fa(qf[0], qf[0], qf[0], cu_seqlens_q=cu), (), ValueError, "together")
    expect_error(lambda: fa(qf[0], qf[0], qf[0], cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 9, 3],
                                                                                             dtype=torch.int32)),
                 (), ValueError, "cu_seqlens_k")
    expect_error(lambda: fa(qf[0], qf[0], qf[0], cu_seqlens_q=cu, cu_seqlens_k=cu, bias=torch.zeros(8, 8)), (),
                 ValueError, "bias")
    expect_error(lambda: fa(qf, qf, qf, seqused_k=torch.tensor([1])), (), ValueError, "seqused_k")
    # int64 offsets past int32 wrapped silently in the cast ([0, 2^32 + 3, 8] ran as [0, 3, 8])
    expect_error(lambda: fa(qf[0], qf[0], qf[0], cu_seqlens_q=torch.tensor([0, 2 ** 32 + 3, 8]),
                            cu_seqlens_k=cu.long()), (), ValueError, r"cu_seqlens_q must fit in int32")
    expect_error(lambda: fa(qf, qf, qf, seqused_k=torch.tensor([2 ** 32 + 2] * qf.shape[0])), (), ValueError,
                 r"seqused_k must fit in int32")
    dec = ops.attention_decode
    kc = torch.randn(2, 10, 2, 16)
    expect_error(dec, (qf[:, :1], kc, kc, torch.tensor([3, 11])), ValueError, "cache_seqlens")
    expect_error(dec, (qf[:, :1], kc, kc, torch.tensor([3.0, 1.0])), TypeError, "cache_seqlens")
    expect_error(lambda: dec(qf[:, :1], kc, kc, torch.tensor([3, 1]), num_splits=-1), (), ValueError, "num_splits")
    mha = MultiheadAttention(16, 2)
    x = torch.randn(5, 2, 16)
    expect_error(lambda: mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), (), ValueError,
                 "key_padding_mask")
    expect_error(lambda: mha(x, x, x, attn_mask=torch.zeros(4, 5)), (), ValueError, "attn_mask")
    expect_error(lambda: mha(x, x, x, is_causal=True), (), ValueError, "is_causal")
    expect_error(lambda: mha(torch.randn(5, 2, 8), x, x), (), ValueError, "embed_dim")


def test_empty_inputs():
    for backend in ["reference"] + CPU_BACKENDS:
        with fastnn.use_backend(backend):
            out = ops.scaled_dot_product_attention(torch.randn(2, 3, 0, 16), torch.randn(2, 3, 5, 16),
                                                   torch.randn(2, 3, 5, 8))
            assert out.shape == (2, 3, 0, 8)
            q = torch.randn(2, 4, 3, 16, requires_grad=True)
            out, lse = ops.flash_attention(q, torch.randn(2, 0, 3, 16), torch.randn(2, 0, 3, 16), return_lse=True)
            assert torch.equal(out, torch.zeros(2, 4, 3, 16)) and bool((lse == -math.inf).all())
            out.sum().backward()
            assert torch.equal(q.grad, torch.zeros_like(q))


# ---------------------------------------------------------------- tier 5: CUDA

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# bf16 for every case; fp16 and fp32 for a few (each distinct configuration is a Triton JIT compile of a
# few seconds on the device, and make gpu-check has 8 minutes)
CUDA_CASE_DTYPES = [pytest.param(n, dt, id=f"{n}-{str(dt)[6:]}") for n in list(CASES) + list(LONG_CASES)
                    for dt in CUDA_DTYPES
                    if dt == torch.bfloat16 or n in ("basic", "everything", "d128", "long", "long_causal")]


@pytest.mark.cuda
@pytest.mark.parametrize("name,dtype", CUDA_CASE_DTYPES)
def test_cuda_kernel_matches_reference(name, dtype):
    case = {**CASES, **LONG_CASES}[name]
    q, k, v, dout, bias, kw = make_inputs(case)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    kw_cuda = {n: cuda(t) for n, t in kw.items()}
    got = run_flash("triton", cuda(q), cuda(k), cuda(v), cuda(dout), cuda(bias), kw_cuda, dtype)
    qd, kd, vd = (t.to(dtype).double() for t in (q, k, v))
    want = run_flash("reference", qd, kd, vd, dout.to(dtype).double(), bias, kw, torch.float64)
    lowp = run_flash("reference", q.to(dtype), k.to(dtype), v.to(dtype), dout, bias, kw,
                     dtype if dtype != torch.float32 else torch.float32)
    for name_, g, w, lp in zip(["out", "lse", "dq", "dk", "dv", "dbias"], got, want, lowp):
        if dtype == torch.float32:  # float32 dots run as exact FMA ("ieee") in the Triton kernels
            torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name_}: {m}")
        elif name_ == "lse":  # float32 statistics of low-precision scores
            torch.testing.assert_close(g.cpu().double(), w, rtol=2e-3, atol=2e-3, msg=lambda m: f"{name_}: {m}")
        else:
            lowp_close(g.cpu(), w, lp, floor=1e-3, what=name_)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv", [1, 2, 8])
def test_cuda_decode_matches_reference(dtype, hkv):
    B, H, D, cache = 4, 8, 128, 3000
    q = torch.randn(B, 2, H, D, device="cuda", dtype=dtype)
    kc, vc = (torch.randn(B, cache, hkv, D, device="cuda", dtype=dtype) for _ in range(2))
    lens = torch.tensor([3000, 1, 0, 1777], dtype=torch.int32, device="cuda")
    out, lse = ops.attention_decode(q, kc, vc, lens, causal=True, return_lse=True)
    with fastnn.use_backend("reference"):
        want, wl = ops.attention_decode(q.double(), kc.double(), vc.double(), lens, causal=True, return_lse=True)
        lp = ops.attention_decode(q, kc, vc, lens, causal=True)
    lowp_close(out, want, lp, what="decode out")
    torch.testing.assert_close(lse.double(), wl, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
def test_cuda_sdpa_and_mha_match_torch():
    q, k, v = (torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        got = ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        lp = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        lowp_close(got, want, lp, what=f"sdpa causal={causal}")
    theirs = torch.nn.MultiheadAttention(128, 2, batch_first=True).cuda()
    ours = MultiheadAttention(128, 2, batch_first=True).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 50, 128, device="cuda")
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0],
                               rtol=2e-3, atol=2e-3)
