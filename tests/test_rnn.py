"""Recurrent layers: fastnn.nn.LSTM / GRU / LSTMCell / GRUCell against torch.nn on the same parameters and
inputs, the layer kernels against fastnn.reference.rnn, packed sequences, low precision, autocast, opcheck,
gradcheck, torch.compile and bad inputs."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastnn
from fastnn.ops import rnn as rnn_ops
from fastnn.reference import rnn as ref

from _tiers import (backends_under_test, check_compiles, check_fake_layout, expect_error, lowp_close, run_gradcheck,
                    run_opcheck)

CPU_BACKENDS = backends_under_test("cpu", ["reference", "cpp"])
TRITON = backends_under_test("cpu", ["triton"])  # the interpreter (fp16 / fp32; kernel tests: test_rnn_triton.py)
TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "lstm_cell": torch.nn.LSTMCell, "gru_cell": torch.nn.GRUCell}
OURS = {"lstm": fastnn.nn.LSTM, "gru": fastnn.nn.GRU, "lstm_cell": fastnn.nn.LSTMCell, "gru_cell": fastnn.nn.GRUCell}
# fp64: rounding only; fp32: the 1e-5 relative (to the largest magnitude of the compared tensor)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_rel_close(got, want, dtype, what):
    scale = max(want.abs().max().item(), 1e-3)
    err = (got.double() - want.double()).abs().max().item() / scale if want.numel() else 0.0
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def pair(mode, dtype, **kw):
    """(torch module, our module) with the same parameters."""
    theirs = TORCH[mode](**kw).to(dtype)
    ours = OURS[mode](**kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def hidden_states(mode, out):
    """The (h_n, c_n) / h_n part of an RNN's result as a list."""
    return list(out) if mode == "lstm" else [out]


def compare_modules(mode, theirs, ours, x, hx, dtype):
    """Forward outputs and every gradient (parameters, input, initial states) equal torch's."""
    def run(m):
        xi = x.detach().clone().requires_grad_()
        h = None if hx is None else [t.detach().clone().requires_grad_() for t in hidden_states(mode, hx)]
        out, hn = m(xi, None if h is None else (tuple(h) if mode == "lstm" else h[0]))
        outs = [out] + hidden_states(mode, hn)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
        loss.backward()
        grads = [xi.grad] + ([] if h is None else [t.grad for t in h]) + [p.grad for p in m.parameters()]
        for p in m.parameters():
            p.grad = None
        return outs, grads

    (want_outs, want_grads), (got_outs, got_grads) = run(theirs), run(ours)
    for i, (g, w) in enumerate(zip(got_outs, want_outs)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        assert_rel_close(g, w, dtype, f"output {i}")
    names = ["input"] + ([] if hx is None else ["h0", "c0"][:len(hidden_states(mode, hx))]) + \
        [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, got_grads, want_grads):
        assert_rel_close(g, w, dtype, f"grad of {name}")


# ---------------------------------------------------------------- tier 1: the reference against torch.nn

@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_reference_matches_torch_packed(mode, bidirectional):
    kw = dict(input_size=5, hidden_size=6, num_layers=2, bidirectional=bidirectional)
    if mode == "lstm":
        kw["proj_size"] = 4
    m = TORCH[mode](**kw).double()
    x = torch.randn(7, 4, 5, dtype=torch.float64)
    packed = pack_padded_sequence(x, [7, 5, 5, 2])
    D = 2 if bidirectional else 1
    P = kw.get("proj_size", 6)
    h0 = torch.randn(2 * D, 4, P, dtype=torch.float64)
    c0 = torch.randn(2 * D, 4, 6, dtype=torch.float64)
    y, hn = m(packed, (h0, c0) if mode == "lstm" else h0)
    weights = [(getattr(m, f"weight_ih{s}"), getattr(m, f"weight_hh{s}"), getattr(m, f"bias_ih{s}"),
                getattr(m, f"bias_hh{s}"), getattr(m, f"weight_hr{s}", None))
               for s in (f"_l{layer}{r}" for layer in range(2) for r in (["", "_reverse"] if bidirectional else [""]))]
    yr, hr, cr = ref.rnn(mode, packed.data, packed.batch_sizes.tolist(), weights, h0,
                         c0 if mode == "lstm" else None, 2, bidirectional)
    torch.testing.assert_close(yr, y.data, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hr, hn[0] if mode == "lstm" else hn, rtol=1e-12, atol=1e-12)
    if mode == "lstm":
        torch.testing.assert_close(cr, hn[1], rtol=1e-12, atol=1e-12)


def test_reference_cells_match_torch():
    x, h, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    lc = torch.nn.LSTMCell(5, 6).double()
    torch.testing.assert_close(ref.lstm_cell(x, h, c, lc.weight_ih, lc.weight_hh, lc.bias_ih, lc.bias_hh), lc(x, (h, c)))
    gc = torch.nn.GRUCell(5, 6).double()
    torch.testing.assert_close(ref.gru_cell(x, h, gc.weight_ih, gc.weight_hh, gc.bias_ih, gc.bias_hh), gc(x, h))


# ---------------------------------------------------------------- tier 2: the layer kernels against the reference

def _layer_args(mode, dtype, proj, lengths, bias=True, I=5, H=20, B=4, requires_grad=False):
    G = ref.gates_per_unit(mode)
    P = proj or H
    bs = [sum(1 for v in lengths if v > t) for t in range(max(lengths))]
    t = lambda *s, scale=1.0: (torch.randn(*s, dtype=dtype) * scale).requires_grad_(requires_grad)  # noqa: E731
    return dict(x=t(sum(bs), I), batch_sizes=torch.tensor(bs), w_ih=t(G * H, I, scale=0.3), w_hh=t(G * H, P, scale=0.3),
                b_ih=t(G * H) if bias else None, b_hh=t(G * H) if bias else None,
                w_hr=t(P, H, scale=0.3) if proj else None, h0=t(B, P), c0=t(B, H) if mode == "lstm" else None)


LAYER_CASES = [(mode, proj, rev, lengths, bias)
               for mode, proj in (("lstm", 0), ("lstm", 7), ("gru", 0))
               for rev in (False, True)
               for lengths in ([6, 6, 6, 6], [6, 4, 4, 1])
               for bias in (True, False)]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,proj,reverse,lengths,bias", LAYER_CASES)
def test_layer_kernel_matches_reference(backend, dtype, mode, proj, reverse, lengths, bias):
    """One layer and direction (H = 20: vector lanes and a scalar tail) forward and backward vs the float64
    reference under autograd, packed lengths included."""
    a = _layer_args(mode, dtype, proj, lengths, bias)
    leaves = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
              for k, v in a.items()}
    want = ref.rnn_layer(mode, leaves["x"], a["batch_sizes"].tolist(), leaves["w_ih"], leaves["w_hh"], leaves["b_ih"],
                         leaves["b_hh"], leaves["w_hr"], leaves["h0"], leaves["c0"], reverse)
    mine = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
            for k, v in a.items()}
    with fastnn.use_backend(backend):
        got = rnn_ops._layer(mode, mine["x"], mine["batch_sizes"], mine["w_ih"], mine["w_hh"], mine["b_ih"],
                             mine["b_hh"], mine["w_hr"], mine["h0"], mine["c0"], reverse)
        outs_got = [t for t in got if t is not None]
        outs_want = [t for t in want if t is not None]
        cotangents = [torch.randn_like(t) for t in outs_got]
        torch.autograd.backward(outs_got, cotangents)
    torch.autograd.backward(outs_want, [c.double() for c in cotangents])
    for i, (g, w) in enumerate(zip(outs_got, outs_want)):
        assert_rel_close(g, w, dtype, f"output {i}")
    for k in a:
        if k != "batch_sizes" and a[k] is not None:
            assert_rel_close(mine[k].grad, leaves[k].grad, dtype, f"grad of {k}")


# The float32 fused recurrence (csrc/cpu/rnn_recurrence_cpu.cpp): units in blocks of 16 (H a multiple of 16
# and not), microkernel row blocks of up to 6 / 8 rows (B = 1, 5, 32), packed steps, and inference's input
# projection and the backward's gate gradients in chunks of ~1024 rows (the long cases run several chunks);
# the backward's groups of 4 / 2 / 1 blocks, partial ones included (H = 100: 4 + 3 blocks on 2 threads).
# The forward walks K = H whole up to 1024 (LSTM) / 1365 (GRU) units and in chunks of 512 beyond (H = 1400:
# 512 + 512 + 376, partial sums between them); the backward always in chunks of 128. From 12 rows a thread
# (B >= 24 on 2 threads) the backward splits the rows between the threads: equal (B = 32) and, for a packed
# batch, balanced by row-steps (the 28 lengths below split at row 6: 204 and 218 of 422 row-steps).
PACKED_28 = [40, 38, 35, 33, 30, 28, 25, 22, 20, 18, 16, 15, 14, 12, 11, 10, 9, 8, 7, 6, 5, 5, 4, 3, 3, 2, 2, 1]
FUSED_SHAPES = [(7, 20, [5]), (9, 48, [7, 7, 5, 3, 3]), (16, 48, [6] * 32), (12, 33, [4] * 5), (64, 512, [5] * 32),
                (32, 512, [9, 8, 8, 6, 5, 5, 3, 2, 1, 1]), (8, 16, [3, 2, 2, 1]), (16, 48, [40] * 32),
                (12, 20, [700, 600, 410]), (12, 100, [5, 4, 2]), (6, 1400, [3, 3, 2]), (10, 48, PACKED_28)]
# From 2048 rows (I <= 1024) the input projection runs as brgemm tiles (rnn_cpu.cpp's gemm_rows): packed,
# with and without biases; 2360 rows, so inference's 1024-row chunks start off the 64-row tile grid.
LONG_PACKED = [300, 280, 270, 250, 240, 230, 220, 210, 200, 160]
FUSED_CASES = [(I, H, lengths, True) for I, H, lengths in FUSED_SHAPES] + [(24, 20, LONG_PACKED, True),
                                                                          (24, 20, LONG_PACKED, False)]


def _blas_projection_reproducible(a, threads):
    """Whether torch.addmm gives the layer's input projection the same bits on one thread as on `threads`."""
    bias = a["b_ih"] if a["b_ih"] is not None else torch.zeros(a["w_ih"].shape[0])
    many = torch.addmm(bias, a["x"], a["w_ih"].t())
    torch.set_num_threads(1)
    try:
        one = torch.addmm(bias, a["x"], a["w_ih"].t())
    finally:
        torch.set_num_threads(threads)
    return torch.equal(one, many)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ backend is not under test")
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("I,H,lengths,bias", FUSED_CASES)
def test_fused_recurrence_float32(mode, reverse, I, H, lengths, bias):
    """Inference and training forward vs the float64 reference, the gradients of training, and the same
    bits on one thread as on all (each unit's sums are one thread's, in a fixed order)."""
    torch.manual_seed(0)
    a = _layer_args(mode, torch.float32, 0, lengths, bias=bias, I=I, H=H, B=len(lengths))
    for k in ("w_ih", "w_hh"):  # torch.nn's scale: at H = 512 the tests' 0.3 saturates every gate
        a[k] = a[k] / 0.3 * min(0.3, H ** -0.5)
    names = ("x", "batch_sizes", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0")
    leaves = {k: (a[k].double().requires_grad_() if isinstance(a[k], torch.Tensor) and k != "batch_sizes" else a[k])
              for k in names}
    want = [t for t in ref.rnn_layer(mode, leaves["x"], a["batch_sizes"].tolist(), *(leaves[k] for k in names[2:7]),
                                     leaves["h0"], leaves["c0"], reverse) if t is not None]
    with fastnn.use_backend("cpp"):
        with torch.no_grad():
            infer = [t for t in rnn_ops._layer(mode, *(a[k] for k in names), reverse) if t is not None]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                one = [t for t in rnn_ops._layer(mode, *(a[k] for k in names), reverse) if t is not None]
            finally:
                torch.set_num_threads(threads)
        mine = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
                for k, v in a.items()}
        train = [t for t in rnn_ops._layer(mode, *(mine[k] for k in names), reverse) if t is not None]
        cotangents = [torch.randn_like(t) for t in train]
        torch.autograd.backward(train, cotangents)
        # the backward's recurrence on one thread, from the same forward: dh0 / dc0 come from it alone (dx
        # and the weight gradients also go through BLAS), so they must be the same bits
        initial = [a[k].clone().requires_grad_() for k in ("h0", "c0") if a[k] is not None]
        outs = [t for t in rnn_ops._layer(mode, *(a[k] for k in names[:7]), *initial, *([None] * (2 - len(initial))),
                                          reverse) if t is not None]
        torch.set_num_threads(1)
        try:
            grads_one = torch.autograd.grad(outs, initial, cotangents)
        finally:
            torch.set_num_threads(threads)
    for k, g in zip(("h0", "c0"), grads_one):
        assert torch.equal(g, mine[k].grad), f"grad of {k}: one thread differs from {threads}"
    torch.autograd.backward(want, [c.double() for c in cotangents])
    # The input projection goes through BLAS below 2048 rows, and MKL's sgemm on the AMD CI machine gives
    # other bits on one thread than on two for small shapes (5 x 7 x 80: 1e-6 apart); the one-thread
    # forward is then only as close as the float32 tolerance. From 2048 rows it is brgemm tiles, one
    # thread per tile: the same bits.
    blas_fixed = sum(lengths) >= 2048 or _blas_projection_reproducible(a, threads)
    for i, (g, t, o, w) in enumerate(zip(infer, train, one, want)):
        assert_rel_close(g, w, torch.float32, f"output {i}")
        assert torch.equal(g, t), f"output {i}: training and inference forwards differ"
        if blas_fixed:
            assert torch.equal(g, o), f"output {i}: one thread differs from {threads}"
        else:
            assert_rel_close(o, w, torch.float32, f"output {i} on one thread")
    for k in names:
        if k != "batch_sizes" and a[k] is not None:
            assert_rel_close(mine[k].grad, leaves[k].grad, torch.float32, f"grad of {k}")


# ---------------------------------------------------------------- modules against torch.nn

MODULE_CASES = [dict(num_layers=nl, bias=bias, batch_first=bf, bidirectional=bi, proj_size=proj)
                for nl, bias, bf, bi, proj in itertools.product((1, 2), (True, False), (False, True), (False, True), (0, 3))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,kw", [("lstm", kw) for kw in MODULE_CASES] +
                         [("gru", {k: v for k, v in kw.items() if k != "proj_size"}) for kw in MODULE_CASES
                          if not kw["proj_size"]],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_module_matches_torch(mode, kw, dtype):
    theirs, ours = pair(mode, dtype, input_size=5, hidden_size=17, **kw)
    T, B = 6, 3
    x = torch.randn(B, T, 5, dtype=dtype) if kw["batch_first"] else torch.randn(T, B, 5, dtype=dtype)
    D = 2 if kw["bidirectional"] else 1
    P = kw.get("proj_size") or 17
    h0 = torch.randn(kw["num_layers"] * D, B, P, dtype=dtype)
    c0 = torch.randn(kw["num_layers"] * D, B, 17, dtype=dtype)
    for hx in (None, (h0, c0) if mode == "lstm" else h0):
        compare_modules(mode, theirs, ours, x, hx, dtype)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_backends_agree(mode, backend):
    theirs, ours = pair(mode, torch.float64, input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with fastnn.use_backend(backend):
        compare_modules(mode, theirs, ours, x, None, torch.float64)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted_matches_torch(mode, dtype, bidirectional):
    kw = dict(input_size=5, hidden_size=19, num_layers=2, bidirectional=bidirectional)
    if mode == "lstm":
        kw["proj_size"] = 4
    theirs, ours = pair(mode, dtype, **kw)
    lengths = torch.tensor([3, 7, 1, 5, 7])
    x = torch.randn(7, 5, 5, dtype=dtype)
    D = 2 if bidirectional else 1
    h0 = torch.randn(2 * D, 5, kw.get("proj_size", 19), dtype=dtype)
    c0 = torch.randn(2 * D, 5, 19, dtype=dtype)
    hx = (h0, c0) if mode == "lstm" else h0

    def run(m):
        xi = x.clone().requires_grad_()
        out, hn = m(pack_padded_sequence(xi, lengths, enforce_sorted=False), hx)
        padded, out_lengths = pad_packed_sequence(out)
        outs = [padded] + hidden_states(mode, hn)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum() for o in outs).backward()
        return out, outs, [xi.grad] + [p.grad for p in m.parameters()]

    want_packed, want, want_g = run(theirs)
    got_packed, got, got_g = run(ours)
    assert isinstance(got_packed, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(got_packed.batch_sizes, want_packed.batch_sizes)
    assert torch.equal(got_packed.unsorted_indices, want_packed.unsorted_indices)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, dtype, f"output {i}")
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert_rel_close(g, w, dtype, f"grad {i}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_unbatched_input_matches_torch(mode):
    theirs, ours = pair(mode, torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    hx = (h0, torch.randn(2, 4, dtype=torch.float64)) if mode == "lstm" else h0
    compare_modules(mode, theirs, ours, x, hx, torch.float64)
    compare_modules(mode, theirs, ours, x, None, torch.float64)


@pytest.mark.parametrize("mode", ["lstm_cell", "gru_cell"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_match_torch(mode, dtype, bias, batched):
    theirs, ours = pair(mode, dtype, input_size=6, hidden_size=18, bias=bias)
    x = torch.randn(*((4,) if batched else ()), 6, dtype=dtype)
    shape = (4, 18) if batched else (18,)
    for with_state in (False, True):
        states = [torch.randn(*shape, dtype=dtype) for _ in range(2 if mode == "lstm_cell" else 1)]

        def run(m):
            xi = x.clone().requires_grad_()
            st = [s.clone().requires_grad_() for s in states]
            hx = (tuple(st) if mode == "lstm_cell" else st[0]) if with_state else None
            out = m(xi, hx)
            outs = list(out) if mode == "lstm_cell" else [out]
            sum((o * (1 + torch.arange(o.numel(), dtype=dtype).view_as(o) / 7)).sum() for o in outs).backward()
            grads = [xi.grad] + ([s.grad for s in st] if with_state else []) + [p.grad for p in m.parameters()]
            for p in m.parameters():
                p.grad = None
            return outs, grads

        (wo, wg), (go, gg) = run(theirs), run(ours)
        for g, w in zip(go + gg, wo + wg):
            assert g.shape == w.shape
            assert_rel_close(g, w, dtype, mode)


@pytest.mark.parametrize("mode", ["lstm_cell", "gru_cell"])
@pytest.mark.parametrize("B, I, H", [(6, 16, 16), (3, 37, 21), (5, 64, 48), (48, 96, 80)])
def test_cell_products_small_and_blas_match_torch(mode, B, I, H):
    """A float32 cell step takes its products from csrc/cpu/small_gemm.h up to kSmallFmas multiply-adds (row
    blocks of 4 with a remainder, 16-wide column blocks with scalar tails) and from ATen's GEMMs beyond (the
    last shape). Outputs and each gradient against torch.nn, with gradients wanted for every tensor, for the
    input alone (no weight gradients) and for the weights alone (no dx)."""
    torch.manual_seed(B * I + H)
    for bias in (True, False):
        theirs, ours = pair(mode, torch.float32, input_size=I, hidden_size=H, bias=bias)
        x = torch.randn(B, I)
        states = [torch.randn(B, H) for _ in range(2 if mode == "lstm_cell" else 1)]
        for wants in ("all", "input", "weights"):
            def run(m):
                for p in m.parameters():
                    p.requires_grad_(wants != "input")
                    p.grad = None
                xi = x.clone().requires_grad_(wants != "weights")
                st = [s.clone().requires_grad_(wants == "all") for s in states]
                out = m(xi, tuple(st) if mode == "lstm_cell" else st[0])
                outs = list(out) if mode == "lstm_cell" else [out]
                sum((o * (1 + torch.arange(o.numel()).view_as(o) / 7)).sum() for o in outs).backward()
                grads = [t.grad for t in [xi, *st, *m.parameters()] if t.requires_grad]
                return outs + grads

            got, want = run(ours), run(theirs)
            assert len(got) == len(want)
            for i, (g, w) in enumerate(zip(got, want)):
                assert g.shape == w.shape
                assert_rel_close(g, w, torch.float32, f"{mode} B{B} I{I} H{H} bias={bias} {wants} [{i}]")


def test_state_dict_round_trip_and_repr():
    theirs = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3)
    ours = fastnn.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs2 = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3)
    theirs2.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert [p.shape for p in ours._flat_weights] == [p.shape for p in theirs._flat_weights]
    assert all(a is b for a, b in zip(ours._flat_weights, ours.parameters()))


@pytest.mark.parametrize("mode", ["lstm", "gru", "lstm_cell", "gru_cell"])
def test_same_initialisation_from_the_same_seed(mode):
    kw = dict(input_size=5, hidden_size=7, bias=True)
    if mode in ("lstm", "gru"):
        kw.update(num_layers=2, bidirectional=True, dropout=0.25)
    torch.manual_seed(11)
    theirs = TORCH[mode](**kw)
    torch.manual_seed(11)
    ours = OURS[mode](**kw)
    assert repr(ours) == repr(theirs)
    for (n, a), (m, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert n == m and torch.equal(a, b)


def test_constructor_arguments_checked_like_torch():
    for kw, exc in ((dict(dropout=1.5), ValueError), (dict(proj_size=7), ValueError), (dict(hidden_size=0), ValueError),
                    (dict(bias=1), TypeError), (dict(num_layers=0), ValueError)):
        args = dict(input_size=5, hidden_size=7)
        args.update(kw)
        with pytest.raises(exc):
            torch.nn.LSTM(**args)
        with pytest.raises(exc):
            fastnn.nn.LSTM(**args)
    with pytest.raises(ValueError, match="proj_size"):
        fastnn.nn.GRU(5, 7, proj_size=2)
    # torch.nn fails at forward on a non-bool bidirectional; a truthy string must not make two directions
    for cls in (fastnn.nn.LSTM, fastnn.nn.GRU, fastnn.nn.LayerNormLSTM):
        with pytest.raises(TypeError, match="bidirectional should be of type bool"):
            cls(5, 7, bidirectional="no")


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_dropout_training_only(mode):
    theirs, ours = pair(mode, torch.float64, input_size=4, hidden_size=6, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    ours.eval()
    theirs.eval()
    compare_modules(mode, theirs, ours, x, None, torch.float64)  # eval: no dropout, torch's numbers
    ours.train()
    torch.manual_seed(3)
    a = ours(x)[0]
    torch.manual_seed(3)
    b = ours(x)[0]
    torch.manual_seed(4)
    c = ours(x)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, ours.eval()(x)[0])


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_dropout_one_zeroes_the_inputs_of_later_layers(mode):
    """p = 1 zeroes every output of layers 0 and 1: the result is the reference with all-zero masks."""
    m = OURS[mode](4, 6, num_layers=3, dropout=1.0).double().train()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    out, hn = m(x)
    packed, sizes = ref.pad_to_packed(x)
    weights = [(getattr(m, f"weight_ih_l{k}"), getattr(m, f"weight_hh_l{k}"), getattr(m, f"bias_ih_l{k}"),
                getattr(m, f"bias_hh_l{k}"), None) for k in range(3)]
    zeros = torch.zeros(2, 6, dtype=torch.float64)
    y, h, c = ref.rnn(mode, packed, sizes, weights, torch.zeros(3, 2, 6, dtype=torch.float64),
                      torch.zeros(3, 2, 6, dtype=torch.float64) if mode == "lstm" else None, 3, False,
                      dropout_masks=[zeros.new_zeros(10, 6)] * 2)
    torch.testing.assert_close(out.reshape(-1, 6), y)
    del zeros, h, c, hn


# ---------------------------------------------------------------- low precision and autocast

@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(mode, dtype):
    """fp16 / bf16 run in float32 and round their results: error vs float64 at most 2x torch's own in the low
    precision (+ one rounding of the output)."""
    m64 = TORCH[mode](8, 24, num_layers=2).double()
    x = torch.randn(10, 3, 8, dtype=torch.float64)
    want = m64(x)[0]
    low = TORCH[mode](8, 24, num_layers=2).to(dtype)
    low.load_state_dict(m64.state_dict())
    theirs_low = low(x.to(dtype))[0]
    ours = OURS[mode](8, 24, num_layers=2).to(dtype)
    ours.load_state_dict(m64.state_dict())
    got = ours(x.to(dtype))[0]
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    lowp_close(got, want, theirs_low, floor=eps)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_cpu_follows_torch(x_dtype):
    """CPU autocast lowers torch's LSTM layer to bf16 and leaves the GRU and the cells in float32 (for a float32
    input); a low-precision input to float32 weights comes out as torch's does: bf16 in bf16, fp16 in float32."""
    x = torch.randn(4, 2, 5).to(x_dtype)
    for mode in ("lstm", "gru", "lstm_cell", "gru_cell"):
        theirs, ours = pair(mode, torch.float32, input_size=5, hidden_size=6)
        xi = x if mode in ("lstm", "gru") else x[0]
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = first(theirs(xi)), first(ours(xi))
        assert got.dtype == want.dtype, (mode, got.dtype, want.dtype)
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_autocast_cpu_packed_lstm_follows_torch(x_dtype, with_state):
    """CPU autocast's list has the LSTM's padded overload only: on a PackedSequence torch's LSTM decomposes
    into autocast GEMMs and promoting pointwise ops, as its GRU does, so a float32 model returns float32 data
    (not bf16, as on padded input); fastnn's gives the same dtypes, states included."""
    from torch.nn.utils.rnn import pack_sequence

    torch.manual_seed(4)
    seqs = [torch.randn(5, 5).to(x_dtype), torch.randn(3, 5).to(x_dtype), torch.randn(4, 5).to(x_dtype)]
    hx = (torch.randn(1, 3, 6), torch.randn(1, 3, 6)) if with_state else None
    theirs, ours = pair("lstm", torch.float32, input_size=5, hidden_size=6)
    packed = pack_sequence(seqs, enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = theirs(packed, hx), ours(packed, hx)
    for g, w in ((got[0].data, want[0].data), (got[1][0], want[1][0]), (got[1][1], want[1][1])):
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        torch.testing.assert_close(g.float(), w.float(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_cpu_promotes_with_the_state_as_torch(x_dtype, h_dtype):
    """Under CPU autocast torch's GRU and cells run autocast GEMMs, then pointwise ops that promote the gates
    with the initial state: a bf16 input with a float32 state comes out in float32, a float32 input with a
    bf16 state in bf16. fastnn's layers give the same dtypes (and numbers within bf16 accuracy)."""
    x = torch.randn(4, 2, 5).to(x_dtype)
    for mode in ("gru", "lstm_cell", "gru_cell"):
        theirs, ours = pair(mode, torch.float32, input_size=5, hidden_size=6)
        cell = mode != "gru"
        xi = x[0] if cell else x
        h = torch.randn((2, 6) if cell else (1, 2, 6)).to(h_dtype)
        hx = (h, torch.randn_like(h)) if mode == "lstm_cell" else h
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = first(theirs(xi, hx)), first(ours(xi, hx))
        assert got.dtype == want.dtype, (mode, got.dtype, want.dtype)
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.02)
        # a float64 state: torch's autocast GEMMs refuse it (RuntimeError); so does fastnn, by name
        hx64 = tuple(t.double() for t in hx) if isinstance(hx, tuple) else hx.double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError):
                theirs(xi, hx64)
            with pytest.raises(RuntimeError, match="initial state of dtype torch.float64"):
                ours(xi, hx64)


# ---------------------------------------------------------------- bf16 layers with bf16 operands (CPU)

def _bf16_native_here() -> bool:
    from fastnn._backend import _C
    return _C is not None and hasattr(_C, "rnn_bf16_native") and _C.rnn_bf16_native(8, False)


needs_bf16_native = pytest.mark.skipif(not _bf16_native_here(),
                                       reason="no AVX512-BF16 here: bf16 layers run wholly in float32")

# (mode, input_size, hidden_size, module kwargs, packed lengths or None): odd H (a zero k pad in the recurrent
# products), G H odd for the GRU (a zero column in the gate gradients), unsorted packed lengths, 40 rows a
# step (two brgemm row blocks), batch_first, two layers, no bias; odd input_size falls back to float32.
BF16_CASES = [
    ("lstm", 8, 24, {}, None),
    ("gru", 8, 24, {}, None),
    ("lstm", 12, 37, {"bidirectional": True}, (7, 3, 5, 1, 6)),
    ("gru", 12, 37, {"bidirectional": True, "bias": False}, (7, 3, 5, 1, 6)),
    ("lstm", 64, 48, {"num_layers": 2, "batch_first": True}, None),
    ("gru", 64, 48, {"num_layers": 2}, None),
    ("lstm", 11, 24, {}, None),
]


def _bf16_run(mode, module, x, init, lengths, batch_first, cotangents):
    """Outputs and every gradient of one forward+backward (module in x's dtype), as float64."""
    dtype = next(module.parameters()).dtype
    module.zero_grad(set_to_none=True)
    xi = x.detach().to(dtype).requires_grad_()
    states = [s.detach().to(dtype).requires_grad_() for s in init]
    inp = pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False) if lengths else xi
    out, hidden = module(inp, tuple(states) if mode == "lstm" else states[0])
    y = out.data if lengths else out
    outs = [y] + (list(hidden) if mode == "lstm" else [hidden])
    loss = sum((o.double() * g).sum() for o, g in zip(outs, cotangents))
    loss.backward()
    return [o.detach().double() for o in outs] + [t.grad.double() for t in [xi, *states, *module.parameters()]]


@needs_bf16_native
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: f"{c[0]}-I{c[1]}-H{c[2]}-{len(c[3])}kw-{bool(c[4])}")
def test_bf16_native_forward_backward(case):
    """bf16 layers with bf16 GEMM operands: outputs and every gradient (input, h0, c0, each parameter) within 2x
    torch's own bf16 error against float64 (DESIGN tier 2), and not the float32 path's numbers, so the bf16
    kernels ran (odd input_size: the float32 path, the same numbers)."""
    mode, I, H, kw, lengths = case
    batch_first = kw.get("batch_first", False)
    B = len(lengths) if lengths else 40
    T = max(lengths) if lengths else 6
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g).bfloat16().double()
    init = [torch.randn(layers, B, H, generator=g).bfloat16().double() for _ in range(2 if mode == "lstm" else 1)]
    m64 = TORCH[mode](I, H, **kw).double()
    rows = sum(lengths) if lengths else T * B
    y_shape = (rows, 2 * H if kw.get("bidirectional") else H) if lengths else \
        ((B, T) if batch_first else (T, B)) + ((2 * H if kw.get("bidirectional") else H),)
    cotangents = [torch.randn(y_shape, generator=g, dtype=torch.float64)] + \
        [torch.randn(layers, B, H, generator=g, dtype=torch.float64) for _ in init]
    want = _bf16_run(mode, m64, x, init, lengths, batch_first, cotangents)
    theirs = TORCH[mode](I, H, **kw).bfloat16()
    theirs.load_state_dict(m64.state_dict())
    got_theirs = _bf16_run(mode, theirs, x, init, lengths, batch_first, cotangents)
    ours = OURS[mode](I, H, **kw).bfloat16()
    ours.load_state_dict(m64.state_dict())
    got = _bf16_run(mode, ours, x, init, lengths, batch_first, cotangents)
    names = ["y", "h_n", "c_n"][:len(init) + 1] + ["dx", "dh0", "dc0"][:len(init) + 1] + \
        [f"d{n}" for n, _ in ours.named_parameters()]
    for name, o, w, t in zip(names, got, want, got_theirs):
        lowp_close(o, w, t, floor=1e-4 * max(1.0, w.abs().max().item()), what=name)
    before = rnn_ops.BF16_NATIVE
    try:
        rnn_ops.BF16_NATIVE = False
        got32 = _bf16_run(mode, ours, x, init, lengths, batch_first, cotangents)
    finally:
        rnn_ops.BF16_NATIVE = before
    same = [torch.equal(a, b) for a, b in zip(got, got32)]
    if I % 2:
        assert all(same), "odd input_size: the float32 path, the same numbers"
    else:
        assert not same[0] and not all(same[len(init) + 1:]), "the bf16 path did not run"


def _round_bf16_straight_through(t):
    """t rounded to bf16 (via float32, as the kernel rounds its float32 h), gradient passed through unchanged."""
    return t + (t.float().bfloat16().double() - t).detach()


def _emulate_bf16_layer(mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0):
    """float64 layer with the bf16 path's one extra rounding: h_{t-1} in bf16 in the recurrent products (the
    GRU's blend keeps it unrounded, as the kernel's float32 gate math does)."""
    H = w_hh.shape[1]
    h, c, ys = h0, c0, []
    for t in range(x.shape[0]):
        gx, gh = x[t] @ w_ih.T + b_ih, _round_bf16_straight_through(h) @ w_hh.T + b_hh
        if mode == "lstm":
            g = gx + gh
            i, f, gg, o = g[:, :H].sigmoid(), g[:, H:2 * H].sigmoid(), g[:, 2 * H:3 * H].tanh(), g[:, 3 * H:].sigmoid()
            c = f * c + i * gg
            h = o * c.tanh()
        else:
            r, z = (gx[:, :H] + gh[:, :H]).sigmoid(), (gx[:, H:2 * H] + gh[:, H:2 * H]).sigmoid()
            h = (1 - z) * (gx[:, 2 * H:] + r * gh[:, 2 * H:]).tanh() + z * h
        ys.append(h)
    return torch.stack(ys)


@needs_bf16_native
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_native_is_the_stated_rounding(mode, seed):
    """The bf16 path computes the float64 layer with h_{t-1} rounded to bf16 in the recurrent products (and
    nothing else rounded but the outputs): its bf16 outputs equal that emulation's rounded ones but for rare
    rounding-boundary flips of one ulp (the float32 path, without the rounding, misses ~11% of them). Its
    gradients (with the rounding's gradient taken as 1) differ by the gate gradients' and the results'
    roundings to bf16: per gate's rows an rms error of at most 3.4e-3 of the rms here, bounded by 6e-3; a 1%
    error in one gate's gradients gives 1e-2."""
    rms_bound = 6e-3
    g = torch.Generator().manual_seed(seed)
    I, H, B, T = 16, 24, 5, 8
    m = OURS[mode](I, H).bfloat16()
    x = torch.randn(T, B, I, generator=g).bfloat16().requires_grad_()
    h0, c0 = (torch.randn(1, B, H, generator=g).bfloat16() for _ in range(2))
    dy = torch.randn(T, B, H, generator=g)
    y = m(x, (h0, c0) if mode == "lstm" else h0)[0]
    (y.float() * dy).sum().backward()
    p = {n: v.detach().double().requires_grad_() for n, v in m.named_parameters()}
    xe = x.detach().double().requires_grad_()
    ye = _emulate_bf16_layer(mode, xe, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"],
                             h0[0].double(), c0[0].double())
    (ye * dy.double()).sum().backward()
    want = ye.detach().float().bfloat16().double()
    diff = (y.detach().double() - want).abs()
    assert (diff > 0).double().mean().item() <= 0.01, "outputs differ from the emulation beyond rounding flips"
    assert diff.max().item() <= 2 ** -7 * want.abs().max().item()
    grads = [x.grad] + [v.grad for v in m.parameters()]
    G = 4 if mode == "lstm" else 3
    for name, got, w in zip(["x", *p], grads, [xe.grad] + [v.grad for v in p.values()]):
        blocks = [(got, w)] if name == "x" else zip(got.double().chunk(G), w.chunk(G))  # each gate's rows
        for q, (a, b) in enumerate(blocks):
            rms = ((a.double() - b).square().mean().sqrt() / b.square().mean().sqrt()).item()
            assert rms <= rms_bound, f"d{name} (block {q}): rms error {rms:.3g} of the rms"

@needs_bf16_native
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_bf16_native_same_bits_on_any_thread_count(mode):
    """Groups of units move between the threads (work stealing): the results must not depend on that."""
    m = OURS[mode](32, 80, bidirectional=True).bfloat16()
    x = torch.randn(9, 37, 32).bfloat16()

    def results():
        m.zero_grad()
        xi = x.clone().requires_grad_()
        out = m(xi)[0]
        out.float().square().sum().backward()
        return [out, xi.grad] + [p.grad.clone() for p in m.parameters()]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = results()
        torch.set_num_threads(max(2, threads))
        many, again = results(), results()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, many, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@needs_bf16_native
def test_bf16_kernel_checks_its_arguments():
    from fastnn._backend import _C
    assert not _C.rnn_bf16_native(7, False) and not _C.rnn_bf16_native(8, True)
    bf = torch.bfloat16
    x, bs = torch.randn(5, 8, dtype=bf), torch.tensor([3, 2])
    w_ih, w_hh = torch.randn(96, 8, dtype=bf), torch.randn(96, 24, dtype=bf)
    h0, c0 = torch.randn(3, 24), torch.randn(3, 24)
    fwd = _C.rnn_layer_forward_cpu
    expect_error(fwd, ("lstm", x, bs, w_ih.float(), w_hh, None, None, None, h0, c0, False, False), RuntimeError,
                 "bfloat16 w_ih and w_hh")
    expect_error(fwd, ("lstm", x, bs, w_ih, w_hh, None, None, None, h0.to(bf), c0, False, False), RuntimeError,
                 "h0 must be float32")
    expect_error(fwd, ("lstm", x[:, :7].contiguous(), bs, w_ih[:, :7].contiguous(), w_hh, None, None, None, h0, c0,
                       False, False), RuntimeError, "input_size 7")
    expect_error(fwd, ("lstm", x.half(), bs, w_ih, w_hh, None, None, None, h0, c0, False, False), RuntimeError,
                 "float32 or float64")

# ---------------------------------------------------------------- determinism, opcheck, gradcheck, compile

@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_backward_is_deterministic(mode):
    m = OURS[mode](16, 32, num_layers=2, bidirectional=True)
    x = torch.randn(9, 5, 16)

    def grads():
        m.zero_grad()
        xi = x.clone().requires_grad_()
        m(xi)[0].square().sum().backward()
        return [xi.grad] + [p.grad.clone() for p in m.parameters()]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def _opcheck_cases(dtype):
    cases = []
    for mode, proj, reverse, lengths in (("lstm", 0, False, [3, 3]), ("lstm", 2, True, [3, 1]), ("gru", 0, True, [3, 2])):
        a = _layer_args(mode, dtype, proj, lengths, I=3, H=4, B=2)
        for train in (True, False):
            cases.append((mode, a["x"], a["batch_sizes"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
                          a["h0"], a["c0"], reverse, train))
    return cases


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend", TRITON)
def test_module_on_triton_matches_torch(mode, backend):
    """The whole module through the custom op with the Triton cells (interpreter): fp32, packed included."""
    kw = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    if mode == "lstm":
        kw["proj_size"] = 3
    theirs, ours = pair(mode, torch.float32, **kw)
    x = torch.randn(4, 2, 4)
    with fastnn.use_backend(backend):
        compare_modules(mode, theirs, ours, x, None, torch.float32)
        packed = pack_padded_sequence(torch.randn(4, 3, 4), torch.tensor([2, 4, 1]), enforce_sorted=False)
        got, want = ours(packed), theirs(packed)
    assert_rel_close(got[0].data, want[0].data, torch.float32, "packed output")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS + TRITON)
def test_opcheck(backend):
    with fastnn.use_backend(backend):
        # the C++ kernel reads every input as a dense array (the public function passes dense copies)
        run_opcheck(torch.ops.fastnn.rnn_layer_forward.default, _opcheck_cases(torch.float32),
                    strided_inputs=backend != "cpp")
        mode, x, bs, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, _ = _opcheck_cases(torch.float32)[2]
        y, h, c, gates, aux, r = torch.ops.fastnn.rnn_layer_forward(mode, x, bs, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0,
                                                                    reverse, True)
        backward = (mode, torch.randn_like(y), torch.randn_like(h), torch.randn_like(c), x, bs, w_ih, w_hh, b_ih, b_hh,
                    w_hr, h0, c0, y, gates, aux, r, reverse, True, True)
        if backend == "reference":  # its backward runs torch.func.vjp, which opcheck's tensor wrappers cannot run
            check_fake_layout(torch.ops.fastnn.rnn_layer_backward.default, backward, {})
            return
        run_opcheck(torch.ops.fastnn.rnn_layer_backward.default, [backward], skip_autograd=True,
                    strided_inputs=backend != "cpp")


@pytest.mark.parametrize("mode,proj", [("lstm", 0), ("lstm", 2), ("gru", 0)])
def test_gradcheck_float64(mode, proj):
    a = _layer_args(mode, torch.float64, proj, [3, 2, 2], I=3, H=4, B=3, requires_grad=True)
    names = [k for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0") if a[k] is not None]

    def f(*xs):
        kw = dict(a, **dict(zip(names, xs)))
        out = rnn_ops._layer(mode, kw["x"], kw["batch_sizes"], kw["w_ih"], kw["w_hh"], kw["b_ih"], kw["b_hh"],
                             kw["w_hr"], kw["h0"], kw["c0"], True)
        return tuple(t for t in out if t is not None)

    run_gradcheck(f, tuple(a[k] for k in names), CPU_BACKENDS)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_compile_fullgraph(mode):
    m = OURS[mode](6, 8, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 6)

    def fwd(x):
        out, hn = m(x)
        return (out,) + tuple(hidden_states(mode, hn))

    check_compiles(fwd, (x,), backend="aot_eager")

    # training: the compiled forward's graph carries the custom op's autograd
    torch._dynamo.reset()
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, fwd):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        f(xi)[0].square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_compile_fullgraph_packed(mode, enforce_sorted):
    """A PackedSequence input compiles whole too (its batch size read from sorted_indices, or bounded when it is
    data-dependent)."""
    m = OURS[mode](5, 6, num_layers=2, bidirectional=True)
    lengths = [4, 3, 2] if enforce_sorted else [2, 4, 3]
    packed = pack_padded_sequence(torch.randn(4, 3, 5), lengths, enforce_sorted=enforce_sorted)
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(packed)
    want = m(packed)
    torch.testing.assert_close(got[0].data, want[0].data)
    for g, w in zip(hidden_states(mode, got[1]), hidden_states(mode, want[1])):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- bad inputs and empty ones

def test_bad_inputs_name_the_argument():
    m = fastnn.nn.LSTM(5, 6, num_layers=2)
    expect_error(m, (torch.randn(3, 2, 4),), ValueError, r"input.*input_size = 5.*\(3, 2, 4\)")
    expect_error(m, (torch.randn(3, 2, 5), (torch.randn(2, 2, 6), torch.randn(1, 2, 6))), ValueError,
                 r"hx\[1\] must have shape \(2, 2, 6\)")
    expect_error(m, (torch.randn(3, 2, 5), torch.randn(2, 2, 6)), ValueError, r"hx must be a tuple")
    expect_error(m, (torch.randn(3, 2, 5, dtype=torch.float64),), TypeError, r"input has dtype torch.float64")
    expect_error(m, (torch.randn(3, 2, 2, 5),), ValueError, r"input must be")
    g = fastnn.nn.GRU(5, 6)
    expect_error(g, (torch.randn(3, 2, 5), torch.randn(1, 3, 6)), ValueError, r"hx must have shape \(1, 2, 6\)")
    # a sequence of no step (sorted_indices longer than batch_sizes[0]): its h_n was read from another row
    idx = torch.tensor([0, 1, 2])
    no_step = PackedSequence(torch.randn(3, 5), torch.tensor([2, 1]), idx, idx)
    for module in (g, fastnn.nn.LSTM(5, 6), fastnn.nn.LayerNormLSTM(5, 6)):
        expect_error(module, (no_step,), ValueError, r"3 sequences \(input.sorted_indices\).*got 2")
    cell = fastnn.nn.LSTMCell(5, 6)
    expect_error(cell, (torch.randn(2, 7),), ValueError, r"input must be .*input_size = 5.*\(2, 7\)")
    expect_error(cell, (torch.randn(2, 5), (torch.randn(3, 6), torch.randn(2, 6))), ValueError, r"hx\[0\]")
    a = _layer_args("lstm", torch.float32, 0, [2, 2], I=3, H=4, B=2)
    expect_error(rnn_ops._check_batch_sizes, (torch.tensor([1, 2]), 3), ValueError, r"batch_sizes must be positive and non-increasing")
    expect_error(rnn_ops._check_batch_sizes, (torch.tensor([2, 2]), 3), ValueError, r"batch_sizes sum to 4")
    lstm1 = lambda *args, **kw: rnn_ops.lstm(*args, num_layers=1, **kw)  # noqa: E731
    expect_error(lstm1, (torch.randn(2, 2, 3), None, [(a["w_ih"], a["w_hh"][:, :3], None, None, None)]),
                 ValueError, r"w_hh must be")
    expect_error(lstm1, (torch.randn(2, 2, 3), None, [(a["w_ih"], a["w_hh"], a["b_ih"], None, None)]),
                 ValueError, r"b_ih and b_hh")
    expect_error(lambda: rnn_ops.lstm(torch.randn(2, 2, 3), None, [(a["w_ih"], a["w_hh"], None, None, None)],
                                      num_layers=1, dropout=1.5), (), ValueError, r"dropout must be in \[0, 1\]")
    expect_error(lambda: rnn_ops.lstm(torch.randn(2, 2, 3), None, [], num_layers=0), (), ValueError,
                 r"num_layers must be a positive int, got 0")


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ backend is not under test")
def test_kernel_rejects_strided_weights():
    """The C++ kernel reads x, the weights and the workspace as dense arrays: a direct call of the op with a strided
    one is refused with the argument's name (the Python wrappers pass them contiguous)."""
    from fastnn._backend import _C
    a = _layer_args("lstm", torch.float32, 0, [3, 3], I=3, H=4, B=2)
    w_hh = torch.randn(a["w_hh"].shape[1], a["w_hh"].shape[0]).t()  # same shape, transposed strides
    args = (a["x"], a["batch_sizes"], a["w_ih"], w_hh, a["b_ih"], a["b_hh"], None, a["h0"], a["c0"], False)
    with pytest.raises(RuntimeError, match="w_hh must be contiguous"):
        _C.rnn_layer_forward_cpu("lstm", *args, True)
    x_strided = a["x"].t().contiguous().t()  # read by the input projection through a raw pointer
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        _C.rnn_layer_forward_cpu("lstm", x_strided, *args[1:3], a["w_hh"], *args[4:], True)
    y, h, c, gates, aux, r = _C.rnn_layer_forward_cpu("lstm", *args[:3], a["w_hh"], *args[4:], True)
    with pytest.raises(RuntimeError, match="w_hh must be contiguous"):
        _C.rnn_layer_backward_cpu("lstm", torch.randn_like(y), torch.randn_like(h), torch.randn_like(c), a["x"],
                                  a["batch_sizes"], a["w_ih"], w_hh, a["b_ih"], a["b_hh"], None, a["h0"], a["c0"], y,
                                  gates, aux, r, False, True, True)
    with pytest.raises(RuntimeError, match="gates must be contiguous"):
        _C.rnn_layer_backward_cpu("lstm", torch.randn_like(y), torch.randn_like(h), torch.randn_like(c), a["x"],
                                  a["batch_sizes"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None, a["h0"],
                                  a["c0"], y, gates.t().contiguous().t(), aux, r, False, True, True)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ backend is not under test")
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_kernel_rejects_misshapen_or_strided_states_and_weights(mode):
    """A one-step float32 call (the small products, which index raw pointers with the layer's extents): a
    direct call of the op with a weight, bias or state of the wrong shape, or a strided state, w_ih or state
    gradient, is refused with the argument's name instead of reading out of bounds or giving wrong numbers."""
    from fastnn._backend import _C
    G, B, I, H = (4 if mode == "lstm" else 3), 4, 16, 16
    x, bs = torch.randn(B, I), torch.tensor([B])
    w_ih, w_hh, b_ih, b_hh = torch.randn(G * H, I), torch.randn(G * H, H), torch.randn(G * H), torch.randn(G * H)
    h0 = torch.randn(B, H)
    c0 = torch.randn(B, H) if mode == "lstm" else None
    args = dict(x=x, batch_sizes=bs, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=None, h0=h0, c0=c0)
    forward = lambda **kw: _C.rnn_layer_forward_cpu(mode, *{**args, **kw}.values(), False, True)  # noqa: E731
    bad = {"h0": (torch.randn(B, H - 2), "h0 must be"), "w_ih": (torch.randn(G * H, I - 3), "w_ih must be"),
           "b_ih": (torch.randn(G * H - 1), "biases must be"), "b_hh": (torch.randn(G * H + 2), "biases must be"),
           "x": (torch.randn(B, I, 1), "x must be")}
    bad["h0" if mode == "gru" else "c0"] = (torch.randn(B, H).t().contiguous().t(), "must be contiguous")
    if mode == "lstm":
        bad["w_ih"] = (torch.randn(G * H - 4, I), "w_ih must be")
    for name, (value, message) in bad.items():
        with pytest.raises(RuntimeError, match=message):
            forward(**{name: value})
    y, h, c, gates, aux, r = forward()
    dy, dh, dc = torch.randn_like(y), torch.randn_like(h), (torch.randn_like(c) if mode == "lstm" else None)

    def backward(dh_n=dh, w=w_ih, dy=dy):
        return _C.rnn_layer_backward_cpu(mode, dy, dh_n, dc, x, bs, w, w_hh, b_ih, b_hh, None, h0, c0, y, gates, aux,
                                         r, False, True, True, True)

    strided = lambda t: t.t().contiguous().t()  # noqa: E731 (same values, transposed strides)
    for kw, message in (({"w": strided(w_ih)}, "w_ih must be contiguous"), ({"dh_n": strided(dh)}, "dh_n must be"),
                        ({"w": torch.randn(G * H, I + 1)}, "w_ih must be"), ({"dh_n": torch.randn(B, H + 1)}, "dh_n"),
                        ({"dy": torch.randn(B, H - 1)}, "dy must be")):
        with pytest.raises(RuntimeError, match=message):
            backward(**kw)
    assert torch.isfinite(backward()[0]).all()
    # w_hh's second size is the state's width: without a projection it must be H (a narrower h0 and w_hh
    # corrupted the heap), and a strided batch_sizes was read as dense
    with pytest.raises(RuntimeError, match="without w_hr"):
        forward(w_hh=torch.randn(G * H, 2), h0=torch.randn(B, 2))
    with pytest.raises(RuntimeError, match="batch_sizes must be a contiguous"):
        forward(x=torch.randn(4, I), batch_sizes=torch.tensor([3, 0, 0, 1]).as_strided((2,), (3,)))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ backend is not under test")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,proj,reverse,lengths", [("lstm", 0, False, [1, 1, 1]), ("gru", 0, True, [1, 1]),
                                                       ("lstm", 0, False, [6, 4, 4, 1]), ("lstm", 7, True, [6, 4, 4, 1]),
                                                       ("gru", 0, True, [6, 4, 4, 1])])
def test_kernel_backward_without_dh0(dtype, mode, proj, reverse, lengths):
    """want_dh0=False (h0 needs no gradient): dh0 comes back empty, the C++ kernel skipping the product that only
    feeds it, and every other gradient is bitwise the want_dh0=True call's (one step, packed, reverse)."""
    from fastnn._backend import _C
    a = _layer_args(mode, dtype, proj, lengths)
    fwd = (a["x"], a["batch_sizes"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"], a["h0"], a["c0"], reverse)
    y, h, c, gates, aux, r = _C.rnn_layer_forward_cpu(mode, *fwd, True)
    grads_in = (torch.randn_like(y), torch.randn_like(h), torch.randn_like(c) if mode == "lstm" else None)
    bwd = lambda want_dh0: _C.rnn_layer_backward_cpu(mode, *grads_in, *fwd[:-1], y, gates, aux, r, reverse,  # noqa: E731
                                                     True, True, want_dh0)
    full, part = bwd(True), bwd(False)
    assert full[6].shape == a["h0"].shape and part[6].numel() == 0
    for i in (0, 1, 2, 3, 4, 5, 7):
        assert torch.equal(full[i], part[i]), i


@pytest.mark.parametrize("mode", ["lstm_cell", "gru_cell", "lstm", "gru"])
def test_direct_calls_equal_the_op(mode, monkeypatch):
    """In plain eager mode _layer runs the op's body (inference) or an autograd.Function around it (training)
    without torch.library's dispatch (fastnn/ops/_direct.py): outputs and every gradient must be bitwise the
    custom op's, with h0 needing a gradient and without."""
    results = []
    for direct in (True, False):
        monkeypatch.setattr(rnn_ops._direct, "plain_eager", (lambda *a: True) if direct else (lambda *a: False))
        torch.manual_seed(7)
        cls = {"lstm_cell": fastnn.nn.LSTMCell, "gru_cell": fastnn.nn.GRUCell, "lstm": fastnn.nn.LSTM,
               "gru": fastnn.nn.GRU}[mode]
        m = cls(6, 10)
        x = torch.randn(5, 3, 6) if mode in ("lstm", "gru") else torch.randn(3, 6)
        x.requires_grad_()
        got = []
        for h_grad in (True, False):
            h = torch.randn(1, 3, 10) if mode in ("lstm", "gru") else torch.randn(3, 10)
            h.requires_grad_(h_grad)
            state = (h, torch.randn_like(h)) if mode.startswith("lstm") else h
            first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 (GRUCell: h alone)
            out = first(m(x, state))
            leaves = [x, *m.parameters()] + ([h] if h_grad else [])
            got += [out.detach(), *torch.autograd.grad(out.square().sum(), leaves)]
            with torch.no_grad():
                got.append(first(m(x, state)))
        results.append(got)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_direct_autograd_function_hands_setup_context_every_argument():
    """_direct.autograd_function (the direct path's Function, which calls the op's setup_context from its own
    forward) gives setup_context the inputs with the body's defaults filled in, as a custom op would, and runs
    the op's backward."""
    from fastnn.ops import _direct

    def body(x, scale=2.0, shift=0.5):
        return x * scale + shift

    def setup_context(ctx, inputs, output):
        assert len(inputs) == 3
        ctx.scale = inputs[1]

    def backward(ctx, grad):
        return grad * ctx.scale, None, None

    function = _direct.autograd_function(body, setup_context, backward)
    for args, scale, shift in (((), 2.0, 0.5), ((3.0,), 3.0, 0.5), ((3.0, -1.0), 3.0, -1.0)):
        x = torch.randn(5, requires_grad=True)
        y = function.apply(x, *args)
        assert torch.equal(y, x.detach() * scale + shift) and y.requires_grad
        y.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, scale))
    # an op body's parameters are the schema's, positional: anything else would be filled wrongly
    for odd in (lambda x, scale=2.0, *rest: x, lambda x, *, scale=2.0: x):
        with pytest.raises(TypeError, match="positional parameters only"):
            _direct.autograd_function(odd, setup_context, backward)


def test_backend_picks_remembered_only_while_they_cannot_change(monkeypatch):
    """_backend.pick remembers a C++ / CUDA pick only when it is the first preference: an earlier one that is
    unusable now (Triton, until its interpreter is switched on) may become usable later; a forced backend
    always wins."""
    from fastnn import _backend
    impls = {"triton": lambda: "triton", "cpp": lambda: "cpp", "reference": lambda: "reference"}
    cpu = torch.device("cpu")
    triton_usable = [False]
    real = _backend.unusable_reason
    monkeypatch.setattr(_backend, "unusable_reason",
                        lambda name, device: (None if triton_usable[0] else "off") if name == "triton"
                        else real(name, device))
    assert _backend.pick("pick_test", cpu, impls, ("triton", "cpp"))() == "cpp"
    triton_usable[0] = True
    assert _backend.pick("pick_test", cpu, impls, ("triton", "cpp"))() == "triton"
    assert _backend.pick("pick_test", cpu, impls, ("cpp",))() == "cpp"
    assert _backend.pick("pick_test", cpu, impls, ("cpp",))() == "cpp"  # remembered
    with _backend.use_backend("reference"):
        assert _backend.pick("pick_test", cpu, impls, ("cpp",))() == "reference"


def test_autocast_on_reads_every_device_type():
    """rnn_ops.autocast_on's shortcut (one C call for CPU and CUDA) must not hide autocast on another device
    type: torch's any-autocast flag does not cover them all."""
    for dev in ("cpu", "mps"):
        if not torch.amp.is_autocast_available(dev):
            continue
        before = torch.is_autocast_enabled(dev)
        try:
            torch.set_autocast_enabled(dev, True)
            assert rnn_ops.autocast_on(dev)
        finally:
            torch.set_autocast_enabled(dev, before)
        assert rnn_ops.autocast_on(dev) == before


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cell_plain_path_equals_the_validated_path(mode, dtype, monkeypatch):
    """A cell's common case skips _cell's full validation (rnn_ops._cell_plain): outputs and every gradient are
    bitwise those of the validated path, with and without biases and hx, in training and without grad; and
    the cases it leaves to _cell (unbatched input, mixed dtypes, wrong shapes) still get _cell's answers."""
    cell = rnn_ops.lstm_cell if mode == "lstm" else rnn_ops.gru_cell
    G = 4 if mode == "lstm" else 3
    torch.manual_seed(3)
    w = [torch.randn(G * 7, 5, dtype=dtype), torch.randn(G * 7, 7, dtype=dtype)]
    b = [torch.randn(G * 7, dtype=dtype), torch.randn(G * 7, dtype=dtype)]
    x = torch.randn(3, 5, dtype=dtype)
    hs = [torch.randn(3, 7, dtype=dtype) for _ in range(2 if mode == "lstm" else 1)]
    plain = rnn_ops._cell_plain
    taken = []
    monkeypatch.setattr(rnn_ops, "_cell_plain", lambda *a: taken.append(plain(*a)) or taken[-1])
    results = {}
    for validated in (False, True):
        if validated:
            monkeypatch.setattr(rnn_ops, "_cell_plain", lambda *a: None)
        got = []
        for bias in (True, False):
            for with_hx in (True, False):
                leaves = [t.clone().requires_grad_() for t in [x, *w, *(b if bias else []), *(hs if with_hx else [])]]
                xi, wi, wh = leaves[:3]
                bi, bh = leaves[3:5] if bias else (None, None)
                st = leaves[5 if bias else 3:]
                hx = (tuple(st) if mode == "lstm" else st[0]) if with_hx else None
                out = cell(xi, hx, wi, wh, bi, bh)
                outs = list(out) if mode == "lstm" else [out]
                got += [o.detach() for o in outs]
                got += torch.autograd.grad(sum((o * o).sum() for o in outs), leaves)
                with torch.no_grad():
                    again = cell(x, None if not with_hx else (tuple(hs) if mode == "lstm" else hs[0]), *w,
                                 *(b if bias else (None, None)))
                got += list(again) if mode == "lstm" else [again]
        results[validated] = got
    assert len(taken) == 8 and all(t is not None for t in taken)  # the plain path ran every call above
    for a, c in zip(results[False], results[True]):
        assert a.dtype == c.dtype and torch.equal(a, c)
    monkeypatch.setattr(rnn_ops, "_cell_plain", plain)
    assert plain(mode, x[0], None, *w, *b) is None  # unbatched: _cell's path
    unbatched = cell(x[0], None, *w, *b)
    want = cell(x[:1], None, *w, *b)
    for u, v in zip(unbatched if mode == "lstm" else [unbatched], want if mode == "lstm" else [want]):
        assert torch.equal(u, v[0])
    other = torch.float64 if dtype != torch.float64 else torch.float32
    expect_error(cell, (x.to(other), None, *w, *b), TypeError, "input has dtype")
    expect_error(cell, (x[:, :4], None, *w, *b), ValueError, r"input_size = 5")
    bad_h = (hs[0][:2], hs[-1][:2]) if mode == "lstm" else hs[0][:2]
    expect_error(cell, (x, bad_h, *w, *b), ValueError, r"must have shape \(3, 7\)")
    expect_error(cell, (x, None, None, w[1], *b), TypeError, "w_ih must be a torch.Tensor")
    expect_error(cell, (x, None, w[0], [1.0], *b), TypeError, "w_hh must be a torch.Tensor")
    expect_error(cell, (x.tolist(), None, *w, *b), TypeError, "input must be a torch.Tensor")


def test_cells_across_inference_fake_and_symbolic_tracing():
    """A cell call in one mode leaves nothing behind for the next: inference mode, then training; fake and
    symbolic tracing (a symbolic batch size), then eager; eager gives the same numbers throughout."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    x = torch.randn(5, 3)
    want = rnn_ops.lstm_cell(x, None, w_ih, w_hh)
    with torch.inference_mode():
        rnn_ops.lstm_cell(x, None, w_ih, w_hh)
    leaf = w_ih.clone().requires_grad_()
    rnn_ops.lstm_cell(x, None, leaf, w_hh)[0].sum().backward()
    assert leaf.grad is not None
    fresh = torch.randn(11, 3)  # a batch size first seen in inference mode (the plain path's batch_sizes cache)
    with torch.inference_mode():
        rnn_ops.lstm_cell(fresh, None, w_ih, w_hh)
    rnn_ops.lstm_cell(fresh, None, leaf, w_hh)[0].sum().backward()
    for mode in ("fake", "symbolic"):
        graph = str(make_fx(lambda *a: rnn_ops.lstm_cell(a[0], None, *a[1:]), tracing_mode=mode)(x, w_ih, w_hh).code)
        assert "fastnn.rnn_layer_forward" in graph
    got = rnn_ops.lstm_cell(x, None, w_ih, w_hh)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_empty_batch(mode):
    """An empty batch runs and backpropagates (zero parameter gradients, as torch.nn's); no time step is refused."""
    theirs, ours = pair(mode, torch.float32, input_size=3, hidden_size=4)
    x = torch.randn(5, 0, 3, requires_grad=True)
    got, want = ours(x), theirs(x)
    assert got[0].shape == want[0].shape
    for g, w in zip(hidden_states(mode, got[1]), hidden_states(mode, want[1])):
        assert g.shape == w.shape
    (got[0].sum() + sum(h.sum() for h in hidden_states(mode, got[1]))).backward()
    for p in ours.parameters():
        assert p.grad is not None and not p.grad.any()
    assert x.grad.shape == x.shape
    expect_error(ours, (torch.randn(0, 2, 3),), ValueError, r"at least one time step.*\(0, 2, 3\)")
    cell = OURS[mode + "_cell"](3, 4)
    out = cell(torch.randn(0, 3))
    (out[0] if mode == "lstm" else out).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in cell.parameters())


def test_initial_state_dtype_must_match_input():
    """Outside autocast, torch.nn refuses a state whose dtype differs from the input's: so does fastnn."""
    x = torch.randn(3, 2, 5)
    expect_error(fastnn.nn.LSTM(5, 6), (x, (torch.randn(1, 2, 6).half(), torch.randn(1, 2, 6))), TypeError,
                 r"hx\[0\] has dtype torch.float16 but the input has torch.float32")
    expect_error(fastnn.nn.GRU(5, 6), (x, torch.randn(1, 2, 6).double()), TypeError, r"hx has dtype torch.float64")
    expect_error(fastnn.nn.LSTMCell(5, 6), (x[0], (torch.randn(2, 6), torch.randn(2, 6).double())), TypeError,
                 r"hx\[1\] has dtype torch.float64")


@pytest.mark.parametrize("mode,kw", [("lstm", {}), ("lstm", {"proj_size": 3, "num_layers": 2}),
                                     ("gru", {"bidirectional": True}), ("lstm_cell", {}), ("gru_cell", {})])
def test_double_backward_matches_torch(mode, kw):
    """Gradients taken with create_graph=True are differentiable (through the reference's recompute) and give
    torch.nn's second derivatives."""
    theirs, ours = pair(mode, torch.float64, input_size=3, hidden_size=4, **kw)
    shape = (5, 2, 3) if mode in ("lstm", "gru") else (2, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    results = []
    for m in (ours, theirs):
        g, = torch.autograd.grad(first(m(x)).square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), [x, *m.parameters()]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_nonfinite_input_propagates():
    m = fastnn.nn.GRU(3, 4)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out = m(x)[0]
    assert torch.isnan(out[1:, 0]).all() and torch.isfinite(out[:, 1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("mode", ["lstm_cell", "gru_cell"])
def test_cells_of_no_hidden_units_are_empty_and_quiet(mode, capfd):
    """torch.nn's cells accept hidden_size 0: (B, 0) states, a backward that reaches the input. fastnn's give
    the same without calling a GEMM on empty weights (MKL printed an error for it)."""
    theirs, ours = pair(mode, torch.float32, input_size=5, hidden_size=0)
    for shape in ((3, 5), (5,)):
        x = torch.randn(shape, requires_grad=True)
        want, got = theirs(x), ours(x)
        for w, g in zip(*(o if isinstance(o, tuple) else (o,) for o in (want, got))):
            assert g.shape == w.shape and g.dtype == w.dtype
        (got[0] if isinstance(got, tuple) else got).sum().backward()
        torch.testing.assert_close(x.grad, torch.zeros_like(x), rtol=0, atol=0)
    out, err = capfd.readouterr()
    assert "ERROR" not in out + err


def test_bad_inputs_raise_what_torch_raises_too():
    """fastnn names the argument in its own ValueError / TypeError; each is also an instance of the class
    torch.nn raises for the same mistake (RuntimeError for sizes, ValueError / RuntimeError for dtypes), so
    code that catches torch's exceptions keeps working."""
    cases = [("lstm", lambda m: m(torch.randn(3, 2, 6))),
             ("lstm", lambda m: m(torch.randn(3, 2, 5), (torch.randn(1, 3, 4), torch.randn(1, 3, 4)))),
             ("gru", lambda m: m(torch.randn(3, 2, 5).double())),
             ("lstm_cell", lambda m: m(torch.randn(3, 6))),
             ("lstm_cell", lambda m: m(torch.randn(3, 5), (torch.randn(2, 4), torch.randn(2, 4)))),
             ("gru_cell", lambda m: m(torch.randn(3, 5).double()))]
    for mode, call in cases:
        theirs, ours = pair(mode, torch.float32, input_size=5, hidden_size=4)
        with pytest.raises(Exception) as torch_error:
            call(theirs)
        with pytest.raises(type(torch_error.value)) as ours_error:
            call(ours)
        assert isinstance(ours_error.value, (ValueError, TypeError)), (mode, ours_error.value)


@pytest.mark.parametrize("mode", ["lstm", "gru", "lstm_cell", "gru_cell"])
def test_jit_trace_passes_its_check(mode):
    """torch.jit.trace's default check traces again under no_grad: the layer op's recorded arguments must not
    depend on grad mode (they did: `train`), so tracing succeeds as for torch.nn's modules, and the traced
    module gives the eager outputs and gradients."""
    import warnings

    theirs, ours = pair(mode, torch.float32, input_size=4, hidden_size=5)
    x = torch.randn(3, 2, 4) if mode in ("lstm", "gru") else torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's warnings about shape-dependent Python branches)
        traced = torch.jit.trace(ours, (x,))
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    got, want = first(traced(x)), first(ours(x))
    assert torch.equal(got, want)
    g_traced = torch.autograd.grad(got.square().sum(), list(ours.parameters()))
    g_eager = torch.autograd.grad(want.square().sum(), list(ours.parameters()))
    for a, b in zip(g_traced, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the GPU path's own argument checks

def _fake_cuda_layer(mode, proj, B=3, I=5, H=8, rows=8):
    """Sizes, and a maker of fake CUDA tensors (sizes, dtype and device, no storage: no GPU needed), for one
    layer whose raw ops go to the GPU kernels. Tensors are made inside the returned FakeTensorMode."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    G = ref.gates_per_unit(mode)
    s = SimpleNamespace(G=G, H=H, P=proj or H, B=B, I=I, rows=rows, GH=G * H)
    e = lambda *shape, device="cuda", dtype=torch.float32: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
    return s, e, FakeTensorMode()


def _fake_cuda_args(mode, proj, s, e, backward):
    """Valid arguments of _forward_triton / _backward_triton (the GPU kernels' way in) as a dict in call order."""
    lstm = mode == "lstm"
    fwd = dict(x=e(s.rows, s.I), batch_sizes=torch.tensor([3, 3, 2]), w_ih=e(s.GH, s.I), w_hh=e(s.GH, s.P),
               b_ih=e(s.GH), b_hh=e(s.GH), w_hr=e(s.P, s.H) if proj else None, h0=e(s.B, s.P),
               c0=e(s.B, s.H) if lstm else None)
    if not backward:
        return dict(mode=mode, **fwd, reverse=False, train=True)
    return dict(mode=mode, dy=e(s.rows, s.P), dh_n=e(s.B, s.P), dc_n=e(s.B, s.H) if lstm else None, **fwd,
                y=e(s.rows, s.P), gates=e(s.rows, s.GH), aux=e(s.rows, s.H), r=e(s.rows, s.H) if proj else e(0),
                reverse=False, want_dx=True, want_dweights=True)


# id -> (layers it applies to, bad arguments from the sizes s and the fake-tensor maker e, error, message)
_GPU_BAD_FORWARD = {
    "mode": ("lstm gru proj", lambda s, e: {"mode": "rnn"}, ValueError,
             "mode must be one of ('lstm', 'gru'), got 'rnn'"),
    "x_3d": ("lstm gru proj", lambda s, e: {"x": e(s.rows, s.I, 1)}, ValueError, "x must be (rows, input_size)"),
    "x_strided": ("lstm gru", lambda s, e: {"x": e(s.I, s.rows).t()}, ValueError, "x must be contiguous"),
    "h0_scalar": ("lstm gru", lambda s, e: {"h0": e(())}, ValueError,
                  "x must be (rows, input_size), w_hh ({G} * hidden_size, P) and h0 (batch, P); got x ({rows}, {I}), "
                  "w_hh ({GH}, {P}), h0 ()"),
    "w_ih_rows": ("lstm gru proj", lambda s, e: {"w_ih": e(s.GH - 1, s.I)}, ValueError,
                  "w_ih must have shape ({GH}, {I}), got ({GH1}, {I})"),
    "w_ih_cols": ("lstm gru", lambda s, e: {"w_ih": e(s.GH, s.I + 1)}, ValueError,
                  "w_ih must have shape ({GH}, {I}), got ({GH}, {I1})"),
    "w_ih_strided": ("lstm gru", lambda s, e: {"w_ih": e(s.I, s.GH).t()}, ValueError, "w_ih must be contiguous"),
    "w_hh_rows": ("lstm gru", lambda s, e: {"w_hh": e(s.GH + 1, s.P)}, ValueError,
                  "w_hh must be ({G} * hidden_size, P), got ({GH1p}, {P})"),
    "w_hh_narrow": ("lstm gru", lambda s, e: {"w_hh": e(s.GH, s.H - 2), "h0": e(s.B, s.H - 2)}, ValueError,
                    "without w_hr, w_hh must have shape ({GH}, {H}), got ({GH}, {H2})"),
    "w_hh_strided": ("lstm gru proj", lambda s, e: {"w_hh": e(s.P, s.GH).t()}, ValueError, "w_hh must be contiguous"),
    "w_hh_dtype": ("lstm gru", lambda s, e: {"w_hh": e(s.GH, s.P, dtype=torch.bfloat16)}, TypeError,
                   "w_hh must have x's dtype torch.float32, got torch.bfloat16"),
    "b_ih_short": ("lstm gru proj", lambda s, e: {"b_ih": e(s.GH - 1)}, ValueError,
                   "b_ih must have shape ({GH},), got ({GH1},)"),
    "b_hh_long": ("lstm gru", lambda s, e: {"b_hh": e(s.GH + 2)}, ValueError, "b_hh must have shape ({GH},), got"),
    "b_ih_strided": ("lstm gru", lambda s, e: {"b_ih": e(2 * s.GH)[::2]}, ValueError, "b_ih must be contiguous"),
    "b_hh_expanded": ("lstm gru", lambda s, e: {"b_hh": e(1).expand(s.GH)}, ValueError, "b_hh must be contiguous"),
    "one_bias": ("lstm gru", lambda s, e: {"b_hh": None}, ValueError,
                 "b_ih and b_hh must be both given or both absent"),
    "b_ih_dtype": ("lstm gru", lambda s, e: {"b_ih": e(s.GH, dtype=torch.float64)}, TypeError,
                   "b_ih must have x's dtype torch.float32, got torch.float64"),
    "b_ih_device": ("lstm gru", lambda s, e: {"b_ih": e(s.GH, device="cpu")}, ValueError,
                    "b_ih is on cpu but x is on cuda:0; expected the same device"),
    "h0_width": ("lstm gru proj", lambda s, e: {"h0": e(s.B, s.P + 1)}, ValueError,
                 "h0 must have shape ({B}, {P}), got ({B}, {P1})"),
    "h0_strided": ("lstm gru proj", lambda s, e: {"h0": e(s.P, s.B).t()}, ValueError, "h0 must be contiguous"),
    "h0_dtype": ("gru", lambda s, e: {"h0": e(s.B, s.P, dtype=torch.float16)}, TypeError,
                 "h0 must have x's dtype torch.float32, got torch.float16"),
    "h0_device": ("gru", lambda s, e: {"h0": e(s.B, s.P, device="cuda:1")}, ValueError,
                  "h0 is on cuda:1 but x is on cuda:0"),
    "c0_missing": ("lstm proj", lambda s, e: {"c0": None}, ValueError, "the LSTM needs c0"),
    "c0_rows": ("lstm proj", lambda s, e: {"c0": e(s.B + 1, s.H)}, ValueError,
                "c0 must have shape ({B}, {H}), got ({B1}, {H})"),
    "c0_strided": ("lstm", lambda s, e: {"c0": e(s.H, s.B).t()}, ValueError, "c0 must be contiguous"),
    "c0_device": ("lstm", lambda s, e: {"c0": e(s.B, s.H, device="cuda:1")}, ValueError,
                  "c0 is on cuda:1 but x is on cuda:0"),
    "w_hr_shape": ("proj", lambda s, e: {"w_hr": e(s.P, s.H + 1)}, ValueError,
                   "w_hr must have shape ({P}, {H}), got ({P}, {H1})"),
    "w_hr_not_below": ("proj", lambda s, e: {"w_hh": e(s.GH, s.H), "h0": e(s.B, s.H), "w_hr": e(s.H, s.H)},
                       ValueError, "with w_hr, w_hh's second size P must be below hidden_size {H}"),
    "w_hr_dtype": ("proj", lambda s, e: {"w_hr": e(s.P, s.H, dtype=torch.float64)}, TypeError,
                   "w_hr must have x's dtype torch.float32, got torch.float64"),
}

_GPU_BAD_BACKWARD = {
    "w_ih_rows": ("lstm gru proj", lambda s, e: {"w_ih": e(s.GH - 1, s.I)}, ValueError,
                  "w_ih must have shape ({GH}, {I}), got ({GH1}, {I})"),
    "c0_strided": ("lstm", lambda s, e: {"c0": e(s.H, s.B).t()}, ValueError, "c0 must be contiguous"),
    "dy_shape": ("lstm gru proj", lambda s, e: {"dy": e(s.rows, s.P + 1)}, ValueError,
                 "dy must have shape ({rows}, {P}), got ({rows}, {P1})"),
    "dy_device": ("lstm gru", lambda s, e: {"dy": e(s.rows, s.P, device="cpu")}, ValueError,
                  "dy is on cpu but x is on cuda:0"),
    "y_rows": ("lstm gru", lambda s, e: {"y": e(s.rows - 1, s.P)}, ValueError,
               "y must have shape ({rows}, {P}), got"),
    "y_strided": ("lstm gru proj", lambda s, e: {"y": e(s.P, s.rows).t()}, ValueError, "y must be contiguous"),
    "dh_n_shape": ("lstm gru proj", lambda s, e: {"dh_n": e(s.B + 1, s.P)}, ValueError,
                   "dh_n must have shape ({B}, {P}), got ({B1}, {P})"),
    "dh_n_strided": ("lstm gru", lambda s, e: {"dh_n": e(s.P, s.B).t()}, ValueError, "dh_n must be contiguous"),
    "dh_n_dtype": ("gru", lambda s, e: {"dh_n": e(s.B, s.P, dtype=torch.bfloat16)}, TypeError,
                   "dh_n must have x's dtype torch.float32, got torch.bfloat16"),
    "dc_n_missing": ("lstm proj", lambda s, e: {"dc_n": None}, ValueError, "the LSTM needs dc_n"),
    "dc_n_shape": ("lstm proj", lambda s, e: {"dc_n": e(s.B, s.H - 1)}, ValueError,
                   "dc_n must have shape ({B}, {H}), got ({B}, {H_1})"),
    "dc_n_strided": ("lstm", lambda s, e: {"dc_n": e(s.H, s.B).t()}, ValueError, "dc_n must be contiguous"),
    "gates_numel": ("lstm gru proj", lambda s, e: {"gates": e(s.rows, s.GH - 1)}, ValueError,
                    "the workspace must hold gates ({rows}, {GH}) and aux ({rows}, {H}) elements"),
    "gates_strided": ("lstm gru", lambda s, e: {"gates": e(s.GH, s.rows).t()}, ValueError,
                      "gates must be contiguous"),
    "gates_dtype": ("lstm gru", lambda s, e: {"gates": e(s.rows, s.GH, dtype=torch.float16)}, TypeError,
                    "gates must have x's dtype torch.float32, got torch.float16"),
    "aux_numel": ("gru", lambda s, e: {"aux": e(s.rows, s.H + 1)}, ValueError, "the workspace must hold gates"),
    "aux_expanded": ("lstm gru", lambda s, e: {"aux": e(1, s.H).expand(s.rows, s.H)}, ValueError,
                     "aux must be contiguous"),
}

_GPU_LAYERS = {"lstm": ("lstm", 0), "gru": ("gru", 0), "proj": ("lstm", 3)}


def _gpu_bad_params(cases):
    return [(layer, case) for case, (layers, *_) in cases.items() for layer in layers.split()]


def _expect_gpu_refusal(who, cases, layer, case, backward):
    import re

    mode, proj = _GPU_LAYERS[layer]
    s, e, fake = _fake_cuda_layer(mode, proj)
    _, bad, error, message = cases[case]
    with fake:
        args = _fake_cuda_args(mode, proj, s, e, backward)
        args.update(bad(s, e))
    sizes = dict(G=s.G, H=s.H, P=s.P, B=s.B, I=s.I, rows=s.rows, GH=s.GH, GH1=s.GH - 1, GH1p=s.GH + 1, I1=s.I + 1,
                 H1=s.H + 1, H2=s.H - 2, H_1=s.H - 1, P1=s.P + 1, B1=s.B + 1)
    call = rnn_ops._backward_triton if backward else rnn_ops._forward_triton
    with pytest.raises(error, match="^" + re.escape(f"{who}: " + message.format(**sizes))):
        call(*args.values())


@pytest.mark.parametrize("layer,case", _gpu_bad_params(_GPU_BAD_FORWARD))
def test_gpu_path_refuses_bad_forward_arguments(layer, case):
    """The GPU kernels (Triton cells, persistent CUDA kernel) index raw pointers with the layer's extents, and their
    way in (rnn._forward_triton) is where a direct call of the raw op with CUDA tensors lands: each misshapen,
    strided, wrongly typed or misplaced argument is refused there, naming it and what was expected, before a
    kernel runs (fake CUDA tensors: checked without a GPU)."""
    _expect_gpu_refusal("rnn_layer_forward", _GPU_BAD_FORWARD, layer, case, backward=False)


@pytest.mark.parametrize("layer,case", _gpu_bad_params(_GPU_BAD_BACKWARD))
def test_gpu_path_refuses_bad_backward_arguments(layer, case):
    """As test_gpu_path_refuses_bad_forward_arguments for rnn._backward_triton: the gradients, the saved output and
    the workspace too."""
    _expect_gpu_refusal("rnn_layer_backward", _GPU_BAD_BACKWARD, layer, case, backward=True)


@pytest.mark.parametrize("layer", list(_GPU_LAYERS))
def test_gpu_path_checks_accept_what_the_kernels_take(layer):
    """The GPU path's checks refuse nothing the kernels take: the layer as the op layer passes it, a strided w_hr
    (it only enters torch.mm) and an aux of another dtype (the launchers convert it)."""
    mode, proj = _GPU_LAYERS[layer]
    s, e, fake = _fake_cuda_layer(mode, proj)
    with fake:
        f = _fake_cuda_args(mode, proj, s, e, backward=False)
        b = _fake_cuda_args(mode, proj, s, e, backward=True)
        if proj:
            f["w_hr"] = b["w_hr"] = e(s.H, s.P).t()
        b["aux"] = e(s.rows, s.H, dtype=torch.float16)
    tensors = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0")
    got = rnn_ops._check_kernel_layer("rnn_layer_forward", mode, *(f[k] for k in tensors))
    assert got == (s.rows, s.G, s.H, s.P, s.B)
    rnn_ops._check_kernel_backward(mode, b["dy"], b["dh_n"], b["dc_n"], *(b[k] for k in tensors), b["y"], b["gates"],
                                   b["aux"])


@pytest.mark.skipif(not TRITON, reason="needs the Triton interpreter (CPU tensors under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_triton_raw_ops_refuse_misshapen_or_strided_tensors(mode):
    """The raw ops on the Triton backend (the interpreter, on CPU tensors) refuse what the C++ kernel refuses, with
    the argument's name, before a cell runs: tensors the cells would read with the wrong extents or as dense when
    strided (each case here would otherwise run and give wrong numbers, or read past a tensor's end)."""
    import re

    a = _layer_args(mode, torch.float32, 0, [3, 3, 1], I=3, H=4, B=3)
    G, H, B = ref.gates_per_unit(mode), 4, 3
    rows = a["x"].shape[0]
    strided = lambda t: t.t().contiguous().t()  # noqa: E731 (same values, transposed strides)
    forward = lambda **kw: torch.ops.fastnn.rnn_layer_forward(mode, *{**a, **kw}.values(), False, True)  # noqa: E731
    bad = {"b_ih": (torch.randn(G * H - 1), f"b_ih must have shape ({G * H},), got ({G * H - 1},)"),
           "b_hh": (torch.randn(1).expand(G * H), "b_hh must be contiguous"),
           "h0": (strided(torch.randn(B, H)), "h0 must be contiguous")}
    if mode == "lstm":
        bad["c0"] = (torch.randn(B + 1, H), f"c0 must have shape ({B}, {H}), got ({B + 1}, {H})")
    with fastnn.use_backend("triton"):
        for name, (value, message) in bad.items():
            with pytest.raises(ValueError, match="^" + re.escape(f"rnn_layer_forward: {message}")):
                forward(**{name: value})
        y, h, c, gates, aux, r = forward()
        grads = dict(dy=torch.randn_like(y), dh_n=torch.randn_like(h),
                     dc_n=torch.randn_like(c) if mode == "lstm" else None)
        backward = lambda **kw: torch.ops.fastnn.rnn_layer_backward(  # noqa: E731
            mode, *{**grads, **{k: v for k, v in kw.items() if k in grads}}.values(),
            *{**a, **{k: v for k, v in kw.items() if k in a}}.values(), kw.get("y", y), kw.get("gates", gates),
            kw.get("aux", aux), r, False, True, True)
        for kw, message in (({"dy": torch.randn(rows, H + 1)},
                             f"dy must have shape ({rows}, {H}), got ({rows}, {H + 1})"),
                            ({"dh_n": strided(grads["dh_n"])}, "dh_n must be contiguous"),
                            ({"aux": strided(aux)}, "aux must be contiguous"),
                            ({"gates": torch.randn(rows, G * H - 1)}, "the workspace must hold gates")):
            with pytest.raises(ValueError, match="^" + re.escape(f"rnn_layer_backward: {message}")):
                backward(**kw)
        assert all(torch.isfinite(g).all() for g in backward())
