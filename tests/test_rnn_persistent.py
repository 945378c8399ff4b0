"""The persistent CUDA LSTM / GRU forward and backward (csrc/cuda/rnn_persistent_*) checked on the CPU: their
plans, and their per-thread code run by the emulation (csrc/cpu/rnn_persistent_emulated.cpp) against the
float64 reference: the forward with the C++ CPU backward run from its workspace (so the saved gates and aux
are checked too), and the backward from the forward's workspace. The
multiprocessor count is a parameter here: small counts give many units per block and long weight rows per
thread (up to the 128-register maximum), large ones the H100's layout. The GPU run is
tests/test_rnn_persistent_cuda.py."""
import pytest
import torch

from fastnn._backend import _C
from fastnn.reference import rnn as ref

from _rnn_cases import Case, FWD_NAMES, check_against_reference, make_inputs, packed_lengths
from _tiers import lowp_close

needs_ext = pytest.mark.skipif(_C is None or not hasattr(_C, "rnn_persistent_plan"),
                               reason="fastnn._C without the persistent RNN")

PLAN_FIELDS = ("fits", "units", "blocks", "slices", "kpt", "pass_rows", "smem")


def plan(mode, H, B, sms, backward=False):
    return dict(zip(PLAN_FIELDS, _C.rnn_persistent_plan(mode, H, B, sms, backward)))


def emulated(sms):
    def forward(mode, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, train):
        assert w_hr is None, "the persistent kernel has no projection"
        return _C.rnn_layer_forward_persistent_emulated(mode, x, bsz, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, train,
                                                        sms)
    return forward


def emulated_backward(sms):
    """The persistent backward's recurrence (emulated), then the weight-gradient GEMMs of kernels/rnn.py."""
    from fastnn.kernels import rnn as kr

    def backward(mode, dy, dh_n, dc_n, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, gates, aux, r, reverse,
                 want_dx, want_dweights):
        assert w_hr is None
        rec = _C.rnn_layer_backward_persistent_emulated(mode, dy, dh_n, dc_n, bsz, w_hh, h0, c0, y, gates, aux,
                                                        reverse, sms)
        return kr.rnn_layer_backward_from_gates(mode, rec, x, bsz, w_ih, w_hh, b_ih, h0, y, reverse, want_dx,
                                                want_dweights)
    return backward


# (case, multiprocessors): H, B and sms chosen to reach every weights-per-thread count, several rows per
# block, several passes over the batch, packed unsorted lengths, reverse, no bias
CASES = {
    "lstm_kpt8_h24_sms132": (Case("lstm", packed_lengths([5, 2, 4]), I=7, H=24), 132),
    "lstm_kpt8_h40_sms8_reverse": (Case("lstm", packed_lengths([6, 1, 3, 6]), I=5, H=40, reverse=True), 8),
    "lstm_kpt32_h70_sms4": (Case("lstm", packed_lengths([7, 3, 6, 1, 2]), I=9, H=70), 4),
    "lstm_kpt64_h64_sms1_nobias": (Case("lstm", (2, 2, 1), I=6, H=64, bias=False), 1),
    "lstm_kpt128_h256_sms8": (Case("lstm", (3, 2), I=8, H=256), 8),
    "lstm_kpt16_b70_two_passes": (Case("lstm", (70, 70, 41), I=4, H=33), 2),
    "gru_kpt8_h24_sms132_reverse": (Case("gru", packed_lengths([4, 2, 3, 1]), I=6, H=24, reverse=True), 132),
    "gru_kpt32_h70_sms4": (Case("gru", packed_lengths([7, 3, 6, 1, 2]), I=9, H=70), 4),
    "gru_kpt128_h200_sms8_nobias": (Case("gru", (2, 2), I=5, H=200, bias=False), 8),
    "gru_kpt8_b70_two_passes_reverse": (Case("gru", (70, 66, 3), I=4, H=20, reverse=True), 4),
}


@needs_ext
def test_plan_invariants():
    """Every unit has a block and a thread row; the k-slices cover H; the shared memory stays in budget."""
    for mode, G in (("lstm", 4), ("gru", 3)):
        for H in (1, 7, 24, 33, 64, 200, 300, 512, 640, 1000, 1024, 1100, 2048):
            for B in (1, 3, 64, 65, 256):
                for sms in (1, 2, 8, 108, 132):
                    for backward in (False, True):
                        p = plan(mode, H, B, sms, backward)
                        if not p["fits"]:
                            continue
                        assert p["blocks"] <= sms and p["blocks"] * p["units"] >= H > (p["blocks"] - 1) * p["units"]
                        rows, length = (p["units"], G * H) if backward else (G * p["units"], H)
                        assert p["slices"] == 256 // rows and p["slices"] * p["kpt"] >= length
                        assert p["kpt"] in (8, 16, 32, 64, 128)
                        assert 1 <= p["pass_rows"] <= min(B, 64) and p["smem"] <= 200 * 1024
    # the H100 (132 SMs): the sizes fit, up to H = 1024 for the LSTM; larger H goes to the fallback
    assert plan("lstm", 1024, 64, 132)["kpt"] == 128
    assert plan("gru", 1024, 256, 132)["fits"]
    assert not plan("lstm", 1100, 64, 132)["fits"]
    assert not plan("gru", 2048, 1, 132)["fits"]
    assert plan("lstm", 64, 4, 1)["fits"] and not plan("lstm", 65, 4, 1)["fits"]  # rows 256 / 260 > 256 threads
    # the backward holds as many weights a block (W_hh's columns of its units): it fits where the forward does
    for mode in ("lstm", "gru"):
        for H in (256, 512, 1024, 1100):
            assert plan(mode, H, 64, 132)["fits"] == plan(mode, H, 64, 132, True)["fits"]


@needs_ext
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_forward_and_workspace_match_reference(name):
    """float32: outputs, and gradients through the C++ backward from the kernel's workspace, within 1e-5
    of the float64 reference."""
    case, sms = CASES[name]
    check_against_reference(case, torch.float32, forward=emulated(sms), backward=_C.rnn_layer_backward_cpu)


@needs_ext
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_backward_matches_reference(name):
    """float32: the persistent forward and backward together, every gradient within 1e-5 of the float64
    reference's."""
    case, sms = CASES[name]
    check_against_reference(case, torch.float32, forward=emulated(sms), backward=emulated_backward(sms))


@needs_ext
@pytest.mark.parametrize("name", ["lstm_kpt8_h40_sms8_reverse", "gru_kpt32_h70_sms4"])
def test_emulated_workspace_equals_cpu_kernel(name):
    """gates (activated) and aux (LSTM c, GRU h W_hn^T + b_hn) as the CPU kernel saves them."""
    case, sms = CASES[name]
    t = make_inputs(case)
    d = {k: (v.float() if v is not None else None) for k, v in t.items()}
    bsz = torch.tensor(case.batch_sizes)
    args = (case.mode, d["x"], bsz, d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"])
    got = _C.rnn_layer_forward_persistent_emulated(*args, d["h0"], d["c0"], case.reverse, True, sms)
    want = _C.rnn_layer_forward_cpu(*args, None, d["h0"], d["c0"], case.reverse, True)
    for what, g, w in zip(FWD_NAMES + ("gates", "aux", "r"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6, msg=lambda m: f"{what}: {m}")
    inference = _C.rnn_layer_forward_persistent_emulated(*args, d["h0"], d["c0"], case.reverse, False, sms)
    for g, w in zip(inference[:3], got[:3]):
        assert torch.equal(g, w)
    assert all(v.numel() == 0 for v in inference[3:])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["lstm_kpt32_h70_sms4", "gru_kpt8_h24_sms132_reverse", "lstm_kpt16_b70_two_passes"])
def test_emulated_half_precision_forward(name, dtype):
    """fp16 / bf16: y, h_n, c_n within DESIGN's tier-2 rule (2x the reference's own error in that dtype)."""
    case, sms = CASES[name]
    t = make_inputs(case)
    r = {k: (v.to(dtype) if v is not None else None) for k, v in t.items()}
    bsz = torch.tensor(case.batch_sizes)
    got = _C.rnn_layer_forward_persistent_emulated(case.mode, r["x"], bsz, r["w_ih"], r["w_hh"], r["b_ih"],
                                                   r["b_hh"], r["h0"], r["c0"], case.reverse, True, sms)
    assert all(v.dtype == dtype for v in got[:4] if v.numel()) and got[4].dtype == torch.float32

    def run(src, dt):
        s = {k: (v.to(dt) if v is not None else None) for k, v in src.items()}
        return ref.rnn_layer(case.mode, s["x"], list(case.batch_sizes), s["w_ih"], s["w_hh"], s["b_ih"], s["b_hh"],
                             None, s["h0"], s["c0"], reverse=case.reverse)

    want = run({k: (v.double() if v is not None else None) for k, v in r.items()}, torch.float64)
    low = run(r, dtype)
    for what, g, w, lo in zip(FWD_NAMES, got, want, low):
        if w is None:
            assert g.numel() == 0
            continue
        lowp_close(g, w, lo, floor=1e-3 * max(1.0, w.abs().max().item()), what=what)


@needs_ext
def test_emulated_rejects_bad_inputs():
    case, sms = CASES["lstm_kpt32_h70_sms4"]
    t = {k: (v.float() if v is not None else None) for k, v in make_inputs(case).items()}
    bsz = torch.tensor(case.batch_sizes)
    base = dict(mode="lstm", x=t["x"], batch_sizes=bsz, w_ih=t["w_ih"], w_hh=t["w_hh"], b_ih=t["b_ih"],
                b_hh=t["b_hh"], h0=t["h0"], c0=t["c0"], reverse=False, train=True, sms=sms)

    def call(**over):
        return _C.rnn_layer_forward_persistent_emulated(**{**base, **over})

    with pytest.raises(RuntimeError, match="mode must be"):
        call(mode="rnn")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        call(x=t["x"].double())
    with pytest.raises(RuntimeError, match="w_hh must be"):
        call(w_hh=t["w_hh"][:, :35].contiguous())  # a projected LSTM's w_hh
    with pytest.raises(RuntimeError, match="non-increasing"):
        call(batch_sizes=torch.tensor(case.batch_sizes[::-1]))
    with pytest.raises(RuntimeError, match="sum to"):
        call(batch_sizes=bsz[:-1])
    with pytest.raises(RuntimeError, match="needs c0"):
        call(c0=None)
    with pytest.raises(RuntimeError, match="both given or both absent"):
        call(b_hh=None)
    with pytest.raises(RuntimeError, match="sms must be"):
        call(sms=0)
    with pytest.raises(RuntimeError, match="does not fit"):
        call(sms=1)  # 70 units in one block: 280 rows > 256 threads


@needs_ext
def test_emulated_backward_rejects_bad_inputs():
    case, sms = CASES["gru_kpt32_h70_sms4"]
    t = {k: (v.float() if v is not None else None) for k, v in make_inputs(case).items()}
    bsz = torch.tensor(case.batch_sizes)
    y, _, _, gates, aux, _ = _C.rnn_layer_forward_persistent_emulated(
        "gru", t["x"], bsz, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["h0"], None, False, True, sms)
    base = dict(mode="gru", dy=t["dy"], dh_n=t["dh_n"], dc_n=None, batch_sizes=bsz, w_hh=t["w_hh"], h0=t["h0"],
                c0=None, y=y, gates=gates, aux=aux, reverse=False, sms=sms)

    def call(**over):
        return _C.rnn_layer_backward_persistent_emulated(**{**base, **over})

    call()
    with pytest.raises(RuntimeError, match="aux must be"):
        call(aux=aux.half())
    with pytest.raises(RuntimeError, match="gates must be"):
        call(gates=gates[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="dy must be"):
        call(dy=t["dy"][:-1].contiguous())
    with pytest.raises(RuntimeError, match="needs c0 and dc_n"):
        call(mode="lstm", w_hh=torch.randn(4 * case.H, case.H))
    with pytest.raises(RuntimeError, match="sum to"):
        call(batch_sizes=bsz[1:])
