"""Builds fastnn._C (C++ CPU kernels always, CUDA C++ when possible) and installs kernels/ as fastnn.kernels.

Environment:
  FASTNN_CUDA=1   compile the CUDA C++ sources (error if torch has no CUDA or nvcc is missing)
  FASTNN_CUDA=0   skip them; unset: compile them when torch has CUDA and nvcc is found
  FASTNN_CUDA_ARCHS  comma-separated subset of sm_80,sm_90a,compute_90 to compile (default: all three; the
                  GPU check builds only its card's arch to save compile time)
  FASTNN_MARCH    -march value for the CPU kernels (default: native; the build machine is the run machine)
  MAX_JOBS        parallel compile jobs for ninja
  FASTNN_NO_EXT=1 register the packages only (make setup; `make build` then compiles in place)
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_real_nvcc(path):
    """The nvcc on PATH may be a wrapper script; the toolkit's bin/nvcc is an ELF binary."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _find_cuda_home():
    """CUDA_HOME if set, else the toolkit the nvcc on PATH really runs, else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        if _is_real_nvcc(real):
            candidates.append(os.path.dirname(os.path.dirname(real)))
        else:  # a wrapper: look for the toolkit path it execs
            try:
                with open(real) as f:
                    for word in f.read().split():
                        if word.endswith("/bin/nvcc") and _is_real_nvcc(word):
                            candidates.append(os.path.dirname(os.path.dirname(word)))
            except (OSError, UnicodeDecodeError):
                pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_real_nvcc(os.path.join(c, "bin", "nvcc")) and os.path.isdir(os.path.join(c, "include")):
            return c
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when imported; it must see the real toolkit.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# sm_80 (A100) and sm_90a (H100/H200, wgmma) machine code, plus compute_90 PTX for newer chips.
_GENCODE = {
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
    "compute_90": "-gencode=arch=compute_90,code=compute_90",
}


def _cuda_archs():
    wanted = [a.strip() for a in os.environ.get("FASTNN_CUDA_ARCHS", "").split(",") if a.strip()]
    unknown = [a for a in wanted if a not in _GENCODE]
    if unknown:
        sys.exit(f"FASTNN_CUDA_ARCHS: unknown arch(s) {unknown}; expected a subset of {list(_GENCODE)}")
    return wanted or list(_GENCODE)


CUDA_ARCHS = ",".join(_cuda_archs())
CUDA_ARCH_FLAGS = [_GENCODE[a] for a in CUDA_ARCHS.split(",")]


def _want_cuda():
    flag = os.environ.get("FASTNN_CUDA", "").strip()
    have_torch_cuda = torch.version.cuda is not None
    have_nvcc = CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have_torch_cuda:
            sys.exit("FASTNN_CUDA=1 but this torch was built without CUDA")
        if not have_nvcc:
            sys.exit("FASTNN_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return True
    return have_torch_cuda and have_nvcc


def _cuda_version():
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]
    except (OSError, IndexError, TypeError):
        return "unknown"


def _extra_include_dirs():
    """torch's ATen/cuda headers include cublas/cusparse headers that pip installs under nvidia/cu13."""
    dirs = [os.path.join(ROOT, "csrc")]
    for base in {os.path.dirname(os.path.dirname(torch.__file__))}:
        for sub in ("cu13", "cu12"):
            inc = os.path.join(base, "nvidia", sub, "include")
            if os.path.isdir(inc):
                dirs.append(inc)
    return dirs


def _write_build_config(with_cuda, cxx_flags, nvcc_flags):
    gen = os.path.join(ROOT, "csrc", "generated")
    os.makedirs(gen, exist_ok=True)

    def q(s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = "\n".join([
        "// Written by setup.py at build time; not committed.",
        "#pragma once",
        f"#define FASTNN_BUILD_WITH_CUDA {'true' if with_cuda else 'false'}",
        f"#define FASTNN_BUILD_CUDA_ARCHS {q(CUDA_ARCHS if with_cuda else '')}",
        f"#define FASTNN_BUILD_CXX_FLAGS {q(' '.join(cxx_flags))}",
        f"#define FASTNN_BUILD_NVCC_FLAGS {q(' '.join(nvcc_flags) + ((' (' + _cuda_version() + ')') if with_cuda else ''))}",
        f"#define FASTNN_BUILD_CUDA_HOME {q(CUDA_HOME or '')}",
        f"#define FASTNN_BUILD_TORCH_VERSION {q(torch.__version__)}",
        "",
    ])
    path = os.path.join(gen, "build_config.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _extension():
    with_cuda = _want_cuda()
    march = os.environ.get("FASTNN_MARCH", "native")
    # -ffp-contract=off: no FMA contraction, so IoU values match torchvision and the GPU bit for bit.
    cxx_flags = ["-O3", f"-march={march}", "-ffp-contract=off", "-fopenmp"]
    nvcc_flags = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"] + CUDA_ARCH_FLAGS
    _write_build_config(with_cuda, cxx_flags, nvcc_flags)
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/common/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="fastnn._C",
        include_dirs=_extra_include_dirs(),
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            sources=sources,
            define_macros=[("FASTNN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-DFASTNN_WITH_CUDA"], "nvcc": nvcc_flags},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)


setup(
    name="fastnn",
    version="0.1.0",
    description="Hand-written Triton, CUDA C++ and C++ CPU kernels for PyTorch, as drop-in layers",
    packages=["fastnn", "fastnn.nn", "fastnn.ops", "fastnn.reference", "fastnn.kernels"],
    package_dir={"fastnn.kernels": "kernels"},
    ext_modules=[] if os.environ.get("FASTNN_NO_EXT") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
