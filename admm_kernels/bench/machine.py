"""The machine's measured roofline denominators: fp32 matmul GFLOP/s and copy GB/s, and its description.

Measured in the run that uses them (SPEC §6: ratios from one run), best of `reps` after a warm-up.
Sizes: a square fp32 GEMM of side `n` (default 1024: 0.03 s here at ~64 GFLOP/s, ENVIRONMENT.md; the
benchmark passes the model's largest in_features so the GEMM is the size the ADMM loop runs) and a copy
of 64 MiB (well beyond the last-level cache, so it measures memory bandwidth; bytes counted = read +
write). In a checkout, benchmarks/roofline.py's `measure_peaks(device, n, reps=)` (the [cpu-kernels]
roofline, a 256 MiB copy) is used instead, so every benchmark of the project divides by the same
measurement; an installed package without the benchmarks folder measures here.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

COPY_BYTES = 64 * 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, reps: int, device: torch.device) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


def _repo_roofline():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "roofline.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_admm_bench_roofline", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception:  # a broken optional script must not break the benchmark
        return None
    return mod if callable(getattr(mod, "measure_peaks", None)) else None


def measure(device: torch.device | str = "cpu", n: int = 1024, reps: int = 3) -> dict:
    """{"matmul_gflops", "matmul_n", "copy_gbps", "copy_bytes", "source"} measured now on `device`."""
    device = torch.device(device)
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise ValueError(f"n must be an int >= 16, got {n!r}")
    mod = _repo_roofline()
    if mod is not None:
        try:
            peaks = {k: str(v) if isinstance(v, torch.device) else v
                     for k, v in mod.measure_peaks(device=device, n=n, reps=reps).items()}
            if {"matmul_gflops", "copy_gbps"} <= set(peaks):
                peaks["source"] = "benchmarks/roofline.py"
                return peaks
        except Exception:  # a changed signature or failure there: measure here instead
            pass
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    t_mm = _best(lambda: torch.mm(a, b, out=c), reps, device)
    src = torch.empty(COPY_BYTES // 4, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = _best(lambda: dst.copy_(src), reps, device)
    return {"matmul_gflops": 2.0 * n ** 3 / t_mm / 1e9, "matmul_n": n,
            "copy_gbps": 2.0 * COPY_BYTES / t_copy / 1e9, "copy_bytes": COPY_BYTES,
            "source": "admm_kernels.bench.machine"}


def describe(device: torch.device | str = "cpu") -> dict:
    """The machine in words: CPU, cores, threads, OS, and the GPU when `device` is CUDA."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "os": f"{platform.system()} {platform.release()}", "device": str(device)}
    if device.type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def git_commit() -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the checkout this package runs from (read-only:
    GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing the index)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                               env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"commit": sha, "dirty": None if status is None else bool(status)}
