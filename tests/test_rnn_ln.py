"""LayerNormLSTM with zoneout: the reference against an independent per-step formulation, the C++ layer kernel
and the Triton cells (under TRITON_INTERPRET=1 here; on CUDA in test_cuda_module_matches_reference) against
the reference (forward and every gradient), the module over packed / padded / unbatched input,
zoneout in training and evaluation, low precision, opcheck, gradcheck, torch.compile, bad inputs and
determinism."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastnn
from fastnn.ops import rnn_ln as ln_ops
from fastnn.reference import rnn as ref

from _tiers import (backends_under_test, check_compiles, check_fake_layout, expect_error, lowp_close, run_gradcheck,
                    run_opcheck)
from test_rnn import assert_rel_close

KERNELS = backends_under_test("cpu", ["reference", "cpp", "triton"])  # triton: under TRITON_INTERPRET=1
F64 = torch.float64


def random_weights(I, H, dtype=F64, bias=True, requires_grad=False, scale=0.4):
    """One layer's LayerNormLSTMWeights with gains and biases away from 1 and 0 (so their gradients matter)."""
    def t(*shape, base=0.0):
        return (base + scale * torch.randn(*shape, dtype=dtype)).requires_grad_(requires_grad)

    return ref.LayerNormLSTMWeights(t(4 * H, I), t(4 * H, H), t(4 * H) if bias else None, t(4 * H, base=1.0),
                                    t(4 * H), t(4 * H, base=1.0), t(4 * H), t(H, base=1.0), t(H))


def batch_sizes_of(lengths):
    return [sum(1 for v in lengths if v > t) for t in range(max(lengths))]


def module_weights(m):
    return m.layer_weights()


# ---------------------------------------------------------------- tier 1: the reference, independently

def test_reference_layer_norm_is_torchs():
    v = torch.randn(5, 12, dtype=F64) * 3 + 1
    w, b = torch.randn(12, dtype=F64), torch.randn(12, dtype=F64)
    torch.testing.assert_close(ref.layer_norm(v, w, b), F.layer_norm(v, (12,), w, b, eps=1e-5), rtol=1e-13, atol=1e-13)


def _independent_padded(x, lengths, w, h0, c0, keep, reverse):
    """The LayerNormLSTM on a padded (T, B, I) batch, written from the definition with F.layer_norm, one step
    at a time over every sequence, a finished sequence's state held by torch.where. reverse: each sequence is
    reversed within its length, run forward, and its outputs put back. keep: None, a float, or (T, B, H)."""
    T, B, _ = x.shape
    H = h0.shape[1]
    order = torch.stack([torch.tensor([(L - 1 - t if t < L else t) if reverse else t for t in range(T)])
                         for L in lengths], dim=1)  # (T, B): the source time of each step
    gather = lambda v: torch.stack([v[order[:, b], b] for b in range(B)], dim=1)  # noqa: E731
    xs = gather(x)
    ks = gather(keep) if isinstance(keep, torch.Tensor) else keep
    h, c, ys = h0, c0, []
    for t in range(T):
        gates = (F.layer_norm(xs[t] @ w.w_ih.T, (4 * H,), w.ln_ih_weight, w.ln_ih_bias, 1e-5)
                 + F.layer_norm(h @ w.w_hh.T, (4 * H,), w.ln_hh_weight, w.ln_hh_bias, 1e-5))
        if w.bias is not None:
            gates = gates + w.bias
        i, f, g, o = gates.split(H, dim=1)
        c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h_new = o.sigmoid() * F.layer_norm(c_new, (H,), w.ln_cell_weight, w.ln_cell_bias, 1e-5).tanh()
        if ks is not None:
            k = ks[t] if isinstance(ks, torch.Tensor) else ks
            h_new = k * h + (1 - k) * h_new
        live = torch.tensor([t < L for L in lengths]).unsqueeze(1)
        h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
        ys.append(h_new)
    y = torch.stack(ys)
    out = torch.zeros_like(y)
    for b in range(B):
        out[order[: lengths[b], b], b] = y[: lengths[b], b]
    return out, h, c


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zoneout", ["none", "mask", "eval"])
def test_reference_matches_independent_formulation(reverse, zoneout):
    T, B, I, H = 6, 4, 3, 5
    lengths = [6, 4, 4, 1]
    x = torch.randn(T, B, I, dtype=F64)
    w = random_weights(I, H)
    h0, c0 = torch.randn(B, H, dtype=F64), torch.randn(B, H, dtype=F64)
    mask = torch.bernoulli(torch.full((T, B, H), 0.4, dtype=F64))
    keep_pad = {"none": None, "mask": mask, "eval": 0.3}[zoneout]
    want_y, want_h, want_c = _independent_padded(x, lengths, w, h0, c0, keep_pad, reverse)
    packed, sizes = ref.pad_to_packed(x, lengths)
    keep = ref.pad_to_packed(mask, lengths)[0] if zoneout == "mask" else keep_pad
    y, h, c = ref.layer_norm_lstm_layer(packed, sizes, w, h0, c0, keep, reverse)
    torch.testing.assert_close(ref.packed_to_pad(y, sizes, T, B), want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, want_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, want_c, rtol=1e-12, atol=1e-12)


def test_reference_zoneout_keeping_every_unit_holds_h():
    """A mask of ones keeps h at h0 at every step while c still evolves."""
    w = random_weights(3, 5)
    x, sizes = ref.pad_to_packed(torch.randn(4, 2, 3, dtype=F64))
    h0, c0 = torch.randn(2, 5, dtype=F64), torch.zeros(2, 5, dtype=F64)
    y, h, c = ref.layer_norm_lstm_layer(x, sizes, w, h0, c0, torch.ones(8, 5, dtype=F64))
    assert torch.equal(h, h0) and torch.equal(y, h0.repeat(4, 1)) and c.abs().sum() > 0


# ---------------------------------------------------------------- tier 2: the layer kernel against the reference

def _layer_case(dtype, lengths, bias, zoneout, I=5, H=20, B=4):
    """Leaves of one layer (H = 20: a vector of 16 units and a scalar tail) and its zoneout arguments."""
    sizes = batch_sizes_of(lengths)
    rows = sum(sizes)
    w = random_weights(I, H, dtype, bias)
    leaves = dict(x=torch.randn(rows, I, dtype=dtype), h0=torch.randn(B, H, dtype=dtype),
                  c0=torch.randn(B, H, dtype=dtype), **w._asdict())
    mask = torch.bernoulli(torch.full((rows, H), 0.35, dtype=dtype)) if zoneout == "mask" else None
    z = 0.25 if zoneout == "eval" else 0.0
    return leaves, torch.tensor(sizes), mask, z


def _run_layer(leaves, sizes, mask, z, reverse, backend=None):
    w = ref.LayerNormLSTMWeights(*(leaves[k] for k in ref.LayerNormLSTMWeights._fields))
    if backend is None:  # the reference under autograd
        keep = mask if mask is not None else (z or None)
        return ref.layer_norm_lstm_layer(leaves["x"], sizes.tolist(), w, leaves["h0"], leaves["c0"], keep, reverse)
    with fastnn.use_backend(backend):
        return ln_ops._layer(leaves["x"], sizes, w, leaves["h0"], leaves["c0"], mask, z, reverse)


LAYER_CASES = [(rev, lengths, bias, zo) for rev in (False, True) for lengths in ([6, 6, 6, 6], [6, 4, 4, 1])
               for bias, zo in ((True, "none"), (False, "mask"), (True, "eval"), (True, "mask"))]


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse,lengths,bias,zoneout", LAYER_CASES)
def test_layer_kernel_matches_reference(backend, dtype, reverse, lengths, bias, zoneout):
    """Forward outputs and the gradients of x, every parameter, h0 and c0 against the float64 reference."""
    if backend == "triton" and dtype == F64:
        pytest.skip("the Triton cells are float32 (float64 runs the reference on CUDA)")
    _check_layer_against_reference(backend, dtype, reverse, *_layer_case(dtype, lengths, bias, zoneout))


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "reference"])
@pytest.mark.parametrize("reverse,lengths,bias,zoneout", [(True, [3, 2, 1], True, "mask"),
                                                          (False, [3, 3, 1], False, "none"),
                                                          (False, [2, 2], True, "eval")])
def test_layer_kernel_wide_rows(backend, reverse, lengths, bias, zoneout):
    """H = 600: the Triton cells walk a row in chunks of 512 units (4H = 2400: five chunks, the last partial),
    so the layer norms' sums and the read-backs span chunks; the C++ kernel likewise past its vector width."""
    case = _layer_case(torch.float32, lengths, bias, zoneout, I=4, H=600, B=len(lengths))
    _check_layer_against_reference(backend, torch.float32, reverse, *case)


def _check_layer_against_reference(backend, dtype, reverse, leaves, sizes, mask, z):
    mine = {k: (None if v is None else v.clone().requires_grad_()) for k, v in leaves.items()}
    want_leaves = {k: (None if v is None else v.double().requires_grad_()) for k, v in leaves.items()}
    got = _run_layer(mine, sizes, mask, z, reverse, backend)
    want = _run_layer(want_leaves, sizes, None if mask is None else mask.double(), z, reverse)
    cotangents = [torch.randn_like(t) for t in got]
    with fastnn.use_backend(backend):  # the backward op picks its backend when it runs
        torch.autograd.backward(got, cotangents)
    torch.autograd.backward(want, [g.double() for g in cotangents])
    for name, g, w in zip(("y", "h_n", "c_n"), got, want):
        assert_rel_close(g, w, dtype, name)
    for k, v in mine.items():
        if v is not None:
            assert_rel_close(v.grad, want_leaves[k].grad, dtype, f"grad of {k}")


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "reference"])
@pytest.mark.parametrize("zoneout", ["none", "eval"])
def test_inference_forward_equals_training_forward(backend, zoneout):
    """train=False gives the training forward's y, h_n, c_n (the same cell math, which keeps no workspace)
    and an empty workspace; H = 600 walks rows of several chunks in both."""
    leaves, sizes, _, z = _layer_case(torch.float32, [4, 3, 3, 1], True, zoneout, I=5, H=600)
    args = (leaves["x"], sizes, *(leaves[k] for k in ref.LayerNormLSTMWeights._fields), leaves["h0"], leaves["c0"],
            None, z, True)
    with fastnn.use_backend(backend):
        inference = torch.ops.fastnn.layer_norm_lstm_layer_forward(*args, False)
        training = torch.ops.fastnn.layer_norm_lstm_layer_forward(*args, True)
    for a, b in zip(inference[:3], training[:3]):
        assert torch.equal(a, b)
    assert all(t.numel() == 0 for t in inference[3:]) and all(t.numel() > 0 for t in training[3:])


def test_backward_only_what_is_asked():
    """With only x requiring grad the backward skips the weight gradients (and the result is the same)."""
    leaves, sizes, mask, z = _layer_case(F64, [3, 2], True, "mask", H=6, B=2)
    x = leaves["x"].clone().requires_grad_()
    dx = torch.autograd.grad(_run_layer(dict(leaves, x=x), sizes, mask, z, False, "cpp")[0].sum(), x)[0]
    x2 = leaves["x"].clone().requires_grad_()
    want = torch.autograd.grad(_run_layer(dict(leaves, x=x2), sizes, mask, z, False)[0].sum(), x2)[0]
    torch.testing.assert_close(dx, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the module

def _module_and_reference(m, x_packed, sizes, h0, c0, masks=None, z=None):
    return ref.layer_norm_lstm(x_packed, sizes, module_weights(m), h0, c0, m.num_layers, m.bidirectional,
                               zoneout_keep=masks if masks is not None else z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_packed_unsorted_matches_each_sequence_alone(dtype):
    """A PackedSequence with unsorted lengths, 2 layers, bidirectional, h0 / c0 given: outputs and final
    states equal running each sequence alone (unbatched); gradients equal the reference backend's."""
    m = fastnn.nn.LayerNormLSTM(5, 19, num_layers=2, bidirectional=True).to(dtype)
    for p in m.parameters():  # gains / biases away from 1 / 0
        p.data.add_(0.1 * torch.randn_like(p))
    lengths = torch.tensor([3, 7, 1, 5, 7])
    x = torch.randn(7, 5, 5, dtype=dtype)
    h0, c0 = torch.randn(4, 5, 19, dtype=dtype), torch.randn(4, 5, 19, dtype=dtype)
    out, (h_n, c_n) = m(pack_padded_sequence(x, lengths, enforce_sorted=False), (h0, c0))
    padded, out_lengths = pad_packed_sequence(out)
    assert torch.equal(out_lengths, lengths)
    for b, L in enumerate(lengths.tolist()):
        y_b, (h_b, c_b) = m(x[:L, b], (h0[:, b], c0[:, b]))
        assert_rel_close(padded[:L, b], y_b, dtype, f"output of sequence {b}")
        assert_rel_close(h_n[:, b], h_b, dtype, f"h_n of sequence {b}")
        assert_rel_close(c_n[:, b], c_b, dtype, f"c_n of sequence {b}")

    def grads(module, backend):
        t = next(module.parameters()).dtype
        xi, hi, ci = (v.to(t, copy=True).requires_grad_() for v in (x, h0, c0))
        with fastnn.use_backend(backend):  # the forward's backend; the backward follows its workspace
            out, (h_n, c_n) = module(pack_padded_sequence(xi, lengths, enforce_sorted=False), (hi, ci))
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64).to(t)).sum() for o in (out.data, h_n, c_n))
        loss.backward()
        return [xi.grad, hi.grad, ci.grad] + [p.grad for p in module.parameters()]

    m64 = copy.deepcopy(m).double()
    names = ["x", "h0", "c0"] + [n for n, _ in m.named_parameters()]
    for name, g, w in zip(names, grads(m, "cpp"), grads(m64, "reference")):
        assert_rel_close(g, w, dtype, f"grad of {name}")


@pytest.mark.parametrize("batch_first", [False, True])
def test_module_padded_hx_none_matches_reference(batch_first):
    m = fastnn.nn.LayerNormLSTM(4, 6, num_layers=2, batch_first=batch_first, bias=False).double()
    x = torch.randn(3, 5, 4, dtype=F64)  # (B, T, I) or (T, B, I)
    out, (h_n, c_n) = m(x)
    xt = x.transpose(0, 1) if batch_first else x
    packed, sizes = ref.pad_to_packed(xt)
    zeros = torch.zeros(2, xt.shape[1], 6, dtype=F64)
    y, h, c = _module_and_reference(m, packed, sizes, zeros, zeros)
    want = y.reshape(xt.shape[0], xt.shape[1], 6)
    torch.testing.assert_close(out, want.transpose(0, 1) if batch_first else want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_n, c, rtol=1e-12, atol=1e-12)


def test_zoneout_training_with_given_masks_and_evaluation():
    m = fastnn.nn.LayerNormLSTM(4, 6, num_layers=2, bidirectional=True, zoneout=0.3).double()
    x = torch.randn(5, 3, 4, dtype=F64)
    packed, sizes = ref.pad_to_packed(x)
    zeros = torch.zeros(4, 3, 6, dtype=F64)
    masks = [torch.bernoulli(torch.full((15, 6), 0.3, dtype=F64)) for _ in range(4)]
    out, (h_n, _) = fastnn.ops.layer_norm_lstm(x, None, module_weights(m), num_layers=2, bidirectional=True,
                                               zoneout=0.3, training=True, zoneout_masks=masks)
    y, h, _ = _module_and_reference(m, packed, sizes, zeros, zeros, masks=masks)
    torch.testing.assert_close(out.reshape(15, 12), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n, h, rtol=1e-12, atol=1e-12)
    m.eval()
    out_eval = m(x)[0]
    y_eval = _module_and_reference(m, packed, sizes, zeros, zeros, z=0.3)[0]
    torch.testing.assert_close(out_eval.reshape(15, 12), y_eval, rtol=1e-12, atol=1e-12)
    # training draws its own masks from torch's RNG: reproducible from a seed, different from evaluation
    m.train()
    torch.manual_seed(5)
    a = m(x)[0]
    torch.manual_seed(5)
    b = m(x)[0]
    assert torch.equal(a, b) and not torch.allclose(a, out_eval) and not torch.allclose(a, m(x)[0])


def test_zoneout_draws_bernoulli_z():
    """The drawn masks keep about z of the units: with one layer, input 0, all-zero weights and LN biases, h_new
    is tanh(0) * sigmoid(0) = 0, so h' = m h0 exposes the mask of step 0."""
    m = fastnn.nn.LayerNormLSTM(2, 64, zoneout=0.25).double()
    for p in m.parameters():
        p.data.zero_()
    h0 = torch.ones(1, 400, 64, dtype=F64)
    out = m(torch.zeros(1, 400, 2, dtype=F64), (h0, torch.zeros_like(h0)))[0]
    kept = out.mean().item()
    assert set(out.unique().tolist()) <= {0.0, 1.0} and abs(kept - 0.25) < 0.01, kept


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_one_holds_h0(training):
    """z = 1 (haste allows it): every unit keeps h0 at every step, in training and in evaluation, while c runs."""
    m = fastnn.nn.LayerNormLSTM(3, 5, zoneout=1.0).double().train(training)
    h0, c0 = torch.randn(1, 2, 5, dtype=F64), torch.randn(1, 2, 5, dtype=F64)
    out, (h_n, c_n) = m(torch.randn(4, 2, 3, dtype=F64), (h0, c0))
    torch.testing.assert_close(out, h0.expand(4, 2, 5), rtol=0, atol=0)
    torch.testing.assert_close(h_n, h0, rtol=0, atol=0)
    assert not torch.allclose(c_n, c0)


def test_unbatched_and_empty_batch():
    m = fastnn.nn.LayerNormLSTM(3, 4, num_layers=2).double()
    x = torch.randn(5, 3, dtype=F64)
    out, (h_n, c_n) = m(x)
    out_b, (h_b, c_b) = m(x.unsqueeze(1))
    assert out.shape == (5, 4) and h_n.shape == (2, 4)
    torch.testing.assert_close(out, out_b.squeeze(1), rtol=0, atol=0)
    torch.testing.assert_close(c_n, c_b.squeeze(1), rtol=0, atol=0)
    out, (h_n, c_n) = m(torch.randn(5, 0, 3, dtype=F64))
    assert out.shape == (5, 0, 4) and h_n.shape == (2, 0, 4) and c_n.shape == (2, 0, 4)
    (out.sum() + h_n.sum() + c_n.sum()).backward()  # zero gradients, as torch.nn's LSTM gives
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


def test_parameters_init_and_repr():
    m = fastnn.nn.LayerNormLSTM(5, 8, num_layers=2, bidirectional=True, zoneout=0.1)
    names = [n for n, _ in m.named_parameters()]
    per = ["weight_ih", "weight_hh", "bias", "ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
           "ln_cell_weight", "ln_cell_bias"]
    assert names == [f"{p}_l{k}{r}" for k in range(2) for r in ("", "_reverse") for p in per]
    assert m.weight_ih_l1.shape == (32, 16) and m.ln_cell_weight_l0_reverse.shape == (8,)
    assert m.weight_hh_l0.abs().max() <= 8 ** -0.5 and m.weight_hh_l0.std() > 0.1
    forget_one = torch.zeros(32)
    forget_one[8:16] = 1.0  # haste's forget_bias = 1 on the forget gate (i, f, g, o)
    assert torch.equal(m.ln_hh_weight_l1, torch.ones(32)) and torch.equal(m.bias_l1_reverse, forget_one)
    assert repr(m) == "LayerNormLSTM(5, 8, num_layers=2, bidirectional=True, zoneout=0.1)"
    m = fastnn.nn.LayerNormLSTM(5, 8, forget_bias=0.0)
    assert torch.equal(m.bias_l0, torch.zeros(32)) and torch.equal(m.ln_ih_bias_l0, torch.zeros(32))
    assert repr(m) == "LayerNormLSTM(5, 8, forget_bias=0.0)"
    assert [n for n, _ in fastnn.nn.LayerNormLSTM(5, 8, bias=False).named_parameters()][2] == "ln_ih_weight_l0"


# ---------------------------------------------------------------- low precision, determinism

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_in_float32(dtype):
    """fp16 / bf16 compute in float32: the error against float64 at most 2x the reference's own in the low
    precision (+ one rounding of the output)."""
    m = fastnn.nn.LayerNormLSTM(8, 24, num_layers=2).double()
    x = torch.randn(10, 3, 8, dtype=F64)
    want = m(x)[0]
    low = fastnn.nn.LayerNormLSTM(8, 24, num_layers=2).to(dtype)
    low.load_state_dict(m.state_dict())
    with fastnn.use_backend("reference"):
        theirs_low = low(x.to(dtype))[0]
    got = low(x.to(dtype))[0]
    assert got.dtype == dtype
    lowp_close(got, want, theirs_low, floor=torch.finfo(dtype).eps)


def test_autocast_cpu_runs_like_torchs_lstm():
    """Under CPU autocast the layer runs in the autocast dtype, as torch runs its LSTM (computed in float32)."""
    m = fastnn.nn.LayerNormLSTM(5, 6)
    x = torch.randn(4, 2, 5)
    want = m(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.03)


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "reference"])
def test_backward_is_deterministic(backend):
    m = fastnn.nn.LayerNormLSTM(16, 32, num_layers=2, bidirectional=True, zoneout=0.2)
    x = torch.randn(9, 5, 16)

    def grads():
        m.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same zoneout masks
        with fastnn.use_backend(backend):
            m(xi)[0].square().sum().backward()
        return [xi.grad] + [p.grad.clone() for p in m.parameters()]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_module_matches_reference(dtype):
    """The module on CUDA (the Triton cells): 2 layers, bidirectional, packed unsorted lengths, zoneout masks,
    H = 640 (two chunks of a row), forward and every gradient against float64 on the GPU; DESIGN's tier-2 rule
    against the reference run in the same dtype on the GPU."""
    from torch.nn.utils.rnn import PackedSequence
    gen = torch.Generator().manual_seed(0)
    m64 = fastnn.nn.LayerNormLSTM(96, 640, num_layers=2, bidirectional=True).double().cuda()
    for p in m64.parameters():
        p.data.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64).cuda())
    lengths = torch.randint(1, 41, (24,), generator=gen)
    x = torch.randn(40, 24, 96, generator=gen, dtype=F64).cuda()
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    rows = packed.data.shape[0]
    masks = [torch.bernoulli(torch.full((rows, 640), 0.15, dtype=F64)).cuda() for _ in range(4)]
    h0 = torch.randn(4, 24, 640, generator=gen, dtype=F64).cuda()
    c0 = torch.randn(4, 24, 640, generator=gen, dtype=F64).cuda()

    def run(module, t, backend):
        xs = PackedSequence(packed.data.to(t, copy=True).requires_grad_(), packed.batch_sizes,
                            packed.sorted_indices, packed.unsorted_indices)
        hi, ci = h0.to(t, copy=True).requires_grad_(), c0.to(t, copy=True).requires_grad_()
        with fastnn.use_backend(backend):
            out, (h_n, c_n) = fastnn.ops.layer_norm_lstm(xs, (hi, ci), module.layer_weights(), num_layers=2,
                                                         bidirectional=True, zoneout=0.15, training=True,
                                                         zoneout_masks=[mk.to(t) for mk in masks])
        g = torch.Generator(device="cuda").manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=F64, device="cuda")).sum()
                   for o in (out.data, h_n, c_n))
        loss.backward()
        return [out.data, h_n, c_n, xs.data.grad, hi.grad, ci.grad] + [p.grad for p in module.parameters()]

    low = copy.deepcopy(m64).to(dtype)
    low_ref = copy.deepcopy(m64).to(dtype)
    got = run(low, dtype, "triton")
    want = run(m64, F64, "reference")
    theirs = run(low_ref, dtype, "reference")
    names = ["y", "h_n", "c_n", "dx", "dh0", "dc0"] + [n for n, _ in m64.named_parameters()]
    for name, g, w, t in zip(names, got, want, theirs):
        assert g.dtype == dtype, name
        lowp_close(g, w, t, floor=1e-5, what=name)


# ---------------------------------------------------------------- opcheck, gradcheck, compile

def _op_args(dtype, train, zoneout, reverse, lengths=(3, 1), I=3, H=4, B=2):
    leaves, sizes, mask, z = _layer_case(dtype, list(lengths), True, zoneout, I=I, H=H, B=B)
    w = [leaves[k] for k in ref.LayerNormLSTMWeights._fields]
    return (leaves["x"], sizes, *w, leaves["h0"], leaves["c0"], mask, z, reverse, train)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_opcheck(backend):
    if backend not in fastnn.usable_backends("cpu"):
        pytest.skip(f"{backend} cannot run here")
    with fastnn.use_backend(backend):
        cases = [_op_args(torch.float32, True, "mask", False), _op_args(torch.float32, False, "eval", True)]
        # the C++ kernel reads every input as a dense array (the public function passes dense copies)
        run_opcheck(torch.ops.fastnn.layer_norm_lstm_layer_forward.default, cases, strided_inputs=backend != "cpp")
        args = _op_args(torch.float32, True, "mask", True)
        y, h, c, *ws = torch.ops.fastnn.layer_norm_lstm_layer_forward(*args)
        backward = (torch.randn_like(y), torch.randn_like(h), torch.randn_like(c), *args[:-2], y, *ws, args[-2], True,
                    True)
        if backend == "reference":
            # its backward is torch.func.vjp, whose wrapped tensors opcheck's modes cannot read ("Cannot access
            # storage of TensorWrapper"); gradcheck and the module tests cover its values
            check_fake_layout(torch.ops.fastnn.layer_norm_lstm_layer_backward.default, backward, {})
            return
        run_opcheck(torch.ops.fastnn.layer_norm_lstm_layer_backward.default, [backward], skip_autograd=True,
                    strided_inputs=backend != "cpp")


def test_gradcheck_float64():
    leaves, sizes, mask, z = _layer_case(F64, [3, 2, 2], True, "mask", I=3, H=4, B=3)
    names = [k for k, v in leaves.items() if v is not None]
    inputs = tuple(leaves[k].clone().requires_grad_() for k in names)

    def f(*xs):  # the op under the backend run_gradcheck forces
        a = dict(zip(names, xs))
        w = ref.LayerNormLSTMWeights(*(a.get(k) for k in ref.LayerNormLSTMWeights._fields))
        return ln_ops._layer(a["x"], sizes, w, a["h0"], a["c0"], mask, z, True)

    run_gradcheck(f, inputs, ["reference"] + [b for b in KERNELS if b not in ("reference", "triton")])  # float64


def test_compile_fullgraph_forward_and_backward():
    m = fastnn.nn.LayerNormLSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 6)

    def fwd(x):
        out, (h_n, c_n) = m(x)
        return out, h_n, c_n

    m.eval()
    check_compiles(fwd, (x,), backend="aot_eager")
    m.train()  # zoneout 0: training is deterministic; the compiled graph carries the custom op's autograd
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
    m.eval()  # a PackedSequence (unsorted lengths) compiles whole as well
    packed = pack_padded_sequence(torch.randn(4, 3, 6), [2, 4, 3], enforce_sorted=False)
    torch._dynamo.reset()
    got, want = torch.compile(m, fullgraph=True, backend="aot_eager")(packed), m(packed)
    torch.testing.assert_close(got[0].data, want[0].data)
    torch.testing.assert_close(got[1], want[1])


def test_double_backward_matches_reference():
    """create_graph=True gradients are differentiable: second derivatives equal the reference's (zoneout in
    evaluation, two layers, bidirectional)."""
    m = fastnn.nn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, zoneout=0.2).double().eval()
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    zeros = torch.zeros(4, 2, 4, dtype=F64)
    results = []
    for loss in (lambda: m(x)[0].square().sum(),  # the reference's torch ops under plain autograd:
                 lambda: _module_and_reference(m, ref.pad_to_packed(x)[0], [2] * 5, zeros, zeros, z=0.2)[0]
                 .square().sum()):
        g, = torch.autograd.grad(loss(), x, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), [x, *m.parameters()]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_argument():
    m = fastnn.nn.LayerNormLSTM(5, 6, num_layers=2)
    expect_error(m, (torch.randn(3, 2, 4),), ValueError, r"input.*input_size = 5.*\(3, 2, 4\)")
    expect_error(m, (torch.randn(3, 2, 5), (torch.randn(2, 2, 6), torch.randn(1, 2, 6))), ValueError,
                 r"hx\[1\] must have shape \(2, 2, 6\)")
    expect_error(m, (torch.randn(3, 2, 5), torch.randn(2, 2, 6)), ValueError, r"hx must be a tuple")
    expect_error(m, (torch.randn(3, 2, 5, dtype=F64),), TypeError, r"input has dtype torch.float64")
    w = m.layer_weights()
    lnlstm = lambda *a, **kw: fastnn.ops.layer_norm_lstm(*a, num_layers=2, **kw)  # noqa: E731
    x = torch.randn(3, 2, 5)
    expect_error(lnlstm, (x, None, w[:1]), ValueError, r"weights must hold num_layers \* directions = 2")
    bad = [w[0]._replace(ln_cell_weight=torch.ones(7)), w[1]]
    expect_error(lnlstm, (x, None, bad), ValueError, r"weights\[0\]\.ln_cell_weight must have shape \(6,\)")
    bad = [w[0]._replace(ln_ih_bias=None), w[1]]
    expect_error(lnlstm, (x, None, bad), ValueError, r"weights\[0\]\.ln_ih_bias must be a tensor")
    bad = [w[0]._replace(bias=w[0].bias.double()), w[1]]
    expect_error(lnlstm, (x, None, bad), TypeError, r"weights\[0\]\.bias has dtype torch.float64")
    expect_error(lnlstm, (x, None, [w[0], w[0]]), ValueError, r"weights\[1\]\.w_ih must have input size 6")
    expect_error(lambda: lnlstm(x, None, w, zoneout=1.5), (), ValueError, r"zoneout must be in \[0, 1\]")
    expect_error(lambda: lnlstm(x, None, w, training=True, zoneout_masks=[torch.ones(6, 6)]), (), ValueError,
                 r"zoneout_masks must hold .* 2 masks")
    expect_error(lambda: lnlstm(x, None, w, training=True, zoneout_masks=[torch.ones(5, 6)] * 2), (), ValueError,
                 r"zoneout_masks\[0\] must have shape \(6, 6\)")
    with pytest.raises(ValueError, match="zoneout must be in"):
        fastnn.nn.LayerNormLSTM(5, 6, zoneout=-0.1)
    with pytest.raises(TypeError, match="hidden_size should be of type int"):
        fastnn.nn.LayerNormLSTM(5, 6.0)
    with pytest.raises(ValueError, match="forget_bias must be a finite number"):
        fastnn.nn.LayerNormLSTM(5, 6, forget_bias=float("nan"))


def test_nonfinite_input_propagates():
    m = fastnn.nn.LayerNormLSTM(3, 4)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out = m(x)[0]
    assert torch.isnan(out[1:, 0]).all() and torch.isfinite(out[:, 1]).all() and torch.isfinite(out[0]).all()


def _raw_layer_forward(I, H, B):
    """A valid raw layer_norm_lstm_layer_forward call of 9 packed rows (batch_sizes 3, 3, 2, 1): its tensors by name,
    and the call with some of them replaced (forward(name=tensor))."""
    G4 = 4 * H
    f = dict(x=torch.randn(9, I), batch_sizes=torch.tensor([3, 3, 2, 1]), w_ih=torch.randn(G4, I),
             w_hh=torch.randn(G4, H), bias=torch.randn(G4), ln_ih_weight=torch.rand(G4), ln_ih_bias=torch.randn(G4),
             ln_hh_weight=torch.rand(G4), ln_hh_bias=torch.randn(G4), ln_cell_weight=torch.rand(H),
             ln_cell_bias=torch.randn(H), h0=torch.randn(B, H), c0=torch.randn(B, H), zoneout_mask=None)
    forward = lambda **kw: torch.ops.fastnn.layer_norm_lstm_layer_forward(  # noqa: E731
        *{**f, **kw}.values(), 0.0, False, True)
    return f, forward


def test_raw_ops_refuse_misshapen_or_strided_tensors():
    """A direct call of the raw ops (which skip the module's checks) with a misshapen or strided tensor is refused
    with its name: the C++ kernel reads every tensor as a dense array with the layer's extents (an empty ln
    weight segfaulted, a short dc_n corrupted the heap, a strided h0 gave wrong numbers)."""
    if "cpp" not in KERNELS:
        pytest.skip("the C++ backend is not under test")
    torch.manual_seed(0)
    I, H, B = 5, 8, 3
    G4 = 4 * H
    f, forward = _raw_layer_forward(I, H, B)
    strided = lambda t: t.t().contiguous().t()  # noqa: E731
    for name, value in (("ln_ih_weight", torch.rand(0)), ("ln_cell_bias", torch.rand(H - 1)),
                        ("w_ih", torch.randn(1, I)), ("bias", torch.randn(G4 + 1)), ("h0", strided(f["h0"])),
                        ("c0", torch.randn(B, H + 1)), ("zoneout_mask", torch.rand(9, H - 1))):
        with pytest.raises(RuntimeError, match=name):
            forward(**{name: value})
    y, h_n, c_n, *workspace = forward()
    grads = dict(dy=torch.randn_like(y), dh_n=torch.randn_like(h_n), dc_n=torch.randn_like(c_n))
    backward = lambda **kw: torch.ops.fastnn.layer_norm_lstm_layer_backward(  # noqa: E731
        *{**grads, **kw}.values(), *f.values(), 0.0, y, *workspace, False, True, True)
    for name, value in (("dc_n", torch.randn(1, 1)), ("dy", torch.randn(0)), ("dh_n", strided(grads["dh_n"]))):
        with pytest.raises(RuntimeError, match=name):
            backward(**{name: value})
    assert all(torch.isfinite(g).all() for g in backward())


# ---------------------------------------------------------------- the GPU path's own argument checks

_GPU_SIZES = dict(I=5, H=8, B=3, rows=8)


def _fake_cuda_ln_args(e, backward):
    """Valid arguments of ln_ops._forward_triton / _backward_triton (the Triton kernels' way in) as a dict in call
    order: fake CUDA tensors from e, batch_sizes a real CPU tensor."""
    I, H, B, rows = (_GPU_SIZES[k] for k in ("I", "H", "B", "rows"))
    G4 = 4 * H
    fwd = dict(x=e(rows, I), batch_sizes=torch.tensor([3, 3, 2]), w_ih=e(G4, I), w_hh=e(G4, H), bias=e(G4),
               ln_ih_weight=e(G4), ln_ih_bias=e(G4), ln_hh_weight=e(G4), ln_hh_bias=e(G4), ln_cell_weight=e(H),
               ln_cell_bias=e(H), h0=e(B, H), c0=e(B, H), zoneout_mask=e(rows, H), zoneout=0.0)
    if not backward:
        return dict(**fwd, reverse=False, train=True)
    return dict(dy=e(rows, H), dh_n=e(B, H), dc_n=e(B, H), **fwd, y=e(rows, H), gates=e(rows, G4), x_proj=e(rows, G4),
                h_proj=e(rows, G4), cells=e(rows, H), stats=e(rows, 6), reverse=False, want_dx=True,
                want_dweights=True)


def _fake_cuda_maker():
    from torch._subclasses.fake_tensor import FakeTensorMode

    e = lambda *shape, device="cuda", dtype=torch.float32: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
    return e, FakeTensorMode()


# id -> (bad arguments from the fake-tensor maker e, message); I 5, H 8 (4H 32), B 3, rows 8
_GPU_BAD_FORWARD = {
    "x_3d": (lambda e: {"x": e(8, 5, 1)}, "x must be (rows, input_size), w_hh (4 * hidden_size, hidden_size) and h0 "
                                          "(batch, hidden_size); got x (8, 5, 1), w_hh (32, 8), h0 (3, 8)"),
    "w_hh_not_4h_by_h": (lambda e: {"w_hh": e(32, 9)}, "x must be (rows, input_size), w_hh (4 * hidden_size, "
                                                       "hidden_size) and h0 (batch, hidden_size); got x (8, 5), w_hh "
                                                       "(32, 9), h0 (3, 8)"),
    "x_strided": (lambda e: {"x": e(5, 8).t()}, "x must be contiguous"),
    "w_ih_rows": (lambda e: {"w_ih": e(31, 5)}, "w_ih must have shape (32, 5), got (31, 5)"),
    "w_ih_strided": (lambda e: {"w_ih": e(5, 32).t()}, "w_ih must be contiguous"),
    "w_hh_strided": (lambda e: {"w_hh": e(8, 32).t()}, "w_hh must be contiguous"),
    "bias_short": (lambda e: {"bias": e(31)}, "bias must have shape (32,), got (31,)"),
    "bias_dtype": (lambda e: {"bias": e(32, dtype=torch.float64)},
                   "bias must have x's dtype torch.float32, got torch.float64"),
    "ln_ih_weight_empty": (lambda e: {"ln_ih_weight": e(0)}, "ln_ih_weight must have shape (32,), got (0,)"),
    "ln_ih_bias_strided": (lambda e: {"ln_ih_bias": e(64)[::2]}, "ln_ih_bias must be contiguous"),
    "ln_hh_weight_long": (lambda e: {"ln_hh_weight": e(33)}, "ln_hh_weight must have shape (32,), got (33,)"),
    "ln_hh_bias_device": (lambda e: {"ln_hh_bias": e(32, device="cpu")},
                          "ln_hh_bias is on cpu but x is on cuda:0; expected the same device"),
    "ln_cell_weight_short": (lambda e: {"ln_cell_weight": e(7)}, "ln_cell_weight must have shape (8,), got (7,)"),
    "ln_cell_bias_dtype": (lambda e: {"ln_cell_bias": e(8, dtype=torch.float64)},
                           "ln_cell_bias must have x's dtype torch.float32, got torch.float64"),
    "ln_cell_bias_expanded": (lambda e: {"ln_cell_bias": e(1).expand(8)}, "ln_cell_bias must be contiguous"),
    "h0_width": (lambda e: {"h0": e(3, 9)}, "h0 must have shape (3, 8), got (3, 9)"),
    "h0_strided": (lambda e: {"h0": e(8, 3).t()}, "h0 must be contiguous"),
    "c0_rows": (lambda e: {"c0": e(4, 8)}, "c0 must have shape (3, 8), got (4, 8)"),
    "c0_strided": (lambda e: {"c0": e(8, 3).t()}, "c0 must be contiguous"),
    "c0_device": (lambda e: {"c0": e(3, 8, device="cuda:1")}, "c0 is on cuda:1 but x is on cuda:0"),
    "zoneout_mask_shape": (lambda e: {"zoneout_mask": e(8, 7)}, "zoneout_mask must have shape (8, 8), got (8, 7)"),
    "zoneout_mask_strided": (lambda e: {"zoneout_mask": e(8, 8).t()}, "zoneout_mask must be contiguous"),
    "zoneout_mask_dtype": (lambda e: {"zoneout_mask": e(8, 8, dtype=torch.float64)},
                           "zoneout_mask must have x's dtype torch.float32, got torch.float64"),
}

_GPU_BAD_BACKWARD = {
    "ln_cell_weight_short": (lambda e: {"ln_cell_weight": e(7)}, "ln_cell_weight must have shape (8,), got (7,)"),
    "zoneout_mask_shape": (lambda e: {"zoneout_mask": e(7, 8)}, "zoneout_mask must have shape (8, 8), got (7, 8)"),
    "dy_empty": (lambda e: {"dy": e(0)}, "dy must have shape (8, 8), got (0,)"),
    "dy_dtype": (lambda e: {"dy": e(8, 8, dtype=torch.float64)}, "dy must have x's dtype torch.float32, got"),
    "dh_n_strided": (lambda e: {"dh_n": e(8, 3).t()}, "dh_n must be contiguous"),
    "dc_n_shape": (lambda e: {"dc_n": e(1, 1)}, "dc_n must have shape (3, 8), got (1, 1)"),
    "dc_n_device": (lambda e: {"dc_n": e(3, 8, device="cpu")}, "dc_n is on cpu but x is on cuda:0"),
    "y_shape": (lambda e: {"y": e(8, 9)}, "y must have shape (8, 8), got (8, 9)"),
    "gates_shape": (lambda e: {"gates": e(8, 31)}, "gates must have shape (8, 32), got (8, 31)"),
    "x_proj_strided": (lambda e: {"x_proj": e(32, 8).t()}, "x_proj must be contiguous"),
    "h_proj_dtype": (lambda e: {"h_proj": e(8, 32, dtype=torch.float64)},
                     "h_proj must have x's dtype torch.float32, got torch.float64"),
    "h_proj_inference": (lambda e: {"h_proj": e(3, 32)}, "h_proj must have shape (8, 32), got (3, 32)"),
    "cells_rows": (lambda e: {"cells": e(9, 8)}, "cells must have shape (8, 8), got (9, 8)"),
    "stats_shape": (lambda e: {"stats": e(8, 5)}, "stats must have shape (8, 6), got (8, 5)"),
    "stats_expanded": (lambda e: {"stats": e(1, 6).expand(8, 6)}, "stats must be contiguous"),
}


def _expect_gpu_refusal(who, cases, case, backward):
    import re

    e, fake = _fake_cuda_maker()
    bad, message = cases[case]
    with fake:
        args = _fake_cuda_ln_args(e, backward)
        args.update(bad(e))
    call = ln_ops._backward_triton if backward else ln_ops._forward_triton
    with pytest.raises((ValueError, TypeError), match="^" + re.escape(f"{who}: {message}")):
        call(*args.values())


@pytest.mark.parametrize("case", list(_GPU_BAD_FORWARD))
def test_gpu_path_refuses_bad_forward_arguments(case):
    """The Triton cells index raw pointers with the layer's extents, and their way in (rnn_ln._forward_triton) is where
    a direct call of the raw op with CUDA tensors lands: each misshapen, strided, wrongly typed or misplaced argument
    is refused there, naming it and what was expected, before a kernel runs (fake CUDA tensors: no GPU needed)."""
    _expect_gpu_refusal("layer_norm_lstm_layer_forward", _GPU_BAD_FORWARD, case, backward=False)


@pytest.mark.parametrize("case", list(_GPU_BAD_BACKWARD))
def test_gpu_path_refuses_bad_backward_arguments(case):
    """As test_gpu_path_refuses_bad_forward_arguments for rnn_ln._backward_triton: the gradients, the saved output and
    the workspace too (an inference forward's h_proj, a step's rows only, included)."""
    _expect_gpu_refusal("layer_norm_lstm_layer_backward", _GPU_BAD_BACKWARD, case, backward=True)


def test_gpu_path_checks_accept_what_the_kernels_take():
    """The GPU path's checks refuse nothing the kernels take: the layer as the op layer passes it, with or without
    bias and zoneout mask."""
    e, fake = _fake_cuda_maker()
    with fake:
        f = _fake_cuda_ln_args(e, backward=False)
        b = _fake_cuda_ln_args(e, backward=True)
    forward_tensors = list(f.values())[:14]
    assert ln_ops._check_kernel_layer("f", *forward_tensors) == (8, 8, 3)
    forward_tensors[4] = forward_tensors[13] = None  # bias, zoneout_mask
    assert ln_ops._check_kernel_layer("f", *forward_tensors) == (8, 8, 3)
    values = list(b.values())
    ln_ops._check_kernel_backward(*values[:17], *values[18:24])


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton interpreter (CPU tensors, TRITON_INTERPRET=1)")
def test_triton_raw_ops_refuse_misshapen_or_strided_tensors():
    """The raw ops on the Triton backend (the interpreter, on CPU tensors) refuse what the C++ kernel refuses, with the
    argument's name, before a cell runs (each case here would otherwise run and give wrong numbers, or be refused
    without its name)."""
    import re

    I, H, B = 5, 8, 3
    G4 = 4 * H
    f, forward = _raw_layer_forward(I, H, B)
    strided = lambda t: t.t().contiguous().t()  # noqa: E731
    who = "layer_norm_lstm_layer_forward"
    with fastnn.use_backend("triton"):
        for name, value, message in (
                ("ln_ih_weight", torch.rand(G4 + 1), f"ln_ih_weight must have shape ({G4},), got ({G4 + 1},)"),
                ("ln_cell_bias", torch.randn(H + 1), f"ln_cell_bias must have shape ({H},), got ({H + 1},)"),
                ("w_ih", torch.randn(G4 + 1, I), f"w_ih must have shape ({G4}, {I}), got ({G4 + 1}, {I})"),
                ("bias", torch.randn(G4 + 1), f"bias must have shape ({G4},), got ({G4 + 1},)"),
                ("h0", strided(f["h0"]), "h0 must be contiguous"),
                ("c0", torch.randn(B + 1, H), f"c0 must have shape ({B}, {H}), got ({B + 1}, {H})"),
                ("zoneout_mask", torch.rand(9, H + 1), f"zoneout_mask must have shape (9, {H}), got (9, {H + 1})")):
            with pytest.raises(ValueError, match="^" + re.escape(f"{who}: {message}")):
                forward(**{name: value})
        y, h_n, c_n, *workspace = forward()
        grads = dict(dy=torch.randn_like(y), dh_n=torch.randn_like(h_n), dc_n=torch.randn_like(c_n))
        backward = lambda **kw: torch.ops.fastnn.layer_norm_lstm_layer_backward(  # noqa: E731
            *{**grads, **kw}.values(), *f.values(), 0.0, y, *workspace, False, True, True)
        who = "layer_norm_lstm_layer_backward"
        for name, value, message in (
                ("dc_n", torch.randn(B + 1, H), f"dc_n must have shape ({B}, {H}), got ({B + 1}, {H})"),
                ("dy", torch.randn(9, H + 1), f"dy must have shape (9, {H}), got (9, {H + 1})"),
                ("dh_n", strided(grads["dh_n"]), "dh_n must be contiguous")):
            with pytest.raises(ValueError, match="^" + re.escape(f"{who}: {message}")):
                backward(**{name: value})
        assert all(torch.isfinite(g).all() for g in backward())
