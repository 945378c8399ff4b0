"""Tier 3: the Triton LSTM / GRU layer (fastnn.kernels.rnn) under TRITON_INTERPRET=1 on CPU tensors, forward and
backward against fastnn.reference.rnn.rnn_layer (float64 autograd for the gradients); fp32 and fp16 only (the
interpreter mishandles bf16: tests/test_rnn_triton_cuda.py runs bf16 on the GPU). Small shapes: the interpreter
takes ~0.4 ms per program and the launchers start one grid per step."""
import math

import pytest
import torch

import fastnn
from fastnn.reference import rnn as ref

from _rnn_cases import Case, check_against_reference, check_layout, make_inputs, packed_lengths, run_launchers
from _tiers import HAS_CUDA

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastnn.kernels import rnn as kr  # noqa: E402

pytestmark = pytest.mark.skipif(HAS_CUDA or "triton" not in fastnn.usable_backends("cpu"),
                                reason="interpreter tier (CPU tensors under TRITON_INTERPRET=1)")

LENGTHS_5331 = packed_lengths([5, 3, 3, 1])          # batch_sizes (4, 3, 3, 1, 1)

CASES = {
    "lstm": Case("lstm", (3, 3, 3, 3), I=5, H=8),
    "lstm_bs5331": Case("lstm", (5, 3, 3, 1), I=5, H=8),
    "lstm_lengths5331_reverse": Case("lstm", LENGTHS_5331, I=5, H=8, reverse=True),
    "lstm_h20_nobias_reverse": Case("lstm", (5, 3, 3, 1), I=4, H=20, bias=False, reverse=True),
    "lstm_proj": Case("lstm", LENGTHS_5331, I=6, H=12, proj=7),
    "lstm_proj_reverse_nobias": Case("lstm", (5, 3, 3, 1), I=6, H=12, proj=5, bias=False, reverse=True),
    "lstm_h24_t6": Case("lstm", (2, 2, 2, 2, 2, 2), I=3, H=24),
    "gru": Case("gru", (3, 3, 3, 3), I=5, H=8),
    "gru_bs5331": Case("gru", (5, 3, 3, 1), I=5, H=10),
    "gru_lengths5331_reverse": Case("gru", LENGTHS_5331, I=5, H=8, reverse=True),
    "gru_h20_nobias_reverse": Case("gru", (5, 3, 3, 1), I=4, H=20, bias=False, reverse=True),
}
FP16_CASES = ("lstm_bs5331", "lstm_lengths5331_reverse", "lstm_proj", "gru_bs5331", "gru_lengths5331_reverse")


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
    check_against_reference(CASES[name], torch.float32)


@pytest.mark.parametrize("name", FP16_CASES)
def test_fp16_matches_reference(name):
    check_against_reference(CASES[name], torch.float16)


@pytest.mark.parametrize("name", ["lstm_proj", "gru_lengths5331_reverse"])
def test_inference_forward_equals_training_forward(name):
    """train=False gives the training forward's y, h_n, c_n bit for bit, and an empty workspace."""
    case = CASES[name]
    t = make_inputs(case)
    trained, _ = run_launchers(case, t, torch.float32, train=False)
    full, _ = run_launchers(case, t, torch.float32)
    for a, b in zip(trained[:3], full[:3]):
        assert torch.equal(a, b)
    assert all(v.numel() == 0 and v.dtype == torch.float32 for v in trained[3:])


@pytest.mark.parametrize("name", ["lstm_proj", "gru_bs5331"])
def test_backward_flags(name):
    """want_dx / want_dweights off give empty (0,) tensors and leave the other gradients unchanged."""
    case = CASES[name]
    t = make_inputs(case)
    _, full = run_launchers(case, t, torch.float32)
    _, none = run_launchers(case, t, torch.float32, want_dx=False, want_dweights=False)
    assert all(v.shape == (0,) for v in none[:6])
    for a, b in zip(full[6:], none[6:]):
        assert torch.equal(a, b)


def test_empty_batch():
    """T = 0: y (0, P), h_n = h0, c_n = c0, an empty workspace of the right width; dh0 = dh_n."""
    for case in (Case("lstm", (), H=8, proj=3), Case("gru", (), H=8)):
        B = 2
        t = make_inputs(Case(case.mode, (B,), case.I, case.H, case.proj))
        t["x"], t["dy"] = t["x"][:0], t["dy"][:0]
        fwd, bwd = run_launchers(case, t, torch.float32)
        assert fwd[0].shape == (0, case.P) and fwd[3].shape == (0, ref.gates_per_unit(case.mode) * case.H)
        assert torch.equal(fwd[1], t["h0"].float()) and torch.equal(bwd[6], t["dh_n"].float())
        if case.mode == "lstm":
            assert torch.equal(fwd[2], t["c0"].float()) and torch.equal(bwd[7], t["dc_n"].float())
        assert torch.equal(bwd[2], torch.zeros_like(bwd[2]))


def test_bad_geometry_raises():
    case = CASES["lstm"]
    t = {k: (v.float() if v is not None else None) for k, v in make_inputs(case).items()}
    args = lambda bs: ("lstm", t["x"], bs, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], None, t["h0"], t["c0"],  # noqa
                       False, True)
    with pytest.raises(ValueError, match="non-increasing"):
        kr.rnn_layer_forward(*args(torch.tensor([3, 3, 2, 4])))
    with pytest.raises(ValueError, match="sum to"):
        kr.rnn_layer_forward(*args(torch.tensor([3, 3, 3])))
    with pytest.raises(ValueError, match="int64 CPU"):
        kr.rnn_layer_forward(*args(torch.tensor([3, 3, 3, 3], dtype=torch.int32)))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kr.rnn_layer_forward("lstm", t["x"].double(), torch.tensor([3, 3, 3, 3]), *(v.double() for v in (
            t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])), None, t["h0"].double(), t["c0"].double(), False, True)


@pytest.mark.skipif(not hasattr(getattr(fastnn._backend, "_C", None), "rnn_layer_forward_cpu"),
                    reason="fastnn._C without the CPU recurrent kernels")
@pytest.mark.parametrize("name", ["lstm_proj_reverse_nobias", "gru_lengths5331_reverse"])
def test_workspace_interchangeable_with_cpp(name):
    """In fp32 the Triton forward's outputs and workspace match the C++ CPU kernel's, and each backward
    accepts the other's workspace: the two implement one contract (csrc/families/rnn.h)."""
    from fastnn._backend import _C

    case = CASES[name]
    d = {k: (v.float() if v is not None else None) for k, v in make_inputs(case).items()}
    bsz = torch.tensor(case.batch_sizes)
    fargs = (case.mode, d["x"], bsz, d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], d["w_hr"], d["h0"], d["c0"],
             case.reverse, True)
    tri, cpp = kr.rnn_layer_forward(*fargs), _C.rnn_layer_forward_cpu(*fargs)
    for i, (a, b) in enumerate(zip(tri, cpp)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward output {i}: {m}")

    def bwd(fn, fw):
        return fn(case.mode, d["dy"], d["dh_n"], d["dc_n"], d["x"], bsz, d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                  d["w_hr"], d["h0"], d["c0"], fw[0], fw[3], fw[4], fw[5], case.reverse, True, True)

    want = bwd(_C.rnn_layer_backward_cpu, cpp)
    for got in (bwd(kr.rnn_layer_backward, cpp), bwd(_C.rnn_layer_backward_cpu, tri)):
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"gradient {i}: {m}")


@triton.jit
def _act_kernel(x_ptr, t_ptr, s_ptr, n, BLOCK: tl.constexpr):
    # tanh and sigmoid of n floats, BLOCK per program
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(x_ptr + i, mask=m, other=0.0)
    tl.store(t_ptr + i, kr._tanh(v), mask=m)
    tl.store(s_ptr + i, kr._sigmoid(v), mask=m)


def test_activations_accuracy():
    """The cells' tanh and sigmoid (pure tl.* math) against float64, over the range and at the branch point
    of tanh: relative error within ~2 fp32 ulps; inf and NaN behave."""
    special = [0.7499999, 0.75, 0.7500001, -0.75, 90.0, -90.0, -200.0, math.inf, -math.inf, math.nan]
    x = torch.cat([torch.linspace(-12, 12, 40001), torch.logspace(-30, 1.3, 2001), -torch.logspace(-30, 1.3, 2001),
                   torch.tensor(special)])
    n = x.numel()
    t_out, s_out = torch.full_like(x, math.nan), torch.full_like(x, math.nan)
    block = 8192
    _act_kernel[(triton.cdiv(n, block),)](x, t_out, s_out, n, BLOCK=block)
    xd = x.double()
    for got, want, ulps in ((t_out, torch.tanh(xd), 2.0), (s_out, torch.sigmoid(xd), 2.0)):
        finite = torch.isfinite(xd)
        normal = want.abs() >= torch.finfo(torch.float32).tiny   # below, fp32 has no relative precision
        err = (got.double() - want).abs()
        rel = (err / want.abs())[finite & normal]
        assert rel.max().item() <= ulps * 2.0 ** -23, f"max relative error {rel.max().item():.3g}"
        assert (err[finite & ~normal] <= torch.finfo(torch.float32).tiny).all()
        assert torch.equal(got[~finite][:2], want[~finite][:2].float())      # +-inf
        assert torch.isnan(got[-1])
