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

And one check of the compiler itself (`compilers`): the extension must share the C++ runtime of the torch
it is loaded into. A compiler that links libstdc++ statically into a shared object gives _C a second,
private copy of the runtime; on the H100 machine this project was first run on (CXX=/opt/gcc/bin/g++, a
newer gcc set up that way) every argument check that formatted a number (`TORCH_CHECK_VALUE(..., n)`)
crashed the process with a segmentation fault inside that copy's std::ostream instead of raising.
So the compiler is probed (a one-line shared object, its NEEDED entries read with readelf); when it
links libstdc++ statically, the system's g++/gcc are used if they link it dynamically, else the build
stops and says why.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence

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


# A shared object that needs the C++ runtime (std::ostringstream, as c10::str uses in every TORCH_CHECK).
_PROBE_SOURCE = """#include <sstream>
#include <string>
std::string admm_probe(long v) { std::ostringstream s; s << v; return s.str(); }
"""
# The system's compilers, tried when CXX links libstdc++ statically: (C++ compiler, C compiler for nvcc).
SYSTEM_COMPILERS = (("/usr/bin/g++", "/usr/bin/gcc"), ("/usr/bin/c++", "/usr/bin/cc"))


def needed_libraries(readelf_dynamic: str) -> list[str]:
    """The NEEDED entries of `readelf -d` output: ['libstdc++.so.6', 'libc.so.6', ...]."""
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf_dynamic)


def links_cxx_runtime_dynamically(cxx: str) -> bool | None:
    """True when the C++ compiler command `cxx` (may carry words, e.g. 'ccache g++') links libstdc++ (or
    libc++) into a shared object as a shared library, False when it links it statically, None when the
    probe cannot tell (the compiler or readelf missing, the probe failing to build)."""
    words = shlex.split(cxx)
    if not words or shutil.which(words[0]) is None or shutil.which("readelf") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w", encoding="utf-8") as f:
            f.write(_PROBE_SOURCE)
        try:
            built = subprocess.run([*words, "-shared", "-fPIC", src, "-o", lib], capture_output=True,
                                   timeout=120)
            if built.returncode != 0:
                return None
            dynamic = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
    needed = needed_libraries(dynamic.stdout)
    return any(name.startswith(("libstdc++.so", "libc++.so")) for name in needed)


def compilers(
    environ: Mapping[str, str], probe: Callable[[str], bool | None] = links_cxx_runtime_dynamically
) -> tuple[dict[str, str], str]:
    """(environment variables to set, why) so that _C links the C++ runtime dynamically. torch's
    BuildExtension compiles with $CXX (default c++) and hands $CC to nvcc as its host compiler (-ccbin),
    so both are switched together. Raises RuntimeError when only static-runtime compilers are found."""
    cxx = environ.get("CXX", "").strip() or "c++"
    verdict = probe(cxx)
    if verdict is None:
        return {}, f"{cxx}: could not probe how it links the C++ runtime (no compiler or readelf); used as is"
    if verdict:
        return {}, f"{cxx} links the C++ runtime dynamically"
    for sys_cxx, sys_cc in SYSTEM_COMPILERS:
        if os.path.exists(sys_cxx) and os.path.exists(sys_cc) and probe(sys_cxx):
            return {"CXX": sys_cxx, "CC": sys_cc}, (
                f"{cxx} links libstdc++ statically (a private copy of the C++ runtime in _C crashes on the "
                f"first failed argument check); using {sys_cxx} and {sys_cc}, which link it dynamically"
            )
    raise RuntimeError(
        f"the C++ compiler {cxx!r} links libstdc++ statically into shared objects, so admm_kernels._C would "
        "carry a private copy of the C++ runtime beside torch's (it crashes on the first failed argument "
        "check), and no system compiler that links it dynamically was found at "
        f"{', '.join(c for c, _ in SYSTEM_COMPILERS)}. Set CXX and CC to such a compiler, or build without "
        "the extension: ADMM_KERNELS_NO_EXT=1"
    )
