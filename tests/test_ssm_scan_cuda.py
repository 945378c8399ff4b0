"""CUDA C++ selective scan (fastnn._C.selective_scan_forward_cuda / selective_scan_backward_cuda) against the
fp64 reference on the CPU (fastnn.reference.ssm.selective_scan and its autograd), with mamba's tolerances.
Every test needs a GPU (marked `cuda`); tests/test_ssm_scan_emu.py runs the same kernels on the CPU."""
from __future__ import annotations

import pytest
import torch

import fastnn
from _scan_cases import CHUNK, Case, assert_close, build, reference, tolerances

pytestmark = pytest.mark.cuda


def _C():
    C = getattr(fastnn, "_C", None)
    if C is None:
        import importlib
        C = importlib.import_module("fastnn._C")
    if not hasattr(C, "selective_scan_forward_cuda"):
        pytest.skip("fastnn._C was built without the CUDA kernels")
    return C


def run_cuda(c: Case):
    t = c.t
    C = _C()
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["bias"], c.softplus, t["init"],
            t["seq"], c.per_seq, CHUNK)
    out, last, chunks = C.selective_scan_forward_cuda(*args)
    grads = C.selective_scan_backward_cuda(t["dout"], t["dlast"], chunks, *args, c.deterministic)
    names = ["du", "ddelta", "dz", "dA", "dB", "dC", "dD", "dbias", "dinit"]
    got = {"out": out, "last": last, "chunks": chunks}
    got.update({k: v for k, v in zip(names, grads)})
    return got


def check(c: Case):
    build(c, "cuda")
    got = run_cuda(c)
    torch.cuda.synchronize()
    want = reference(c)
    tol = tolerances(c)
    assert got["out"].dtype == c.dtype and got["du"].dtype == c.dtype and got["ddelta"].dtype == c.dtype
    for k, present in (("dz", c.z), ("dD", c.D_skip), ("dbias", c.bias), ("dinit", c.init)):
        assert (got[k] is not None) == present, f"{k}: defined={got[k] is not None}, input given={present}"
    for k, ref in want.items():
        assert_close(k, got[k], ref, *tol[k])
    return got


# Coverage: dtypes x N (16, 64, 256) x L (1, 7, 2049) with B/C fixed and per step in groups, z, D,
# delta_bias + softplus, seq_idx (per row and per sequence), initial states, deterministic on and off.
# The reference's autograd costs O(B * D * N * L^2) (each step's slice gradient is a full-size tensor), so
# the long cases keep B * D * N at 64: a few seconds each on the CPU.
CASES = [
    Case(dtype=torch.float32, B=2, D=8, L=7, N=16, z=True, D_skip=True, bias=True, softplus=True, init=True),
    Case(dtype=torch.float32, B=1, D=4, L=2049, N=16, G=2, var_B=True, var_C=True, z=True, D_skip=True,
         bias=True, softplus=True, init=True, seq=True),
    Case(dtype=torch.float32, B=1, D=1, L=2049, N=64, var_B=True, var_C=True, deterministic=False),
    Case(dtype=torch.float32, B=1, D=4, L=1, N=256, var_B=True, var_C=True, init=True, D_skip=True),
    Case(dtype=torch.float32, B=1, D=1, L=300, N=256, var_C=True, z=True, init=True),
    Case(dtype=torch.float32, B=1, D=6, L=700, N=16, G=3, var_B=True, var_C=True, seq=True, per_seq=True,
         init=True, bias=True, softplus=True),
    Case(dtype=torch.float32, B=1, D=2, L=2049, N=16, var_B=True, seq=True, per_seq=True, z=True,
         init=True, deterministic=False),
    Case(dtype=torch.float16, B=1, D=4, L=2049, N=16, var_B=True, var_C=True, z=True, D_skip=True, bias=True,
         softplus=True),
    Case(dtype=torch.float16, B=2, D=4, L=7, N=64, G=2, var_B=True, var_C=True, init=True, seq=True),
    Case(dtype=torch.float16, B=1, D=4, L=1, N=16, z=True),
    Case(dtype=torch.bfloat16, B=1, D=4, L=2049, N=16, var_B=True, var_C=True, z=True, D_skip=True,
         bias=True, softplus=True, init=True, seq=True, deterministic=False),
    Case(dtype=torch.bfloat16, B=1, D=4, L=7, N=256, z=True, D_skip=True),
    Case(dtype=torch.bfloat16, B=1, D=2, L=300, N=64, G=2, var_B=True, var_C=True, seq=True, per_seq=True,
         init=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_scan_matches_reference(case):
    check(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_scan_deterministic_is_bitwise_repeatable(dtype):
    c = build(Case(dtype=dtype, B=2, D=16, L=2049, N=16, G=2, var_B=True, var_C=True, z=True, D_skip=True,
                   bias=True, softplus=True), "cuda")
    first = run_cuda(c)
    second = run_cuda(c)
    for k in ("dB", "dC", "dA", "dD", "dbias", "du", "ddelta", "dz"):
        assert torch.equal(first[k], second[k]), f"{k} differs between two deterministic runs"
    # the atomic path computes the same sums (in another order)
    c.deterministic = False
    third = run_cuda(c)
    rtol, atol = 1e-5, 1e-5
    for k in ("dB", "dC"):
        assert_close(k, third[k], first[k], rtol, atol)


def test_cuda_scan_rejects_bad_inputs():
    C = _C()
    u = torch.randn(1, 4, 8, device="cuda")
    A = -torch.rand(4, 16, device="cuda")
    Bm = torch.randn(4, 16, device="cuda")
    base = [u, u.clone(), A, Bm, Bm.clone(), None, None, None, False, None, None, False]
    with pytest.raises(RuntimeError, match="chunk_size"):
        C.selective_scan_forward_cuda(*base, 1024)
    with pytest.raises(RuntimeError, match="float64"):
        C.selective_scan_forward_cuda(u.double(), u.double(), *base[2:], CHUNK)
    A_big = -torch.rand(4, 257, device="cuda")
    with pytest.raises(RuntimeError, match="N must be"):
        C.selective_scan_forward_cuda(u, u.clone(), A_big, torch.randn(4, 257, device="cuda"),
                                      torch.randn(4, 257, device="cuda"), *base[5:], CHUNK)
