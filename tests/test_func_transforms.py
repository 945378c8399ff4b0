"""torch.func transforms (grad, vjp, jacrev, vmap and their compositions) over fastnn's differentiable ops.

torch.library's custom ops refuse torch.func.grad (their generated autograd.Function has no setup_context:
pytorch/pytorch#168393), while torch.nn.LSTM, scaled_dot_product_attention and torchvision's box ops accept
it; fastnn/ops/_direct.py calls the ops through transformable Functions under a transform. Each case here is
checked against an independent result: torch's / torchvision's module or the plain reference under ordinary
autograd, or a Python loop for vmap.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch.func import functional_call, grad, jacrev, vjp, vmap

import fastnn
from fastnn import ops
from fastnn.reference import roi as roi_ref
from fastnn.reference import spp as spp_ref
from fastnn.reference import ssm as ssm_ref

F64 = torch.float64

pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _autograd(f, x):
    """d sum(f(x)^2) / dx by ordinary autograd."""
    x = x.detach().clone().requires_grad_()
    g, = torch.autograd.grad(f(x).square().sum(), x)
    return g


def _batch(x):
    return torch.stack([x, 0.7 * x + 0.1, x + 0.3])


def _boxes(n_images, k, size, generator):
    xy = torch.rand(k, 2, generator=generator, dtype=F64) * size * 0.6
    wh = torch.rand(k, 2, generator=generator, dtype=F64) * size * 0.4 + 1
    idx = torch.randint(0, n_images, (k, 1), generator=generator).to(F64)
    return torch.cat([idx, xy, xy + wh], 1)


def _cases():
    """(name, fastnn function of x, an independent function of x under ordinary autograd, x)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    feat, rois = rnd(2, 3, 12, 12), _boxes(2, 5, 12, g)
    cases = [
        ("roi_align", lambda f: ops.roi_align(f, rois, (3, 2), 0.9, 2, True),
         lambda f: torchvision.ops.roi_align(f, rois, (3, 2), 0.9, 2, True), feat),
        ("roi_align_adaptive", lambda f: ops.roi_align(f, rois, 3, 1.0, -1),
         lambda f: roi_ref.roi_align(f, rois, 3, 3, 1.0, -1), feat),
        ("roi_pool", lambda f: ops.roi_pool(f, rois, 3, 1.0), lambda f: torchvision.ops.roi_pool(f, rois, 3, 1.0),
         feat),
        ("spp_pool", lambda f: ops.spp_pool(f, (1, 2, 4)), lambda f: spp_ref.spp_pool(f, (1, 2, 4), "max"), feat),
        ("sppf_pool", lambda f: ops.sppf_pool(f, 5), lambda f: spp_ref.sppf_pool(f, 5), feat),
        ("fpn_topdown_add", lambda f: ops.fpn_topdown_add(f, f[:, :, ::2, ::2] * 2),
         lambda f: f + torch.nn.functional.interpolate(f[:, :, ::2, ::2] * 2, size=(12, 12), mode="nearest"), feat),
        ("generalized_box_iou", lambda b: ops.generalized_box_iou(b, 1.3 * b + 0.5),
         lambda b: torchvision.ops.generalized_box_iou(b, 1.3 * b + 0.5), rois[:, 1:]),
        ("box_iou", lambda b: ops.box_iou(b, b.flip(0) + 1), lambda b: torchvision.ops.box_iou(b, b.flip(0) + 1),
         rois[:, 1:]),
    ]
    q = rnd(2, 3, 5, 8)
    cases.append(("scaled_dot_product_attention",
                  lambda q: ops.scaled_dot_product_attention(q, 0.5 * q, q + 1, is_causal=True),
                  lambda q: torch.nn.functional.scaled_dot_product_attention(q, 0.5 * q, q + 1, is_causal=True), q))
    A, Bm, Cm, Dv = -torch.rand(4, 3, generator=g, dtype=F64) - 0.2, rnd(4, 3), rnd(4, 3), rnd(4)
    scan = lambda fn: lambda u: _first(fn(u, u.sin(), A, Bm, Cm, D=Dv, z=u.cos(), delta_softplus=True))  # noqa
    cases.append(("selective_scan_fn", scan(ops.selective_scan_fn), scan(ssm_ref.selective_scan), rnd(2, 4, 6)))
    w, b = rnd(4, 3), rnd(4)
    cases.append(("causal_conv1d_fn", lambda x: ops.causal_conv1d_fn(x, w, b, activation="silu"),
                  lambda x: _first(ssm_ref.causal_conv1d(x, w, b, activation="silu")), rnd(2, 4, 6)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,ours,theirs,x", CASES, ids=[c[0] for c in CASES])
def test_grad_vjp_vmap_of_ops(name, ours, theirs, x):
    """torch.func.grad and vjp give the independent function's autograd gradient; vmap and vmap(grad) give the
    loop over the batch."""
    want = _autograd(theirs, x)
    torch.testing.assert_close(grad(lambda x: ours(x).square().sum())(x), want, rtol=1e-10, atol=1e-12)
    out, pullback = vjp(ours, x)
    torch.testing.assert_close(pullback(2 * out)[0], want, rtol=1e-10, atol=1e-12)
    xs = _batch(x)
    torch.testing.assert_close(vmap(ours)(xs), torch.stack([ours(t) for t in xs]), rtol=0, atol=0)
    per_sample = vmap(grad(lambda x: ours(x).square().sum()))(xs)
    torch.testing.assert_close(per_sample, torch.stack([_autograd(theirs, t) for t in xs]), rtol=1e-10, atol=1e-12)


NO_SECOND_DERIVATIVE = [c for c in CASES if "box_iou" not in c[0]]


@pytest.mark.parametrize("name,ours,theirs,x", NO_SECOND_DERIVATIVE, ids=[c[0] for c in NO_SECOND_DERIVATIVE])
def test_grad_of_grad_raises_naming_the_op(name, ours, theirs, x):
    """These ops have no second derivative: torch.func's grad of a grad raises, naming the backward op (a
    gradient without history would have made it silently zero)."""
    inner = grad(lambda x: ours(x).square().sum())
    with pytest.raises(RuntimeError, match=r"fastnn::\w+_backward has no derivative"):
        grad(lambda x: inner(x).square().sum())(x)


def test_vmap_of_roi_align_over_boxes_and_levels():
    """roi_align takes its levels as a Tensor[], which functorch's own fallback refuses: fastnn's loop rule
    batches features and boxes, one level or several (MultiScaleRoIAlign)."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 2, 4, 16, 16, generator=g, dtype=F64)
    boxes = torch.stack([_boxes(2, 6, 16, g) for _ in range(3)])
    f = lambda x, b: ops.roi_align(x, b, 2, 0.5, 2)  # noqa: E731
    torch.testing.assert_close(vmap(f)(feats, boxes), torch.stack([f(x, b) for x, b in zip(feats, boxes)]),
                               rtol=0, atol=0)
    torch.testing.assert_close(vmap(f, in_dims=(None, 0))(feats[0], boxes),
                               torch.stack([f(feats[0], b) for b in boxes]), rtol=0, atol=0)
    pool = fastnn.nn.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    ms = lambda x: pool({"p2": x, "p3": x[:, :, ::2, ::2]}, [boxes[0, :3, 1:] * 4, boxes[0, 3:, 1:] * 4],  # noqa
                        [(64, 64), (64, 64)])
    torch.testing.assert_close(vmap(ms)(feats), torch.stack([ms(x) for x in feats]), rtol=0, atol=0)
    per_sample = vmap(grad(lambda x: ms(x).square().sum()))(feats)
    torch.testing.assert_close(per_sample, torch.stack([_autograd(ms, x) for x in feats]), rtol=1e-10, atol=1e-12)


def test_grad_of_channels_last_roi_align():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 5, 10, 10, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last)
    rois = _boxes(2, 4, 10, g)
    ours = grad(lambda f: ops.roi_align(f, rois, 3, 1.0, 2).square().sum())(feat)
    torch.testing.assert_close(ours, _autograd(lambda f: torchvision.ops.roi_align(f, rois, 3, 1.0, 2), feat),
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- recurrent layers: torch.nn as the reference

RNN_CASES = [("LSTM", dict(num_layers=2, bidirectional=True), (5, 2, 3)),
             ("LSTM", dict(proj_size=2), (5, 2, 3)),
             ("GRU", dict(batch_first=True), (2, 5, 3)),
             ("LSTMCell", {}, (2, 3)),
             ("GRUCell", {}, (2, 3))]


def _rnn_pair(name, kw):
    theirs = getattr(torch.nn, name)(3, 4, **kw).double()
    ours = getattr(fastnn.nn, name)(3, 4, **kw).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _loss(module):
    return lambda params, x: _first(functional_call(module, params, (x,))).square().sum()


@pytest.mark.parametrize("name,kw,shape", RNN_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RNN_CASES)])
def test_rnn_func_grad_and_grad_of_grad_match_torch(name, kw, shape):
    """torch.func.grad over the parameters and the input, and its grad again, equal torch.nn's (which supports
    both); the first derivative runs the kernels, the second the reference."""
    ours, theirs = _rnn_pair(name, kw)
    x = torch.randn(*shape, dtype=F64)
    results = []
    for m in (ours, theirs):
        params = {k: v.detach() for k, v in m.named_parameters()}
        first = grad(_loss(m), argnums=(0, 1))(params, x)
        second = grad(lambda p, x: sum(g.square().sum() for g in grad(_loss(m), argnums=(0, 1))(p, x)[0].values()),
                      argnums=1)(params, x)
        results.append((first, second))
    (f_ours, s_ours), (f_theirs, s_theirs) = results
    torch.testing.assert_close(f_ours, f_theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_ours, s_theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kw,shape", RNN_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RNN_CASES)])
def test_rnn_per_sample_gradients_match_torch_loop(name, kw, shape):
    """vmap(grad) over a batch of inputs (per-sample gradients, the DP-SGD pattern) equals torch.nn's ordinary
    autograd, one sample at a time (torch.nn's RNNs have no vmap rule)."""
    ours, theirs = _rnn_pair(name, kw)
    xs = torch.randn(3, *shape, dtype=F64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    got = vmap(grad(_loss(ours)), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        theirs.zero_grad()
        _first(theirs(x)).square().sum().backward()
        for k, p in theirs.named_parameters():
            torch.testing.assert_close(got[k][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kw,shape", RNN_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RNN_CASES)])
def test_rnn_differentiated_around_vmap_matches_torch(name, kw, shape):
    """Autograd outside a vmap (a loss over vmap(module), by .backward() and by torch.func.grad) and
    jacrev of jacrev: the vmapped backward reads its saved tensors with the batch dimensions that forward mode's
    save_for_forward also sets."""
    ours, theirs = _rnn_pair(name, kw)
    xs = torch.randn(3, *shape, dtype=F64)
    out = lambda m: lambda x: _first(m(x))  # noqa: E731
    want = _autograd(lambda x: torch.stack([out(theirs)(t) for t in x]), xs)
    torch.testing.assert_close(grad(lambda x: vmap(out(ours))(x).square().sum())(xs), want, rtol=1e-10, atol=1e-12)
    leaf = xs.clone().requires_grad_()
    vmap(out(ours))(leaf).square().sum().backward()
    torch.testing.assert_close(leaf.grad, want, rtol=1e-10, atol=1e-12)
    hessians = [jacrev(jacrev(lambda x: out(m)(x).square().sum()))(xs[0]) for m in (ours, theirs)]
    torch.testing.assert_close(*hessians, rtol=1e-10, atol=1e-12)


def test_dropout_and_zoneout_under_vmap_randomness():
    """Random masks under vmap: randomness="same" draws what a plain call draws after the same seed, "different"
    draws per entry (MultiheadAttention's dropout on both its paths, LayerNormLSTM's zoneout)."""
    mha = fastnn.nn.MultiheadAttention(8, 2, dropout=0.3, dtype=F64).train()
    lnlstm = fastnn.nn.LayerNormLSTM(3, 4, zoneout=0.3).double().train()
    s, x = torch.randn(4, 2, 8, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    for f, a in ((lambda s: mha(s, s, s)[0], s), (lambda s: mha(s, s, s, need_weights=False)[0], s),
                 (lambda x: lnlstm(x)[0], x)):
        torch.manual_seed(7)
        plain = f(a)
        torch.manual_seed(7)
        same = vmap(f, randomness="same")(torch.stack([a, a]))
        torch.testing.assert_close(same, torch.stack([plain, plain]), rtol=0, atol=0)
        different = vmap(f, randomness="different")(torch.stack([a, a]))
        assert (different[0] != different[1]).any()


def test_jacrev_of_cells_and_layer_norm_lstm():
    """jacrev (vmap over vjp) of the cells equals torch.nn's; of LayerNormLSTM, its reference's."""
    for name in ("LSTMCell", "GRUCell"):
        ours, theirs = _rnn_pair(name, {})
        x = torch.randn(2, 3, dtype=F64)
        torch.testing.assert_close(jacrev(lambda x: _first(ours(x)))(x), jacrev(lambda x: _first(theirs(x)))(x),
                                   rtol=1e-10, atol=1e-12)
    m = fastnn.nn.LayerNormLSTM(3, 4).double()
    x = torch.randn(4, 2, 3, dtype=F64)
    with fastnn.use_backend("reference"):
        want = torch.autograd.functional.jacobian(lambda x: m(x)[0], x)
    torch.testing.assert_close(jacrev(lambda x: m(x)[0])(x), want, rtol=1e-10, atol=1e-12)


def test_mamba_and_attention_modules_under_grad():
    """Whole modules: torch.func.grad over the parameters of fastnn.nn.Mamba and MultiheadAttention equals their
    ordinary autograd gradients."""
    torch.manual_seed(3)
    mamba, x = fastnn.nn.Mamba(8, d_state=4, dtype=F64), torch.randn(2, 5, 8, dtype=F64)
    attention, s = fastnn.nn.MultiheadAttention(8, 2, dtype=F64), torch.randn(3, 2, 8, dtype=F64)
    for m, args in ((mamba, (x,)), (attention, (s, s, s))):
        loss = lambda p: _first(functional_call(m, p, args)).square().sum()  # noqa: E731
        got = grad(loss)({k: v.detach() for k, v in m.named_parameters()})
        m.zero_grad()
        _first(m(*args)).square().sum().backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12)


def test_plain_calls_keep_the_custom_ops():
    """Outside a transform nothing changes: the transformable Functions are used only while a torch.func transform
    or a forward-AD level is active (plain autograd records the custom op's own backward), and torch.export still
    records fastnn's custom ops."""
    x = torch.randn(2, 3, 12, 12)
    rois = _boxes(2, 3, 12, torch.Generator().manual_seed(4)).float()
    plain = ops.roi_align(x.clone().requires_grad_(), rois, 3, 1.0, 2).grad_fn
    assert plain is not None and "transformable" not in type(plain).__name__
    with torch.autograd.forward_ad.dual_level():
        dual = ops.box_iou(torch.autograd.forward_ad.make_dual(rois[:, 1:], rois[:, 1:]).requires_grad_(), rois[:, 1:])
    assert "transformable" in type(dual.grad_fn).__name__
    ep = torch.export.export(fastnn.nn.RoIAlign(3, 1.0, 2), (x, rois))
    assert "fastnn.roi_align" in str(ep.graph)
    ep = torch.export.export(fastnn.nn.LSTM(3, 4), (torch.randn(5, 2, 3),))
    assert "fastnn.rnn_layer_forward" in ep.graph_module.print_readable(print_output=False)  # (in autocast's wrap)


@pytest.mark.parametrize("name,kw,shape", RNN_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RNN_CASES)])
def test_rnn_forward_mode_matches_torch(name, kw, shape):
    """Forward mode through the reference, as torch.nn's layers have it: torch.func.jvp, jacfwd, hessian
    (forward over reverse: the backward op's own jvp), and torch.autograd.forward_ad's dual tensors."""
    ours, theirs = _rnn_pair(name, kw)
    x = torch.randn(*shape, dtype=F64)
    v = torch.randn_like(x)
    results = []
    for m in (ours, theirs):
        params = {k: w.detach() for k, w in m.named_parameters()}
        out = lambda x: _first(m(x))  # noqa: E731
        with torch.autograd.forward_ad.dual_level():
            dual = _first(m(torch.autograd.forward_ad.make_dual(x, v)))
            tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
        results.append((torch.func.jvp(out, (x,), (v,))[1], torch.func.jacfwd(out)(x), tangent,
                        torch.func.hessian(_loss(m), argnums=1)(params, x)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_box_iou_forward_mode_and_second_derivatives_match_torchvision():
    """Forward mode and second derivatives of box_iou / generalized_box_iou, through the reference, equal
    torchvision's (torch ops): jvp, jacfwd, forward_ad, hessian, grad of grad, create_graph=True."""
    g = torch.Generator().manual_seed(5)
    b1, b2 = _boxes(1, 6, 10, g)[:, 1:], _boxes(1, 4, 10, g)[:, 1:]
    v = torch.randn(b1.shape, generator=g, dtype=F64)
    for ours, theirs in ((ops.box_iou, torchvision.ops.box_iou),
                         (ops.generalized_box_iou, torchvision.ops.generalized_box_iou)):
        torch.testing.assert_close(torch.func.jvp(lambda b: ours(b, b2), (b1,), (v,))[1],
                                   torch.func.jvp(lambda b: theirs(b, b2), (b1,), (v,))[1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.func.jacfwd(lambda b: ours(b, b2))(b1),
                                   torch.func.jacrev(lambda b: theirs(b, b2))(b1), rtol=1e-12, atol=1e-14)
        with torch.autograd.forward_ad.dual_level():
            dual = ours(torch.autograd.forward_ad.make_dual(b1, v), b2)
            tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
        torch.testing.assert_close(tangent, torch.func.jvp(lambda b: theirs(b, b2), (b1,), (v,))[1], rtol=1e-12,
                                   atol=1e-14)
        second = []
        for f in (ours, theirs):
            loss = lambda b, c: f(b, c).square().sum()  # noqa: E731
            leaves = (b1.clone().requires_grad_(), b2.clone().requires_grad_())
            g, = torch.autograd.grad(loss(*leaves), leaves[0], create_graph=True)
            second.append((torch.func.hessian(loss)(b1, b2), grad(lambda b: grad(loss)(b, b2).square().sum())(b1),
                           torch.autograd.grad(g.square().sum(), leaves)))
        torch.testing.assert_close(second[0], second[1], rtol=1e-12, atol=1e-14)


def test_forward_mode_is_refused_by_name():
    """Where fastnn has no forward mode, torch.func.jvp and torch.autograd.forward_ad raise naming the op
    and pointing to reverse mode. (torch.library's custom ops, and torchvision's roi_align, return no tangent
    there, silently; torch's CPU attention raises.)"""
    feat, rois = torch.randn(1, 2, 6, 6, dtype=F64), torch.tensor([[0, 1.0, 1, 4, 4]], dtype=F64)
    with pytest.raises(RuntimeError, match=r"fastnn::roi_align has no forward-mode derivative.*jacrev"):
        torch.func.jvp(lambda f: ops.roi_align(f, rois, 2), (feat,), (torch.ones_like(feat),))
    q = torch.randn(1, 2, 4, 8, dtype=F64)
    x, lnlstm = torch.randn(5, 2, 3, dtype=F64), fastnn.nn.LayerNormLSTM(3, 4).double()
    with torch.autograd.forward_ad.dual_level():
        for run, op in ((lambda: ops.roi_align(torch.autograd.forward_ad.make_dual(feat, feat), rois, 2),
                         "roi_align"),
                        (lambda: ops.scaled_dot_product_attention(*[torch.autograd.forward_ad.make_dual(q, q)] * 3),
                         "attention_forward"),
                        (lambda: lnlstm(torch.autograd.forward_ad.make_dual(x, x)), "layer_norm_lstm_layer_forward")):
            with pytest.raises(RuntimeError, match=f"fastnn::{op} has no forward-mode derivative"):
                run()
