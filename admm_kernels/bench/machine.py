"""The machine's measured roofline denominators (fp32 matmul GFLOP/s, copy GB/s), timing, and its
description: the one implementation every benchmark of the project uses (benchmarks/roofline.py,
benchmarks/compare.py and `admm-prune bench` import it), so they all divide by the same measurement.

Measured in the run that uses them (a ratio compares two numbers of the same run, never of two runs),
best of `reps` after a warm-up.
Sizes: a square fp32 GEMM of side `n` (the bench passes the model's largest in_features, so the GEMM is
the size the ADMM loop runs) and a copy of 256 MiB (far beyond any last-level cache, so it measures
memory bandwidth; bytes counted = read + write).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

COPY_BYTES = 256 * 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], reps: int = 3, device: torch.device | str = "cpu") -> float:
    """Best wall time in seconds of `fn()` over `reps` runs after one warm-up run.

    The best (not the mean) because the machines these run on are shared: the minimum is the run least
    disturbed by other processes.
    """
    device = torch.device(device)
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(max(1, int(reps))):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def matmul_gflops(n: int = 2048, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  reps: int = 3) -> float:
    """GFLOP/s of an (n, n) @ (n, n) matmul of `dtype` (2 n^3 FLOPs)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / best_time(lambda: torch.mm(a, b, out=c), reps, device) / 1e9


def copy_gbps(nbytes: int = COPY_BYTES, device: torch.device | str = "cpu", reps: int = 3) -> float:
    """GB/s of dst.copy_(src) for fp32 tensors of `nbytes`, counting bytes read + written (2 nbytes)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 4:
        raise ValueError(f"nbytes must be an int >= 4, got {nbytes!r}")
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / best_time(lambda: dst.copy_(src), reps, device) / 1e9


def measure_peaks(device: torch.device | str = "cpu", n: int = 2048, copy_bytes: int = COPY_BYTES,
                  reps: int = 3) -> dict:
    """The roofline denominators measured now: {"matmul_gflops", "matmul_n", "copy_gbps", "copy_bytes",
    "device"} (fp32 GEMM of side n; copy of copy_bytes, read + write counted)."""
    device = torch.device(device)
    return {
        "matmul_gflops": matmul_gflops(n, device, reps=reps),
        "matmul_n": n,
        "copy_gbps": copy_gbps(copy_bytes, device, reps=reps),
        "copy_bytes": copy_bytes,
        "device": str(device),
    }


def measure(device: torch.device | str = "cpu", n: int = 1024, reps: int = 3) -> dict:
    """measure_peaks() with a GEMM of side n >= 16, plus "source" (for the bench's records)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise ValueError(f"n must be an int >= 16, got {n!r}")
    return {**measure_peaks(device, n=n, reps=reps), "source": "admm_kernels.bench.machine"}


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
