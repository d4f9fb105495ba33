"""Build admm_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

CUDA sources (csrc/cuda: kernels in .cu, their torch glue in .cpp) are compiled only when torch is a CUDA
build and nvcc is found.
ADMM_KERNELS_CUDA=1 forces them (and fails loudly without a toolkit), ADMM_KERNELS_CUDA=0 skips them.
ADMM_KERNELS_NO_EXT=1 skips the extension entirely (the package then runs on its pure-torch reference).
ADMM_KERNELS_CPU_ARCH=native|portable chooses -march=native or the portable x86-64 baseline; by default
in-place and editable builds are native, wheel/sdist builds portable (tools/build_flags.py says why).
TORCH_CUDA_ARCH_LIST chooses the GPU architectures; without it and without a visible GPU, every
architecture the installed torch ships kernels for. The choices are printed (pip shows them with -v).
Build without isolation so the installed torch is used: `MAX_JOBS=2 pip install --no-build-isolation -e .`
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_flags():
    spec = importlib.util.spec_from_file_location(
        "admm_build_flags", os.path.join(HERE, "tools", "build_flags.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _want_cuda() -> bool:
    flag = os.environ.get("ADMM_KERNELS_CUDA")
    if flag is not None:
        return flag.strip() not in ("0", "", "false", "False")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _say(msg: str) -> None:
    print(f"admm_kernels build: {msg}", file=sys.stderr, flush=True)


def _write_build_info(info: dict) -> None:
    """admm_kernels/_build_info.py (git-ignored, shipped in wheels): what _C was built with, for
    `admm-prune doctor` and bug reports."""
    path = os.path.join(HERE, "admm_kernels", "_build_info.py")
    text = (
        f'"""Written by setup.py when admm_kernels._C is built (not tracked by git)."""\n\nBUILD = {info!r}\n'
    )
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _extensions():
    if os.environ.get("ADMM_KERNELS_NO_EXT", "0") not in ("0", ""):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    flags = _load_build_flags()
    switched, why_compiler = flags.compilers(os.environ)
    os.environ.update(switched)  # read by torch's BuildExtension (CXX) and given to nvcc as -ccbin (CC)
    _say(f"C++ compiler: {why_compiler}")
    mode, why_mode = flags.cpu_arch_mode(sys.argv, os.environ)
    cxx = flags.cxx_flags(torch.__version__, mode)
    _say(
        f"torch {torch.__version__}: -std={flags.cxx_standard(torch.__version__)}; CPU target {mode} "
        f"({' '.join(flags.cpu_arch_flags(mode)) or 'compiler default'}): {why_mode}"
    )
    cpp = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    link = ["-fopenmp"]
    include = [os.path.join(HERE, "csrc")]
    cuda = _want_cuda()
    info = {
        "torch": torch.__version__,
        "cxx_std": flags.cxx_standard(torch.__version__),
        "cpu_arch": mode,
        "cuda": cuda,
        "cuda_arch_list": None,
    }
    if cuda:
        archs, why_archs = flags.cuda_arch_list(
            os.environ, torch.cuda.device_count(), torch.cuda.get_arch_list()
        )
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's BuildExtension
        _say(f"CUDA kernels for TORCH_CUDA_ARCH_LIST={archs or '(detected)'}: {why_archs}")
        info["cuda_arch_list"] = archs or "detected"
        # The kernels (.cu) go through nvcc; their torch glue (csrc/cuda/*.cpp) through the host compiler.
        cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "admm_kernels._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": flags.nvcc_flags(torch.__version__)},
            extra_link_args=link,
            include_dirs=include,
        )
    else:
        _say("CPU kernels only (no CUDA torch and nvcc, or ADMM_KERNELS_CUDA=0)")
        ext = CppExtension(
            "admm_kernels._C",
            cpp,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            include_dirs=include,
        )
    _write_build_info(info)
    py = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    variant = f"{py}-torch{torch.__version__}-{'cuda' if cuda else 'cpu'}-{mode}"
    build = BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": _persistent_build_dir(build, variant)}


def _persistent_build_dir(base, variant: str):
    """build_ext whose object files live in build/temp.ninja/VARIANT (not pip's throw-away temp directory),
    so ninja rebuilds only the translation units that changed: a one-file edit recompiles one file
    (~30 s) instead of all of them (~5 min on the shared 2-core machine, measured). One folder per torch
    version, CUDA or not and CPU target, so switching between them does not rebuild everything."""

    class PersistentBuild(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(HERE, "build", "temp.ninja", variant)
            # Always hand over to ninja (a no-op when nothing changed) and relink: setuptools' own
            # up-to-date test compares only timestamps, so a _C.so left in build/lib by another variant
            # (CPU-only, another torch) would otherwise be packed into the wheel unchanged.
            self.force = True

    return PersistentBuild


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
