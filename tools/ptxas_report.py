#!/usr/bin/env python3
"""ptxas resource report of the CUDA kernels (csrc/cuda/*_kernel.cu): registers, spills, stack and shared
memory per kernel and architecture, from `nvcc -Xptxas -v`, with the flags setup.py builds with.

The kernel files include no torch header, so each compiles in seconds; the torch glue (ops_cuda.cpp, plain
C++) holds no __global__ function. The architectures are the ones setup.py picks without a visible GPU
(tools/build_flags.py), or --arch-list. Writes OUT/ptxas.json and OUT/ptxas.txt (the raw ptxas log);
exit status 1 when a kernel spills registers (every kernel here is on the hot path of a solve) or a
compile fails, 2 when nvcc is missing.

Usage: python tools/ptxas_report.py [--out build/gpu-check] [--arch-list "8.0;9.0+PTX"] [--torch-version V]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_flags  # noqa: E402

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> list[dict]:
    """One dict per compiled entry function of a `ptxas -v` log: kernel (mangled name), arch, registers,
    stack, spill_stores, spill_loads (bytes), smem (static shared memory bytes)."""
    out: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {
                "kernel": m.group(1),
                "arch": m.group(2),
                "registers": None,
                "stack": 0,
                "spill_stores": 0,
                "spill_loads": 0,
                "smem": 0,
            }
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _SMEM.search(m.group(2))
            if s:
                cur["smem"] = int(s.group(1))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names through c++filt (names unchanged when it is missing)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    readable = proc.stdout.splitlines()
    return dict(zip(names, readable)) if len(readable) == len(names) else {n: n for n in names}


def compile_with_report(nvcc: str, source: str, flags: list[str]) -> tuple[str, int, str]:
    cmd = [nvcc, *flags, "-Xptxas", "-v", f"-I{os.path.join(ROOT, 'csrc')}", "-c", source, "-o", os.devnull]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default=os.path.join(ROOT, "build", "gpu-check"), help="folder for ptxas.json/.txt"
    )
    p.add_argument("--arch-list", default=None, help="TORCH_CUDA_ARCH_LIST-style list (default: setup.py's)")
    p.add_argument(
        "--torch-version", default=None, help="torch version the flags follow (default: installed)"
    )
    p.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    nvcc = shutil.which(args.nvcc) or (
        shutil.which("/usr/local/cuda/bin/nvcc") if args.nvcc == "nvcc" else None
    )
    if nvcc is None:
        print(f"nvcc not found ({args.nvcc!r})", file=sys.stderr)
        return 2
    torch_version = args.torch_version
    arch_list = args.arch_list
    if torch_version is None or arch_list is None:
        import torch

        torch_version = torch_version or torch.__version__
        arch_list = arch_list or build_flags.arch_list_from_torch(torch.cuda.get_arch_list())
    flags = build_flags.nvcc_flags(torch_version) + build_flags.gencode_flags(arch_list)
    sources = sorted(
        f
        for f in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        if "__global__" in open(f, encoding="utf-8").read()
    )
    os.makedirs(args.out, exist_ok=True)
    kernels, log, failed = [], [], 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for source, rc, text in pool.map(lambda s: compile_with_report(nvcc, s, flags), sources):
            name = os.path.relpath(source, ROOT)
            log.append(f"### {name} (exit {rc})\n{text}")
            if rc != 0:
                failed += 1
                print(f"FAIL {name}\n{text}", file=sys.stderr)
                continue
            for k in parse_ptxas_log(text):
                kernels.append({"source": name, **k})
    names = demangle(sorted({k["kernel"] for k in kernels}))
    for k in kernels:
        k["name"] = names[k["kernel"]]
    spills = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    report = {
        "torch_version": torch_version,
        "arch_list": arch_list,
        "nvcc_flags": flags,
        "kernels": kernels,
        "spilling": [f"{k['name']} ({k['arch']})" for k in spills],
    }
    with open(os.path.join(args.out, "ptxas.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "ptxas.txt"), "w", encoding="utf-8") as f:
        f.write(f"nvcc {' '.join(flags)} -Xptxas -v\n\n" + "\n".join(log))
    for k in kernels:
        if k["arch"] in ("sm_90", "sm_90a"):
            print(
                f"{k['arch']:7s} regs {k['registers']:3d}  stack {k['stack']:4d}  spills {k['spill_stores']}/"
                f"{k['spill_loads']}  smem {k['smem']:6d}  {k['name']}"
            )
    print(
        f"{len(kernels)} kernel compilations ({len(sources)} files, archs {arch_list}); "
        f"{len(spills)} spill; report in {args.out}/ptxas.json"
    )
    for s in spills:
        print(
            f"SPILL {s['name']} ({s['arch']}): {s['spill_stores']} B stores, {s['spill_loads']} B loads",
            file=sys.stderr,
        )
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
