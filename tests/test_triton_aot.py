"""Tier 4: every Triton kernel configuration compiles ahead of time for sm_90 and sm_80 (no GPU needed),
without register spills and within the chip's shared memory; the compiled CUDA C++ kernels likewise."""
import os

import pytest

import fastnn

pytest.importorskip("triton")

from fastnn.kernels import all_aot_specs  # noqa: E402

from _tiers import aot_reports, assert_fits, cuda_cxx_resource_usage, spec_id, spec_options  # noqa: E402

# (spec id, arch) for each architecture a configuration is launched on
SPEC_ARCHS = [pytest.param(spec_id(s), a, id=f"{spec_id(s)}-sm{a}")
              for s in all_aot_specs() for a in spec_options(s)["archs"]]


@pytest.mark.parametrize("sid,arch", SPEC_ARCHS)
def test_triton_kernel_compiles_without_spills(sid, arch):
    report = aot_reports()[sid][arch]
    assert_fits(report, arch, sid)
    assert report["REG"] <= 255


@pytest.mark.skipif(not fastnn.build_info()["cuda_compiled"], reason="fastnn._C built without CUDA C++")
def test_cuda_cxx_kernels_have_no_spills():
    usage = {arch: {k: v for k, v in kernels.items() if "fastnn" in k}
             for arch, kernels in cuda_cxx_resource_usage().items()}
    machine_code = {arch for arch, kernels in usage.items() if kernels}  # PTX entries report nothing
    assert {"sm_80", "sm_90a"} <= machine_code, f"archs with fastnn kernels in fastnn._C: {sorted(machine_code)}"
    for arch in machine_code:
        for name, report in usage[arch].items():
            assert report.get("STACK", 0) == 0, f"{name} spills on {arch}: {report}"


def test_cuda_sources_compiled_when_forced():
    """CI builds with FASTNN_CUDA=1: then every CUDA C++ source must be in the extension."""
    if os.environ.get("FASTNN_CUDA") != "1":
        pytest.skip("FASTNN_CUDA=1 not set for this run")
    info = fastnn.build_info()
    assert info["cuda_compiled"], info
    assert {"sm_80", "sm_90a"} <= set(info["cuda_archs"])
