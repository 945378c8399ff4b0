"""Test set-up shared by every test file.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before anything
imports triton, hence here, before the imports. Outputs are poisoned (NaN / -1) so an unwritten element
fails the comparison. Tests marked `cuda` are skipped without a GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnn  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    fastnn.set_poison(True)


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
