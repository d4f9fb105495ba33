#!/usr/bin/env python3
"""Compile-check csrc/cuda against the installed torch's headers: every .cu with `nvcc -fdevice-syntax-only`,
the torch glue (.cpp) with the host compiler's -fsyntax-only and CUDA's headers.

A CPU build of torch cannot build a CUDAExtension, so this is the fast CI check that keeps the CUDA
sources honest: host and device code are parsed and type-checked for sm_90 (H100/H200) without generating
code, with the C++ standard setup.py uses for the installed torch. The real build (template
instantiation, linking, the dispatcher registration) is `make check-gpu-build` (tools/check_gpu_build.py).
ADMM_SYNTAX_CHECK_ONLY is defined so csrc/cuda/stream.h does not need c10/cuda (absent from a CPU torch).
Files run in parallel (--jobs, default 2); prints each file's time; exit status 1 if any file fails,
2 if nvcc is missing.

Usage: python tools/check_cuda_syntax.py [--jobs N] [--nvcc PATH] [FILE.cu ...]
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_includes() -> list[str]:
    """-I flags for torch's headers (as torch.utils.cpp_extension would pass them)."""
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


def cxx_standard() -> str:
    """The C++ standard setup.py compiles with for the installed torch (tools/build_flags.py)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import build_flags

    return build_flags.cxx_standard(torch.__version__)


def nvcc_command(nvcc: str, source: str, includes: list[str], std: str = "c++17") -> list[str]:
    return [
        nvcc, f"-std={std}", "-fdevice-syntax-only", "--expt-relaxed-constexpr",
        "-gencode", "arch=compute_90,code=sm_90", "-DADMM_SYNTAX_CHECK_ONLY",
        # torch's headers use a C++20 bit-field initialiser; nvcc warns about it in C++17 mode.
        "-diag-suppress", "3306", "-Xcompiler", "-Wno-c++20-extensions",
        f"-I{os.path.join(ROOT, 'csrc')}", *includes, "-c", source, "-o", os.devnull,
    ]


def cuda_include_dir(nvcc: str) -> str:
    """CUDA's header folder: $CUDA_HOME/include, else beside nvcc (a wrapper script on PATH may hide the
    toolkit, hence /usr/local/cuda last); the first that holds cuda_runtime_api.h."""
    candidates = [os.path.join(os.environ["CUDA_HOME"], "include")] if os.environ.get("CUDA_HOME") else []
    candidates += [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"),
                   "/usr/local/cuda/include"]
    for path in candidates:
        if os.path.exists(os.path.join(path, "cuda_runtime_api.h")):
            return path
    return candidates[0]  # the compile then fails and names the missing header


def host_command(cxx: str, nvcc: str, source: str, includes: list[str], std: str = "c++17") -> list[str]:
    """The glue is plain C++ (setup.py compiles it with the host compiler, `cxx` may carry words such as
    'ccache g++') that needs CUDA's headers."""
    cuda_include = cuda_include_dir(nvcc)
    return [
        *shlex.split(cxx), f"-std={std}", "-fsyntax-only", "-DADMM_SYNTAX_CHECK_ONLY",
        f"-I{os.path.join(ROOT, 'csrc')}", f"-I{cuda_include}", *includes, source,
    ]


def check(nvcc: str, source: str, includes: list[str], std: str) -> tuple[str, bool, float, str]:
    t0 = time.perf_counter()
    if source.endswith(".cu"):
        cmd = nvcc_command(nvcc, source, includes, std)
    else:
        cmd = host_command(os.environ.get("CXX", "c++"), nvcc, source, includes, std)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # the compiler itself is missing: that file fails, the others are still checked
        return source, False, time.perf_counter() - t0, f"{cmd[0]}: {exc}"
    return source, proc.returncode == 0, time.perf_counter() - t0, (proc.stdout + proc.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="sources to check (default: csrc/cuda/*.cu and *.cpp)")
    parser.add_argument("--jobs", type=int, default=2, help="files checked at once (default 2)")
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"), help="nvcc executable")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        print(f"nvcc not found ({args.nvcc!r}); nothing checked", file=sys.stderr)
        return 2
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    sources = glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp"))
    files = args.files or sorted(sources)
    if not files:
        print("no CUDA sources to check", file=sys.stderr)
        return 1
    includes = torch_includes()
    std = cxx_standard()
    t0 = time.perf_counter()
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for source, ok, seconds, output in pool.map(lambda f: check(nvcc, f, includes, std), files):
            name = os.path.relpath(source, ROOT)
            print(f"{'ok  ' if ok else 'FAIL'} {name:40s} {seconds:6.1f} s", flush=True)
            if not ok:
                failed += 1
                print(output, file=sys.stderr)
            elif output and os.environ.get("CHECK_CUDA_VERBOSE"):
                print(output)
    print(f"{len(files) - failed}/{len(files)} files ok in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
