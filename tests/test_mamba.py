"""fastnn.nn.Mamba: mamba_ssm.Mamba's parameters and initialisation, its forward against the plain-PyTorch
block (F.conv1d + the reference scan), gradients, decoding against the full forward, packed sequences."""
import math

import pytest
import torch

from fastnn.nn import InferenceParams, Mamba
from fastnn.reference import ssm as ref

from _tiers import cuda_param

MAMBA_KEYS = ["A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
              "dt_proj.bias", "out_proj.weight"]


def test_parameters_and_initialisation_match_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=8, d_conv=3, expand=2, dt_min=0.002, dt_max=0.05)
    sd = m.state_dict()
    assert sorted(sd) == sorted(MAMBA_KEYS)
    shapes = {"A_log": (128, 8), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 3),
              "conv1d.bias": (128,), "x_proj.weight": (4 + 16, 128), "dt_proj.weight": (128, 4),
              "dt_proj.bias": (128,), "out_proj.weight": (64, 128)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert m.dt_rank == math.ceil(64 / 16)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 9.0)).repeat(128, 1))
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32
    torch.testing.assert_close(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert Mamba(64, bias=True).in_proj.bias is not None and Mamba(64, conv_bias=False).conv1d.bias is None
    # a state_dict saved by another instance loads unchanged
    Mamba(64, d_state=8, d_conv=3).load_state_dict(sd)


def _block(d_model=32, dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(0)
    m = Mamba(d_model, device=device, dtype=dtype, layer_idx=0, **kw)
    with torch.no_grad():  # away from the initial values, so every parameter matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_match_reference_block(device, dtype):
    m = _block(dtype=dtype, device=device)
    x = torch.randn(2, 37, 32, device=device, dtype=dtype, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    dx = x.grad.clone()
    m64 = _block(dtype=torch.float64)
    m64.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_()
    want = ref.mamba_forward(m64, x64)
    want.backward(g.double().cpu())
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double().cpu(), want, **tol)
    scale = lambda t: t.abs().max().item()  # noqa: E731
    for n, p in m64.named_parameters():
        err = (grads[n].double().cpu() - p.grad).abs().max().item()
        assert err <= tol["atol"] * max(scale(p.grad), 1) * 4, f"d{n}: {err}"
    assert (dx.double().cpu() - x64.grad).abs().max().item() <= tol["atol"] * max(scale(x64.grad), 1) * 4


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
def test_decode_steps_match_full_forward(device):
    m = _block(device=device)
    B, L, prefill = 2, 12, 5
    x = torch.randn(B, L, 32, device=device)
    with torch.no_grad():
        full = m(x)
        params = InferenceParams(max_seqlen=L, max_batch_size=B)
        outs = [m(x[:, :prefill], inference_params=params)]
        params.seqlen_offset += prefill
        for t in range(prefill, L):
            outs.append(m(x[:, t:t + 1], inference_params=params))
            params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    # the cached states are the full forward's final states
    conv_state, ssm_state = params.key_value_memory_dict[0]
    assert conv_state.shape == (B, m.d_inner, m.d_conv) and ssm_state.shape == (B, m.d_inner, m.d_state)
    # allocate_inference_cache + step from scratch reproduces the forward too
    conv, ssm = m.allocate_inference_cache(B, L)
    with torch.no_grad():
        steps = [m.step(x[:, t:t + 1], conv, ssm)[0] for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm, ssm_state, rtol=1e-4, atol=1e-5)


def test_packed_sequences_match_separate_runs():
    m = _block()
    lens = [7, 1, 12, 4]
    xs = [torch.randn(1, n, 32) for n in lens]
    packed = torch.cat(xs, 1)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens))[None]
    with torch.no_grad():
        want = torch.cat([m(x) for x in xs], 1)
        torch.testing.assert_close(m(packed, cu_seqlens=cu), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(packed, seq_idx=seq_idx), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref.mamba_forward(m, packed, seq_idx=seq_idx), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="d_conv"):
        Mamba(16, d_conv=5)
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)
    m = Mamba(16)
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="layer_idx"):
        m(torch.randn(1, 3, 16), inference_params=InferenceParams(3, 1))
    with pytest.raises(ValueError, match="batch must be 1"):
        m(torch.randn(2, 3, 16), cu_seqlens=torch.tensor([0, 3]))
    for bad in ([0, 5, 3, 8], [1, 8], [2, 4, 8], [0, 4, 7]):
        with pytest.raises(ValueError, match="cu_seqlens must start at 0, increase strictly"):
            m(torch.randn(1, 8, 16), cu_seqlens=torch.tensor(bad, dtype=torch.int32))
    for kwargs, what in ((dict(dt_rank=0), "dt_rank"), (dict(dt_rank=-2), "dt_rank"), (dict(expand=0), "expand"),
                         (dict(expand=-1), "expand"), (dict(dt_min=-0.1), "dt_min"), (dict(dt_min=0.2), "dt_min"),
                         (dict(expand=float("nan")), "expand"), (dict(expand=float("inf")), "expand"),
                         (dict(dt_scale=float("nan")), "dt_scale"), (dict(dt_scale=-1.0), "dt_scale"),
                         (dict(dt_init_floor=float("nan")), "dt_init_floor")):
        with pytest.raises(ValueError, match=what):
            Mamba(16, **kwargs)
    with pytest.raises(ValueError, match="d_model"):
        Mamba(True)
    for kwargs, what in ((dict(d_state=True), "d_state"), (dict(d_conv=True), "d_conv")):
        with pytest.raises(ValueError, match=what):  # (a bool is an int to isinstance: was taken as 1)
            Mamba(16, **kwargs)


def test_numpy_numbers_construct_as_in_mamba_ssm():
    """mamba_ssm's constructor takes numpy integers and floats (plain arithmetic): so does fastnn's, with the
    same parameter shapes and, from the same seed, the same parameters as from Python numbers."""
    import numpy as np

    torch.manual_seed(0)
    want = Mamba(32, d_state=8, d_conv=3, expand=2, dt_rank=4, dt_min=0.002)
    torch.manual_seed(0)
    got = Mamba(np.int64(32), d_state=np.int32(8), d_conv=np.int64(3), expand=np.float64(2.0), dt_rank=np.int64(4),
                dt_min=np.float64(0.002), dt_scale=np.float32(1.0))
    for (n, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n
    assert Mamba(16, dt_scale=-1.0, dt_init="constant").dt_proj.weight.lt(0).all()  # mamba_ssm allows it
    # decoding: a cache filled for one batch refuses another (a prefill broadcast into every row before);
    # step names the state of the wrong shape
    layer = Mamba(16, layer_idx=0)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    with torch.no_grad():
        layer(torch.randn(2, 3, 16), inference_params=params)
        for batch in (1, 3):
            with pytest.raises(ValueError, match=rf"inference_params: layer 0's cache holds 2 sequences but "
                                                 rf"hidden_states has batch {batch}"):
                layer(torch.randn(batch, 3, 16), inference_params=params)
        conv, ssm = layer.allocate_inference_cache(2, 8)
        with pytest.raises(ValueError, match=r"ssm_state must be \(B, d_inner, d_state\) = \(2, 32, 16\); got \(2, 32, 5\)"):
            layer.step(torch.randn(2, 1, 16), conv, ssm[..., :5])
        with pytest.raises(ValueError, match=r"conv_state must be"):
            layer.step(torch.randn(1, 1, 16), conv, ssm)


def test_compiles_fullgraph():
    m = _block()
    x = torch.randn(2, 9, 32)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)  # packed sequences too
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: m(x, cu_seqlens=cu), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x[:1]), m(x[:1], cu_seqlens=cu), rtol=1e-5, atol=1e-5)
