#!/usr/bin/env bash
# Compile one CUDA C++ source of fastnn to an object file with the flags setup.py uses, then print its
# per-kernel resource usage (registers, stack = spills, shared memory) for every architecture.
#   tools/compile_cuda_file.sh csrc/cuda/selective_scan_fwd.cu [out.o]
# PYTHON picks the interpreter whose torch supplies the headers (default: .venv/bin/python, then python3).
# torch.utils.cpp_extension's own nvcc flags (C++20, the no-half-operator defines) are added too, as
# the real build gets them. Works without a GPU. Run one at a time on the 2-core machine (a .cu with torch headers takes minutes).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:?usage: $0 file.cu [out.o]}
OBJ=${2:-/tmp/$(basename "${SRC%.cu}").o}
if [ -z "${PYTHON:-}" ]; then
  for c in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python python3; do
    if [ -x "$c" ] || command -v "$c" >/dev/null 2>&1; then PYTHON=$c; break; fi
  done
fi
CUDA_HOME=${CUDA_HOME:-$(ls -d /usr/local/cuda-* /usr/local/cuda 2>/dev/null | while read -r d; do
  [ -x "$d/bin/nvcc" ] && [ -d "$d/include" ] && echo "$d"; done | sort -r | head -1)}
export CUDA_HOME
# Include dirs, ABI flag and the nvidia/cu13 headers, as torch.utils.cpp_extension and setup.py see them.
mapfile -t PYFLAGS < <("$PYTHON" - <<'PY' 2>/dev/null
import os, torch
from torch.utils.cpp_extension import include_paths
for p in include_paths(device_type="cuda"):
    print("-I" + p)
base = os.path.dirname(os.path.dirname(torch.__file__))
for sub in ("cu13", "cu12"):
    inc = os.path.join(base, "nvidia", sub, "include")
    if os.path.isdir(inc):
        print("-I" + inc)
import sysconfig
print("-I" + sysconfig.get_paths()["include"])  # Python.h (torch/extension.h includes pybind11)
print("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
PY
)
"$CUDA_HOME/bin/nvcc" -c "$ROOT/$SRC" -o "$OBJ" \
  -O3 --fmad=false -lineinfo --expt-relaxed-constexpr \
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
  -gencode=arch=compute_90,code=compute_90 \
  -I"$ROOT/csrc" "${PYFLAGS[@]}" -DFASTNN_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ -std=c++20 -Xcompiler -fPIC ${NVCC_EXTRA:-}
CUOBJDUMP=$(command -v cuobjdump || true)
[ -z "$CUOBJDUMP" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
[ -z "$CUOBJDUMP" ] && CUOBJDUMP=$("$PYTHON" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
echo "== $OBJ"
"$CUOBJDUMP" --dump-resource-usage "$OBJ" | grep -E "arch|Function|REG" | sed 's/^[[:space:]]*//' | c++filt
