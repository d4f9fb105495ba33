"""The CUDA sources compile: `nvcc -fdevice-syntax-only` for sm_90 against torch's headers (tools/
check_cuda_syntax.py). A CPU torch cannot build the CUDA extension, so this is what keeps csrc/cuda honest
on machines without a GPU (the torch glue, plain C++, with the host compiler). About 15 s on 2 cores;
skipped without nvcc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "check_cuda_syntax.py")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc not found")
def test_cuda_sources_pass_nvcc_syntax_check():
    proc = subprocess.run([sys.executable, TOOL, "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "files ok" in proc.stdout


@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc not found")
def test_syntax_check_reports_a_broken_file(tmp_path):
    """The check can fail: a kernel using an undeclared name is reported with a non-zero exit status."""
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k(float* x) { x[threadIdx.x] = undeclared_name; }\n")
    proc = subprocess.run([sys.executable, TOOL, str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "undeclared_name" in proc.stderr


@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc not found")
def test_syntax_check_sends_the_glue_to_the_host_compiler(tmp_path):
    """A .cpp file (the torch glue is one) is checked by the host compiler, with CUDA's headers found."""
    good, bad = tmp_path / "good.cpp", tmp_path / "bad.cpp"
    good.write_text("#include <cuda_runtime_api.h>\nint f() { return cudaSuccess; }\n")
    bad.write_text("int g() { return undeclared_glue_name; }\n")
    proc = subprocess.run([sys.executable, TOOL, str(good), str(bad)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ok   " in proc.stdout and "FAIL" in proc.stdout and "undeclared_glue_name" in proc.stderr
