#!/usr/bin/env bash
# One-shot GPU check: build the extension with CUDA, run the GPU and Triton tests, benchmark.
#
# Usage: benchmarks/gpu/run.sh OUTDIR
# For a machine with one NVIDIA GPU and its own CUDA torch (never pip-installs torch). Every step has a
# time limit and its own log (OUTDIR/<step>.log); a failed step is recorded in OUTDIR/steps.tsv and the
# rest still run. The whole script stays within TOTAL_BUDGET_S (default 480 s = 8 minutes): each step's
# limit is cut to what is left. Results: OUTDIR/results.json, OUTDIR/results.md, OUTDIR/summary.md.
# Environment: PYTHON (default python3), JOBS (default 16), TOTAL_BUDGET_S, BENCH_ARGS (extra arguments of
# bench_gpu.py, e.g. smaller sizes), SKIP_BUILD=1 (use the extension as it is: for checking this script).
set -u
OUT="${1:?usage: benchmarks/gpu/run.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/../.." || exit 1
PY="${PYTHON:-python3}"
JOBS="${JOBS:-16}"
BUDGET="${TOTAL_BUDGET_S:-480}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
: > "$OUT/steps.tsv"

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log"; }

# step NAME LIMIT_S CMD...: run CMD with a timeout (LIMIT_S, cut to the budget left), log to OUTDIR/NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  if (( left < 10 )); then
    log "step $name: SKIPPED (time budget spent)"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    return 0
  fi
  (( limit > left )) && limit=$left
  log "step $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then log "step $name: TIMED OUT after ${dt}s"; else log "step $name: rc=$rc in ${dt}s"; fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$OUT/steps.tsv"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/run.log"
  return 0
}

step env 30 bash -c "nvidia-smi; echo CC=\${CC-} CXX=\${CXX-}; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -2"

# Only what is missing, never torch; offline machines skip this step gracefully.
missing=""
$PY -c "import pytest" 2>/dev/null || missing="$missing pytest"
$PY -c "import pytest_benchmark" 2>/dev/null || missing="$missing pytest-benchmark"
$PY -c "import ninja" 2>/dev/null || missing="$missing ninja"
if [[ -n "$missing" ]]; then
  step pip 60 $PY -m pip install -q --retries 1 --timeout 10 --no-deps $missing
fi

# Build admm_kernels._C with the CUDA sources (ADMM_KERNELS_CUDA=1: fail loudly if they cannot be built);
# fall back to an in-place build when an editable install is not possible. The same setup.py path as
# `make check-gpu-build` (tools/build_flags.py): C++17 for torch <= 2.13 (the H200 image has 2.11), C++20
# from 2.14; the visible GPU's architecture only (torch's detection), so the build takes ~1-2 minutes.
[[ "${SKIP_BUILD:-0}" == 1 ]] || step build 200 bash -c "MAX_JOBS=$JOBS ADMM_KERNELS_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . \
  || MAX_JOBS=$JOBS ADMM_KERNELS_CUDA=1 $PY setup.py build_ext --inplace"
step check_ext 30 $PY -c "import admm_kernels.backends.cuda as c, admm_kernels.backends.triton as t; \
print('cuda backend available:', c.is_available(), c.unavailable_reason() if not c.is_available() else ''); \
print('triton backend available:', t.is_available())"
# Every kernel of every backend against the reference on this GPU, with times (admm_kernels/doctor.py):
# the first numerics of the CUDA/Triton kernels on a real device; OUTDIR/doctor.log and doctor.json.
step doctor 120 bash -c "$PY -m admm_kernels doctor; $PY -m admm_kernels doctor --json --repeat 3 > '$OUT/doctor.json'"

# pytest: addopts of pyproject.toml need pytest-benchmark; override them so a missing plugin cannot stop us.
step test_gpu 150 env ADMM_REQUIRE_CUDA_EXT=1 $PY -m pytest -q -o addopts=-ra -m gpu tests
step test_triton 90 $PY -m pytest -q -o addopts=-ra tests/kernels/test_triton.py
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step bench 180 $PY benchmarks/gpu/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-}

{
  echo "# benchmarks/gpu/run.sh summary ($(date '+%Y-%m-%d %H:%M'), $(( $(date +%s) - START )) s)"
  echo
  echo "| step | exit status | seconds |"
  echo "|---|---|---|"
  while IFS=$'\t' read -r n rc dt; do echo "| $n | $rc | $dt |"; done < "$OUT/steps.tsv"
  echo
  [[ -f "$OUT/doctor.log" ]] && echo "- doctor: $(grep -E 'checks passed' "$OUT/doctor.log" | tail -n 1)"
  for t in test_gpu test_triton; do
    [[ -f "$OUT/$t.log" ]] && echo "- $t: $(grep -E '(passed|failed|error|skipped)' "$OUT/$t.log" | tail -n 1)"
  done
  echo
  [[ -f "$OUT/results.md" ]] && cat "$OUT/results.md"
} > "$OUT/summary.md"
log "done in $(( $(date +%s) - START )) s; summary in $OUT/summary.md"
# Non-zero when any step failed, so a caller can tell; every step has run regardless.
! grep -qvP '\t0\t' "$OUT/steps.tsv"
