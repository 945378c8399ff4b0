"""torch.compile(fullgraph=True) with shapes that change between calls: dynamic=True, and the default's
automatic dynamic shapes (a second shape recompiles with symbolic sizes). Each public op and module runs at
two shapes through one compiled function and must give the eager results, gradients included where the op
has them. Failures this caught: module float attributes (dropout, softcap) arriving as SymFloats that
math.isnan / isinf cannot trace; value-check messages that formatted a symbolic size; attention_decode's
host read of cache_seqlens. test_no_recompile_per_size counts the compiles over four sizes: a size formatted
into a message, a global filled in during the first trace, or a sort().diff() of a batch of 2 each made the graph
compile again. Also torch.export with dynamic dimensions, run at another shape: selective_scan's
chunk-state count, a dimension of its own once, was 1 at the example's L and bounded the exported L to 256."""
from collections import OrderedDict

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from fastnn import nn as fnn
from fastnn import ops


def _boxes(n):
    b = torch.rand(n, 4) * 50
    b[:, 2:] += b[:, :2]
    return b


def _rois(n, images=2):
    return torch.cat([torch.randint(0, images, (n, 1)).float(), _boxes(n) * 0.3], 1)


def _scan_args(b, length, groups=1):
    return (torch.randn(b, 4, length), torch.rand(b, 4, length), -torch.rand(4, 8),
            torch.randn(b, groups, 8, length), torch.randn(b, groups, 8, length), torch.randn(4),
            torch.randn(b, 4, length))


def _ssu_args(b, rows):
    return (torch.randn(rows, 4, 8), torch.randn(b, 4), torch.randn(b, 4), -torch.rand(4, 8), torch.randn(b, 8),
            torch.randn(b, 8), torch.randn(4))


_DETECTIONS = [(_boxes(4), torch.rand(4)) for _ in range(3)]


def _fixed_detector(images):
    """A stand-in detector for multiscale_detect: the same detections whatever the scale."""
    return [{"boxes": b, "scores": s, "labels": torch.zeros(4, dtype=torch.long)}
            for b, s in _DETECTIONS[:images.shape[0]]]


def _cases():
    """name -> (module or None, function, two argument tuples, whether to compare gradients)."""
    torch.manual_seed(0)
    lstm = fnn.LSTM(8, 16, num_layers=2, dropout=0.0)
    gru = fnn.GRU(8, 16, bidirectional=True, batch_first=True)
    lstm_proj = fnn.LSTM(8, 16, proj_size=4)
    ln_lstm = fnn.LayerNormLSTM(8, 16, zoneout=0.1).eval()
    cell, gcell = fnn.LSTMCell(8, 16), fnn.GRUCell(8, 16)
    mha = fnn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).eval()
    mamba = fnn.Mamba(32, d_state=8)
    fpn = fnn.FeaturePyramidNetwork([4, 8], 8, extra_blocks=fnn.LastLevelP6P7(8, 8))
    msra = fnn.MultiScaleRoIAlign(["a", "b"], 3, 2)
    sppf, spp = fnn.SPPF(4, 8).eval(), fnn.SPP()
    qkv = lambda *shape: tuple(torch.randn(*shape) for _ in range(3))  # noqa: E731
    return {
        "lstm": (lambda x: lstm(x)[0], (torch.randn(5, 3, 8),), (torch.randn(7, 4, 8),), True),
        "gru": (lambda x: gru(x)[0], (torch.randn(3, 5, 8),), (torch.randn(4, 7, 8),), True),
        "lstm_proj": (lambda x: lstm_proj(x)[1][0], (torch.randn(5, 3, 8),), (torch.randn(7, 4, 8),), False),
        "lstm_packed": (lambda p: lstm(p)[1][0],  # (pack_padded_sequence itself is skipped by dynamo)
                        (pack_padded_sequence(torch.randn(5, 3, 8), torch.tensor([5, 2, 4]), enforce_sorted=False),),
                        (pack_padded_sequence(torch.randn(7, 4, 8), torch.tensor([3, 7, 1, 6]), enforce_sorted=False),),
                        False),
        "layer_norm_lstm": (lambda x: ln_lstm(x)[0], (torch.randn(5, 3, 8),), (torch.randn(7, 4, 8),), True),
        "lstm_cell": (lambda x: cell(x)[1], (torch.randn(3, 8),), (torch.randn(5, 8),), True),
        "gru_cell": (gcell, (torch.randn(3, 8),), (torch.randn(5, 8),), True),
        "mha": (lambda x: mha(x, x, x)[0], (torch.randn(2, 5, 16),), (torch.randn(3, 7, 16),), True),
        "mha_no_weights": (lambda x: mha(x, x, x, need_weights=False)[0], (torch.randn(2, 5, 16),),
                           (torch.randn(3, 7, 16),), False),
        "sdpa": (lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, scale=0.3, is_causal=True),
                 qkv(2, 4, 8, 16), qkv(2, 4, 11, 16), True),
        "flash_softcap": (lambda q, k, v: ops.flash_attention(q, k, v, softcap=5.0, causal=True, window=(4, 0)),
                          qkv(2, 8, 4, 16), qkv(3, 11, 4, 16), True),
        "flash_varlen": (lambda q, k, v, cu: ops.flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                                 max_seqlen_q=7, max_seqlen_k=7, causal=True),
                         (*qkv(9, 4, 16), torch.tensor([0, 4, 9], dtype=torch.int32)),
                         (*qkv(13, 4, 16), torch.tensor([0, 3, 10, 13], dtype=torch.int32)), False),
        "attention_decode": (lambda q, k, v, n: ops.attention_decode(q, k, v, n, softcap=3.0),
                             (torch.randn(2, 1, 4, 16), *qkv(2, 12, 4, 16)[:2], torch.tensor([5, 12])),
                             (torch.randn(3, 1, 4, 16), *qkv(3, 20, 4, 16)[:2], torch.tensor([5, 9, 20])), False),
        "selective_scan": (lambda u, dt, A, B, C, D, z: ops.selective_scan_fn(u, dt, A, B, C, D, z,
                                                                               delta_softplus=True),
                           _scan_args(2, 9), _scan_args(3, 13), True),
        "selective_scan_cu_seqlens": (lambda u, dt, A, B, C, D, z, cu: ops.selective_scan_fn(u, dt, A, B, C, D, z,
                                                                                             cu_seqlens=cu),
                                      (*_scan_args(1, 9), torch.tensor([0, 4, 9])),
                                      (*_scan_args(1, 13), torch.tensor([0, 3, 10, 13])), False),
        "causal_conv1d": (lambda x, w, b: ops.causal_conv1d_fn(x, w, b, activation="silu"),
                          (torch.randn(2, 4, 9), torch.randn(4, 4), torch.randn(4)),
                          (torch.randn(3, 4, 13), torch.randn(4, 4), torch.randn(4)), True),
        "causal_conv1d_update": (lambda x, s, w, i: (ops.causal_conv1d_update(x, s := s.clone(), w, None, "silu",
                                                                              conv_state_indices=i), s),
                                 (torch.randn(2, 4), torch.randn(3, 4, 3), torch.randn(4, 4), torch.tensor([2, 0])),
                                 (torch.randn(3, 4), torch.randn(5, 4, 3), torch.randn(4, 4), torch.tensor([4, 1, 0])),
                                 False),
        "causal_conv1d_update_seqlens": (lambda x, s, w, n: ops.causal_conv1d_update(x, s.clone(), w,
                                                                                     cache_seqlens=n),
                                         (torch.randn(2, 4, 1), torch.randn(2, 4, 5), torch.randn(4, 4),
                                          torch.tensor([2, 7])),
                                         (torch.randn(3, 4, 1), torch.randn(3, 4, 6), torch.randn(4, 4),
                                          torch.tensor([4, 1, 0])), False),
        "selective_state_update": (lambda s, x, dt, A, B, C, D, i: (ops.selective_state_update(
                                       s := s.clone(), x, dt, A, B, C, D, dt_softplus=True, state_batch_indices=i), s),
                                   (*_ssu_args(2, 3), torch.tensor([2, 0])),
                                   (*_ssu_args(3, 5), torch.tensor([4, 1, 0])), False),
        "mamba": (mamba, (torch.randn(2, 9, 32),), (torch.randn(3, 13, 32),), True),
        "roi_align": (lambda f, r: ops.roi_align(f, r, (3, 3), 0.5, 2, True),
                      (torch.randn(2, 4, 16, 16), _rois(5)), (torch.randn(2, 4, 20, 18), _rois(9)), True),
        "roi_pool": (lambda f, r: ops.roi_pool(f, r, (3, 3), 0.5),
                     (torch.randn(2, 4, 16, 16), _rois(5)), (torch.randn(2, 4, 20, 18), _rois(9)), True),
        "multiscale_roi_align": (lambda a, b, r0, r1: msra(OrderedDict(a=a, b=b), [r0, r1], [(64, 64), (64, 64)]),
                                 (torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8), _boxes(3), _boxes(5)),
                                 (torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8), _boxes(4), _boxes(7)), True),
        "fpn": (lambda a, b: fpn(OrderedDict(a=a, b=b))["p6"],
                (torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8)),
                (torch.randn(2, 4, 20, 24), torch.randn(2, 8, 10, 12)), True),
        "sppf": (sppf, (torch.randn(2, 4, 12, 12),), (torch.randn(3, 4, 15, 17),), True),
        "spp": (spp, (torch.randn(2, 4, 12, 12),), (torch.randn(3, 4, 15, 17),), True),
        "box_iou": (ops.generalized_box_iou, (_boxes(5), _boxes(7)), (_boxes(9), _boxes(3)), True),
        "nms": (lambda b, s: ops.batched_nms(b, s, (s * 3).long(), 0.5), (_boxes(20), torch.rand(20)),
                (_boxes(31), torch.rand(31)), False),
        "soft_nms": (lambda b, s: ops.soft_nms(b, s, sigma=0.7, method="gaussian"), (_boxes(20), torch.rand(20)),
                     (_boxes(31), torch.rand(31)), False),
        "matrix_nms": (lambda b, s: ops.matrix_nms(b, s, sigma=2.0), (_boxes(10), torch.rand(10)),
                       (_boxes(17), torch.rand(17)), False),
        "detection_postprocess": (lambda b, s: ops.detection_postprocess(b, s, 0.3, 0.5, 10),
                                  (torch.stack([_boxes(40)] * 2), torch.rand(2, 40, 3)),
                                  (torch.stack([_boxes(57)] * 3), torch.rand(3, 57, 3)), False),
        "heatmap_peaks": (lambda h: ops.heatmap_peaks(h, 5), (torch.rand(2, 3, 16, 16),), (torch.rand(3, 3, 20, 18),),
                          False),
        # the scales as arguments: floats that dynamic=True makes symbolic (its check once called math.isfinite)
        "multiscale_detect": (lambda im, s0, s1: ops.multiscale_detect(_fixed_detector, im, (s0, s1)),
                              (torch.randn(2, 3, 32, 32), 0.5, 1.0), (torch.randn(2, 3, 40, 48), 0.75, 1.0), False),
        "decode_fcos": (lambda p, d: ops.decode_fcos(p, d, stride=8.0), (torch.rand(10, 2) * 50, torch.rand(10, 4)),
                        (torch.rand(13, 2) * 50, torch.rand(13, 4)), False),
        "decode_yolo": (lambda p: ops.decode_yolo(p, None, 8.0, 8), (torch.randn(2, 64, 4, 5),),
                        (torch.randn(1, 64, 6, 7),), False),
    }


CASES = _cases()


def _with_grad(args):
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


def _compare(fn, compiled, args, grad):
    want_args, got_args = (_with_grad(args), _with_grad(args)) if grad else (args, args)
    want, got = _flat(fn(*want_args)), _flat(compiled(*got_args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True)
    if grad:
        seeds = [torch.randn_like(w) for w in want if w.is_floating_point() and w.requires_grad]
        torch.autograd.backward([w for w in want if w.is_floating_point() and w.requires_grad], seeds)
        torch.autograd.backward([g for g in got if g.is_floating_point() and g.requires_grad], seeds)
        for a, b in zip(want_args, got_args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dynamic_shapes(name):
    """dynamic=True: one graph with symbolic sizes serves both shapes."""
    fn, first, second, grad = CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for args in (first, second):
        _compare(fn, compiled, args, grad)


@pytest.mark.parametrize("name", ["attention_decode", "causal_conv1d_update", "selective_state_update", "lstm",
                                  "selective_scan_cu_seqlens"])
def test_automatic_dynamic_recompile(name):
    """The default (dynamic=None): the second shape recompiles with symbolic sizes, the decode loop's case
    when its batch changes."""
    fn, first, second, grad = CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for args in (first, second):
        _compare(fn, compiled, args, grad)


def test_mamba_training_inductor():
    """Mamba's forward and backward through inductor, whose generated code asserts every custom op output's
    strides against the fake kernel's: causal_conv1d_backward's fake once copied x's transposed layout."""
    fn, first, _, _ = CASES["mamba"]
    torch._dynamo.reset()
    _compare(fn, torch.compile(fn, fullgraph=True), first, True)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_value_checks_raise(dynamic):
    """Value checks inside a compiled graph raise with the eager message's text (sizes named where symbolic)."""
    fn = CASES["attention_decode"][0]
    q, k, v, _ = CASES["attention_decode"][2]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    compiled(*CASES["attention_decode"][1])
    with pytest.raises(RuntimeError, match=r"cache_seqlens must be in \[0, "):
        compiled(q, k, v, torch.tensor([5, 21, 3]))
    fn = CASES["selective_state_update"][0]
    args = CASES["selective_state_update"][2]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    compiled(*CASES["selective_state_update"][1])
    with pytest.raises(RuntimeError, match=r"state_batch_indices must be in \[0, "):
        compiled(*args[:-1], torch.tensor([5, 1, 0]))


class _Wrapped(torch.nn.Module):
    def __init__(self, fn, modules):
        super().__init__()
        self.fn, self.held = fn, torch.nn.ModuleList(modules)

    def forward(self, *args):
        return self.fn(*args)


def _export_cases():
    torch.manual_seed(0)
    batch, steps = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("steps", min=2, max=4096)
    rois = torch.export.Dim("rois", min=2, max=4096)
    mamba, lstm = fnn.Mamba(32, d_state=8).eval(), fnn.LSTM(8, 16, num_layers=2).eval()
    mha, sppf = fnn.MultiheadAttention(16, 4, batch_first=True).eval(), fnn.SPPF(4, 8).eval()
    return {
        # L = 9 and 300: one chunk of saved states and two (the chunk count once bounded an exported L)
        "mamba": (mamba, [mamba], (torch.randn(2, 9, 32),), ({0: batch, 1: steps},), (torch.randn(3, 300, 32),)),
        "lstm": (lambda x: lstm(x)[0], [lstm], (torch.randn(5, 3, 8),), ({0: steps, 1: batch},),
                 (torch.randn(7, 4, 8),)),
        "mha": (lambda x: mha(x, x, x)[0], [mha], (torch.randn(2, 5, 16),), ({0: batch, 1: steps},),
                (torch.randn(3, 7, 16),)),
        "sppf": (sppf, [sppf], (torch.randn(2, 4, 12, 12),), ({0: batch},), (torch.randn(3, 4, 12, 12),)),
        "roi_align": (lambda f, r: ops.roi_align(f, r, (3, 3), 0.5, 2, True), [],
                      (torch.randn(2, 4, 16, 16), _rois(5)), (None, {0: rois}),
                      (torch.randn(2, 4, 16, 16), _rois(9))),
    }


EXPORT_CASES = _export_cases()


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_dynamic_shapes(name):
    """torch.export with dynamic dimensions: the exported program runs at another shape and matches eager."""
    fn, modules, example, dims, other = EXPORT_CASES[name]
    program = torch.export.export(_Wrapped(fn, modules), example, dynamic_shapes=(dims,))
    torch.testing.assert_close(program.module()(*other), fn(*other), rtol=1e-5, atol=1e-5)


def _at_size(name, n):
    """The arguments of case `name` at a size that grows with n = 0, 1, 2, 3 (batch, length or cache size)."""
    b, length = 2 + n, 9 + 4 * n
    if name == "selective_scan_cu_seqlens":
        return (*_scan_args(1, length), torch.tensor([0, length // 3, length]))
    if name == "attention_decode":
        cache = 12 + 4 * n
        return (torch.randn(b, 1, 4, 16), torch.randn(b, cache, 4, 16), torch.randn(b, cache, 4, 16),
                torch.randint(1, cache + 1, (b,)))
    # (no two sizes equal at the first call: dynamo would assume they always are)
    if name == "selective_state_update":
        return (*_ssu_args(b, b + 3), torch.randperm(b + 3)[:b])
    if name == "causal_conv1d_update":
        return (torch.randn(b, 4), torch.randn(b + 3, 4, 3), torch.randn(4, 4), torch.randperm(b + 3)[:b])
    if name == "lstm":
        return (torch.randn(length, b, 8),)
    assert name == "mamba"
    return (torch.randn(b, (9, 200, 300, 520)[n], 32),)  # one chunk of saved states, then two and three


@pytest.mark.parametrize("dynamic", [True, None])
@pytest.mark.parametrize("name", ["selective_scan_cu_seqlens", "attention_decode", "selective_state_update",
                                  "causal_conv1d_update", "lstm", "mamba"])
def test_no_recompile_per_size(name, dynamic):
    """No compile after the sizes have gone symbolic (the first call with dynamic=True, the second with the
    default): no check specialises the graph to a size (a size formatted into an assert's message once did, and
    a compiled decode loop recompiled at every new cache size until dynamo's recompile limit)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    fn = CASES[name][0]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    settled = None
    for n in range(4):
        _compare(fn, compiled, _at_size(name, n), False)
        if n == (0 if dynamic else 1):  # the default compiles again, with symbolic sizes, at the second size
            settled = counter.frame_count
    assert counter.frame_count == settled, f"{counter.frame_count - settled} compiles after the sizes went symbolic"
