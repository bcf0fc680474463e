# Everyday commands. CI runs `make build` then `make test` (no GPU: gpu-marked tests are skipped there).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: build build-python test test-gpu bench bench-cpu lint gpu-check cmake help

help:
	@echo "make build       install editable and compile nanotrain._C (CUDA sm_80+sm_90a where nvcc is found)"
	@echo "make build-python  install without the extension (NANOTRAIN_NO_EXT=1)"
	@echo "make test        the CPU test suite (pytest tests)"
	@echo "make test-gpu    only the gpu-marked tests (needs a CUDA GPU)"
	@echo "make bench       every benchmark through pytest-benchmark (GPU ones skip without CUDA)"
	@echo "make bench-cpu   the CPU benchmarks as scripts (packer), with RESULTS.md rows"
	@echo "make lint        ruff"
	@echo "make gpu-check   the lent-GPU script: build, gpu tests, benchmarks, training throughput"
	@echo "make cmake       build the extension with CMake into build/ (for C++/CUDA development)"

build:
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -c "from nanotrain.ops._ext import extension_status; print('nanotrain._C:', extension_status())"

build-python:
	NANOTRAIN_NO_EXT=1 $(PIP) install --no-build-isolation --no-deps -e .

test:
	$(PYTHON) -m pytest -q tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

bench:
	$(PYTHON) -m pytest -q benchmarks

bench-cpu:
	$(PYTHON) benchmarks/bench_packing.py

lint:
	ruff check .

gpu-check:
	benchmarks/gpu_check.sh

cmake:
	cmake -S . -B build -G Ninja -DPython3_EXECUTABLE="$$(command -v $(PYTHON))"
	cmake --build build
