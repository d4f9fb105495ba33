# Set-up and everyday commands. `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2

.PHONY: venv build install demo test test-fast test-integration lint check-cuda bench clean

$(VENV)/.deps: requirements.txt requirements-data.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the CPU wheel on local disk (first: nothing else may pull torch)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $@

venv: $(VENV)/.deps

# The C++ extension (and CUDA kernels on a CUDA machine). flock: several shells may build at once.
build: venv
	MAX_JOBS=$(JOBS) flock /tmp/admm_kernels_build.lock $(PIP) install -q --no-build-isolation --no-deps -e .

install: build

demo: install
	$(VENV)/bin/admm-prune prune

test: install lint
	$(PY) -m pytest -q tests

# llm-compressor integration tests in their own venv (cached in ~/.cache/admm_kernels; ~1 min to create).
test-integration: build
	tools/run_integration_tests.sh

lint: venv
	$(VENV)/bin/ruff check admm_kernels tests tests_integration benchmarks tools setup.py

check-cuda: venv
	$(PY) tools/check_cuda_syntax.py

clean:
	rm -rf build *.egg-info admm_kernels/_C*.so
