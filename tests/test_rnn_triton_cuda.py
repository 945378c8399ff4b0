"""Tier 5: the Triton LSTM / GRU layer (fastnn.kernels.rnn) on CUDA tensors at realistic sizes, forward and
backward against fastnn.reference.rnn.rnn_layer (float64 autograd on the GPU for the gradients), in fp32, fp16
and bf16. Every comparison uses DESIGN's tier-2 rule against the reference run in the same dtype on the GPU
(fp32 included: cuBLAS and torch's own tanh / sigmoid set the scale of the error there)."""
import pytest
import torch

from _rnn_cases import Case, check_against_reference, make_inputs, random_packed_lengths, run_launchers

pytestmark = pytest.mark.cuda


_lengths = random_packed_lengths


CASES = {
    "lstm_b64_t48_h512_packed": Case("lstm", _lengths(64, 48, 1), I=256, H=512),
    "lstm_b64_t48_h512_packed_reverse": Case("lstm", _lengths(64, 48, 2), I=256, H=512, reverse=True),
    "lstm_b128_t32_h1024": Case("lstm", (128,) * 32, I=512, H=1024),
    "lstm_proj_b32_t40_h640_p160_reverse": Case("lstm", _lengths(32, 40, 3), I=128, H=640, proj=160, reverse=True),
    "lstm_b16_t24_h300_nobias": Case("lstm", _lengths(16, 24, 4), I=100, H=300, bias=False),  # H % 256 != 0
    "gru_b64_t48_h384_packed": Case("gru", _lengths(64, 48, 5), I=256, H=384),
    "gru_b64_t48_h512_packed_reverse": Case("gru", _lengths(64, 48, 6), I=256, H=512, reverse=True),
    "gru_b1_t64_h200_nobias": Case("gru", (1,) * 64, I=50, H=200, bias=False),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference(name, dtype):
    check_against_reference(CASES[name], dtype, device="cuda", fp32_rtol=None, lowp_floor=1e-5)


@pytest.mark.parametrize("name", ["lstm_proj_b32_t40_h640_p160_reverse", "gru_b64_t48_h384_packed"])
def test_cuda_inference_forward_equals_training_forward(name):
    """train=False runs the same cell math as train=True (only the workspace stores differ): equal outputs up
    to the compiler's freedom between the two specialisations."""
    case = CASES[name]
    t = make_inputs(case)
    inf, _ = run_launchers(case, t, torch.float32, "cuda", train=False)
    full, _ = run_launchers(case, t, torch.float32, "cuda")
    for a, b in zip(inf[:3], full[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(v.numel() == 0 for v in inf[3:])
