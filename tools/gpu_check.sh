#!/usr/bin/env bash
# make gpu-check: the one prepared command for a lent GPU machine (DESIGN.md section 7).
# Uses that machine's python3 (no venv, nothing to install): builds fastnn._C with the CUDA kernels on all
# cores, runs the tests marked `cuda`, runs the quick benchmark on the GPU, and writes logs and the
# results JSON under $OUT (./gpu-check-out when OUT is unset). Budget: under 8 minutes.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1
stamp "GPU: $(tail -1 "$OUT/nvidia-smi.txt")"

stamp "building fastnn._C with CUDA"
if ! FASTNN_CUDA=1 MAX_JOBS=$(nproc) timeout 300 "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "build failed"
  exit 1
fi
"$PY" -c "import fastnn, json; print(json.dumps(fastnn.build_info(), indent=1))" > "$OUT/build_info.json" 2>&1
cat "$OUT/build_info.json"

stamp "pytest -m cuda"
PYTHONUNBUFFERED=1 timeout 240 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-cuda.log"
rc_test=${PIPESTATUS[0]}

stamp "python -m bench --device cuda --quick"
PYTHONUNBUFFERED=1 timeout 200 "$PY" -m bench --device cuda --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

stamp "done: pytest rc=$rc_test bench rc=$rc_bench"
[ "$rc_test" -eq 0 ] && [ "$rc_bench" -eq 0 ]
