"""Diagnostics for a lent GPU machine (run by tools/gpu_check.sh after the tests): the open questions of the
first H100 run (bench/NOTES.md, "First H100 run of every suite"), answered in a few seconds each.

1. roi_align: ours on CUDA vs ours on the CPU vs torchvision on CUDA and on the CPU, on the bench's inputs:
   the largest differences, so a disagreement is pinned to one side.
2. Fixed cost per call: torch.profiler over a few small calls (fpn top-down, SPPF pooling, a decode-shaped
   attention call), the CPU-side functions that take the time.
3. Selective scan at the bench's shape (B8 D1536 L2048 N16 bf16, per-step B / C, z): the time of each CUDA
   kernel of a forward+backward, so the gap to the HBM floor is pinned to the forward scan, the backward
   scan or the reductions around them.

Usage: python tools/gpu_diag.py            (prints to stdout)
       python tools/gpu_diag.py --once  (one forward+backward of 3. and one of the roi bench's roi_align, for
                                          ncu in tools/gpu_check.sh)"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastnn  # noqa: E402
from fastnn import ops  # noqa: E402


def roi_sides():
    import torchvision

    from bench.suites.roi import make_rois

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 200, 200, generator=g)
    rois = make_rois(512, 2, 800, "cpu")
    for sr, aligned in ((2, False), (-1, False), (2, True)):
        outs = {}
        with fastnn.use_backend("cpp"):
            outs["ours-cpu"] = ops.roi_align(x, rois, 7, 0.25, sr, aligned)
        with fastnn.use_backend("cuda"):
            outs["ours-cuda"] = ops.roi_align(x.cuda(), rois.cuda(), 7, 0.25, sr, aligned).cpu()
        outs["tv-cpu"] = torchvision.ops.roi_align(x, rois, 7, 0.25, sr, aligned)
        outs["tv-cuda"] = torchvision.ops.roi_align(x.cuda(), rois.cuda(), 7, 0.25, sr, aligned).cpu()
        names = list(outs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                d = (outs[a] - outs[b]).abs()
                worst = int(d.flatten().argmax())
                print(f"roi sr={sr} aligned={aligned}: {a} vs {b}: max |diff| {float(d.max()):.3g} "
                      f"at flat index {worst} (roi {worst // (256 * 49)}), {int((d > 1e-5).sum())} over 1e-5")


def profile(name, fn, calls=20, sort_by="self_cpu_time_total"):
    from torch.profiler import ProfilerActivity, profile as prof

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t) / calls * 1e3
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"\n== {name}: {per_call:.3f} ms per call (wall, {calls} calls)")
    try:
        table = p.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=60)
    except Exception:  # older / newer names of the device-time column
        table = p.key_averages().table(sort_by=sort_by.replace("cuda", "device"), row_limit=12,
                                       max_name_column_width=60)
    print(table)


def overheads():
    dev = "cuda"
    lat, top = torch.randn(1, 256, 32, 32, device=dev), torch.randn(1, 256, 16, 16, device=dev)
    profile("fpn_topdown_add 32<-16", lambda: ops.fpn_topdown_add(lat, top))
    y = torch.randn(1, 256, 20, 20, device=dev)
    profile("sppf_pool 20x20", lambda: ops.sppf_pool(y, 5))
    q = torch.randn(8, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(8, 8192, 8, 128, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((8,), 8192, dtype=torch.int32, device=dev)
    profile("attention_decode B8 H32/8 cache 8192 D128", lambda: ops.attention_decode(q, kc, vc, lens), calls=10)


def scan_inputs():
    from bench.suites.ssm import _fwd_bwd, _inputs

    return _fwd_bwd(ops.selective_scan_fn, _inputs(8, 1536, 2048, 16, torch.bfloat16, "cuda"))


def roi_inputs():
    from bench.suites.roi import make_rois

    x = torch.randn(2, 256, 200, 200, device="cuda", requires_grad=True)
    rois = make_rois(512, 2, 800, "cuda")
    dy = torch.randn(512, 256, 7, 7, device="cuda")

    def fwd_bwd():
        x.grad = None
        ops.roi_align(x, rois, 7, 0.25, 2, False).backward(dy)
    return fwd_bwd


def scan_kernels():
    profile("selective_scan_fn fwd+bwd B8 D1536 L2048 N16 bf16", scan_inputs(), calls=5,
            sort_by="self_cuda_time_total")


def main():
    if not torch.cuda.is_available():
        print("gpu_diag: no CUDA GPU")
        return 1
    if "--once" in sys.argv:
        for make in (scan_inputs, roi_inputs):
            make()()
        torch.cuda.synchronize()
        return 0
    for step in (roi_sides, overheads, scan_kernels):
        try:
            step()
        except Exception as e:  # one failing diagnostic must not hide the others
            print(f"gpu_diag {step.__name__}: FAILED {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
