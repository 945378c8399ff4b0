"""Test set-up shared by every test file.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before anything
imports triton, hence here, before the imports. Outputs are poisoned (NaN / -1) so an unwritten element
fails the comparison. Tests marked `cuda` are skipped without a GPU. Inductor compiles into a fresh cache
directory per session: its on-disk graph cache is not keyed on a custom op's fake kernel, so a cache left
by an earlier checkout could replay a graph built from a since-fixed fake.
"""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastnn-inductor-")

import pytest  # noqa: E402

import fastnn  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    fastnn.set_poison(True)


def pytest_unconfigure(config):
    if _INDUCTOR_CACHE is not None:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = fastnn.build_info()
    return (f"fastnn build: cuda_compiled={info['cuda_compiled']} archs={info['cuda_archs']} "
            f"backends={info['backends']} gpu={info['gpu']} triton={info['triton']}")
