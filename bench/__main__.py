"""python -m bench [--suite NAME ...] [--device cpu|cuda] [--quick] [--out DIR]

Runs each suite's cases against their peers, prints the results table, writes
<out>/<device>-latest.json and a PNG plot per suite (default out: bench/results)."""
import argparse
import importlib
import sys

import torch

import fastnn

from . import harness
from .suites import SUITES


def _failing_records(records):
    """Rows that fail the run: a disagreement with the peer, unless the case's float64 reference shows the
    peer is the side that is off."""
    return [r for r in records if r.get("agrees_with_peer") is False and not r.get("peer_off_reference")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", choices=SUITES, help="suite to run (repeatable; default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, for smoke runs and gpu-check")
    p.add_argument("--out", default=harness.RESULTS_DIR, help="directory for the JSON and plots")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")

    torch.manual_seed(0)
    ceilings = harness.measure_ceilings(args.device, args.quick)
    card = harness.device_name(args.device)
    print(f"fastnn bench on {args.device} ({card}); ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, "
          f"matmul {ceilings['matmul_TFLOPs']:.2f} TFLOP/s ({ceilings['matmul_dtype']}), "
          f"exp {ceilings['exp_Gps']:.2f} G/s")
    print(harness.HEADER)
    records = []
    info = fastnn.build_info()
    for name in args.suite or SUITES:
        try:
            suite = importlib.import_module(f"bench.suites.{name}")
            cases = suite.cases(args.device, args.quick)
        except Exception as e:  # a suite that cannot even build its cases: report it, run the others
            print(f"{name}: FAILED to build its cases: {type(e).__name__}: {str(e)[:300]}", flush=True)
            harness.FAILURES.append({"suite": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        records += harness.run_cases(cases, args.device, ceilings, args.quick)
        # Rewritten after every suite, so a run cut off by a time limit keeps the suites it finished.
        path = harness.write_results(records, args.device, ceilings, args.out,
                                     {"quick": args.quick, "build_info": info, "failures": harness.FAILURES})
    path = harness.write_results(records, args.device, ceilings, args.out,
                                 {"quick": args.quick, "build_info": info, "failures": harness.FAILURES})
    print(f"wrote {path}")
    if not args.no_plot:
        for name in args.suite or SUITES:
            png = harness.plot_suite(records, name, args.device, card, args.out)
            if png:
                print(f"wrote {png}")
    bad = _failing_records(records)
    peer_off = [r for r in records if r.get("peer_off_reference")]
    if peer_off:
        print(f"{len(peer_off)} case(s): the peer is off the float64 reference and ours is not", file=sys.stderr)
    if bad:
        print(f"{len(bad)} case(s) disagree with their peer", file=sys.stderr)
    if harness.FAILURES:
        print(f"{len(harness.FAILURES)} case(s) or suite(s) failed", file=sys.stderr)
    return 1 if bad or harness.FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
