"""Benchmark harness: each case runs against its peer in the same process, alternating, median of repeats
(CUDA events on the GPU), and reports achieved throughput as a fraction of this machine's measured ceiling.

A suite is a module in bench/suites with `cases(device, quick) -> list[Case]`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, List, Optional

import torch

from fastnn._backend import _C

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Case:
    """One benchmark row. `work` is the floor for the metric: bytes for GB/s, flops for TFLOP/s."""
    suite: str
    case: str
    shape: str
    dtype: str
    ours: Callable[[], object]
    peer: str
    peer_fn: Optional[Callable[[], object]]
    metric: str = "GB/s"          # "GB/s" (vs the copy ceiling) or "TFLOP/s" (vs the matmul ceiling)
    work: float = 0.0
    check: Optional[Callable[[object, object], bool]] = None  # ours vs peer output agreement
    peak_memory: bool = False     # also record the peak memory of one call of each (CUDA only)
    # seconds of timed calls for this case instead of the default (1 s, 0.3 quick): for comparisons near
    # parity, where the 3 repeats a 0.3 s call gets cannot tell a few per cent from this machine's noise
    budget_s: Optional[float] = None
    # the same computation in float64 from the same (rounded) inputs: run only when ours and the peer
    # disagree, to tell which side is off. A peer that fails `check` against it while ours passes is
    # recorded as off the reference (peer_off_reference) and does not fail the run.
    reference: Optional[Callable[[], object]] = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call (CUDA events on the GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _minor_faults() -> int:
    """Page faults of this process so far that needed no I/O: on the CPU, each first touch of a fresh page."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_pair(ours: Callable, peer: Optional[Callable], device: str, quick: bool,
              budget_s: Optional[float] = None, floor: Optional[Callable] = None,
              faults: Optional[list] = None) -> tuple:
    """Median seconds of ours, peer and floor (None for an absent one), alternating calls after one
    untimed call of each. Repeats adapt to the slowest so a case takes about budget_s (default 1 s, 0.3 s
    quick; at least 3 repeats); a call of over 1 s is timed twice (its first timed call counts). With
    `faults` (a list), the mean page faults per timed call of each are appended to it in that order."""
    fns = [ours] + ([peer] if peer is not None else []) + ([floor] if floor is not None else [])
    # The first call of a torch custom op pays a one-time set-up (~1.5 s on the CPU machine, independent of
    # the input): one untimed call of each (both, so cases that step a state in place stay in step).
    for fn in fns:
        fn()
    first = []
    for fn in fns:  # warm-up, also the first estimate
        _sync(device)
        first.append(time_call(fn, device))
    slowest = max(first)
    budget = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    if slowest > 1.0:
        repeats = 1
        samples = [[f] for f in first]
    else:
        repeats = int(min(max(budget / max(slowest, 1e-6), 3), 25 if quick and budget_s is None else 100))
        samples = [[] for _ in fns]
    touched = [0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            before = _minor_faults()
            samples[i].append(time_call(fn, device))
            touched[i] += _minor_faults() - before
    if faults is not None:
        faults += [n / repeats for n in touched]
    medians = [statistics.median(s) for s in samples]
    return medians[0], (medians[1] if peer is not None else None), (medians[-1] if floor is not None else None)


def exp_floor_fn(exps: float) -> Optional[Callable[[], object]]:
    """A call that evaluates `exps` exponentials with the CPU kernels' vectorised exp2 on L1-resident data
    (the exp ceiling's own loop), or None without the CPU kernels: timed in step with an exp-bound op, its
    time is that op's floor measured at the same moment, which this VM's swings (the exp loop runs at
    8.6 G/s for seconds, then at 15-18) cannot skew the way a ceiling measured once can."""
    if _C is None or not hasattr(_C, "exp2_throughput_cpu"):
        return None
    x = torch.empty(2**13, dtype=torch.float32).uniform_(-6, 0)
    y = torch.empty_like(x)
    reps = max(1, round(exps / x.numel()))
    return lambda: _C.exp2_throughput_cpu(x, y, reps)


def measure_ceilings(device: str, quick: bool) -> dict:
    """This machine's copy bandwidth (GB/s, bytes read + written), matmul rate (TFLOP/s) and exp rate (G/s)."""
    if device == "cuda":
        n_copy, n_mm, mm_dtype = 256 * 2**20, 8192, torch.bfloat16
    else:
        n_copy, n_mm, mm_dtype = 32 * 2**20, 2048, torch.float32
    src = torch.empty(n_copy // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = min(time_call(lambda: dst.copy_(src), device) for _ in range(5 if quick else 10))
    a = torch.randn(n_mm, n_mm, device=device).to(mm_dtype)
    b = torch.randn(n_mm, n_mm, device=device).to(mm_dtype)
    torch.mm(a, b)
    mm_s = min(time_call(lambda: torch.mm(a, b), device) for _ in range(3 if quick else 5))
    # exp rate (fp32, torch's vectorised exp, every thread) on an L2-resident buffer: the compute floor of
    # ops dominated by exponentials (the selective scan's exp(dt * A) per state element).
    n_exp = 2**18 if device == "cpu" else 2**26
    xe = torch.empty(n_exp, dtype=torch.float32, device=device).uniform_(-4, 0)
    ye = torch.empty_like(xe)
    reps = 16 if device == "cpu" else 1

    def exps():
        for _ in range(reps):
            torch.exp(xe, out=ye)

    exps()
    exp_s = min(time_call(exps, device) for _ in range(5 if quick else 10))
    exp_gps = n_exp * reps / exp_s / 1e9
    # On the CPU torch.exp can be far below what the machine does (1.2 G/s a thread on the AMD EPYC VM, where
    # the scan's own exp evaluates 3-6 G/s): the ceiling is the faster of it and the CPU kernels' vectorised
    # exp2 (vec_math.h) on L1-resident data, which is what the scan's exp(dt * A) runs.
    kernel_exps = 2**21
    kernel = exp_floor_fn(kernel_exps) if device == "cpu" else None
    if kernel is not None:
        kernel()
        kernel_s = min(time_call(kernel, device) for _ in range(5 if quick else 10))
        exp_gps = max(exp_gps, kernel_exps / kernel_s / 1e9)
    return {"copy_GBps": 2 * n_copy / copy_s / 1e9, "matmul_TFLOPs": 2 * n_mm**3 / mm_s / 1e12,
            "matmul_dtype": str(mm_dtype).replace("torch.", ""), "exp_Gps": exp_gps}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def peak_memory_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak CUDA memory allocated during one call, above what was allocated before it (MB)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - base) / 2**20


def _max_abs_diff(a, b) -> Optional[float]:
    """Largest |a - b| over the tensors of two results (tensors or sequences of them); None if they do not
    pair up (different structure or shapes). NaN where exactly one side is NaN."""
    pairs = list(zip(a, b)) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else [(a, b)]
    worst = 0.0
    for x, y in pairs:
        if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.shape != y.shape:
            return None
        if x.numel():
            d = (x.double() - y.double()).abs()
            both_nan = x.isnan() & y.isnan()
            worst = max(worst, float(d.masked_fill(both_nan, 0).nan_to_num(nan=float("inf")).max()))
    return worst


def _against_reference(c: Case, ours, theirs) -> dict:
    """Ours and the peer each checked against the case's float64 reference (same check as ours vs peer)."""
    ref = c.reference()
    ours_ok, peer_ok = bool(c.check(ours, ref)), bool(c.check(theirs, ref))
    return {"ours_vs_reference": _max_abs_diff(ours, ref), "peer_vs_reference": _max_abs_diff(theirs, ref),
            "ours_agrees_with_reference": ours_ok, "peer_off_reference": ours_ok and not peer_ok}


# Cases (or whole suites) that raised: reported by python -m bench, which then exits non-zero.
FAILURES: List[dict] = []


def _failed(c: Case, stage: str, e: Exception) -> None:
    error = f"{stage}{type(e).__name__}: {str(e)[:300]}"
    print(f"{c.suite} {c.case} {c.shape}: FAILED {error}", flush=True)
    FAILURES.append({"suite": c.suite, "case": c.case, "shape": c.shape, "error": error})


def run_cases(cases: List[Case], device: str, ceilings: dict, quick: bool) -> List[dict]:
    records = []
    for c in cases:
        try:
            floor_fn = exp_floor_fn(c.work) if c.metric == "Gexp/s" and device == "cpu" else None
            faults: list = []
            ours_s, peer_s, floor_s = time_pair(c.ours, c.peer_fn, device, quick, c.budget_s, floor_fn, faults)
        except torch.OutOfMemoryError:
            print(f"{c.suite} {c.case} {c.shape}: out of memory, skipped", flush=True)
            continue
        except Exception as e:  # one broken case must not cost the rest of a (GPU-time-limited) run
            _failed(c, "", e)
            continue
        agree, diff, arbiter = None, None, {}
        if c.check is not None and c.peer_fn is not None:
            try:
                ours, theirs = c.ours(), c.peer_fn()
                agree = bool(c.check(ours, theirs))
            except Exception as e:
                _failed(c, "check: ", e)
                continue
            if not agree:  # how far off, so a failed check on a lent GPU can be diagnosed from the log
                diff = _max_abs_diff(ours, theirs)
                if c.reference is not None:
                    try:
                        arbiter = _against_reference(c, ours, theirs)
                    except Exception as e:
                        _failed(c, "reference: ", e)
                        continue
        if c.metric == "TFLOP/s":
            value = c.work / ours_s / 1e12
            ceiling = ceilings["matmul_TFLOPs"]
        elif c.metric == "GB/s":
            value = c.work / ours_s / 1e9
            ceiling = ceilings["copy_GBps"]
        elif c.metric == "Gexp/s":  # work = exponentials the op must evaluate
            value = c.work / ours_s / 1e9
            ceiling = ceilings.get("exp_Gps")
        else:  # a rate without a machine ceiling (e.g. tokens/s)
            value = c.work / ours_s
            ceiling = None
        rec = {
            "suite": c.suite, "case": c.case, "device": device, "dtype": c.dtype, "shape": c.shape,
            "ours_ms": ours_s * 1e3, "peer": c.peer, "peer_ms": None if peer_s is None else peer_s * 1e3,
            "speedup": None if peer_s is None else peer_s / ours_s,
            "metric": c.metric, "value": value, "ceiling_fraction": value / ceiling if ceiling else None,
            "agrees_with_peer": agree,
        }
        if floor_s is not None:  # ours against its floor timed alongside (see exp_floor_fn)
            rec["x_floor_paired"] = ours_s / floor_s
        if device == "cpu":  # first touches of fresh pages per call: ~1.5 us each on the CPU VM
            rec["ours_page_faults"] = faults[0]
            rec["peer_page_faults"] = faults[1] if peer_s is not None else None
        if diff is not None:
            rec["max_abs_diff"] = diff
        rec.update(arbiter)
        if c.peak_memory and device == "cuda":
            rec["ours_peak_MB"] = peak_memory_mb(c.ours, device)
            rec["peer_peak_MB"] = None if c.peer_fn is None else peak_memory_mb(c.peer_fn, device)
        records.append(rec)
        print(format_row(rec), flush=True)
    return records


HEADER = (f"{'suite':<7} {'case':<26} {'shape':<22} {'dtype':<8} {'dev':<5} {'ours ms':>10} "
          f"{'peer':<22} {'peer ms':>10} {'speedup':>8} {'achieved':>14} {'ceil%':>6}")


def format_row(r: dict) -> str:
    peer_ms = "-" if r["peer_ms"] is None else f"{r['peer_ms']:.3f}"
    speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    ach = f"{r['value']:.3g} {r['metric']}"
    frac = "-" if r["ceiling_fraction"] is None else f"{100 * r['ceiling_fraction']:.2f}"
    flag = "" if r.get("agrees_with_peer") in (None, True) else "  DISAGREES WITH PEER"
    if r.get("max_abs_diff") is not None:
        flag += f" (max |diff| {r['max_abs_diff']:.3g})"
    if r.get("ours_vs_reference") is not None:
        flag += (f"; vs float64 reference: ours {r['ours_vs_reference']:.3g}, peer {r['peer_vs_reference']:.3g}"
                 + (" (PEER OFF THE REFERENCE)" if r.get("peer_off_reference") else ""))
    if r.get("x_floor_paired") is not None:
        flag += f"  {r['x_floor_paired']:.2f}x the exp floor timed alongside"
    if (r.get("ours_page_faults") or 0) >= 100:  # worth a look: ~1.5 us each on the CPU VM
        flag += f"  {r['ours_page_faults']:.0f} page faults/call"
    if r.get("ours_peak_MB") is not None:
        flag += f"  peak MB {r['ours_peak_MB']:.0f} vs {r['peer_peak_MB'] or 0:.0f}"
    return (f"{r['suite']:<7} {r['case']:<26} {r['shape']:<22} {r['dtype']:<8} {r['device']:<5} "
            f"{r['ours_ms']:>10.3f} {r['peer']:<22} {peer_ms:>10} {speed:>8} {ach:>14} {frac:>6}{flag}")


def write_results(records: List[dict], device: str, ceilings: dict, out_dir: str, extra: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "card": device_name(device), "torch": torch.__version__,
        "ceilings": ceilings, **extra, "records": records,
    }
    path = os.path.join(out_dir, f"{device}-latest.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def plot_suite(records: List[dict], suite: str, device: str, card: str, out_dir: str) -> Optional[str]:
    """Bar chart of ours vs peer time per case (log scale), speedups annotated. Returns the PNG path."""
    rows = [r for r in records if r["suite"] == suite]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['shape']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["ours_ms"] for r in rows], width=0.4, label="fastnn")
    ax.bar([i + 0.2 for i in x], [r["peer_ms"] or 0 for r in rows], width=0.4, label="peer")
    for i, r in enumerate(rows):
        if r["speedup"]:
            ax.annotate(f"{r['speedup']:.1f}x", (i, max(r["ours_ms"], r["peer_ms"] or 0)), ha="center",
                        va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(f"{suite} on {device} ({card})")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{device}-{suite}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
