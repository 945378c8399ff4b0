"""Causal conv1d, causal_conv1d_update and selective_state_update through every tier of DESIGN.md section 5
(C++ on the CPU, Triton under the interpreter here, Triton on CUDA in the tests marked cuda)."""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import ops
from fastnn.ops import ssm_conv as conv_ops
from fastnn.reference import ssm as ref

from _tiers import (
    HAS_CUDA,
    backends_under_test,
    check_compiles,
    device_params,
    expect_error,
    lowp_close,
    run_gradcheck,
    run_opcheck,
)

IMPLS = tuple(conv_ops._FORWARD_IMPLS)
CPU_BACKENDS = backends_under_test("cpu", IMPLS)
LOWP = (torch.float16, torch.bfloat16)


def _dtypes(backend):
    # the Triton interpreter mishandles bf16 (bf16 runs on CUDA)
    return [torch.float32, torch.float16] + ([torch.bfloat16] if backend != "triton" else [])


# ---------------------------------------------------------------- tier 1: the references

def _conv_loop(x, w, bias, seq, init, silu):
    """causal conv1d by the module docstring, one scalar at a time in float64 (independent of the
    reference's conv1d / masking formulation). Returns (out, final_states)."""
    Bsz, D, L = x.shape
    W = w.shape[1]
    out = torch.zeros(Bsz, D, L, dtype=torch.float64)
    final = torch.zeros(Bsz, D, W - 1, dtype=torch.float64)

    def xc(b, d, s):  # the extended input at step s (s < 0: initial states)
        if s >= 0:
            return float(x[b, d, s])
        return float(init[b, d, W - 1 + s]) if init is not None else 0.0

    def sid(b, s):
        return int(seq[b, max(s, 0)]) if seq is not None else 0

    for b in range(Bsz):
        for d in range(D):
            for t in range(L):
                acc = float(bias[d]) if bias is not None else 0.0
                for k in range(W):
                    s = t - (W - 1) + k
                    if sid(b, s) == sid(b, t):
                        acc += float(w[d, k]) * xc(b, d, s)
                out[b, d, t] = acc / (1 + math.exp(-acc)) if silu else acc
            for j in range(W - 1):
                s = L - (W - 1) + j
                final[b, d, j] = xc(b, d, s) if sid(b, s) == sid(b, L - 1) else 0.0
    return out, final


def _seq_idx(B, L, n_seq=3, gen=None):
    """(B, L) int32 non-decreasing sequence ids (packed sequences), different per row."""
    return torch.sort(torch.randint(0, n_seq, (B, L), generator=gen), dim=1).values.to(torch.int32)


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 9])
def test_reference_conv_matches_scalar_loop(W, L):
    x = torch.randn(2, 3, L, dtype=torch.float64)
    w, bias = torch.randn(3, W, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    init = torch.randn(2, 3, W - 1, dtype=torch.float64)
    seq = _seq_idx(2, L)
    for s, i, silu in ((None, None, False), (seq, init, True), (None, init, False), (seq, None, True)):
        out, final = ref.causal_conv1d(x, w, bias, s, i, True, "silu" if silu else None)
        want_out, want_final = _conv_loop(x, w, bias, s, i, silu)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final, want_final, rtol=0, atol=0)


def test_reference_conv_matches_torch_conv1d():
    x, w, bias = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(5)
    want = F.conv1d(x, w.unsqueeze(1), bias.double(), padding=3, groups=5)[..., :11]
    torch.testing.assert_close(ref.causal_conv1d(x, w, bias), want, rtol=1e-12, atol=1e-12)
    out, final = ref.causal_conv1d(x[..., :0], w, None, None, x[..., :3], True)  # L = 0
    assert out.shape == (2, 5, 0) and torch.equal(final, x[..., :3])


# ---------------------------------------------------------------- tiers 2-3: conv kernels vs the reference

@dataclass(frozen=True)
class ConvCase:
    B: int = 2
    D: int = 5
    L: int = 7
    W: int = 4
    bias: bool = True
    silu: bool = True
    seq: bool = False
    init: bool = False
    final: bool = False


CONV_CASES = {
    "w2_l1_states": ConvCase(W=2, L=1, init=True, final=True),
    "w3_l7_seq_states": ConvCase(W=3, L=7, seq=True, init=True, final=True),
    "w4_l7_plain": ConvCase(W=4, L=7, bias=False, silu=False),
    "w4_l2_shorter_than_halo": ConvCase(W=4, L=2, seq=True, init=True, final=True),
    "w4_l150_seq": ConvCase(B=3, D=18, W=4, L=150, seq=True, final=True),  # several channel and time blocks
}
LONG_CASE = ConvCase(B=1, D=3, W=4, L=2049, seq=True, init=True, final=True)
# under the interpreter: the long case without the W^2 pre-activation recompute of silu and seq_idx
LONG_CASE_PLAIN = ConvCase(B=1, D=3, W=4, L=2049, silu=False, init=True, final=True)


def _conv_inputs(case: ConvCase, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w = r(case.B, case.D, case.L), r(case.D, case.W) * 0.5
    bias = r(case.D) if case.bias else None
    seq = _seq_idx(case.B, case.L, 4, g) if case.seq else None
    init = r(case.B, case.D, case.W - 1) if case.init else None
    dout = r(case.B, case.D, case.L)
    dfinal = r(case.B, case.D, case.W - 1) if case.final else None
    return x, w, bias, seq, init, dout, dfinal


def _run_conv(backend, case, inputs, dtype):
    """Forward and backward through ops.causal_conv1d_fn with `backend` forced, every float input cast to
    dtype. Returns [out, final?, dx, dweight, dbias?, dinit?] (None where absent)."""
    x, w, bias, seq, init, dout, dfinal = inputs
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, bias, init)]
    with fastnn.use_backend(backend):
        res = ops.causal_conv1d_fn(leaves[0], leaves[1], leaves[2], seq_idx=seq, initial_states=leaves[3],
                                   return_final_states=case.final, activation="silu" if case.silu else None)
        out, final = res if case.final else (res, None)
        loss = (out * dout.to(dtype)).sum() + ((final * dfinal.to(dtype)).sum() if case.final else 0)
        wrt = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(loss, wrt))
    return [out, final] + [next(grads) if t is not None else None for t in leaves]


NAMES = ["out", "final", "dx", "dweight", "dbias", "dinit"]


def check_conv(backend, case, dtype, device="cpu"):
    inputs = _conv_inputs(case)
    dev = [t.to(device) if t is not None else None for t in inputs]
    got = _run_conv(backend, case, dev, dtype)
    rounded = [t.to(dtype).double() if t is not None and t.is_floating_point() else t for t in inputs]
    want = _run_conv("reference", case, rounded, torch.float64)
    lowp = _run_conv("reference", case, inputs, dtype) if dtype in LOWP else None
    for i, (name, g, w) in enumerate(zip(NAMES, got, want)):
        assert (g is None) == (w is None), name
        if g is None:
            continue
        assert g.dtype == dtype and g.shape == w.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        g = g.cpu()
        if dtype == torch.float32:
            # dweight / dbias sum B * L terms of size ~1: scale the absolute tolerance with sqrt(B * L)
            atol = 1e-5 * (math.sqrt(case.B * case.L) if name in ("dweight", "dbias") else 1.0)
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            lowp_close(g, w, lowp[i], floor=1e-3 if name.startswith("d") else 1e-4, what=name)


# the interpreter takes ~0.5 s per launch of a large case: Triton runs fp16 on the small cases only
_TRITON_FP16 = ("w3_l7_seq_states", "w4_l2_shorter_than_halo")


def _conv_params():
    return [pytest.param(b, n, dt, id=f"{b}-{n}-{str(dt)[6:]}") for b in CPU_BACKENDS for n in CONV_CASES
            for dt in _dtypes(b) if not (b == "triton" and dt != torch.float32 and n not in _TRITON_FP16)]


@pytest.mark.parametrize("backend,name,dtype", _conv_params())
def test_conv_matches_reference(backend, name, dtype):
    check_conv(backend, CONV_CASES[name], dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_long_sequence(backend):
    if backend == "triton":
        check_conv(backend, LONG_CASE_PLAIN, torch.float32)
        return
    check_conv(backend, LONG_CASE, torch.float32)
    check_conv(backend, LONG_CASE, torch.bfloat16)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpp"])
def test_conv_cpp_float64(backend):
    inputs = _conv_inputs(CONV_CASES["w3_l7_seq_states"])
    got = _run_conv(backend, CONV_CASES["w3_l7_seq_states"], inputs, torch.float64)
    want = _run_conv("reference", CONV_CASES["w3_l7_seq_states"], inputs, torch.float64)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_seq_idx_blocks_nan_and_backward_is_deterministic(backend):
    """A NaN in one sequence must not reach another (terms are dropped, not multiplied by 0); the
    backward gives bit-identical gradients run to run."""
    x, w = torch.randn(2, 4, 40), torch.randn(4, 4)
    seq = torch.zeros(2, 40, dtype=torch.int32)
    seq[:, 20:] = 1
    x[:, :, 18] = math.nan
    with fastnn.use_backend(backend):
        out = ops.causal_conv1d_fn(x, w, seq_idx=seq, activation="silu")
    # step 18 feeds outputs 18..21; 20 and 21 belong to the next sequence
    assert torch.isnan(out[:, :, 18:20]).all() and not torch.isnan(out[:, :, 20:]).any()
    assert not torch.isnan(out[:, :, :18]).any()
    x = torch.randn(2, 20, 300, requires_grad=True)
    wg = w.repeat(5, 1).requires_grad_()
    grads = []
    for _ in range(2):
        with fastnn.use_backend(backend):
            o = ops.causal_conv1d_fn(x, wg, activation="silu")
        grads.append(torch.autograd.grad(o.square().sum(), (x, wg)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_conv_unmasked_paths_equal_masked_path(width, dtype):
    """The C++ kernels have fused paths for rows without seq_idx (backward: two passes; float32 forward: one)
    beside the general (masked) path; with one sequence every mask keeps every term, so both must give the
    same bits: initial and final states, silu or not, lengths around the 16-lane blocks and shorter than the
    width."""
    torch.manual_seed(width)
    for L, silu in ((1, True), (2, False), (37, True), (64, False), (300, True)):
        x = torch.randn(2, 5, L).to(dtype)
        w, b = torch.randn(5, width).to(dtype), torch.randn(5).to(dtype)
        init = torch.randn(2, 5, width - 1).to(dtype)
        dout, dfinal = torch.randn(2, 5, L).to(dtype), torch.randn(2, 5, width - 1).to(dtype)
        one_seq = torch.zeros(2, L, dtype=torch.int32)
        with fastnn.use_backend("cpp"):
            fwd_plain = torch.ops.fastnn.causal_conv1d_forward(x, w, b, None, init, True, silu)
            fwd_masked = torch.ops.fastnn.causal_conv1d_forward(x, w, b, one_seq, init, True, silu)
            plain = torch.ops.fastnn.causal_conv1d_backward(dout, dfinal, x, w, b, None, init, silu)
            masked = torch.ops.fastnn.causal_conv1d_backward(dout, dfinal, x, w, b, one_seq, init, silu)
        for name, p, m in zip(("out", "final_states", "dx", "dweight", "dbias", "dinit"), fwd_plain + plain,
                              fwd_masked + masked):
            assert torch.equal(p, m), f"{name} differs, L={L} W={width} silu={silu} {dtype}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_api_details(backend):
    """final_states_out receives the states and is returned; "swish" is silu; channel-last and other
    strided inputs give the numbers of contiguous ones; weight / bias in another dtype than x are accepted."""
    x = torch.randn(2, 9, 6).transpose(1, 2)  # (B, D=6, L=9) with the channel dim contiguous
    w, bias = torch.randn(12, 3)[::2], torch.randn(6, dtype=torch.float64)
    fs = torch.full((2, 6, 2), 7.0)
    with fastnn.use_backend(backend):
        out, final = ops.causal_conv1d_fn(x, w, bias, return_final_states=True, final_states_out=fs,
                                          activation="swish")
        dense = ops.causal_conv1d_fn(x.contiguous(), w.contiguous(), bias.float(), activation="silu")
    assert final is fs
    torch.testing.assert_close(fs, x[:, :, -2:], rtol=0, atol=0)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), ref.causal_conv1d(x.double(), w.double(), bias, activation="silu"),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- decode: causal_conv1d_update

def _update_params():
    out = []
    for b in CPU_BACKENDS:
        for W in (2, 3, 4):
            for dt in (torch.float32, torch.float16):
                if b != "triton" or (W, dt) in ((4, torch.float32), (2, torch.float16)):  # interpreter: ~2 s each
                    out.append(pytest.param(b, W, dt, id=f"{b}-W{W}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("backend,W,dtype", _update_params())
def test_update_token_by_token_reproduces_forward(backend, W, dtype):
    """Running causal_conv1d_update over the steps reproduces causal_conv1d_fn's outputs and final state,
    for a state of exactly W - 1 steps and for a longer one (S = W + 2), one step at a time and in chunks."""
    B, D, L = 2, 20, 7
    x, w, bias = torch.randn(B, D, L).to(dtype), torch.randn(D, W), torch.randn(D)
    init = torch.randn(B, D, W - 1).to(dtype)
    with fastnn.use_backend(backend):
        out, final = ops.causal_conv1d_fn(x, w, bias, initial_states=init, return_final_states=True,
                                          activation="silu")
        state = init.clone()
        steps = torch.stack([ops.causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(L)], -1)
        older = torch.randn(B, D, 3).to(dtype)
        long_state = torch.cat([older, init], 2)  # S = W + 2: the older entries only shift out
        chunks = torch.cat([ops.causal_conv1d_update(x[:, :, t:t + 3], long_state, w, bias, "silu")
                            for t in range(0, L, 3)], -1)
    # the forward and the decode steps run the same fp32 math per output: equal up to the final rounding
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(steps, out, **tol)
    torch.testing.assert_close(chunks, out, **tol)
    torch.testing.assert_close(state, final, rtol=0, atol=0)
    torch.testing.assert_close(long_state, torch.cat([older, init, x], 2)[:, :, -(W + 2):], rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_matches_reference_with_indices(backend):
    B, D, W, S, T = 3, 70, 4, 5, 6  # 70 channels: two channel blocks and a partial one
    cache = torch.randn(6, D, S)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    x, w, bias = torch.randn(B, D, T), torch.randn(D, W), torch.randn(D)
    mine, theirs = cache.clone(), cache.clone()
    with fastnn.use_backend(backend):
        out = ops.causal_conv1d_update(x, mine, w, bias, None, conv_state_indices=idx)
    want = ref.causal_conv1d_update(x, theirs, w, bias, None, idx.long())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)  # rows 1, 3, 5 untouched, the others shifted
    # a non-contiguous state is updated in place too
    big = torch.randn(B, D, 2 * S)
    strided, expect = big[:, :, ::2], big[:, :, ::2].clone()
    with fastnn.use_backend(backend):
        out = ops.causal_conv1d_update(x[:, :, 0], strided, w, bias, "silu")
    want = ref.causal_conv1d_update(x[:, :, 0], expect, w, bias, "silu")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big[:, :, ::2], expect, rtol=0, atol=0)


def _ring_update_loop(x, state, w, bias, silu, rows, lens):
    """causal-conv1d's circular-buffer update as plain loops (float64), independent of the reference: the
    window reads the W - 1 entries before position lens[b] (mod S), then the new steps are written one by
    one at lens[b] + t (mod S), so of more than S steps the last S stay. Updates `state` in place."""
    B, D, T = x.shape
    W, S = w.shape[1], state.shape[2]
    out = torch.empty(B, D, T, dtype=torch.float64)
    for b in range(B):
        r, p = int(rows[b]), int(lens[b])
        for d in range(D):
            hist = [float(state[r, d, (p - (W - 1) + j) % S]) for j in range(W - 1)] + x[b, d].double().tolist()
            for t in range(T):
                v = float(bias[d]) + sum(float(w[d, k]) * hist[t + k] for k in range(W))
                out[b, d, t] = v / (1 + math.exp(-v)) if silu else v
            for t in range(T):
                state[r, d, (p + t) % S] = x[b, d, t]
    return out


def test_reference_ring_update_matches_loop():
    g = torch.Generator().manual_seed(3)
    B, D, W = 3, 5, 4
    for S, T in ((3, 1), (6, 2), (4, 7)):  # S = W - 1, a roomy buffer, more new steps than S
        cache = torch.randn(5, D, S, generator=g, dtype=torch.float64)
        rows, lens = torch.tensor([4, 0, 2]), torch.tensor([0, 5, 13])
        x = torch.randn(B, D, T, generator=g, dtype=torch.float64)
        w, bias = torch.randn(D, W, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
        mine, theirs = cache.clone(), cache.clone()
        out = ref.causal_conv1d_update(x, mine, w, bias, "silu", rows, lens)
        want = _ring_update_loop(x, theirs, w, bias, True, rows, lens)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)  # rows 1 and 3 untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_ring_buffer_reproduces_forward(backend):
    """With cache_seqlens the state is a circular buffer: feeding a sequence step by step (and in chunks,
    one of them longer than the buffer) with cache_seqlens = steps so far reproduces causal_conv1d_fn, and
    the buffer ends up holding the last S inputs at positions t mod S."""
    B, D, L, W, S = 2, 20, 11, 4, 5
    x, w, bias = torch.randn(B, D, L), torch.randn(D, W), torch.randn(D)
    with fastnn.use_backend(backend):
        out = ops.causal_conv1d_fn(x, w, bias, activation="silu")
        ring = torch.zeros(B, D, S)
        steps = torch.stack([ops.causal_conv1d_update(x[:, :, t], ring, w, bias, "silu",
                                                      cache_seqlens=torch.full((B,), t, dtype=torch.int32))
                             for t in range(L)], -1)
        ring2, chunks, t0 = torch.zeros(B, D, S), [], 0
        for T in (3, 7, 1):  # 7 > S: only the last S of those steps stay in the buffer
            chunks.append(ops.causal_conv1d_update(x[:, :, t0:t0 + T], ring2, w, bias, "silu",
                                                   cache_seqlens=torch.full((B,), t0, dtype=torch.int64)))
            t0 += T
    torch.testing.assert_close(steps, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(chunks, -1), out, rtol=1e-5, atol=1e-5)
    last = torch.zeros(B, D, S)
    for t in range(L - S, L):
        last[:, :, t % S] = x[:, :, t]
    torch.testing.assert_close(ring, last, rtol=0, atol=0)
    torch.testing.assert_close(ring2, last, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_ring_buffer_with_indices_matches_loop(backend):
    B, D, W, S, T = 3, 70, 3, 4, 2  # 70 channels: two channel blocks and a partial one
    cache = torch.randn(6, D, S).to(torch.float16)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    lens = torch.tensor([0, 9, 2], dtype=torch.int32)
    x, w, bias = torch.randn(B, D, T).to(torch.float16), torch.randn(D, W), torch.randn(D)
    mine, theirs = cache.clone(), cache.clone()
    with fastnn.use_backend(backend):
        out = ops.causal_conv1d_update(x, mine, w, bias, None, cache_seqlens=lens, conv_state_indices=idx)
    want = _ring_update_loop(x, theirs, w, bias, False, idx, lens)
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-3)  # fp16 output rounding (half ulp 4.9e-4)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)  # rows 1, 3, 5 untouched, the others written


# ---------------------------------------------------------------- decode: selective_state_update

def _ssu_inputs(B, Bc, H, P, N, G, xdt, sdt, three_d=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(
        state=r(Bc, H, P, N).to(sdt), x=r(B, H, P).to(xdt), dt=(r(B, H, P) * 0.5 - 1).to(xdt),
        A=-torch.rand(H, P, N, generator=g) * 2, B=r(B, G, N).to(xdt), C=r(B, G, N).to(xdt), D=r(H, P),
        z=r(B, H, P).to(xdt), dt_bias=r(H, P) * 0.3)
    if three_d:
        t = {k: (v[:, 0] if k in ("state", "x", "dt", "z", "B", "C") else v[0]) for k, v in t.items()}
    return t


SSU_CASES = {
    # name: (B, B_cache, H, P, N, G, three_d, indices)
    "mamba1": (2, 2, 1, 24, 16, 1, True, False),
    "mamba1_n12_indices": (3, 5, 1, 10, 12, 1, True, True),
    "mamba2_groups": (2, 4, 4, 6, 32, 2, False, True),
    "mamba2_n256": (1, 1, 2, 3, 256, 1, False, False),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(SSU_CASES))
@pytest.mark.parametrize("xdt,sdt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                     (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "fp16", "bf16-state32", "bf16"])
def test_ssu_matches_reference(backend, name, xdt, sdt):
    if backend == "triton" and torch.bfloat16 in (xdt, sdt):
        pytest.skip("the Triton interpreter mishandles bf16 (covered on CUDA)")
    B, Bc, H, P, N, G, three_d, indices = SSU_CASES[name]
    t = _ssu_inputs(B, Bc, H, P, N, G, xdt, sdt, three_d)
    idx = torch.randperm(Bc)[:B].to(torch.int32) if indices else None
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, state_batch_indices=idx)
    mine = t["state"].clone()
    with fastnn.use_backend(backend):
        out = ops.selective_state_update(mine, t["x"], t["dt"], t["A"], t["B"], t["C"], **kw)
    # fp64 reference on the rounded inputs, and the reference itself in the low precision
    st64 = t["state"].double()
    want = ref.selective_state_update(st64, *(t[k].double() for k in ("x", "dt", "A", "B", "C")), t["D"].double(),
                                      t["z"].double(), t["dt_bias"].double(), True, idx)
    assert out.dtype == xdt and out.shape == t["x"].shape
    if xdt == torch.float32:
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.double(), st64, rtol=1e-5, atol=1e-5)
    else:
        lp_state = t["state"].clone()
        lp = ref.selective_state_update(lp_state, t["x"], t["dt"], t["A"], t["B"], t["C"], **kw)
        lowp_close(out, want, lp, what="out")
        lowp_close(mine, st64, lp_state, what="state")
    if idx is not None:  # rows not named by the indices are untouched
        rest = torch.ones(Bc, dtype=torch.bool)
        rest[idx.long()] = False
        assert torch.equal(mine[rest], t["state"][rest])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ssu_softplus_over_its_range(backend):
    """With A = 0, a zero state and B = C = x = 1 the step returns N * softplus(dt): checks the kernels'
    softplus (vectorised log1p on the CPU, log1p without libdevice in Triton) from -30 to past the threshold."""
    dt = torch.linspace(-30, 30, 601).view(1, 601)
    N = 16
    state = torch.zeros(1, 601, N)
    with fastnn.use_backend(backend):
        out = ops.selective_state_update(state, torch.ones(1, 601), dt, torch.zeros(601, N), torch.ones(1, N),
                                         torch.ones(1, N), dt_softplus=True)
    want = F.softplus(dt.double(), threshold=20) * N
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["mamba1", "mamba2"])
def test_ssu_stepping_matches_selective_scan(backend, form):
    """Stepping selective_state_update over L steps reproduces the reference selective scan's outputs and
    last state (the scan's channel d = h * P + p, group d // (D / G))."""
    B, H, P, N, G, L = 2, (1 if form == "mamba1" else 4), (12 if form == "mamba1" else 4), 8, \
        (1 if form == "mamba1" else 2), 6
    D = H * P
    u, delta, z = torch.randn(B, D, L), torch.randn(B, D, L) * 0.5, torch.randn(B, D, L)
    A, Dskip, dbias = -torch.rand(D, N) * 2, torch.randn(D), torch.randn(D) * 0.3
    Bs, Cs = torch.randn(B, G, N, L), torch.randn(B, G, N, L)
    init = torch.randn(B, D, N)
    want, last = ref.selective_scan(u, delta, A, Bs, Cs, Dskip, z, dbias, True, init)
    if form == "mamba1":
        state = init.clone()
        args = lambda t: (u[..., t], delta[..., t], A, Bs[:, 0, :, t], Cs[:, 0, :, t], Dskip, z[..., t], dbias)  # noqa
    else:
        state = init.view(B, H, P, N).clone()
        hp = lambda v: v.reshape(B, H, P)  # noqa: E731
        args = lambda t: (hp(u[..., t]), hp(delta[..., t]), A.view(H, P, N), Bs[..., t], Cs[..., t],  # noqa
                          Dskip.view(H, P), hp(z[..., t]), dbias.view(H, P))
    outs = []
    with fastnn.use_backend(backend):
        for t in range(L):
            x, dt, A_, B_, C_, D_, z_, db_ = args(t)
            outs.append(ops.selective_state_update(state, x, dt, A_, B_, C_, D_, z_, db_, True).reshape(B, D))
    torch.testing.assert_close(torch.stack(outs, -1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.reshape(B, D, N), last, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradcheck, opcheck, torch.compile

@pytest.mark.parametrize("backend", ["reference"] + [b for b in CPU_BACKENDS if b == "cpp"])
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    init = torch.randn(2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    seq = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]], dtype=torch.int32)

    def f(x_, w_, b_, i_):
        return ops.causal_conv1d_fn(x_, w_, b_, seq_idx=seq, initial_states=i_, return_final_states=True,
                                    activation="silu")

    def f_short(x_, w_, i_):  # L < W - 1: the final states come partly from the initial states
        return ops.causal_conv1d_fn(x_[..., :2], w_, None, initial_states=i_, return_final_states=True)

    run_gradcheck(f, (x, w, b, init), [backend])
    run_gradcheck(f_short, (x, w, init), [backend])


def _opcheck_conv_args(dtype=torch.float32):
    case = ConvCase(B=2, D=5, L=9, W=3, seq=True, init=True, final=True)
    x, w, bias, seq, init, dout, dfinal = (t.to(dtype) if t is not None and t.is_floating_point() else t
                                           for t in _conv_inputs(case))
    return x, w, bias, seq, init, dout, dfinal


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_opcheck(backend):
    x, w, bias, seq, init, dout, dfinal = _opcheck_conv_args()
    leaves = [t.clone().requires_grad_() for t in (x, w, bias, init)]
    t = _ssu_inputs(2, 3, 2, 4, 16, 1, torch.float32, torch.float32)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    with fastnn.use_backend(backend):
        run_opcheck(torch.ops.fastnn.causal_conv1d_forward,
                    [(leaves[0], leaves[1], leaves[2], seq, leaves[3], True, True)]
                    + ([(leaves[0], leaves[1], None, None, None, False, False)] if backend != "triton" else []))
        if backend == "triton":  # the op registrations are backend-independent; the interpreter is slow
            return
        run_opcheck(torch.ops.fastnn.causal_conv1d_backward,
                    [(dout, dfinal, x, w, bias, seq, init, True), (dout, None, x, w, None, None, None, False)],
                    skip_autograd=True)
        run_opcheck(torch.ops.fastnn.causal_conv1d_update,
                    [(x[:, :, :2].contiguous(), torch.randn(4, 5, 3), w, bias, True, idx)], skip_autograd=True)
        run_opcheck(torch.ops.fastnn.selective_state_update,
                    [(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, idx)],
                    skip_autograd=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiles_fullgraph(backend):
    x, w, bias, seq, init, _, _ = _opcheck_conv_args()
    t = _ssu_inputs(2, 2, 2, 4, 16, 1, torch.float32, torch.float32)

    def decode(x_, st, sst):  # clones first: the eager and compiled calls must see the same states
        st, sst = st.clone(), sst.clone()
        o1 = ops.causal_conv1d_update(x_[:, :, 0], st, w, bias, "silu")
        o2 = ops.selective_state_update(sst, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                                        True)
        return o1, st, o2, sst

    with fastnn.use_backend(backend):
        check_compiles(lambda a, i: ops.causal_conv1d_fn(a, w, bias, seq_idx=seq, initial_states=i,
                                                         return_final_states=True, activation="silu"), (x, init))
        check_compiles(decode, (x, init, t["state"]))
        # the backward through a fullgraph-compiled forward (AOTAutograd traces the registered autograd)
        torch._dynamo.reset()
        f = torch.compile(lambda a: ops.causal_conv1d_fn(a, w, bias, activation="silu"), fullgraph=True)
        a1, a2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        f(a1).square().sum().backward()
        ops.causal_conv1d_fn(a2, w, bias, activation="silu").square().sum().backward()
        torch.testing.assert_close(a1.grad, a2.grad)


def test_decode_steps_with_indices_compile_and_carry_no_gradient():
    """Decode steps with continuous-batching indices compile whole (the indices checked inside the graph; a
    repeated row raises when the graph runs), and their outputs carry no gradient history, as mamba's and
    causal-conv1d's steps (they have no backward)."""
    t = _ssu_inputs(2, 2, 2, 4, 16, 1, torch.float32, torch.float32)
    w = torch.randn(t["x"].shape[1] * t["x"].shape[2], 4)
    cache = torch.randn(3, *t["state"].shape[1:])
    conv_cache = torch.randn(3, w.shape[0], 3)
    x_conv = torch.randn(2, w.shape[0], requires_grad=True)

    def decode(idx, st, cst):
        st, cst = st.clone(), cst.clone()
        o1 = ops.causal_conv1d_update(x_conv, cst, w, None, "silu", conv_state_indices=idx)
        o2 = ops.selective_state_update(st, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                                        True, state_batch_indices=idx)
        return o1, cst, o2, st

    idx = torch.tensor([2, 0], dtype=torch.int32)
    check_compiles(decode, (idx, cache, conv_cache))
    assert not decode(idx, cache, conv_cache)[0].requires_grad
    torch._dynamo.reset()
    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="conv_state_indices must be distinct"):
        compiled(torch.tensor([1, 1], dtype=torch.int32), cache, conv_cache)


def _decode_step_calls(t, w, bias, idx):
    """One causal_conv1d_update and one selective_state_update on clones of the states: (outputs, states)."""
    st, cst = t["state"].clone(), t["conv_state"].clone()
    o1 = ops.causal_conv1d_update(t["x_conv"], cst, w, bias, "silu", conv_state_indices=idx)
    o2 = ops.selective_state_update(st, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
                                    state_batch_indices=idx)
    return (o1, o2), (cst, st)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("three_d", [False, True], ids=["heads", "mamba1"])
def test_decode_steps_direct_call_equals_the_op(backend, three_d, monkeypatch):
    """In plain eager mode the public decode functions run the ops' bodies without torch.library's dispatch
    (fastnn/ops/_direct.py): outputs and updated states must be bitwise those of the custom ops, in both of
    selective_state_update's forms, with indices; the state's version counter moves as the op's does."""
    t = _ssu_inputs(2, 3, 1 if three_d else 2, 8, 16, 1, torch.float32, torch.float32, three_d, seed=3)
    D = t["x"].shape[1] * (1 if three_d else t["x"].shape[2])
    t["x_conv"], t["conv_state"] = torch.randn(2, D), torch.randn(3, D, 3)
    w, bias = torch.randn(D, 4), torch.randn(D)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    with fastnn.use_backend(backend):
        direct = _decode_step_calls(t, w, bias, idx)
        monkeypatch.setattr(conv_ops._direct, "plain_eager", lambda *a: False)
        via_op = _decode_step_calls(t, w, bias, idx)
    for a, b in zip(direct[0] + direct[1], via_op[0] + via_op[1]):
        assert a.shape == b.shape and torch.equal(a, b)
    assert not torch.equal(direct[1][1], t["state"]) and not torch.equal(direct[1][0], t["conv_state"])
    monkeypatch.undo()
    st = t["state"][:2].clone()
    version = st._version
    ops.selective_state_update(st, t["x"], t["dt"], t["A"], t["B"], t["C"])
    assert st._version > version
    # a tensor saved for a backward and then updated by a step: autograd notices, as after any in-place op
    leaf = torch.randn(st.shape, requires_grad=True)
    prod = leaf * st
    ops.selective_state_update(st, t["x"], t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        prod.sum().backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_decode_steps_traced_and_transformed_go_through_the_op():
    """Tracing (make_fx, torch.jit.trace), Python dispatch modes and vmap must see the custom op, not its body:
    the direct call is for plain eager mode only."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    t = _ssu_inputs(2, 2, 1, 8, 16, 1, torch.float32, torch.float32, True, seed=4)
    w = torch.randn(8, 4)

    def step(state, conv_state, x, w, dt, A, B, C):
        o1 = ops.causal_conv1d_update(x, conv_state, w, None, "silu")
        return o1, ops.selective_state_update(state, o1, dt, A, B, C, dt_softplus=True)

    args = (t["state"].clone(), torch.randn(2, 8, 3), t["x"], w, t["dt"], t["A"], t["B"], t["C"])
    for mode in ("real", "fake"):
        graph = str(make_fx(step, tracing_mode=mode)(*(a.clone() for a in args)).code)
        assert "fastnn.causal_conv1d_update" in graph and "fastnn.selective_state_update" in graph, graph
    assert conv_ops._direct.plain_eager(t["x"])
    with FlopCounterMode(display=False):
        assert not conv_ops._direct.plain_eager(t["x"])
    seen = []
    torch.vmap(lambda x: seen.append(conv_ops._direct.plain_eager(x)) or x)(t["x"])
    torch.jit.trace(lambda x: seen.append(conv_ops._direct.plain_eager(x)) or x * 2, (t["x"],), check_trace=False)
    assert seen == [False, False]
    assert conv_ops._direct.plain_eager(t["x"], None, torch.nn.Parameter(t["A"]))


# ---------------------------------------------------------------- bad and empty inputs

def test_bad_inputs_name_the_argument():
    x, w = torch.randn(2, 4, 8), torch.randn(4, 3)
    fn = ops.causal_conv1d_fn
    expect_error(fn, ([1.0], w), TypeError, "x must be a torch.Tensor")
    expect_error(fn, (x.int(), w), TypeError, "x must have dtype")
    expect_error(fn, (x[0], w), ValueError, "x must have shape")
    expect_error(fn, (x, torch.randn(4, 5)), ValueError, "width W in 2..4")
    expect_error(fn, (x, torch.randn(4, 1)), ValueError, "width W in 2..4")
    expect_error(fn, (x, torch.randn(3, 3)), ValueError, "weight must have shape")
    expect_error(fn, (x, w, torch.randn(5)), ValueError, "bias must have shape")
    expect_error(lambda: fn(x, w, activation="relu"), (), ValueError, "activation")
    expect_error(lambda: fn(x, w, seq_idx=torch.zeros(2, 8, dtype=torch.int64)), (), TypeError, "seq_idx must have dtype int32")
    expect_error(lambda: fn(x, w, seq_idx=torch.zeros(2, 7, dtype=torch.int32)), (), ValueError, "seq_idx must have shape")
    expect_error(lambda: fn(x, w, initial_states=torch.randn(2, 4, 3)), (), ValueError, "initial_states must have shape")
    expect_error(lambda: fn(x, w, initial_states=torch.randn(2, 4, 2).double()), (), TypeError, "initial_states must have")
    expect_error(lambda: fn(x, w, final_states_out=torch.randn(2, 4, 2)), (), ValueError, "return_final_states")
    expect_error(lambda: fn(x, w, return_final_states=True, final_states_out=torch.randn(2, 4, 3)), (), ValueError,
                 "final_states_out must have shape")
    if HAS_CUDA:
        expect_error(fn, (x, w.cuda()), ValueError, "weight is on")
    upd = ops.causal_conv1d_update
    st = torch.randn(2, 4, 2)
    expect_error(lambda: upd(x[:, :, 0], st, w, cache_seqlens=torch.tensor([0, -1], dtype=torch.int32)), (),
                 ValueError, r"cache_seqlens must be in \[0")
    expect_error(lambda: upd(x[:, :, 0], st, w, cache_seqlens=torch.zeros(3, dtype=torch.int32)), (),
                 ValueError, "cache_seqlens must have shape")
    expect_error(lambda: upd(x[:, :, 0], st, w, cache_seqlens=torch.zeros(2)), (), TypeError, "cache_seqlens")
    expect_error(upd, (x[:, :, 0], torch.randn(2, 4, 1), w), ValueError, "at least W - 1")
    expect_error(upd, (x[:, :, 0], st.double(), w), TypeError, "conv_state must have")
    expect_error(upd, (x[:, :, 0], torch.randn(3, 4, 2), w), ValueError, "batch size")
    expect_error(lambda: upd(x[:, :, 0], st, w, conv_state_indices=torch.tensor([0, 2])), (), ValueError,
                 r"conv_state_indices must be in \[0, 2\)")
    expect_error(lambda: upd(x[:, :, 0], st, w, conv_state_indices=torch.tensor([1, 1])), (), ValueError,
                 r"conv_state_indices must be distinct")
    expect_error(upd, (x[0, 0], st, w), ValueError, "x must have shape")
    ssu = ops.selective_state_update
    t = _ssu_inputs(2, 2, 4, 3, 8, 2, torch.float32, torch.float32)
    args = [t[k] for k in ("state", "x", "dt", "A", "B", "C")]

    def bad(i, v, exc, match):
        a = list(args)
        a[i] = v
        expect_error(ssu, tuple(a), exc, match)

    bad(0, torch.randn(2, 4, 3, 300), ValueError, "N must be <= 256")
    bad(0, torch.randn(2, 3, 8), ValueError, "x must have shape")
    bad(0, t["state"].half(), TypeError, "state must have x's dtype")
    bad(2, t["dt"].half(), TypeError, "dt must have x's dtype")
    bad(3, torch.randn(4, 3, 9), ValueError, "A must have shape")
    bad(4, torch.randn(2, 3, 8), ValueError, "groups G dividing")
    bad(5, t["C"].double(), TypeError, "C must have x's dtype")
    expect_error(lambda: ssu(*args, D=torch.randn(4)), (), ValueError, "D must have shape")
    expect_error(lambda: ssu(*args, state_batch_indices=torch.tensor([0, 5])), (), ValueError, "state_batch_indices")
    expect_error(lambda: ssu(*args, state_batch_indices=torch.tensor([0, 0])), (), ValueError,
                 "state_batch_indices must be distinct")
    expect_error(lambda: ssu(*args, state_batch_indices=torch.tensor([0.0, 1.0])), (), TypeError,
                 "state_batch_indices must have an integer dtype")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_empty_inputs(backend):
    w = torch.randn(4, 4)
    init = torch.randn(2, 4, 3, requires_grad=True)
    with fastnn.use_backend(backend):
        x = torch.randn(2, 4, 0, requires_grad=True)
        out, final = ops.causal_conv1d_fn(x, w, initial_states=init, return_final_states=True, activation="silu")
        assert out.shape == (2, 4, 0) and torch.equal(final, init.detach())
        (final * 3).sum().backward()
        assert torch.equal(init.grad, torch.full_like(init, 3.0)) and x.grad.shape == (2, 4, 0)
        assert ops.causal_conv1d_fn(torch.randn(0, 4, 5), w).shape == (0, 4, 5)
        st = torch.randn(3, 4, 3)
        assert ops.causal_conv1d_update(torch.randn(0, 4), st, w, conv_state_indices=torch.zeros(0, dtype=torch.int32)).shape == (0, 4)
        t = _ssu_inputs(0, 1, 2, 3, 8, 1, torch.float32, torch.float32)
        out = ops.selective_state_update(*(t[k] for k in ("state", "x", "dt", "A", "B", "C")),
                                         state_batch_indices=torch.zeros(0, dtype=torch.int32))
        assert out.shape == (0, 2, 3)


# ---------------------------------------------------------------- tier 5: CUDA

CUDA_CONV = {"w4_l4096_states": ConvCase(B=2, D=200, W=4, L=4096, seq=False, init=True, final=True),
             "w3_l1000_seq": ConvCase(B=2, D=64, W=3, L=1000, seq=True, init=True, final=True),
             "w2_l1": ConvCase(B=3, D=40, W=2, L=1, init=True, final=True)}


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CUDA_CONV))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_conv_matches_reference(name, dtype):
    check_conv("triton", CUDA_CONV[name], dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_decode_matches_reference(dtype):
    B, D, W, L = 4, 300, 4, 5
    x, w, bias = torch.randn(B, D, L, device="cuda").to(dtype), torch.randn(D, W, device="cuda"), \
        torch.randn(D, device="cuda")
    init = torch.randn(B, D, W - 1, device="cuda").to(dtype)
    out, final = ops.causal_conv1d_fn(x, w, bias, initial_states=init, return_final_states=True, activation="silu")
    state = init.clone()
    steps = torch.stack([ops.causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(L)], -1)
    torch.testing.assert_close(steps, out, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if dtype !=
                               torch.float32 else 1e-5)
    torch.testing.assert_close(state, final, rtol=0, atol=0)
    for name in SSU_CASES:
        Bq, Bc, H, P, N, G, three_d, indices = SSU_CASES[name]
        t = {k: v.cuda() for k, v in _ssu_inputs(Bq, Bc, H, P, N, G, dtype, torch.float32, three_d).items()}
        idx = torch.randperm(Bc)[:Bq].to(torch.int32).cuda() if indices else None
        kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, state_batch_indices=idx)
        mine = t["state"].clone()
        out = ops.selective_state_update(mine, t["x"], t["dt"], t["A"], t["B"], t["C"], **kw)
        st = t["state"].cpu().double()
        want = ref.selective_state_update(st, *(t[k].cpu().double() for k in ("x", "dt", "A", "B", "C")),
                                          t["D"].cpu().double(), t["z"].cpu().double(), t["dt_bias"].cpu().double(),
                                          True, None if idx is None else idx.cpu())
        lp_state = t["state"].clone()
        lp = ref.selective_state_update(lp_state, t["x"], t["dt"], t["A"], t["B"], t["C"], **kw)
        if dtype == torch.float32:
            torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-4)
        else:
            lowp_close(out.cpu(), want, lp.cpu(), what=f"{name} out")
        torch.testing.assert_close(mine.cpu().double(), st, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", device_params())
def test_devices_agree_with_reference_small(device):
    """The default backend of each device (cpp on CPU, Triton on CUDA) on one small case with every feature."""
    check_conv(None, CONV_CASES["w3_l7_seq_states"], torch.float32, device=device)


# ---------------------------------------------------------------- raw ops: indices and sizes the kernels trust

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_raw_decode_ops_refuse_or_mask_out_of_range_indices(backend):
    """torch.ops.fastnn.* skip the public functions' checks. The C++ kernels refuse an index that names no
    cache row; the Triton kernels (whose CUDA callers are not checked on the host) touch no state for it and
    return NaN. Either way no foreign memory is read or written."""
    g = torch.Generator().manual_seed(11)
    state = torch.randn(2, 3, 4, 5, generator=g)
    x, dt = torch.randn(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g)
    A, Bm = -torch.rand(3, 4, 5, generator=g), torch.randn(2, 1, 5, generator=g)
    conv_state, cx, w = torch.randn(2, 3, 3, generator=g), torch.randn(2, 3, 1, generator=g), torch.randn(3, 4, generator=g)
    for bad in (2, -1, 100000):
        idx = torch.tensor([1, bad], dtype=torch.int32)
        mine, conv_mine = state.clone(), conv_state.clone()
        with fastnn.use_backend(backend):
            if backend == "cpp":
                with pytest.raises(RuntimeError, match=r"state_batch_indices must be in \[0, 2\)"):
                    torch.ops.fastnn.selective_state_update(mine, x, dt, A, Bm, Bm, None, None, None, False, idx)
                with pytest.raises(RuntimeError, match=r"conv_state_indices must be in \[0, 2\)"):
                    torch.ops.fastnn.causal_conv1d_update(cx, conv_mine, w, None, False, idx)
                torch.testing.assert_close(mine, state, rtol=0, atol=0)
                torch.testing.assert_close(conv_mine, conv_state, rtol=0, atol=0)
                continue
            out = torch.ops.fastnn.selective_state_update(mine, x, dt, A, Bm, Bm, None, None, None, False, idx)
            conv_out = torch.ops.fastnn.causal_conv1d_update(cx, conv_mine, w, None, False, idx)
        # row 0 updates cache row 1 as the reference does; row 1 touches nothing and returns NaN
        want_state, want_conv = state.clone(), conv_state.clone()
        want = ref.selective_state_update(want_state[1:], x[:1], dt[:1], A, Bm[:1], Bm[:1])
        want_c = ref.causal_conv1d_update(cx[:1], want_conv[1:], w, None, None)
        torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv_out[0], want_c[0], rtol=1e-5, atol=1e-5)
        assert out[1].isnan().all() and conv_out[1].isnan().all()
        torch.testing.assert_close(mine, want_state, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(conv_mine, want_conv, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_raw_ops_refuse_sizes_the_kernels_would_overrun(backend):
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(2, 3, 6, generator=g), torch.randn(3, 4, generator=g)
    state, xs = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, generator=g)
    A, Bm = -torch.rand(3, 4, 5, generator=g), torch.randn(2, 1, 5, generator=g)
    with fastnn.use_backend(backend):
        with pytest.raises(RuntimeError, match="initial_states must be"):
            torch.ops.fastnn.causal_conv1d_forward(x, w, None, None, torch.randn(1, 3, 1), True, False)
        with pytest.raises(RuntimeError, match="seq_idx must be"):
            torch.ops.fastnn.causal_conv1d_forward(x, w, None, torch.zeros(2, 3, dtype=torch.int32), None, True, False)
        with pytest.raises(RuntimeError, match="bias must be"):
            torch.ops.fastnn.causal_conv1d_update(x[:, :, :1], torch.randn(2, 3, 3), w, torch.randn(1), False, None)
        with pytest.raises(RuntimeError, match="the cache must have 2 rows"):
            torch.ops.fastnn.causal_conv1d_update(x[:, :, :1], torch.randn(1, 3, 3), w, None, False, None)
        with pytest.raises(RuntimeError, match="D must be"):
            torch.ops.fastnn.selective_state_update(state, xs, xs, A, Bm, Bm, torch.randn(1), None, None, False, None)
        with pytest.raises(RuntimeError, match="A must be"):
            torch.ops.fastnn.selective_state_update(state, xs, xs, A[:, :, :2], Bm, Bm, None, None, None, False, None)


def test_decode_steps_refuse_an_expanded_state():
    state = torch.zeros(1, 4, 3).expand(2, 4, 3)  # both batch rows one memory location
    x, A, B = torch.randn(2, 4), -torch.rand(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"state is updated in place, so it must not be an expanded"):
        ops.selective_state_update(state, x, x, A, B, B)
    conv_state = torch.zeros(1, 4, 3).expand(2, 4, 3)
    with pytest.raises(ValueError, match=r"conv_state is updated in place"):
        ops.causal_conv1d_update(x, conv_state, torch.randn(4, 3))
