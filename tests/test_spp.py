"""Spatial pyramid pooling: spp_pool / SPP and sppf_pool / SPPF through the tiers of DESIGN.md section 5."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnn
from fastnn import ops
from fastnn.nn import SPP, SPPF
from fastnn.ops import spp as spp_ops
from fastnn.reference import spp as ref

from _tiers import (
    HAS_CUDA,
    backends_under_test,
    check_compiles,
    device_params,
    expect_error,
    lowp_close,
    run,
    run_gradcheck,
    run_opcheck,
)

BACKENDS = tuple(spp_ops._SPP_IMPLS)
LOWP = (torch.float16, torch.bfloat16)
INTERPRETED = not HAS_CUDA and "triton" in fastnn.usable_backends("cpu")
interpreter_tier = pytest.mark.skipif(not INTERPRETED, reason="interpreter tier")


def kernel_backends(device):
    """Backends checked on `device`; the Triton interpreter runs in its own small-shape tests."""
    return [b for b in backends_under_test(device, BACKENDS) if not (b == "triton" and device == "cpu")]


def grads(fn, x, grad):
    xr = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(xr), xr, grad)
    return g


def channels_last(x):
    y = x.contiguous(memory_format=torch.channels_last)
    assert not y.is_contiguous() or x.shape[1] == 1
    return y


def tied(shape, dtype=torch.float32, device="cpu"):
    """Few distinct values: every window has ties."""
    return torch.randint(0, 3, shape).to(dtype=dtype, device=device)


# ---------------------------------------------------------------- tier 1: reference vs independent formulations

@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_reference_sppf_equals_single_pools_of_growing_size(k):
    """Three chained k-pools = one pool each of size k, 2k-1, 3k-2 (-inf padding)."""
    x = torch.randn(2, 3, 11, 6, dtype=torch.float64)
    want = [x] + [F.max_pool2d(x, j * (k - 1) + 1, 1, j * (k // 2)) for j in (1, 2, 3)]
    assert torch.equal(ref.sppf_pool(x, k), torch.cat(want, 1))


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape,levels", [((2, 3, 13, 7), (1, 2, 4)), ((1, 2, 3, 3), (4,)), ((1, 2, 5, 9), (3, 6, 1))])
def test_reference_spp_equals_explicit_bins(shape, levels, mode):
    x = torch.randn(*shape, dtype=torch.float64)
    n, c, h, w = shape
    parts = []
    for lv in levels:
        lvl = torch.empty(n, c, lv, lv, dtype=torch.float64)
        for i in range(lv):
            for j in range(lv):
                h0, h1 = (i * h) // lv, -(-((i + 1) * h) // lv)   # floor(i*H/l), ceil((i+1)*H/l)
                w0, w1 = (j * w) // lv, -(-((j + 1) * w) // lv)
                win = x[:, :, h0:h1, w0:w1]
                lvl[:, :, i, j] = win.amax((2, 3)) if mode == "max" else win.mean((2, 3))
        parts.append(lvl.reshape(n, -1))
    torch.testing.assert_close(ref.spp_pool(x, levels, mode), torch.cat(parts, 1), rtol=1e-14, atol=1e-14)
    assert ref.adaptive_bins(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]


# ---------------------------------------------------------------- tiers 2, 5: kernels vs reference

SPPF_SHAPES = [((2, 5, 13, 7), 5), ((1, 3, 20, 20), 5), ((2, 4, 3, 3), 5), ((1, 2, 1, 1), 5), ((2, 3, 6, 9), 3),
               ((1, 2, 10, 4), 9), ((1, 17, 9, 8), 5), ((1, 40, 5, 6), 7)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_sppf_matches_reference(device, dtype, layout):
    for shape, k in SPPF_SHAPES:
        x = torch.randn(*shape, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.randn(shape[0], shape[1] * 2, shape[2], shape[3] + 3, dtype=dtype, device=device)[:, ::2, :, 1:-2]
        want = ref.sppf_pool(x, k)
        grad = torch.randn_like(want)
        gwant = grads(lambda t: ref.sppf_pool(t, k), x, grad)
        for backend in kernel_backends(device):
            got = run(backend, ops.sppf_pool, x, k)
            assert torch.equal(got, want), f"{backend} {shape} k={k} {layout}"   # max is exact
            fmt = torch.channels_last if spp_ops.is_channels_last(x) else torch.contiguous_format
            assert spp_ops.is_channels_last(x) == (layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1)
            assert got.is_contiguous(memory_format=fmt)   # the output keeps the input's layout
            g = run(backend, lambda t: grads(lambda u: ops.sppf_pool(u, k), t, grad), x)
            # same additions in the same order as torch's chain
            torch.testing.assert_close(g, gwant, rtol=0, atol=0, msg=lambda m: f"{backend} {shape} {layout}: {m}")
            assert g.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sppf_gradient_ties_follow_torch_chain(device, layout):
    """With ties in every window, gradients land exactly where torch's max_pool2d chain puts them."""
    for shape, k in SPPF_SHAPES[:6]:
        x = tied(shape, torch.float64, device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x[..., 0, 0] = float("-inf")    # and an -inf corner
        grad = torch.randn(shape[0], 4 * shape[1], *shape[2:], dtype=torch.float64, device=device)
        want = grads(lambda t: ref.sppf_pool(t, k), x, grad)
        for backend in kernel_backends(device):
            got = run(backend, lambda t: grads(lambda u: ops.sppf_pool(u, k), t, grad), x)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{backend} {shape}: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sppf_every_radius_signed_zeros_and_nan_blocks(device, layout):
    """Each window radius the C++ kernel specialises (1-4) and the any-radius path (k = 11, 13), with
    windows tied between -0.0 and +0.0 (torch keeps the first: the sign must match, not just the value) and
    one plane / channel block holding a NaN (the kernel's NaN-aware variant) beside NaN-free ones, and an
    -inf region with windows of nothing else."""
    torch.manual_seed(3)
    for k in (1, 3, 5, 7, 9, 11, 13):
        shape = (2, 20, 9, 14)   # 20 channels: a full 16-lane block and a partial one when channels_last
        x = torch.randint(-1, 2, shape).to(torch.float64) * 0.0   # -0.0 / +0.0 mixed
        x = torch.where(torch.rand(shape) < 0.3, torch.randint(0, 3, shape).double(), x).to(device=device)
        x[1, 3, 4, 5] = float("nan")
        x[0, 5, :6, 2:9] = float("-inf")   # windows that are all -inf: torch picks their first element
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        want = ref.sppf_pool(x, k)
        grad = torch.randn_like(want)
        gwant = grads(lambda t: ref.sppf_pool(t, k), x, grad)
        for backend in kernel_backends(device):
            got = run(backend, ops.sppf_pool, x, k)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{backend} k={k}: {m}")
            assert torch.equal(torch.signbit(got), torch.signbit(want)), f"{backend} k={k}: the sign of a zero differs"
            g = run(backend, lambda t: grads(lambda u: ops.sppf_pool(u, k), t, grad), x)
            torch.testing.assert_close(g, gwant, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{backend} k={k}: {m}")


@pytest.mark.parametrize("device", device_params())
def test_sppf_k_beyond_the_plane(device):
    """k larger than the plane (2 max(H, W) - 1 already reaches every pixel from every pixel) pools and
    routes exactly as torch's chain does; the op then runs the smallest such k, so an absurd k (2^40 + 1,
    beyond int64's range too) costs no scratch memory and needs no int64."""
    torch.manual_seed(5)
    shape = (2, 5, 4, 7)
    x = torch.randint(0, 3, shape).to(torch.float64).to(device)   # ties everywhere
    x[1, 2, 3, 1] = float("nan")
    grad = torch.randn(2, 20, 4, 7, dtype=torch.float64, device=device)
    want = ref.sppf_pool(x, 21)
    gwant = grads(lambda t: ref.sppf_pool(t, 21), x, grad)
    for backend in kernel_backends(device):
        for k in (13, 19, 21, 2 ** 40 + 1, 2 ** 64 + 1):
            got = run(backend, ops.sppf_pool, x, k)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{backend} k={k}: {m}")
            g = run(backend, lambda t: grads(lambda u: ops.sppf_pool(u, k), t, grad), x)
            torch.testing.assert_close(g, gwant, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{backend} k={k}: {m}")


@pytest.mark.parametrize("device", device_params())
def test_sppf_nan_and_inf(device):
    x = torch.randn(2, 3, 9, 8, device=device)
    x[0, 0, 4, 4] = float("nan")
    x[1, 2, 0, :] = float("-inf")
    x[1, 1, 3, 3] = float("inf")
    want = ref.sppf_pool(x, 5)
    for backend in kernel_backends(device):
        got = run(backend, ops.sppf_pool, x, 5)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        for layout in (torch.channels_last,):
            got = run(backend, ops.sppf_pool, x.contiguous(memory_format=layout), 5)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", LOWP)
def test_sppf_low_precision(device, dtype):
    x = torch.randn(2, 6, 11, 10, device=device).to(dtype)
    grad = torch.randn(2, 24, 11, 10, device=device).to(dtype)
    want = ref.sppf_pool(x.double(), 5)
    g64 = grads(lambda t: ref.sppf_pool(t, 5), x.double(), grad.double())
    glow = grads(lambda t: ref.sppf_pool(t, 5), x, grad)
    for backend in kernel_backends(device):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            got = run(backend, ops.sppf_pool, xx, 5)
            assert got.dtype == dtype and torch.equal(got.double(), want)
            g = run(backend, lambda t: grads(lambda u: ops.sppf_pool(u, 5), t, grad), xx)
            assert g.dtype == dtype
            lowp_close(g, g64, glow, what=f"{backend} {dtype} grad")


SPP_CASES = [((2, 3, 13, 7), (1, 2, 4)), ((1, 2, 3, 3), (4,)), ((2, 20, 5, 9), (3, 6, 1)), ((1, 4, 1, 1), (1, 2)),
             ((3, 9, 20, 20), (1, 2, 4)), ((1, 33, 7, 12), (2, 5))]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_spp_matches_reference(device, mode, dtype, layout):
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    for shape, levels in SPP_CASES:
        x = torch.randn(*shape, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        want = ref.spp_pool(x, levels, mode)
        grad = torch.randn_like(want)
        gwant = grads(lambda t: ref.spp_pool(t, levels, mode), x, grad)
        for backend in kernel_backends(device):
            got = run(backend, ops.spp_pool, x, levels, mode)
            assert got.shape == (shape[0], shape[1] * sum(lv * lv for lv in levels)) and got.is_contiguous()
            if mode == "max":
                assert torch.equal(got, want), f"{backend} {shape} {levels}"
            else:
                torch.testing.assert_close(got, want, **tol)
            g = run(backend, lambda t: grads(lambda u: ops.spp_pool(u, levels, mode), t, grad), x)
            torch.testing.assert_close(g, gwant, **tol, msg=lambda m: f"{backend} {shape} {levels}: {m}")


@pytest.mark.parametrize("device", device_params())
def test_spp_max_ties_and_nan_follow_torch(device):
    x = tied((2, 5, 13, 7), torch.float64, device)
    x[0, 1, 2, 3] = float("nan")
    x[0, 1, 9, 1] = float("nan")    # two NaNs in one level-1 bin: torch picks the last
    x[1, 2] = float("-inf")         # a whole -inf plane: torch picks each bin's first element
    levels = (1, 2, 4, 3)
    want = ref.spp_pool(x, levels, "max")
    grad = torch.randn_like(want)
    gwant = grads(lambda t: ref.spp_pool(t, levels, "max"), x, grad)
    for backend in kernel_backends(device):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            got = run(backend, ops.spp_pool, xx, levels, "max")
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            g = run(backend, lambda t: grads(lambda u: ops.spp_pool(u, levels, "max"), t, grad), xx)
            torch.testing.assert_close(g, gwant, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("dtype", LOWP)
def test_spp_low_precision(device, mode, dtype):
    x = torch.randn(2, 10, 13, 9, device=device).to(dtype)
    levels = (1, 2, 4)
    out64 = ref.spp_pool(x.double(), levels, mode)
    outlow = ref.spp_pool(x, levels, mode)
    grad = torch.randn_like(outlow)
    g64 = grads(lambda t: ref.spp_pool(t, levels, mode), x.double(), grad.double())
    glow = grads(lambda t: ref.spp_pool(t, levels, mode), x, grad)
    for backend in kernel_backends(device):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            got = run(backend, ops.spp_pool, xx, levels, mode)
            assert got.dtype == dtype
            lowp_close(got, out64, outlow, what=f"{backend} {dtype}")
            g = run(backend, lambda t: grads(lambda u: ops.spp_pool(u, levels, mode), t, grad), xx)
            lowp_close(g, g64, glow, what=f"{backend} {dtype} grad")


def test_cpp_backward_deterministic_across_threads():
    x = torch.randn(4, 24, 20, 20)
    grad = torch.randn(4, 96, 20, 20)
    sgrad = torch.randn(4, 24 * 21)
    runs = []
    for threads in (1, torch.get_num_threads()):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with fastnn.use_backend("cpp"):
                runs.append((grads(lambda t: ops.sppf_pool(t, 5), x, grad),
                             grads(lambda t: ops.spp_pool(t, (1, 2, 4), "max"), x, sgrad),
                             grads(lambda t: ops.spp_pool(t, (1, 2, 4), "avg"), x, sgrad)))
        finally:
            torch.set_num_threads(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- tier 3: Triton under the interpreter

@interpreter_tier
def test_triton_interpreted_sppf():
    # kept small: the interpreter is slow (a tied fp32 input checks exact values and torch's tie routing)
    for shape, k, dtype in (((1, 2, 7, 9), 5, torch.float32), ((1, 1, 6, 5), 3, torch.float16)):
        for x in ((tied(shape, dtype),) if dtype == torch.float32 else (torch.randn(*shape).to(dtype),)):
            want = ref.sppf_pool(x, k)
            assert torch.equal(run("triton", ops.sppf_pool, x, k), want)
            grad = torch.randn_like(want)
            got = run("triton", lambda t: grads(lambda u: ops.sppf_pool(u, k), t, grad), x)
            if dtype == torch.float32:   # torch's chain, same additions in the same order
                torch.testing.assert_close(got, grads(lambda t: ref.sppf_pool(t, k), x, grad), rtol=0, atol=0)
            else:
                gwant = grads(lambda t: ref.sppf_pool(t, k), x.double(), grad.double())
                lowp_close(got, gwant, grads(lambda t: ref.sppf_pool(t, k), x, grad), what="triton fp16 grad")
    x = channels_last(torch.randn(1, 3, 4, 5))
    assert torch.equal(run("triton", ops.sppf_pool, x, 3), ref.sppf_pool(x, 3))


@interpreter_tier
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_triton_interpreted_spp(mode):
    # kept small: the interpreter runs one program per (plane, bin)
    for shape, levels, dtype in (((1, 2, 13, 7), (1, 2), torch.float32), ((1, 1, 3, 3), (4,), torch.float32),
                                 ((1, 1, 9, 37), (1, 3), torch.float16)):
        for x in (torch.randn(*shape).to(dtype),) + ((tied(shape, dtype),) if mode == "max" and shape[2] < 4 else ()):
            want = ref.spp_pool(x, levels, mode)
            got = run("triton", ops.spp_pool, x, levels, mode)
            grad = torch.randn_like(want)
            gwant = grads(lambda t: ref.spp_pool(t, levels, mode), x.double(), grad.double())
            g = run("triton", lambda t: grads(lambda u: ops.spp_pool(u, levels, mode), t, grad), x)
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(g, gwant.float(), rtol=1e-6, atol=1e-6)
            else:
                lowp_close(got, ref.spp_pool(x.double(), levels, mode), want, what="triton fp16")
                lowp_close(g, gwant, grads(lambda t: ref.spp_pool(t, levels, mode), x, grad), what="triton fp16 grad")


@interpreter_tier
def test_triton_interpreted_spp_nan_and_neg_inf():
    x = tied((1, 2, 9, 6))
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 6, 4] = float("nan")
    x[0, 1] = float("-inf")
    want = ref.spp_pool(x, (1, 2), "max")
    grad = torch.randn_like(want)
    torch.testing.assert_close(run("triton", ops.spp_pool, x, (1, 2), "max"), want, equal_nan=True, rtol=0, atol=0)
    g = run("triton", lambda t: grads(lambda u: ops.spp_pool(u, (1, 2), "max"), t, grad), x)
    torch.testing.assert_close(g, grads(lambda t: ref.spp_pool(t, (1, 2), "max"), x, grad), rtol=0, atol=0)


# ---------------------------------------------------------------- gradcheck, opcheck, compile

def test_gradcheck():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    backends = ["reference"] + kernel_backends("cpu")
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    run_gradcheck(lambda t: ops.sppf_pool(t, 3), (x,), backends)
    run_gradcheck(lambda t: ops.sppf_pool(t, 5), (xcl,), backends, fast_mode=True)
    for mode in ("max", "avg"):
        run_gradcheck(lambda t: ops.spp_pool(t, (1, 2, 4), mode), (x,), backends, fast_mode=True)
        run_gradcheck(lambda t: ops.spp_pool(t, (3,), mode), (xcl,), backends, fast_mode=True)


def test_opcheck():
    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    run_opcheck(torch.ops.fastnn.sppf_pool.default, [(x, 5), (xcl, 3), (x[:0], 5)])
    run_opcheck(torch.ops.fastnn.sppf_pool_backward.default,
                [(torch.randn(2, 12, 7, 5), x.detach(), 5), (torch.randn(2, 12, 7, 5), xcl.detach(), 3)],
                skip_autograd=True)
    run_opcheck(torch.ops.fastnn.spp_pool.default, [(x, [1, 2, 4], "max"), (xcl, [3], "avg")])
    run_opcheck(torch.ops.fastnn.spp_pool_backward.default,
                [(torch.randn(2, 63), x.detach(), [1, 2, 4], "max"), (torch.randn(2, 27), xcl.detach(), [3], "avg")],
                skip_autograd=True)


def test_compile_fullgraph():
    def head(x):
        return ops.spp_pool(ops.sppf_pool(x, 5), (1, 2, 4), "max"), ops.spp_pool(x, [2, 3], "avg")

    check_compiles(head, (torch.randn(2, 4, 13, 7),))
    model = SPPF(8, 6).eval()
    check_compiles(model, (torch.randn(2, 8, 10, 10),), backend="aot_eager")


def test_compile_backward():
    def loss(x):
        return ops.sppf_pool(x, 5).square().sum() + ops.spp_pool(x, (1, 2), "avg").sum()

    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(g_compiled, g_eager)


# ---------------------------------------------------------------- modules

class _YoloConv(nn.Module):
    """YOLOv5 models.common.Conv (k=1, s=1), written out."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 1, 1, 0, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _YoloSPPF(nn.Module):
    """YOLOv5 models.common.SPPF, written out in plain torch."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = _YoloConv(c1, c_)
        self.cv2 = _YoloConv(c_ * 4, c2)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@pytest.mark.parametrize("k", [5, 3])
def test_sppf_module_loads_yolov5_state_dict(k):
    yolo = _YoloSPPF(16, 12, k)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (yolo.cv1.bn, yolo.cv2.bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    ours = SPPF(16, 12, k)
    assert list(ours.state_dict()) == list(yolo.state_dict())
    ours.load_state_dict(yolo.state_dict(), strict=True)
    x = torch.randn(2, 16, 13, 11)
    for train in (False, True):
        ours.train(train)
        yolo.train(train)
        xo, xy = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_o, out_y = ours(xo), yolo(xy)
        torch.testing.assert_close(out_o, out_y)
        g = torch.randn_like(out_o)
        out_o.backward(g)
        out_y.backward(g)
        torch.testing.assert_close(xo.grad, xy.grad)
        torch.testing.assert_close(ours.cv1.conv.weight.grad, yolo.cv1.conv.weight.grad)
    assert "SPPF" in repr(ours) and "MaxPool2d(kernel_size=%d" % k in repr(ours)


def test_spp_module():
    m = SPP((1, 2, 4), "avg")
    x = torch.randn(3, 5, 13, 7)
    assert m.output_size(5) == 105
    torch.testing.assert_close(m(x), ref.spp_pool(x, (1, 2, 4), "avg"))
    assert repr(m) == "SPP(levels=(1, 2, 4), mode='avg')"
    for shape in ((1, 5, 3, 3), (2, 5, 40, 40)):   # any input size -> the same length
        assert SPP()(torch.randn(*shape)).shape == (shape[0], 105)


# ---------------------------------------------------------------- bad and edge inputs

BAD_INPUTS = [
    (ops.sppf_pool, (torch.randn(1, 2, 5, 5), 4), ValueError, "k must be a positive odd int"),
    (ops.sppf_pool, (torch.randn(1, 2, 5, 5), 0), ValueError, "k must be a positive odd int"),
    (ops.sppf_pool, (torch.randn(1, 2, 5, 5), 5.0), TypeError, "k must be an int"),
    (ops.sppf_pool, (torch.randn(1, 2, 5, 5), True), TypeError, "k must be an int"),
    (ops.sppf_pool, (torch.randn(2, 5, 5), 5), ValueError, r"x must have shape \(\*, \*, \*, \*\)"),
    (ops.sppf_pool, (torch.zeros(1, 2, 5, 5, dtype=torch.int32), 5), TypeError, "x must have dtype"),
    (ops.sppf_pool, ([[1.0]], 5), TypeError, "x must be a torch.Tensor"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), (1, 0)), ValueError, "levels must be positive"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), (1, -2)), ValueError, "levels must be positive"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), (1, 2.0)), TypeError, "levels must hold ints"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), (True, 2)), TypeError, "levels must hold ints"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), ()), ValueError, "levels must not be empty"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), 4), TypeError, "levels must be a list or tuple"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), "124"), TypeError, "levels must be a list or tuple"),
    (ops.spp_pool, (torch.randn(1, 2, 5, 5), (1, 2), "min"), ValueError, "mode must be 'max' or 'avg'"),
    (ops.spp_pool, (torch.randn(2, 5, 5), (1, 2)), ValueError, "x must have shape"),
    (ops.spp_pool, (torch.randn(1, 2, 0, 5), (1, 2)), ValueError, "x must have positive H and W"),
    (ops.spp_pool, (torch.zeros(1, 2, 5, 5, dtype=torch.long), (1,)), TypeError, "x must have dtype"),
    (SPP, ((1, 0),), ValueError, "levels must be positive"),
    (SPP, ((1, 2), "sum"), ValueError, "mode must be"),
    (SPPF, (8, 8, 6), ValueError, "k must be a positive odd int"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f"{getattr(c[0], '__name__', c[0])}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_naming_the_argument(case):
    fn, args, exc, match = case
    expect_error(fn, args, exc, match)


@pytest.mark.parametrize("device", device_params())
def test_empty_inputs(device):
    for backend in ["reference"] + kernel_backends(device):
        with fastnn.use_backend(backend):
            for shape in ((0, 3, 5, 5), (2, 0, 5, 5)):
                x = torch.randn(*shape, device=device, requires_grad=True)
                out = ops.spp_pool(x, (1, 2), "max")
                assert out.shape == (shape[0], shape[1] * 5)
                (g,) = torch.autograd.grad(out.sum(), x)
                assert g.shape == x.shape
            for shape in ((0, 3, 5, 5), (2, 3, 0, 5), (2, 0, 4, 4)):
                x = torch.randn(*shape, device=device, requires_grad=True)
                out = ops.sppf_pool(x, 5)
                assert out.shape == (shape[0], 4 * shape[1], *shape[2:])
                (g,) = torch.autograd.grad(out.sum(), x)
                assert g.shape == x.shape


@pytest.mark.cuda
def test_gpu_matches_cpu_at_yolo_sizes():
    for shape in ((2, 256, 20, 20), (1, 128, 40, 40)):
        x = torch.randn(*shape)
        grad = torch.randn(shape[0], 4 * shape[1], *shape[2:])
        want = run("cpp", ops.sppf_pool, x, 5)
        gwant = run("cpp", lambda t: grads(lambda u: ops.sppf_pool(u, 5), t, grad), x)
        assert torch.equal(run("triton", ops.sppf_pool, x.cuda(), 5).cpu(), want)
        got = run("triton", lambda t: grads(lambda u: ops.sppf_pool(u, 5), t, grad.cuda()), x.cuda())
        torch.testing.assert_close(got.cpu(), gwant, rtol=0, atol=0)
        sgrad = torch.randn(shape[0], shape[1] * 21)
        for mode in ("max", "avg"):
            torch.testing.assert_close(run("triton", ops.spp_pool, x.cuda(), (1, 2, 4), mode).cpu(),
                                       run("cpp", ops.spp_pool, x, (1, 2, 4), mode))
            g = run("triton", lambda t: grads(lambda u: ops.spp_pool(u, (1, 2, 4), mode), t, sgrad.cuda()), x.cuda())
            torch.testing.assert_close(g.cpu(), run("cpp", lambda t: grads(lambda u: ops.spp_pool(u, (1, 2, 4), mode),
                                                                            t, sgrad), x))


def test_levels_past_the_bin_limit_are_refused():
    """sum(l * l) past 2^31 - 1 bins per channel is refused by name: at l = 2^32 the kernels' l * l wrapped to
    an empty output, and l = 2^32 + 1 asked for 34 GB (both silently, before)."""
    x = torch.randn(1, 1, 2, 2)
    for levels in ((2 ** 32,), (2 ** 32 + 1,), (2 ** 32, 1), (46341,), (46340, 300)):
        with pytest.raises(ValueError, match=r"levels must give at most 2147483647 bins"):
            ops.spp_pool(x, levels)
        with pytest.raises(ValueError, match=r"levels must give at most"):
            torch.ops.fastnn.spp_pool(x, list(levels), "max")
    with pytest.raises(ValueError, match=r"levels must give at most"):
        fastnn.nn.SPP((2 ** 32,))


@pytest.mark.parametrize("op", ["spp_max", "spp_avg", "sppf"])
def test_direct_call_equals_the_op(op, monkeypatch):
    """In plain eager mode spp_pool / sppf_pool run the op's body (or an autograd.Function with the op's
    setup_context and backward) without torch.library's dispatch (fastnn/ops/_direct.py): output and gradient
    bitwise the op's; tracing still records the op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(6)
    x = torch.randn(2, 3, 11, 9)
    x[0, 1, 2:5, 3:6] = 0.25  # ties
    fn = (lambda t: ops.sppf_pool(t, 5)) if op == "sppf" else (lambda t: ops.spp_pool(t, (1, 2, 3), op[4:]))
    results = []
    for direct in (True, False):
        monkeypatch.setattr(spp_ops._direct, "plain_eager", (lambda *a: True) if direct else (lambda *a: False))
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (grad,) = torch.autograd.grad((out * out).sum(), xi)
        with torch.no_grad():
            again = fn(x)
        results.append([out.detach(), grad, again])
    for a, b in zip(*results):
        assert a.stride() == b.stride() and torch.equal(a, b)
    monkeypatch.undo()
    name = "fastnn.sppf_pool" if op == "sppf" else "fastnn.spp_pool"
    assert name in str(make_fx(fn)(x).code)


def test_raw_ops_refuse_an_unknown_mode():
    """The raw spp ops check the mode as spp_pool does: anything but "max" or "avg" is an error, not max pooling."""
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.fastnn.spp_pool(x, [1, 2], "mean")
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.fastnn.spp_pool_backward(torch.randn(1, 10), x, [1, 2], "mean")
