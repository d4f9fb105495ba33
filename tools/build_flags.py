"""Compiler flags of admm_kernels._C, decided in one place for setup.py, tools/check_cuda_syntax.py and
tools/ptxas_report.py (loaded by file path: it imports nothing from the package and no torch at import).

Three choices, each printed by setup.py with its reason:

* C++ standard: follows the torch being built against. torch 2.14's headers stop with `#error C++20 or
  later compatible compiler is required to use ATen`; 2.11-2.13 are built as C++17 (their headers only
  warn about one C++20 bit-field initialiser). So C++17 below torch 2.14, C++20 from 2.14 on.
* CPU target (ADMM_KERNELS_CPU_ARCH=native|portable): `native` (-march=native) for a build that runs on
  the machine that compiles it, `portable` (the x86-64 baseline every manylinux wheel assumes) for a
  wheel or sdist that others install: a wheel compiled with -march=native dies with an illegal
  instruction on an older CPU. The AVX2 paths of the sparse kernels are compiled in both modes and
  chosen at run time (csrc/cpu/simd_load.h). Without the variable: `native` for the builds that can only
  ever run here (`setup.py build_ext --inplace`, `setup.py develop`, `pip install -e .`, whose
  setuptools command is editable_wheel), `portable` for everything else (`pip install .`, `pip wheel`,
  `python -m build`, bdist_wheel), since a wheel can be copied elsewhere.
* CUDA architectures: TORCH_CUDA_ARCH_LIST when given; else torch's own detection when a GPU is
  visible; else (no GPU: torch's detection would stop with an IndexError) every architecture the torch
  being built against ships kernels for, the last one also as PTX so newer GPUs can JIT it: a GPU
  build of torch runs on exactly those, so the extension then runs wherever that torch does
  (torch 2.14.1+cu130: 7.5;8.0;8.6;9.0;10.0;12.0+PTX).
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping, Sequence

CPU_ARCH_ENV = "ADMM_KERNELS_CPU_ARCH"
CPU_ARCH_MODES = ("native", "portable")
# Used when a CUDA torch reports no architectures at all (never seen; a safe Ampere + Hopper default).
FALLBACK_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def torch_version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.14.1+cu130' or '2.15.0.dev20261201'."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot read a major.minor version from torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


def cxx_standard(torch_version: str) -> str:
    """'c++20' for torch >= 2.14 (its headers require it), 'c++17' for older ones."""
    return "c++20" if torch_version_tuple(torch_version) >= (2, 14) else "c++17"


def _is_local_command(argv: Sequence[str]) -> bool:
    args = list(argv[1:])
    if "develop" in args or "editable_wheel" in args:
        return True
    return "build_ext" in args and ("--inplace" in args or "-i" in args)


def cpu_arch_mode(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, str]:
    """('native' or 'portable', why) for the setup.py command line `argv` and the environment."""
    forced = environ.get(CPU_ARCH_ENV, "").strip().lower()
    if forced:
        if forced not in CPU_ARCH_MODES:
            raise ValueError(f"{CPU_ARCH_ENV}={environ[CPU_ARCH_ENV]!r}: expected one of {CPU_ARCH_MODES}")
        return forced, f"{CPU_ARCH_ENV}={forced}"
    if _is_local_command(argv):
        return "native", "in-place or editable build (runs only on this machine)"
    return "portable", "wheel/sdist-style build (may run on other machines)"


def cpu_arch_flags(mode: str, machine: str | None = None) -> list[str]:
    """-march flags of `mode` for the CPU `machine` (platform.machine() by default)."""
    if mode not in CPU_ARCH_MODES:
        raise ValueError(f"CPU arch mode must be one of {CPU_ARCH_MODES}, got {mode!r}")
    machine = (machine or platform.machine()).lower()
    if mode == "native":
        return ["-march=native"]
    if machine in ("x86_64", "amd64"):
        return ["-march=x86-64", "-mtune=generic"]
    if machine in ("aarch64", "arm64"):
        return ["-march=armv8-a"]
    return []


def cxx_flags(torch_version: str, mode: str, machine: str | None = None) -> list[str]:
    """Flags of the C++ (host) compiler. -fopenmp so at::parallel_for really runs in parallel (torch's CPU
    build uses OpenMP); -g0: Python's default CFLAGS add -g, and debug info of the ATen headers only slows
    the build down."""
    return [
        "-O3",
        *cpu_arch_flags(mode, machine),
        "-fopenmp",
        f"-std={cxx_standard(torch_version)}",
        "-DNDEBUG",
        "-g0",
    ]


def nvcc_flags(torch_version: str) -> list[str]:
    """Flags of nvcc (architectures excluded: torch adds them from TORCH_CUDA_ARCH_LIST)."""
    return ["-O3", f"-std={cxx_standard(torch_version)}", "--expt-relaxed-constexpr", "-lineinfo"]


def arch_list_from_torch(torch_arch_list: Sequence[str]) -> str:
    """TORCH_CUDA_ARCH_LIST string for the 'sm_XY' names torch.cuda.get_arch_list() reports, the newest
    one also as PTX; FALLBACK_CUDA_ARCH_LIST when there are none."""
    archs = sorted({int(m.group(1)) for a in torch_arch_list if (m := re.fullmatch(r"sm_(\d+)a?", a))})
    if not archs:
        return FALLBACK_CUDA_ARCH_LIST
    names = [f"{a // 10}.{a % 10}" for a in archs]
    names[-1] += "+PTX"
    return ";".join(names)


def cuda_arch_list(
    environ: Mapping[str, str], visible_gpus: int, torch_arch_list: Sequence[str]
) -> tuple[str | None, str]:
    """(TORCH_CUDA_ARCH_LIST to set or None to leave torch's detection alone, why)."""
    given = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given, "TORCH_CUDA_ARCH_LIST from the environment"
    if visible_gpus > 0:
        return None, f"torch's detection for the {visible_gpus} visible GPU(s)"
    return arch_list_from_torch(
        torch_arch_list
    ), "no GPU visible: the architectures this torch ships kernels for"


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST string ('9.0', '8.0;9.0+PTX', spaces allowed)."""
    flags: list[str] = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", item)
        if m is None:
            raise ValueError(f"unknown CUDA architecture {item!r} in {arch_list!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if m.group(4):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags
