# make test   - create .venv with the pinned environment (first use), build fastnn._C, run the test suite
# make bench  - same set-up, run the benchmark suite on the device present (CUDA if there is one)
# make gpu-check - on a lent GPU machine: its python3 (no venv), build with CUDA, cuda tests, quick bench
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
JOBS ?= $(shell nproc)

.PHONY: setup build test bench gpu-check clean

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Registers the source tree (fastnn, and kernels/ as fastnn.kernels) with the venv; no compile here.
$(VENV)/.editable: setup.py $(VENV)/.installed
	FASTNN_NO_EXT=1 $(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.editable

# Incremental (ninja keeps build/): only changed sources recompile.
build: setup
	MAX_JOBS=$(JOBS) $(VPY) setup.py -q build_ext --inplace

test: build
	$(VPY) -m pytest -q tests

bench: build
	$(VPY) -m bench

gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf build fastnn/_C*.so csrc/generated *.egg-info
