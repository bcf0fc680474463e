# Everyday commands. CI runs `make build` then `make test` (no GPU: gpu-marked tests are skipped there).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: build build-python test test-gpu bench bench-cpu lint gpu-check gpu-check-dry gpu-check-plan gpu-prepare \
	gpu-rehearsal cmake help

help:
	@echo "make build       install editable and compile nanotrain._C (CUDA sm_80+sm_90a where nvcc is found)"
	@echo "make build-python  install without the extension (NANOTRAIN_NO_EXT=1)"
	@echo "make test        the CPU test suite (pytest tests)"
	@echo "make test-gpu    only the gpu-marked tests (needs a CUDA GPU)"
	@echo "make bench       every benchmark through pytest-benchmark (GPU ones skip without CUDA)"
	@echo "make bench-cpu   the CPU benchmarks (packer, loader) into one results file (benchmarks/out/results.jsonl)"
	@echo "make lint        ruff"
	@echo "make gpu-check CALL=call1|call2   one call of the lent-GPU plan (benchmarks/gpu_check.sh; needs CUDA)"
	@echo "make gpu-prepare   here, before the GPU calls: rustbpe cp312 wheel in .whl/, corpus + tokenizer in .gpu_carry/"
	@echo "make gpu-check-dry  both calls of the plan end to end on this machine, CUDA work skipped"
	@echo "make gpu-check-plan print the two device calls with this commit filled in"
	@echo "make gpu-rehearsal the GPU image's python3.12 + torch 2.11.0 + triton 3.6.0 in .rehearsal/: kernel tests + AOT compiles"
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
	$(PYTHON) benchmarks/run.py bench packing loader

lint:
	ruff check .

COMMIT := $(shell git describe --always --dirty=+dirty 2>/dev/null || echo unknown)
CALL ?= call1

gpu-check:
	NANOTRAIN_COMMIT=$${NANOTRAIN_COMMIT:-$(COMMIT)} PYTHON=$(PYTHON) benchmarks/gpu_check.sh $(CALL)

gpu-prepare:
	PYTHON=$(PYTHON) benchmarks/gpu_check.sh prepare

gpu-check-dry:
	NANOTRAIN_COMMIT=$(COMMIT) PYTHON=$(PYTHON) benchmarks/gpu_check.sh --dry-run call1
	NANOTRAIN_COMMIT=$(COMMIT) PYTHON=$(PYTHON) benchmarks/gpu_check.sh --dry-run call2

gpu-check-plan:
	@echo 'run(command="NANOTRAIN_COMMIT=$(COMMIT) benchmarks/gpu_check.sh call1", carry=[".whl", ".gpu_carry"], timeout_s=420)'
	@echo 'run(command="NANOTRAIN_COMMIT=$(COMMIT) benchmarks/gpu_check.sh call2", carry=[".whl", ".gpu_carry"], timeout_s=380)'

gpu-rehearsal:
	benchmarks/gpu_rehearsal.sh

cmake:
	cmake -S . -B build -G Ninja -DPython3_EXECUTABLE="$$(command -v $(PYTHON))"
	cmake --build build
