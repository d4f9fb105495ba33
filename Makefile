# Set-up and everyday commands. `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2
# Exact versions CI passed with (pip constraints); requirements.txt is the human-edited list.
LOCK := requirements-lock.txt

.PHONY: venv build install demo test test-fast test-integration lint check-cuda check-gpu-build lock clean

$(VENV)/.deps: requirements.txt requirements-data.txt $(LOCK)
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(LOCK) torch==2.13.0          # the CPU wheel on local disk (first: nothing else may pull torch)
	$(PIP) install -q -c $(LOCK) -r requirements.txt
	$(PIP) install -q -c $(LOCK) --no-deps -r requirements-data.txt
	touch $@

venv: $(VENV)/.deps

# Rewrite the lock from the venv after requirements.txt changed: installs requirements.txt *without* the
# old lock (so a changed pin can move), then freezes what the venv holds (the project and pip left out).
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	{ sed -n '/^#/p' $(LOCK); $(PIP) freeze --all --exclude-editable | grep -v -i -E '^(pip|admm[-_]kernels)=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	touch $(VENV)/.deps

# The C++ extension (and CUDA kernels on a CUDA machine). flock: several shells may build at once.
# An editable install: setup.py builds for this machine's CPU (-march=native; tools/build_flags.py).
build: venv
	MAX_JOBS=$(JOBS) flock /tmp/admm_kernels_build.lock $(PIP) install -q --no-build-isolation --no-deps -e .

install: build

demo: install
	$(VENV)/bin/admm-prune prune

# --durations=25: the slowest tests are listed after every run (CI's included), so the suite's time is known.
test: install lint
	$(PY) -m pytest -q --durations=25 tests

# The suite without the tests marked slow (pyproject.toml's markers): a quick check while working.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# llm-compressor integration tests in their own venv (cached in ~/.cache/admm_kernels; ~1 min to create).
test-integration: build
	tools/run_integration_tests.sh

# ruff, then the import contracts of .importlinter: the layer order and no import cycles (docs/DESIGN.md).
lint: venv
	$(VENV)/bin/ruff check admm_kernels tests tests_integration benchmarks tools setup.py
	$(VENV)/bin/lint-imports

check-cuda: venv
	$(PY) tools/check_cuda_syntax.py

# The GPU code checked as far as a machine without a GPU allows (tools/check_gpu_build.py): a real CUDA
# build against torch 2.14.1 (a second venv under ~/.cache/admm_kernels), dispatcher checks, ptxas and
# Triton sm_90 resource reports in build/gpu-check/, the CPU suite subset against that torch.
check-gpu-build: venv
	MAX_JOBS=$(JOBS) $(PY) tools/check_gpu_build.py --jobs $(JOBS)

clean:
	rm -rf build *.egg-info admm_kernels/_C*.so admm_kernels/_build_info.py
