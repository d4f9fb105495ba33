"""Build flags (tools/build_flags.py, used by setup.py and the CUDA tools): the C++ standard follows torch,
native vs portable CPU target by build kind, the default CUDA architectures without a GPU; the ptxas log
parser; the portable-build disassembly check (tools/gpu_build_checks.py) can fail; the AVX2-less scalar
paths of the sparse kernels (ADMM_KERNELS_NO_AVX2=1) agree with the reference."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bf = _load("build_flags")


@pytest.mark.parametrize("version,std", [("2.11.0", "c++17"), ("2.13.0+cpu", "c++17"),
                                         ("2.14.1+cu130", "c++20"), ("2.15.0.dev20261201", "c++20"),
                                         ("3.0.0", "c++20")])
def test_cxx_standard_follows_torch(version, std):
    assert bf.cxx_standard(version) == std
    assert f"-std={std}" in bf.cxx_flags(version, "portable")
    assert f"-std={std}" in bf.nvcc_flags(version)


def test_unreadable_torch_version_is_an_error():
    with pytest.raises(ValueError, match="'nightly'"):
        bf.cxx_standard("nightly")


@pytest.mark.parametrize("argv,mode", [
    (["setup.py", "build_ext", "--inplace"], "native"),
    (["setup.py", "build_ext", "-i"], "native"),
    (["setup.py", "develop"], "native"),
    # pip install -e . (PEP 660): setuptools' build backend runs setup.py with these arguments
    (["setup.py", "editable_wheel", "--dist-dir", "/tmp/x"], "native"),
    # pip install . / pip wheel . / python -m build: bdist_wheel; an sdist; a plain build_ext
    (["setup.py", "bdist_wheel", "--dist-dir", "/tmp/x"], "portable"),
    (["setup.py", "sdist"], "portable"),
    (["setup.py", "build_ext"], "portable"),
    (["setup.py", "egg_info"], "portable"),
])
def test_cpu_target_by_kind_of_build(argv, mode):
    got, why = bf.cpu_arch_mode(argv, {})
    assert got == mode, why


def test_cpu_target_environment_override():
    assert bf.cpu_arch_mode(["setup.py", "bdist_wheel"], {"ADMM_KERNELS_CPU_ARCH": "native"})[0] == "native"
    assert bf.cpu_arch_mode(["setup.py", "develop"], {"ADMM_KERNELS_CPU_ARCH": " Portable "})[0] == "portable"
    with pytest.raises(ValueError, match="ADMM_KERNELS_CPU_ARCH='avx512'"):
        bf.cpu_arch_mode(["setup.py", "develop"], {"ADMM_KERNELS_CPU_ARCH": "avx512"})


def test_cpu_arch_flags():
    assert bf.cpu_arch_flags("native", "x86_64") == ["-march=native"]
    portable = bf.cpu_arch_flags("portable", "x86_64")
    assert "-march=x86-64" in portable and not any("native" in f for f in portable)
    assert bf.cpu_arch_flags("portable", "aarch64") == ["-march=armv8-a"]
    with pytest.raises(ValueError, match="'fast'"):
        bf.cpu_arch_flags("fast")


def test_default_cuda_architectures_without_a_gpu():
    torch_archs = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130
    assert bf.arch_list_from_torch(torch_archs) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert bf.arch_list_from_torch([]) == bf.FALLBACK_CUDA_ARCH_LIST
    assert bf.cuda_arch_list({}, 0, torch_archs)[0] == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert bf.cuda_arch_list({}, 1, torch_archs)[0] is None  # torch detects the visible GPU
    assert bf.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}, 0, torch_archs)[0] == "9.0"


def test_gencode_flags():
    assert bf.gencode_flags("8.0;9.0+PTX") == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
    assert bf.gencode_flags("9.0a") == ["-gencode", "arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="'Hopper'"):
        bf.gencode_flags("Hopper")


def test_syntax_check_uses_the_standard_of_the_installed_torch():
    import torch

    tool = _load("check_cuda_syntax")
    assert tool.cxx_standard() == bf.cxx_standard(torch.__version__)
    assert f"-std={tool.cxx_standard()}" in tool.nvcc_command("nvcc", "x.cu", [], tool.cxx_standard())


NVCC_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN12admm_kernels4cuda14dual_step_flatEv' for 'sm_90'
ptxas info    : Function properties for _ZN12admm_kernels4cuda14dual_step_flatEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'hist' for 'sm_80'
ptxas info    : Function properties for hist
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
ptxas-blackwell info    : Compiling entry function '_dual_step_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _dual_step_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 54 registers, used 1 barriers
"""


def test_ptxas_log_parser():
    rows = _load("ptxas_report").parse_ptxas_log(NVCC_LOG)
    assert [(r["kernel"], r["arch"], r["registers"]) for r in rows] == [
        ("_ZN12admm_kernels4cuda14dual_step_flatEv", "sm_90", 32), ("hist", "sm_80", 24),
        ("_dual_step_kernel", "sm_90a", 54)]
    hist = rows[1]
    assert (hist["stack"], hist["spill_stores"], hist["spill_loads"], hist["smem"]) == (16, 8, 12, 1024)
    assert rows[0]["smem"] == 0 and rows[2]["spill_stores"] == 0


def _built_extension():
    from admm_kernels.backends import _extension

    mod = _extension.load()
    if mod is None:
        pytest.skip("admm_kernels._C is not built")
    try:
        from admm_kernels._build_info import BUILD
    except ImportError:
        BUILD = {}
    return mod, BUILD


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="objdump/ELF")
def test_disassembly_check_flags_a_native_build():
    """The check `make check-gpu-build` runs on the portable wheel can fail: this machine's -march=native
    build (AVX2) uses AVX instructions far outside the avx2 namespaces."""
    import shutil

    mod, build = _built_extension()
    if shutil.which("objdump") is None:
        pytest.skip("objdump not installed")
    if build.get("cpu_arch") != "native" or "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip(f"needs a native build on an AVX2 CPU, have {build}")
    inside, outside = _load("gpu_build_checks").vex_outside_avx2(mod.__file__)
    assert inside > 0
    assert len(outside) > 10, outside


def test_sparse_kernels_without_avx2_match_the_reference():
    """ADMM_KERNELS_NO_AVX2=1 runs the scalar paths an older CPU (or a portable wheel there) would run."""
    _built_extension()
    code = textwrap.dedent("""
        import torch
        from admm_kernels.backends import cpu, reference
        g = torch.Generator().manual_seed(0)
        for n, m in ((2, 4), (1, 4)):
            w = torch.randn(37, 96, generator=g)
            w = w * reference.nm_mask(w.abs(), n, m)
            for dtype in (torch.float32, torch.bfloat16):
                values, meta = reference.pack_nm(w.to(dtype), n, m)
                for batch in (1, 3, 9):
                    x = torch.randn(batch, 96, generator=g)
                    got = cpu.sparse_nm_mm(x, values, meta, n, m, 96)
                    want = reference.sparse_nm_mm(x, values, meta, n, m, 96)
                    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (n, m, dtype, batch)
        w = torch.randn(23, 150, generator=g) * (torch.rand(23, 150, generator=g) < 0.2)
        keep = w != 0
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
        col = keep.nonzero()[:, 1].to(torch.int16)
        for batch in (1, 9, 40):
            x = torch.randn(batch, 150, generator=g)
            got = cpu.csr_mm(x, crow, col, w[keep], 150)
            assert torch.allclose(got, reference.csr_mm(x, crow, col, w[keep], 150), rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    for flag in ("1", "0"):
        env = {**os.environ, "ADMM_KERNELS_NO_AVX2": flag, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


READELF_D = """
Dynamic section at offset 0x2dd8 contains 27 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libstdc++.so.6]
 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]
 0x000000000000000e (SONAME)             Library soname: [probe.so]
"""


def test_needed_libraries_reads_readelf():
    assert bf.needed_libraries(READELF_D) == ["libstdc++.so.6", "libgcc_s.so.1"]
    assert bf.needed_libraries("") == []


@pytest.mark.skipif(subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True,
                                   text=True).stdout.strip() in ("", "libstdc++.a"),
                    reason="no static libstdc++ to link against")
def test_probe_tells_a_static_cxx_runtime_from_a_shared_one():
    """The probe really links: plain g++ needs libstdc++.so; with -static-libstdc++ (what the H100 image's
    /opt/gcc/bin/g++ does by default) the shared object carries its own copy."""
    assert bf.links_cxx_runtime_dynamically("g++") is True
    assert bf.links_cxx_runtime_dynamically("g++ -static-libstdc++") is False
    assert bf.links_cxx_runtime_dynamically("no-such-compiler-xyz") is None


def test_compilers_switch_away_from_a_static_runtime(monkeypatch, tmp_path):
    sys_cxx, sys_cc = tmp_path / "g++", tmp_path / "gcc"
    sys_cxx.touch()
    sys_cc.touch()
    monkeypatch.setattr(bf, "SYSTEM_COMPILERS", ((str(sys_cxx), str(sys_cc)),))
    verdicts = {"/opt/gcc/bin/g++": False, str(sys_cxx): True, "c++": True}
    env, why = bf.compilers({"CXX": "/opt/gcc/bin/g++", "CC": "/opt/gcc/bin/gcc"}, verdicts.get)
    assert env == {"CXX": str(sys_cxx), "CC": str(sys_cc)} and "statically" in why
    assert bf.compilers({}, verdicts.get) == ({}, "c++ links the C++ runtime dynamically")
    assert bf.compilers({"CXX": "weird"}, lambda cxx: None)[0] == {}  # cannot tell: left alone
    verdicts[str(sys_cxx)] = False
    with pytest.raises(RuntimeError, match="links libstdc\\+\\+ statically.*ADMM_KERNELS_NO_EXT=1"):
        bf.compilers({"CXX": "/opt/gcc/bin/g++"}, verdicts.get)
