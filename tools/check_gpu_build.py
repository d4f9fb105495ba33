#!/usr/bin/env python3
"""`make check-gpu-build`: the GPU code checked as far as a machine without a GPU allows.

Steps (each logged to OUT/<step>.log, OUT = build/gpu-check by default; a summary in OUT/summary.md):

1. venv     a second virtual environment with the CUDA 13.0 build of torch GPU_TORCH (from the machine's
            package index, ~5.5 GB) and requirements.txt at the versions of requirements-lock.txt, in
            $ADMM_KERNELS_CACHE or ~/.cache/admm_kernels/venv-torch<version>: shared by every clone on the
            machine, reinstalled only when the requirements or the lock change.
2. sync     the checkout's files are copied into a mirror next to it (…/gpu-build-torch<version>/src),
            only those whose content changed, so ninja's object files (kept there, one folder per build
            variant) stay valid across clones and runs: a cached run recompiles nothing.
3. cuda     the extension with the CUDA sources (CUDA_HOME=/usr/local/cuda, MAX_JOBS=2) built as a wheel
            (`pip wheel`: setup.py picks the portable CPU target by itself) for setup.py's default
            architectures (no GPU visible: every one this torch ships kernels for); its _C is unpacked into
            the mirror and checked by tools/gpu_build_checks.py --expect cuda (import, dispatcher
            registrations, each CUDA kernel called up to its device check, AVX only behind run-time
            dispatch), then the CPU suite subset below runs on it.
4. ptxas    tools/ptxas_report.py: registers, spills, stack, shared memory of every CUDA kernel per
            architecture (OUT/ptxas.json, OUT/ptxas.txt); fails on a spill.
5. triton   for every Triton version of TRITON_VERSIONS (pip --target folders in the cache; the venv's
            own for the one torch pins): tools/triton_aot.py compiles every kernel variant the launchers
            pick for sm_90 (OUT/triton-<version>.json; fails on an error or a spill), and
            tests/kernels/test_triton.py runs the kernels in that version's interpreter (the pinned version's
            interpreter tests are part of the step-3 subset). A version that cannot be downloaded is
            reported as skipped.
            The ptxas and Triton reports are pure functions of their inputs: a step whose inputs (sources,
            tools, compiler and torch versions) have the digest of its last passing run is not recomputed.
6. cpu      the CPU-only extension (ADMM_KERNELS_CUDA=0, in place: native CPU target) against the same
            torch, checked with --expect cpu and tests/kernels/test_ops.py.

The CPU suite subset run against torch GPU_TORCH (step 3): every test not marked model/slow/gpu, i.e.
the kernels against the reference, the solver, the sparse formats and layers, bad input, the pipeline
on tiny models and the CLI (the real SmolLM2 runs, the benchmarks and the nvcc syntax check stay in the
main suite, which runs them against the project's pinned torch; they exercise no torch API the subset
does not). Exit status 0 when every step passed.

Usage: python tools/check_gpu_build.py [--out DIR] [--jobs 2] [--skip-triton] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import fcntl
import filecmp
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TORCH = "2.14.1"
TRITON_VERSIONS = ("3.6.0", "3.8.0", "3.9.0")
# Extra packages the interpreter tests of a Triton version need: 3.6's interpreter fails with numpy >= 2.4
# ("only 0-dimensional arrays can be converted to Python scalars"), measured 2026-12-01.
INTERPRETER_EXTRA = {"3.6.0": "numpy==2.3.5"}
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
TEST_SUBSET = ["-m", "not model and not slow and not gpu"]
# Files of the checkout the build and the tests need (others, e.g. benchmarks' figures, are not copied).
MIRRORED = (
    "setup.py",
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "requirements.txt",
    "requirements-lock.txt",
    "admm_kernels",
    "csrc",
    "tools",
    "tests",
    "benchmarks/model_quality.py",  # the presets' protocol, whose materials tests/unit checks
    "benchmarks/preset_protocol.py",
)


def cache_root() -> str:
    return os.environ.get("ADMM_KERNELS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "admm_kernels"
    )


class Steps:
    """Runs commands with their output in OUT/<name>.log and keeps the outcome of each step."""

    def __init__(self, out: str):
        self.out = out
        self.rows: list[tuple[str, str, float, str]] = []
        os.makedirs(out, exist_ok=True)

    def run(self, name: str, cmd: list[str], cwd: str, env: dict | None = None, timeout: int = 3600) -> bool:
        t0 = time.perf_counter()
        log = os.path.join(self.out, f"{name}.log")
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        with open(log, "w", encoding="utf-8") as f:
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=cwd,
                    env={**os.environ, **(env or {})},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = 124
        dt = time.perf_counter() - t0
        tail = _tail(log, 3)
        self.add(name, "ok" if rc == 0 else f"FAIL (exit {rc})", dt, tail)
        if rc != 0:
            print(_tail(log, 40), file=sys.stderr)
        return rc == 0

    def add(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.rows.append((name, status, seconds, detail))
        print(f"[{name}] {status} in {seconds:.0f} s" + (f"\n    {detail}" if detail else ""), flush=True)

    def ok(self) -> bool:
        return all(r[1] == "ok" or r[1].startswith("skipped") for r in self.rows)

    def summary(self) -> str:
        lines = ["| step | result | seconds | last lines |", "|---|---|---|---|"]
        for name, status, dt, detail in self.rows:
            lines.append(
                f"| {name} | {status} | {dt:.0f} | {detail.replace(chr(10), ' / ').replace('|', '/')} |"
            )
        return "\n".join(lines)


def _tail(path: str, n: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return "\n    ".join(lines[-n:])


def _digest(*paths: str, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def ensure_venv(steps: Steps, venv: str) -> bool:
    """The torch GPU_TORCH venv with requirements.txt at the lock's versions (torch lines replaced)."""
    req, lock = os.path.join(ROOT, "requirements.txt"), os.path.join(ROOT, "requirements-lock.txt")
    data = os.path.join(ROOT, "requirements-data.txt")
    stamp = os.path.join(venv, f".deps-{_digest(req, lock, data, extra=GPU_TORCH)}")
    if os.path.exists(stamp):
        steps.add("venv", "ok", 0.0, f"cached: {venv}")
        return True
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run(
            [sys.executable if sys.prefix == sys.base_prefix else "python3", "-m", "venv", venv], check=True
        )
    work = os.path.join(venv, "admm-requirements")
    os.makedirs(work, exist_ok=True)
    keep = lambda line: not line.strip().lower().startswith(("torch==", "torch>", "torch<", "torch "))  # noqa: E731
    with open(req, encoding="utf-8") as f, open(os.path.join(work, "requirements.txt"), "w") as g:
        g.writelines(ln for ln in f if keep(ln))
    with open(lock, encoding="utf-8") as f, open(os.path.join(work, "constraints.txt"), "w") as g:
        g.writelines(ln for ln in f if keep(ln))
    py = os.path.join(venv, "bin", "python")
    pip = [py, "-m", "pip", "install", "-q", "-c", os.path.join(work, "constraints.txt")]
    ok = (
        steps.run("venv-torch", [*pip, f"torch=={GPU_TORCH}"], cwd=ROOT)
        and steps.run(
            "venv-requirements",
            [*pip, "-r", os.path.join(work, "requirements.txt"), f"torch=={GPU_TORCH}"],
            cwd=ROOT,
        )
        and steps.run("venv-data", [*pip, "--no-deps", "-r", data], cwd=ROOT)
    )
    if ok:
        for old in glob.glob(os.path.join(venv, ".deps-*")):
            os.remove(old)
        open(stamp, "w").close()
    steps.add("venv", "ok" if ok else "FAIL", time.perf_counter() - t0, venv)
    return ok


def _source_files() -> list[str]:
    """Paths (relative to ROOT) of the checkout's files under MIRRORED: git's tracked and untracked-not-
    ignored files when ROOT is a git checkout, else every file there."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "--", *MIRRORED],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        return [p for p in out if os.path.isfile(os.path.join(ROOT, p))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for top in MIRRORED:
            full = os.path.join(ROOT, top)
            if os.path.isfile(full):
                files.append(top)
            for d, _, names in os.walk(full):
                files += [
                    os.path.relpath(os.path.join(d, n), ROOT)
                    for n in names
                    if not n.endswith((".so", ".pyc"))
                ]
        return files


def sync_mirror(src_dir: str) -> tuple[int, int]:
    """Copy the checkout's files into src_dir where their content differs (unchanged files keep their old
    timestamps, so ninja rebuilds nothing for them) and delete mirrored files the checkout no longer has.
    Returns (copied, removed)."""
    files = set(_source_files())
    copied = removed = 0
    for rel in sorted(files):
        a, b = os.path.join(ROOT, rel), os.path.join(src_dir, rel)
        if os.path.exists(b) and filecmp.cmp(a, b, shallow=False):
            continue
        os.makedirs(os.path.dirname(b), exist_ok=True)
        shutil.copyfile(a, b)
        copied += 1
    for top in MIRRORED:
        base = os.path.join(src_dir, top)
        for d, _, names in os.walk(base):
            for n in names:
                rel = os.path.relpath(os.path.join(d, n), src_dir)
                generated = n.endswith((".so", ".pyc")) or n == "_build_info.py" or "__pycache__" in rel
                if rel not in files and not generated and not rel.endswith(".egg-info"):
                    os.remove(os.path.join(d, n))
                    removed += 1
    return copied, removed


def unpack_extension(wheel: str, src_dir: str) -> str:
    """Extract the wheel's admm_kernels/_C*.so and _build_info.py into the mirror's package folder."""
    with zipfile.ZipFile(wheel) as z:
        names = [
            n for n in z.namelist() if n.startswith("admm_kernels/_C") or n == "admm_kernels/_build_info.py"
        ]
        if not any(n.startswith("admm_kernels/_C") for n in names):
            raise RuntimeError(f"{wheel} holds no admm_kernels/_C extension")
        for old in glob.glob(os.path.join(src_dir, "admm_kernels", "_C*.so")):
            os.remove(old)
        for n in names:
            z.extract(n, src_dir)
    return wheel


def resources_markdown(out: str) -> str:
    """Markdown tables of OUT/ptxas.json (sm_90 rows) and OUT/triton-*.json (one row per kernel variant;
    a column per Triton version: registers / spill bytes / shared memory bytes)."""
    lines = []
    try:
        with open(os.path.join(out, "ptxas.json"), encoding="utf-8") as f:
            px = json.load(f)
        lines += [
            f"CUDA kernels, sm_90 (ptxas -v, archs built: {px['arch_list']}; "
            f"spilling on any arch: {', '.join(px['spilling']) or 'none'}):",
            "",
            "| kernel | registers | stack B | spill stores/loads B | static smem B |",
            "|---|---|---|---|---|",
        ]
        for k in px["kernels"]:
            if k["arch"] == "sm_90":
                name = k["name"].replace("admm_kernels::cuda::(anonymous namespace)::", "").split("(")[0]
                lines.append(
                    f"| `{name}` | {k['registers']} | {k['stack']} | {k['spill_stores']}/{k['spill_loads']} "
                    f"| {k['smem']} |"
                )
        lines.append("")
    except (OSError, KeyError, ValueError):
        pass
    reports = {}
    for path in sorted(glob.glob(os.path.join(out, "triton-*.json"))):
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
        reports[rep["triton"]] = rep
    if reports:
        versions = sorted(reports, key=lambda v: tuple(int(x) for x in v.split(".")[:3] if x.isdigit()))
        rows: dict[tuple, dict] = {}
        for v in versions:
            for k in reports[v]["kernels"]:
                cx = ", ".join(f"{a}={b}" for a, b in k["constexprs"].items() if a.isupper())
                key = (k["kernel"], cx, k["num_warps"], k["launch"])
                cell = (
                    f"{k['registers']} / {k['spill_stores']}+{k['spill_loads']} / {k['shared']}"
                    if k["ok"]
                    else "FAIL"
                )
                rows.setdefault(key, {})[v] = cell
        lines += [
            "Triton kernels compiled for sm_90 (registers / spill bytes / shared memory bytes), "
            "per Triton version:",
            "",
            "| kernel | constexprs | warps | launch | " + " | ".join(versions) + " |",
            "|---|---|---|---|" + "---|" * len(versions),
        ]
        for (kernel, cx, warps, launch), cells in rows.items():
            lines.append(
                f"| `{kernel}` | {cx} | {warps} | {launch} | "
                + " | ".join(cells.get(v, "-") for v in versions)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _inputs_digest(src: str, patterns: list[str], extra: str) -> str:
    """Digest of the mirror's files matching `patterns` (relative globs) and `extra`: a report step whose
    inputs have this digest again is not recomputed."""
    paths = sorted(p for pat in patterns for p in glob.glob(os.path.join(src, pat)))
    return _digest(*paths, extra=extra + "|" + ",".join(os.path.relpath(p, src) for p in paths))


def cached_report(
    steps: Steps,
    name: str,
    digest: str,
    reports: str,
    out: str,
    files: list[str],
    cmd: list[str],
    cwd: str,
    env: dict | None = None,
) -> bool:
    """Run `cmd` (which writes `files` into `reports`) unless it already passed for inputs of `digest`;
    either way copy `files` into `out`. Reports are pure functions of their inputs (sources, flags,
    compiler versions), so a cached run keeps them without recompiling."""
    stamp = os.path.join(reports, f"{name}.passed")
    cached = (
        os.path.exists(stamp)
        and open(stamp).read() == digest
        and all(os.path.exists(os.path.join(reports, f)) for f in files)
    )
    if cached:
        steps.add(name, "ok", 0.0, f"cached: inputs unchanged since the run that wrote {reports}")
    elif steps.run(name, cmd, cwd=cwd, env=env):
        with open(stamp, "w") as f:
            f.write(digest)
    else:
        return False
    for f in files:
        shutil.copyfile(os.path.join(reports, f), os.path.join(out, f))
    return True


def _pip_target(steps: Steps, py: str, cache: str, requirement: str, cwd: str) -> str | None:
    """A `pip install --target` folder in the cache holding `requirement` (name==version), or None."""
    target = os.path.join(cache, requirement.replace("==", "-"))
    if os.path.isdir(target) and os.listdir(target):
        return target
    ok = steps.run(
        f"{requirement}-install",
        [py, "-m", "pip", "install", "-q", "--no-deps", "--target", target, requirement],
        cwd=cwd,
    )
    if not ok:
        name, _, dt, detail = steps.rows[-1]
        steps.rows[-1] = (name, "skipped (could not install)", dt, detail)
        shutil.rmtree(target, ignore_errors=True)
        return None
    return target


def check_triton(steps: Steps, py: str, cache: str, src: str, reports: str, out: str) -> None:
    """Step 5: each Triton version's ahead-of-time compile (cached by input digest) and, for the versions
    the main suite does not run, its interpreter tests (the venv's own Triton runs
    tests/kernels/test_triton.py within the cuda-tests subset already)."""
    pinned = subprocess.run(
        [py, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    for version in TRITON_VERSIONS:
        path = []
        if version != pinned:
            target = _pip_target(steps, py, cache, f"triton=={version}", src)
            if target is None:
                continue
            path.append(target)
        env = {"PYTHONPATH": os.pathsep.join(path)}
        digest = _inputs_digest(
            src,
            ["admm_kernels/backends/triton/*.py", "tools/triton_aot.py", "tools/ptxas_report.py"],
            f"triton {version}",
        )
        name = f"triton-{version}.json"
        cached_report(
            steps,
            f"triton-{version}",
            digest,
            reports,
            out,
            [name],
            [py, os.path.join("tools", "triton_aot.py"), "--out", reports],
            cwd=src,
            env=env,
        )
        if version == pinned:
            continue
        extra = INTERPRETER_EXTRA.get(version)
        if extra:
            target = _pip_target(steps, py, cache, extra, src)
            if target is None:
                continue
            path.append(target)
        steps.run(
            f"triton-{version}-interpreter",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_triton.py"],
            cwd=src,
            env={"PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"},
        )


def check_cuda_build(steps: Steps, py: str, mirror: str, src: str, out: str, env: dict) -> None:
    """Step 3: the CUDA wheel (portable CPU target chosen by setup.py itself), its checks and tests."""
    dist = os.path.join(mirror, "dist")
    shutil.rmtree(dist, ignore_errors=True)
    wheel_cmd = [py, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", dist, "."]
    if not steps.run("cuda-build", wheel_cmd, cwd=src, env={**env, "ADMM_KERNELS_CUDA": "1"}):
        return
    with open(os.path.join(out, "cuda-build.log"), encoding="utf-8", errors="replace") as f:
        portable = "CPU target portable" in f.read()
    steps.add(
        "cuda-build-target",
        "ok" if portable else "FAIL",
        0.0,
        "pip wheel chose the portable CPU target" if portable else "pip wheel did not build portable",
    )
    unpack_extension(glob.glob(os.path.join(dist, "admm_kernels-*.whl"))[0], src)
    steps.run("cuda-checks", [py, os.path.join("tools", "gpu_build_checks.py"), "--expect", "cuda"], cwd=src)
    steps.run(
        "cuda-tests",
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_SUBSET, "tests"],
        cwd=src,
        env={"OMP_NUM_THREADS": "1"},
    )


def check_cpu_build(steps: Steps, py: str, src: str, env: dict) -> None:
    """Step 6: the CPU-only extension in place (native CPU target), its checks and the kernel tests."""
    if steps.run(
        "cpu-build",
        [py, "setup.py", "build_ext", "--inplace"],
        cwd=src,
        env={**env, "ADMM_KERNELS_CUDA": "0"},
    ):
        steps.run(
            "cpu-checks", [py, os.path.join("tools", "gpu_build_checks.py"), "--expect", "cpu"], cwd=src
        )
        steps.run(
            "cpu-tests",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_ops.py"],
            cwd=src,
            env={"OMP_NUM_THREADS": "1"},
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-check"))
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    p.add_argument("--skip-triton", action="store_true", help="leave out step 5")
    p.add_argument("--skip-cpu", action="store_true", help="leave out step 6")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        print(f"no nvcc under CUDA_HOME={CUDA_HOME}: the CUDA build cannot be checked here", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    for old in glob.glob(os.path.join(out, "*.log")) + glob.glob(os.path.join(out, "triton-*.json")):
        os.remove(old)  # only this run's logs and reports
    steps = Steps(out)
    t_start = time.perf_counter()
    cache = cache_root()
    venv = os.path.join(cache, f"venv-torch{GPU_TORCH}")
    mirror = os.path.join(cache, f"gpu-build-torch{GPU_TORCH}")
    src, reports = os.path.join(mirror, "src"), os.path.join(mirror, "reports")
    py = os.path.join(venv, "bin", "python")
    os.makedirs(src, exist_ok=True)
    os.makedirs(reports, exist_ok=True)
    lock_fd = os.open(os.path.join(cache, f"gpu-build-torch{GPU_TORCH}.lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one check at a time per machine: they share the venv and mirror
    if not ensure_venv(steps, venv):
        print(steps.summary())
        return 1
    t0 = time.perf_counter()
    copied, removed = sync_mirror(src)
    steps.add("sync", "ok", time.perf_counter() - t0, f"{copied} files copied, {removed} removed into {src}")
    for var in (
        "TORCH_CUDA_ARCH_LIST",
        "ADMM_KERNELS_CPU_ARCH",
        "ADMM_KERNELS_NO_EXT",
        "ADMM_KERNELS_BACKEND",
    ):
        os.environ.pop(var, None)  # the defaults are what is checked
    build_env = {
        "CUDA_HOME": CUDA_HOME,
        "MAX_JOBS": str(args.jobs),
        "PATH": f"{CUDA_HOME}/bin:{os.environ['PATH']}",
    }
    check_cuda_build(steps, py, mirror, src, out, build_env)
    nvcc_version = subprocess.run(
        [os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    digest = _inputs_digest(
        src,
        ["csrc/cuda/*", "tools/ptxas_report.py", "tools/build_flags.py"],
        f"{nvcc_version}|torch {GPU_TORCH}",
    )
    cached_report(
        steps,
        "ptxas",
        digest,
        reports,
        out,
        ["ptxas.json", "ptxas.txt"],
        [py, os.path.join("tools", "ptxas_report.py"), "--out", reports, "--jobs", str(args.jobs)],
        cwd=src,
        env=build_env,
    )
    if not args.skip_triton:
        check_triton(steps, py, cache, src, reports, out)
    if not args.skip_cpu:
        check_cpu_build(steps, py, src, build_env)
    total = time.perf_counter() - t_start
    text = (
        f"# make check-gpu-build ({time.strftime('%Y-%m-%d %H:%M')}, {total:.0f} s, torch {GPU_TORCH})\n\n"
        f"{steps.summary()}\n"
    )
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "resources.md"), "w", encoding="utf-8") as f:
        f.write(resources_markdown(out))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"seconds": total, "steps": steps.rows}, f, indent=1)
    print(text)
    print("check-gpu-build: " + ("all steps passed" if steps.ok() else "FAILED"), flush=True)
    return 0 if steps.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
