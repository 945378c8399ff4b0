"""Box ops: nms, batched_nms, box_iou, generalized_box_iou, through every tier of DESIGN.md section 5."""
import math

import pytest
import torch
import torchvision

import fastnn
from fastnn import ops
from fastnn.ops import boxes as box_ops
from fastnn.reference import boxes as ref

from _tiers import (
    HAS_CUDA,
    assert_same_nonfinite_and_close,
    backends_under_test,
    check_compiles,
    device_params,
    expect_error,
    lowp_close,
    run,
    run_gradcheck,
    run_opcheck,
)

NMS_BACKENDS = tuple(box_ops._NMS_IMPLS)
IOU_BACKENDS = tuple(box_ops._IOU_IMPLS)
LOWP = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- inputs

def random_boxes(n, *, image=256.0, size=(4.0, 64.0), dtype=torch.float32, device="cpu"):
    """Boxes with uniform centres in a square image and uniform widths/heights."""
    centre = torch.rand(n, 2, dtype=torch.float64) * image
    wh = torch.empty(n, 2, dtype=torch.float64).uniform_(*size)
    return torch.cat([centre - wh / 2, centre + wh / 2], 1).to(dtype=dtype, device=device)


def clustered_boxes(n, *, clusters=6, dtype=torch.float32, device="cpu"):
    """Tight clusters: chains of heavily overlapping boxes, the hard case for greedy order."""
    base = random_boxes(clusters, image=200.0, size=(20.0, 60.0), dtype=torch.float64)
    pick = torch.randint(0, clusters, (n,))
    jitter = torch.randn(n, 4, dtype=torch.float64) * 4.0
    return (base[pick] + jitter).to(dtype=dtype, device=device)


def integer_boxes(n, *, dtype=torch.float32, device="cpu"):
    """Small integer coordinates: exact IoU ties, duplicates, zero-width and inverted boxes."""
    xy = torch.randint(0, 12, (n, 4)).to(torch.float64)
    return xy.to(dtype=dtype, device=device)


def odd_boxes(n, *, dtype=torch.float32, device="cpu"):
    """Random boxes mixed with inverted, zero-area, huge and infinite boxes."""
    b = random_boxes(n, dtype=torch.float64)
    k = max(n // 8, 1)
    b[:k, 2] = b[:k, 0] - 3.0                          # inverted
    b[k:2 * k, 2] = b[k:2 * k, 0]                      # zero width
    b[2 * k:2 * k + 2] = torch.tensor([-1e4, -1e4, 1e4, 1e4], dtype=torch.float64)  # covers everything
    if n > 2 * k + 3:
        b[2 * k + 2, 2] = math.inf                     # infinite extent
        b[2 * k + 3, 0] = -math.inf
    return b[torch.randperm(n)].to(dtype=dtype, device=device)


GENERATORS = {"random": random_boxes, "clustered": clustered_boxes, "integer": integer_boxes, "odd": odd_boxes}


def scores_for(n, *, ties=False, dtype=torch.float32, device="cpu"):
    if ties:
        return (torch.randint(0, 7, (n,)).to(torch.float64) / 7).to(dtype=dtype, device=device)
    return torch.randperm(n).to(torch.float64).div(max(n, 1)).to(dtype=dtype, device=device)


# ---------------------------------------------------------------- tier 1: reference vs torchvision

@pytest.mark.parametrize("kind", list(GENERATORS))
def test_reference_nms_matches_torchvision(kind):
    boxes = GENERATORS[kind](500)
    scores = scores_for(500)
    for thr in (0.0, 0.3, 0.5, 0.8):
        assert torch.equal(ref.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))


def test_reference_batched_nms_matches_torchvision():
    boxes, scores = random_boxes(600), scores_for(600)
    idxs = torch.randint(0, 7, (600,))
    for thr in (0.2, 0.5):
        assert torch.equal(ref.batched_nms(boxes, scores, idxs, thr),
                           torchvision.ops.batched_nms(boxes, scores, idxs, thr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("generalized", [False, True])
def test_reference_iou_matches_torchvision(dtype, generalized):
    a, b = random_boxes(50, dtype=dtype), odd_boxes(70, dtype=dtype)
    tv = torchvision.ops.generalized_box_iou if generalized else torchvision.ops.box_iou
    assert_same_nonfinite_and_close(ref.pairwise_box_iou(a, b, generalized), tv(a, b), rtol=0, atol=0)


def test_reference_threshold_rounding():
    # torchvision compares a float32 IoU with a double threshold; float32(0.7) > 0.7 in double terms is
    # false, so the float32 stand-in must round down.
    t = ref.threshold_below(0.7, torch.float32)
    assert t <= 0.7 and torch.tensor(t, dtype=torch.float32).item() == t
    assert ref.threshold_below(0.5, torch.float32) == 0.5
    assert ref.threshold_below(0.7, torch.float64) == 0.7


# ---------------------------------------------------------------- tiers 2, 3, 5: kernels vs reference

def _check_nms_backend(backend, device, sizes, thresholds=(0.0, 0.5, 0.9), dtype=torch.float32):
    for kind, gen in GENERATORS.items():
        for n in sizes:
            boxes = gen(n, dtype=dtype, device=device)
            scores = scores_for(n, ties=kind == "integer", dtype=dtype, device=device)
            for thr in thresholds:
                want = ref.nms(boxes.cpu(), scores.cpu(), thr)
                got = run(backend, ops.nms, boxes, scores, thr)
                assert got.dtype == torch.long and got.device.type == device
                assert torch.equal(got.cpu(), want), f"{backend} {kind} n={n} thr={thr} {dtype}"


def _check_batched_backend(backend, device, sizes, classes=(1, 3, 40), thresholds=(0.3, 0.7), dtype=torch.float32):
    for n in sizes:
        for c in classes:
            boxes = clustered_boxes(n, dtype=dtype, device=device)
            scores = scores_for(n, ties=c == 3, dtype=dtype, device=device)
            idxs = torch.randint(0, c, (n,), device=device) * 1000 - 7  # sparse, negative class ids
            for thr in thresholds:
                want = ref.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), thr)
                got = run(backend, ops.batched_nms, boxes, scores, idxs, thr)
                assert torch.equal(got.cpu(), want), f"{backend} n={n} classes={c} thr={thr}"


def test_cpp_nms_matches_reference():
    _check_nms_backend("cpp", "cpu", (1, 2, 63, 64, 65, 255, 256, 300, 1200))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_nms_other_dtypes(dtype):
    _check_nms_backend("cpp", "cpu", (5, 300, 900), dtype=dtype)


def test_cpp_nms_unusual_thresholds():
    _check_nms_backend("cpp", "cpu", (40, 400), thresholds=(-0.5, -1e-40, 1e-40, 1.0, 1.5, math.inf, -math.inf))


def test_cpp_batched_nms_matches_reference():
    _check_batched_backend("cpp", "cpu", (1, 70, 700, 3000))


def test_cpp_nms_matches_torchvision_at_10k():
    boxes = random_boxes(10000, image=1024.0, size=(16.0, 128.0))
    scores = scores_for(10000)
    idxs = torch.randint(0, 80, (10000,))
    with fastnn.use_backend("cpp"):
        assert torch.equal(ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
        assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5),
                           torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def test_cpp_nms_mixed_score_dtype():
    boxes = random_boxes(500)
    scores = scores_for(500, dtype=torch.float64)
    assert torch.equal(run("cpp", ops.nms, boxes, scores, 0.4), ref.nms(boxes, scores, 0.4))


@pytest.mark.skipif(HAS_CUDA or "triton" not in fastnn.usable_backends("cpu"), reason="interpreter tier")
def test_triton_interpreted_nms_matches_reference():
    _check_nms_backend("triton", "cpu", (1, 65, 150), thresholds=(0.0, 0.5))


@pytest.mark.skipif(HAS_CUDA or "triton" not in fastnn.usable_backends("cpu"), reason="interpreter tier")
def test_triton_interpreted_batched_nms_matches_reference():
    _check_batched_backend("triton", "cpu", (90,), classes=(1, 3), thresholds=(0.5,))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_nms_matches_reference(backend):
    if backend not in fastnn.usable_backends("cuda"):
        pytest.skip(f"{backend} not usable")
    _check_nms_backend(backend, "cuda", (1, 2, 63, 64, 65, 300, 1200), thresholds=(-0.5, 0.0, 0.5, 0.9))
    _check_nms_backend(backend, "cuda", (300,), dtype=torch.float64)
    _check_nms_backend(backend, "cuda", (300,), dtype=torch.float16)
    _check_batched_backend(backend, "cuda", (1, 70, 700, 3000))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_nms_large_matches_cpu(backend):
    if backend not in fastnn.usable_backends("cuda"):
        pytest.skip(f"{backend} not usable")
    boxes = random_boxes(100000, image=1024.0, size=(16.0, 128.0))
    scores = scores_for(100000)
    idxs = torch.randint(0, 80, (100000,))
    for thr in (0.5, 0.7):
        want = run("cpp", ops.nms, boxes, scores, thr)
        assert torch.equal(run(backend, ops.nms, boxes.cuda(), scores.cuda(), thr).cpu(), want)
        want = run("cpp", ops.batched_nms, boxes, scores, idxs, thr)
        assert torch.equal(run(backend, ops.batched_nms, boxes.cuda(), scores.cuda(), idxs.cuda(), thr).cpu(), want)


@pytest.mark.cuda
def test_gpu_masks_agree_between_triton_and_cuda():
    from fastnn.kernels import boxes as kb

    if "cuda" not in fastnn.usable_backends("cuda"):
        pytest.skip("cuda backend not usable")
    boxes = clustered_boxes(700, device="cuda")
    scores = scores_for(700, device="cuda")
    idxs = torch.randint(0, 5, (700,), device="cuda")
    lay = box_ops._nms_layout(boxes, scores, idxs)
    tables = (lay["seg_first_block"], lay["seg_num_blocks"], lay["seg_mask_offset"])
    args = (lay["boxes"], lay["block_segment"], *tables, lay["max_blocks"], lay["total_words"], 0.5)
    m_cuda = fastnn._backend._C.nms_mask_cuda(*args)
    m_triton = kb.nms_mask(*args)
    assert torch.equal(m_cuda, m_triton)
    assert not (m_cuda == -1).all()


@pytest.mark.cuda
def test_gpu_nms_nan_and_inf_boxes():
    boxes = odd_boxes(500, device="cuda")
    scores = scores_for(500, device="cuda")
    boxes[::17, 1] = math.nan
    scores[::23] = math.nan
    want = ref.nms(boxes.cpu(), scores.cpu(), 0.5)
    for b in backends_under_test("cuda", NMS_BACKENDS):
        assert torch.equal(run(b, ops.nms, boxes, scores, 0.5).cpu(), want)


# pairwise IoU ------------------------------------------------------------------------------------

def _iou_backends(device):
    return backends_under_test(device, IOU_BACKENDS)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("generalized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iou_matches_reference(device, generalized, dtype):
    fn = ops.generalized_box_iou if generalized else ops.box_iou
    for n, m, gen in ((1, 1, random_boxes), (37, 150, random_boxes), (60, 20, odd_boxes), (30, 45, integer_boxes)):
        a, b = gen(n, dtype=dtype, device=device), gen(m, dtype=dtype, device=device)
        want = ref.pairwise_box_iou(a.cpu(), b.cpu(), generalized)
        for backend in _iou_backends(device):
            got = run(backend, fn, a, b)
            # Same operations in the same order as torch, IEEE division, no FMA contraction: exact.
            assert_same_nonfinite_and_close(got.cpu(), want, rtol=0, atol=0, what=f"{backend} {gen.__name__}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("generalized", [False, True])
@pytest.mark.parametrize("dtype", LOWP)
def test_iou_low_precision(device, generalized, dtype):
    fn = ops.generalized_box_iou if generalized else ops.box_iou
    a64, b64 = random_boxes(40, dtype=torch.float64), random_boxes(50, dtype=torch.float64)
    a, b = a64.to(dtype), b64.to(dtype)
    ref64 = ref.pairwise_box_iou(a.double(), b.double(), generalized)   # exact math on the same inputs
    tv = (torchvision.ops.generalized_box_iou if generalized else torchvision.ops.box_iou)(a, b)
    for backend in _iou_backends(device):
        got = run(backend, fn, a.to(device), b.to(device)).cpu()
        assert got.dtype == tv.dtype == torch.float32
        lowp_close(got, ref64, tv, what=f"{backend} {dtype}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("generalized", [False, True])
def test_iou_backward_matches_torch_autograd(device, generalized):
    """Including exact ties (integer boxes), where torch splits min/max gradients evenly."""
    fn = ops.generalized_box_iou if generalized else ops.box_iou
    for gen in (random_boxes, integer_boxes):
        a0, b0 = gen(23, dtype=torch.float64), gen(41, dtype=torch.float64)
        if gen is integer_boxes:  # keep positive areas so the values stay finite
            a0[:, 2:] = a0[:, :2] + 1 + a0[:, 2:] % 5
            b0[:, 2:] = b0[:, :2] + 1 + b0[:, 2:] % 5
        grad = torch.randn(23, 41, dtype=torch.float64)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        want = torch.autograd.grad(ref.pairwise_box_iou(a, b, generalized), (a, b), grad)
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            for backend in _iou_backends(device):
                a = a0.to(dtype=dtype, device=device).requires_grad_()
                b = b0.to(dtype=dtype, device=device).requires_grad_()
                got = torch.autograd.grad(run(backend, fn, a, b), (a, b), grad.to(dtype=dtype, device=device))
                for g, w in zip(got, want):
                    assert g.dtype == dtype
                    torch.testing.assert_close(g.cpu().double(), w, rtol=tol, atol=tol,
                                               msg=lambda m: f"{backend} {gen.__name__} {dtype}: {m}")


@pytest.mark.parametrize("at_zero", [False, True])
def test_iou_backward_clamp_convention_at_touching_boxes(at_zero):
    """torch <= 2.11 passes clamp(min=0)'s gradient at exactly 0, torch 2.14 does not; the kernels take
    the convention as a flag and the ops pass the running torch's (checked against autograd above)."""
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0, 2.0, 1.0]], dtype=torch.float64)   # touching: intersection width exactly 0
    grad = torch.ones(1, 1, dtype=torch.float64)
    half = 0.5 if at_zero else 0.0   # d iou / d inter = 1 / union = 1/2, times height 1
    want_a = torch.tensor([[0.0, 0.0, half, 0.0]], dtype=torch.float64)
    want_b = torch.tensor([[-half, 0.0, 0.0, 0.0]], dtype=torch.float64)
    g1, g2 = fastnn._backend._C.pairwise_box_iou_backward_cpu(grad, a, b, False, at_zero)
    torch.testing.assert_close(g1, want_a)
    torch.testing.assert_close(g2, want_b)
    if "triton" in fastnn.usable_backends("cpu"):
        from fastnn.kernels import boxes as kb

        t1, t2 = kb.pairwise_iou_backward(grad, a, b, False, at_zero)
        torch.testing.assert_close(t1, want_a)
        torch.testing.assert_close(t2, want_b)
    assert box_ops._CLAMP_AT_ZERO == ref.clamp_grad_at_zero()


@pytest.mark.parametrize("generalized", [False, True])
def test_iou_backward_low_precision(generalized):
    fn = ops.generalized_box_iou if generalized else ops.box_iou
    a0, b0 = random_boxes(20, dtype=torch.float64), random_boxes(30, dtype=torch.float64)
    grad = torch.randn(20, 30, dtype=torch.float64)
    for dtype in LOWP:
        a, b = a0.to(dtype), b0.to(dtype)
        a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
        want = torch.autograd.grad(ref.pairwise_box_iou(a64, b64, generalized), (a64, b64), grad)
        al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
        lowp = torch.autograd.grad(ref.pairwise_box_iou(al, bl, generalized), (al, bl), grad.float())
        for backend in _iou_backends("cpu"):
            ak, bk = a.clone().requires_grad_(), b.clone().requires_grad_()
            got = torch.autograd.grad(run(backend, fn, ak, bk), (ak, bk), grad.float())
            for g, w, l in zip(got, want, lowp):
                assert g.dtype == dtype
                # the reference's low-precision error includes rounding the gradient to dtype
                lowp_close(g, w, l, what=f"{backend} {dtype} grad")


# ---------------------------------------------------------------- opcheck, gradcheck, compile

def test_opcheck_box_ops():
    boxes, scores = random_boxes(200), scores_for(200)
    idxs = torch.randint(0, 4, (200,))
    run_opcheck(torch.ops.fastnn.nms.default, [(boxes, scores, 0.5), (boxes[:0], scores[:0], 0.5)],
                skip_autograd=True)
    run_opcheck(torch.ops.fastnn.batched_nms.default, [(boxes, scores, idxs, 0.5)], skip_autograd=True)
    a = random_boxes(7, dtype=torch.float64).requires_grad_()
    b = random_boxes(9, dtype=torch.float64).requires_grad_()
    run_opcheck(torch.ops.fastnn.pairwise_box_iou.default, [(a, b, False), (a, b, True)])
    grad = torch.randn(7, 9, dtype=torch.float64)
    run_opcheck(torch.ops.fastnn.pairwise_box_iou_backward.default,
                [(grad, a.detach(), b.detach(), True)], skip_autograd=True)


@pytest.mark.parametrize("generalized", [False, True])
def test_gradcheck_iou(generalized):
    fn = ops.generalized_box_iou if generalized else ops.box_iou
    a = random_boxes(5, dtype=torch.float64).requires_grad_()
    b = random_boxes(6, dtype=torch.float64).requires_grad_()
    run_gradcheck(fn, (a, b), ["reference"] + _iou_backends("cpu"))


def test_compile_fullgraph_box_ops():
    def detect(boxes, scores, idxs):
        keep = ops.batched_nms(boxes, scores, idxs, 0.5)
        single = ops.nms(boxes, scores, 0.6)
        kept = boxes[keep]
        return keep, single, ops.box_iou(kept, boxes), ops.generalized_box_iou(kept, kept)

    boxes, scores = random_boxes(300), scores_for(300)
    idxs = torch.randint(0, 5, (300,))
    check_compiles(detect, (boxes, scores, idxs), backend="inductor")


def test_compile_fullgraph_iou_backward():
    def loss(a, b):
        return (1 - ops.generalized_box_iou(a, b).diagonal()).sum()

    a, b = random_boxes(16), random_boxes(16)
    a.requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(a, b), a)
    (g_eager,) = torch.autograd.grad(loss(a, b), a)
    torch.testing.assert_close(g_compiled, g_eager)


# ---------------------------------------------------------------- bad and edge inputs

BAD_INPUTS = [
    (ops.nms, ([[0, 0, 1, 1]], torch.ones(1), 0.5), TypeError, "boxes must be a torch.Tensor"),
    (ops.nms, (torch.zeros(3, 5), torch.ones(3), 0.5), ValueError, r"boxes must have shape \(\*, 4\)"),
    (ops.nms, (torch.zeros(3, 4, 1), torch.ones(3), 0.5), ValueError, "boxes must have shape"),
    (ops.nms, (torch.zeros(3, 4, dtype=torch.int32), torch.ones(3), 0.5), TypeError, "boxes must have dtype"),
    (ops.nms, (torch.zeros(3, 4), torch.ones(4), 0.5), ValueError, r"scores must have shape \(3,\)"),
    (ops.nms, (torch.zeros(3, 4), torch.ones(3, dtype=torch.long), 0.5), TypeError, "scores must have dtype"),
    (ops.nms, (torch.zeros(3, 4), torch.ones(3), math.nan), ValueError, "iou_threshold must not be NaN"),
    (ops.nms, (torch.zeros(3, 4), torch.ones(3), "0.5"), TypeError, "iou_threshold must be a real number"),
    (ops.batched_nms, (torch.zeros(3, 4), torch.ones(3), torch.zeros(3), 0.5), TypeError,
     "idxs must have an integer dtype"),
    (ops.batched_nms, (torch.zeros(3, 4), torch.ones(3), torch.zeros(2, dtype=torch.long), 0.5), ValueError,
     r"idxs must have shape \(3,\)"),
    (ops.box_iou, (torch.zeros(3, 4), torch.zeros(3, 3)), ValueError, "boxes2 must have shape"),
    (ops.generalized_box_iou, (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4)), TypeError,
     "boxes1 must have dtype"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_naming_the_argument(case):
    fn, args, exc, match = case
    expect_error(fn, args, exc, match)


@pytest.mark.cuda
def test_mixed_devices_raise():
    expect_error(ops.nms, (torch.zeros(3, 4, device="cuda"), torch.ones(3), 0.5), ValueError,
                 "scores is on cpu but boxes is on cuda")
    expect_error(ops.box_iou, (torch.zeros(3, 4), torch.zeros(3, 4, device="cuda")), ValueError,
                 "boxes2 is on cuda")


def test_use_backend_errors():
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        fastnn.use_backend("fast")
    with fastnn.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run here"):
        ops.nms(random_boxes(4), scores_for(4), 0.5)
    with fastnn.use_backend("cuda"), pytest.raises(NotImplementedError, match="no kernel for this op"):
        ops.box_iou(random_boxes(4), random_boxes(4))


@pytest.mark.parametrize("device", device_params())
def test_empty_inputs(device):
    for backend in ["reference"] + backends_under_test(device, NMS_BACKENDS):
        with fastnn.use_backend(backend):
            e = torch.zeros(0, 4, device=device)
            for out in (ops.nms(e, torch.zeros(0, device=device), 0.5),
                        ops.batched_nms(e, torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device), 0.5)):
                assert out.shape == (0,) and out.dtype == torch.long and out.device.type == device
    for backend in ["reference"] + backends_under_test(device, IOU_BACKENDS):
        with fastnn.use_backend(backend):
            a = torch.zeros(0, 4, device=device, requires_grad=True)
            b = random_boxes(5, device=device).requires_grad_()
            out = ops.generalized_box_iou(a, b)
            assert out.shape == (0, 5) and out.dtype == torch.float32
            ga, gb = torch.autograd.grad(out.sum(), (a, b), allow_unused=True)
            assert ga.shape == (0, 4) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_inputs(device):
    base = random_boxes(400, device=device)
    boxes = base.t().contiguous().t()       # column-major (N, 4)
    assert not boxes.is_contiguous()
    scores = scores_for(800, device=device)[::2]
    idxs = torch.randint(0, 3, (800,), device=device)[::2]
    want = ref.nms(base.cpu(), scores.cpu(), 0.5)
    want_b = ref.batched_nms(base.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    for backend in backends_under_test(device, NMS_BACKENDS):
        if backend == "triton" and device == "cpu":
            continue  # the interpreter tier covers contiguous inputs only, to stay fast
        assert torch.equal(run(backend, ops.nms, boxes, scores, 0.5).cpu(), want)
        assert torch.equal(run(backend, ops.batched_nms, boxes, scores, idxs, 0.5).cpu(), want_b)
    for backend in backends_under_test(device, IOU_BACKENDS):
        got = run(backend, ops.box_iou, boxes[:30], boxes[100:140:2])
        torch.testing.assert_close(got.cpu(), ref.box_iou(base[:30].cpu(), base[100:140:2].cpu()))


@pytest.mark.parametrize("device", device_params())
def test_nan_boxes_and_scores_are_never_kept(device):
    boxes = random_boxes(300, device=device)
    scores = scores_for(300, device=device)
    boxes[::7, 2] = math.nan
    scores[::11] = math.nan
    bad = set(range(0, 300, 7)) | set(range(0, 300, 11))
    idxs = torch.randint(0, 3, (300,), device=device)
    want = ref.nms(boxes.cpu(), scores.cpu(), 0.5)
    assert not bad & set(want.tolist())
    for backend in backends_under_test(device, NMS_BACKENDS):
        if backend == "triton" and device == "cpu":
            continue
        got = run(backend, ops.nms, boxes, scores, 0.5).cpu()
        assert torch.equal(got, want)
        got_b = run(backend, ops.batched_nms, boxes, scores, idxs, 0.5).cpu()
        assert not bad & set(got_b.tolist())
        assert torch.equal(got_b, ref.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5))


def test_requires_grad_inputs_to_nms():
    boxes = random_boxes(50).requires_grad_()
    scores = scores_for(50).requires_grad_()
    assert torch.equal(ops.nms(boxes, scores, 0.5), ref.nms(boxes.detach(), scores.detach(), 0.5))


def test_build_info_reports_backends():
    info = fastnn.build_info()
    for key in ("torch", "triton", "cuda_compiled", "cuda_archs", "cxx_flags", "backends"):
        assert key in info
    assert "reference" in info["backends"]["cpu"]
    assert info["extension_built"], info["extension_error"]
    assert "cpp" in info["backends"]["cpu"]


def test_raw_iou_ops_refuse_boxes_and_grads_of_the_wrong_shape():
    """The raw pairwise IoU ops (and the C++ functions behind them) read rows of 4 coordinates and an (N, M)
    gradient: anything else is refused with a named error (a (500, 2) box tensor and a (500, 3) gradient
    corrupted the heap; (N, 5) boxes gave wrong IoUs)."""
    from fastnn._backend import _C
    a, b = torch.rand(6, 4), torch.rand(3, 4)
    for bad in (torch.rand(6, 2), torch.rand(6, 5), torch.rand(24)):
        with pytest.raises(RuntimeError, match="boxes1 must be"):
            torch.ops.fastnn.pairwise_box_iou(bad, b, False)
        with pytest.raises(RuntimeError, match="boxes must be"):
            _C.pairwise_box_iou_cpu(bad, b, False)
    for grad in (torch.rand(3, 6), torch.rand(1), torch.rand(6, 4)):
        with pytest.raises(RuntimeError, match="grad must be"):
            torch.ops.fastnn.pairwise_box_iou_backward(grad, a, b, False)
        with pytest.raises(RuntimeError, match="grad must be"):
            _C.pairwise_box_iou_backward_cpu(grad, a, b, False, False)
    g1, g2 = torch.ops.fastnn.pairwise_box_iou_backward(torch.rand(6, 3), a, b, False)
    assert g1.shape == a.shape and g2.shape == b.shape
