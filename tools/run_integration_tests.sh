#!/usr/bin/env bash
# Integration tests against llm-compressor, in a virtual environment of their own.
#
# llm-compressor 0.13.0 pins transformers <= 5.14.1 (our main environment has 5.24), so it cannot share
# the main venv. The venv is created once per machine outside the checkout and reused while the pinned
# versions below are unchanged (a stamp file records them):
#   ${ADMM_KERNELS_LLMC_VENV:-~/.cache/admm_kernels/venv-llmcompressor-0.13.0}
# Our package is imported from this checkout through PYTHONPATH (the compiled extension admm_kernels/_C
# is used when `make build` put it there; the pure-torch reference kernels otherwise).
#
# Usage: tools/run_integration_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

LLMC_VERSION=0.13.0
TORCH_VERSION=2.13.0   # the CPU wheel on local disk; llm-compressor 0.13.0 accepts torch <= 2.13.0
PINS="torch==$TORCH_VERSION llmcompressor==$LLMC_VERSION pytest safetensors tqdm"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/admm_kernels
VENV=${ADMM_KERNELS_LLMC_VENV:-$CACHE/venv-llmcompressor-$LLMC_VERSION}
STAMP=$VENV/.admm_kernels-pins

make_venv() {
    # Built in place (console scripts carry the venv's absolute path); the stamp is written last, so
    # an interrupted build is redone by the next run.
    echo "integration: creating $VENV (llmcompressor==$LLMC_VERSION; about a minute)" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"   # first: nothing else may pull another torch
    "$VENV/bin/python" -m pip install -q $PINS
    echo "$PINS" > "$STAMP"
}

mkdir -p "$(dirname "$VENV")"
(
    flock 9   # two runs on one machine: the second waits for the first to finish the venv
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$PINS" ]; then
        make_venv
    fi
) 9>"$VENV.lock"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# -o addopts: pyproject.toml's addopts name pytest-benchmark, which this venv does not need.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts=-ra tests_integration "$@"
