"""Tier 5: the persistent LSTM / GRU kernels (one cooperative launch per layer and direction, W_hh in
registers; forward and the backward's recurrence) on CUDA tensors: against the float64 reference (the
forward with the Triton backward run from its workspace, and with the persistent backward), against their
CPU emulation (the same per-thread code: what differs is the device's exp / tanh and the synchronisation),
run to run, and their limits."""
import pytest
import torch

from fastnn._backend import _C

from _rnn_cases import Case, check_against_reference, make_inputs, random_packed_lengths

pytestmark = pytest.mark.cuda


_lengths = random_packed_lengths


def persistent(mode, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
    assert w_hr is None, "the persistent kernel has no projection"
    return _C.rnn_layer_forward_persistent_cuda(mode, x, bsz, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, train)


def persistent_backward(mode, dy, dh_n, dc_n, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r,
                        reverse, want_dx, want_dweights):
    from fastnn.kernels import rnn as kr

    rec = _C.rnn_layer_backward_persistent_cuda(mode, dy, dh_n, dc_n, bsz, w_hh, h0, c0, y, gates, aux, reverse)
    return kr.rnn_layer_backward_from_gates(mode, rec, x, bsz, w_ih, w_hh, b_ih, h0, y, reverse, want_dx,
                                            want_dweights)


# on the H100 (132 SMs): H 512 -> 32 weights per thread, 1024 -> 128; B 200 -> several passes per step
CASES = {
    "lstm_b64_t48_h512_packed": Case("lstm", _lengths(64, 48, 1), I=256, H=512),
    "lstm_b64_t48_h512_packed_reverse": Case("lstm", _lengths(64, 48, 2), I=256, H=512, reverse=True),
    "lstm_b64_t32_h1024": Case("lstm", (64,) * 32, I=512, H=1024),
    "lstm_b200_t16_h300_nobias": Case("lstm", _lengths(200, 16, 4), I=100, H=300, bias=False),
    "lstm_b1_t64_h1024": Case("lstm", (1,) * 64, I=128, H=1024),
    "gru_b64_t48_h384_packed": Case("gru", _lengths(64, 48, 5), I=256, H=384),
    "gru_b64_t48_h1024_packed_reverse": Case("gru", _lengths(64, 48, 6), I=256, H=1024, reverse=True),
    "gru_b1_t64_h200_nobias": Case("gru", (1,) * 64, I=50, H=200, bias=False),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _skip_unless_fits(case):
    # H = 1024 needs ~128 SMs (an H100 / H200 has 132; an A100's 108 leave 10 units a block, 171 weights a
    # thread): a smaller card runs those layers on the fallback
    if not _C.rnn_persistent_fits(case.mode, case.H, case.B, torch.cuda.current_device()):
        pytest.skip(f"H = {case.H} does not fit the persistent kernels on {_sms()} SMs")


def _inputs(case, dtype):
    t = make_inputs(case)
    d = {k: (v.to("cuda", dtype).contiguous() if v is not None else None) for k, v in t.items()}
    bsz = torch.tensor(case.batch_sizes, dtype=torch.int64)
    return (case.mode, d["x"], bsz, d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], d["h0"], d["c0"], case.reverse)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_persistent_matches_reference(name, dtype):
    """Forward, and the gradients of the Triton backward from the persistent forward's workspace, within
    DESIGN's tier-2 rule against the reference run on the GPU."""
    case = CASES[name]
    _skip_unless_fits(case)
    check_against_reference(case, dtype, device="cuda", fp32_rtol=None, lowp_floor=1e-5, forward=persistent)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_persistent_backward_matches_reference(name, dtype):
    """Forward and backward both persistent: every gradient within DESIGN's tier-2 rule."""
    case = CASES[name]
    _skip_unless_fits(case)
    check_against_reference(case, dtype, device="cuda", fp32_rtol=None, lowp_floor=1e-5, forward=persistent,
                            backward=persistent_backward)


@pytest.mark.parametrize("name", ["lstm_b64_t48_h512_packed_reverse", "gru_b64_t48_h384_packed",
                                  "lstm_b200_t16_h300_nobias"])
def test_persistent_equals_its_emulation(name):
    """The same per-thread code on the CPU with the device's multiprocessor count: equal up to the device's
    exp / tanh (a few ulps per step)."""
    case = CASES[name]
    args = _inputs(case, torch.float32)
    got = _C.rnn_layer_forward_persistent_cuda(*args, True)
    sms = _sms()
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    want = _C.rnn_layer_forward_persistent_emulated(*cpu, True, sms)
    for what, g, w in zip(("y", "h_n", "c_n", "gates", "aux", "r"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", ["lstm_b64_t48_h512_packed", "gru_b64_t48_h384_packed", "lstm_b200_t16_h300_nobias"])
def test_persistent_backward_equals_its_emulation(name):
    case = CASES[name]
    args = _inputs(case, torch.float32)
    mode, x, bsz, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse = args
    y, _, _, gates, aux, _ = _C.rnn_layer_forward_persistent_cuda(*args, True)
    t = make_inputs(case)
    dy, dh_n = t["dy"].float().cuda(), t["dh_n"].float().cuda()
    dc_n = t["dc_n"].float().cuda() if t["dc_n"] is not None else None
    bargs = (mode, dy, dh_n, dc_n, bsz, w_hh, h0, c0, y, gates, aux, reverse)
    got = _C.rnn_layer_backward_persistent_cuda(*bargs)
    sms = _sms()
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in bargs]
    want = _C.rnn_layer_backward_persistent_emulated(*cpu, sms)
    for what, g, w in zip(("dgx", "dgh", "dh0", "dc0"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_persistent_is_deterministic():
    case = CASES["gru_b64_t48_h1024_packed_reverse"]
    _skip_unless_fits(case)
    args = _inputs(case, torch.bfloat16)
    first = _C.rnn_layer_forward_persistent_cuda(*args, True)
    second = _C.rnn_layer_forward_persistent_cuda(*args, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    mode, x, bsz, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse = args
    y, _, _, gates, aux, _ = first
    dy, dh_n = torch.randn_like(y), torch.randn_like(h0)
    bargs = (mode, dy, dh_n, None, bsz, w_hh, h0, c0, y, gates, aux, reverse)
    for a, b in zip(_C.rnn_layer_backward_persistent_cuda(*bargs), _C.rnn_layer_backward_persistent_cuda(*bargs)):
        assert torch.equal(a, b)


def test_persistent_layers_match_torch_nn():
    """fastnn.nn.LSTM / GRU with the persistent kernels switched on, against torch.nn (cuDNN), fp32, forward
    and every parameter's gradient."""
    from fastnn.ops import rnn as rnn_ops
    import fastnn

    for kind in ("LSTM", "GRU"):
        torch.manual_seed(0)
        theirs = getattr(torch.nn, kind)(256, 512).cuda()
        ours = getattr(fastnn.nn, kind)(256, 512).cuda()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(40, 16, 256, device="cuda")
        before, rnn_ops.PERSISTENT = rnn_ops.PERSISTENT, True
        try:
            out, _ = ours(x)
            out.sum().backward()
        finally:
            rnn_ops.PERSISTENT = before
        tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # cuDNN in true fp32
        try:
            ref_out, _ = theirs(x)
            ref_out.sum().backward()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3, msg=lambda m: f"{kind} {name}: {m}")


def test_persistent_limits():
    dev, sms = torch.cuda.current_device(), _sms()
    for mode, H, B in (("lstm", 512, 64), ("lstm", 1024, 256), ("gru", 1024, 1), ("lstm", 2048, 1)):
        want = _C.rnn_persistent_plan(mode, H, B, sms, False)[0] and _C.rnn_persistent_plan(mode, H, B, sms, True)[0]
        assert _C.rnn_persistent_fits(mode, H, B, dev) == want
    assert not _C.rnn_persistent_fits("lstm", 2048, 1, dev)
    case = Case("lstm", (2, 2), I=8, H=2048)
    with pytest.raises(RuntimeError, match="does not fit"):
        _C.rnn_layer_forward_persistent_cuda(*_inputs(case, torch.float32), False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        args = _inputs(CASES["gru_b1_t64_h200_nobias"], torch.float32)
        _C.rnn_layer_forward_persistent_cuda(args[0], args[1].cpu(), *args[2:], False)
