#!/usr/bin/env python3
"""Checks of a built admm_kernels._C that need no GPU, run by `make check-gpu-build`
(tools/check_gpu_build.py) in the torch it was built against, from the source folder holding the built _C:

1. _C imports (a kernel registered with another C++ signature than its op's other kernels aborts the
   process here: "Mismatch in kernel C++ signatures").
2. --expect cuda: every op of backends/_dispatch.CUDA_KERNEL_OPS, and no other op, has a CUDA kernel in
   torch's dispatcher; --expect cpu: no op has one. Every op the cpu backend routes to C++ has a CPU kernel.
3. --expect cuda: each CUDA kernel is called through the dispatcher (redispatch to the CUDA key) with CPU
   tensors, which runs the argument unboxing and the kernel's own checks up to its first device check;
   it must stop there with its "must be a CUDA tensor" error, nothing else.
4. When _C was built for the portable CPU target: only functions of an `avx2` namespace contain AVX
   (VEX-encoded) instructions (objdump), so the extension runs on any x86-64 CPU.

Exit status 0 when all pass; prints one line per check.
Usage: python tools/gpu_build_checks.py --expect cuda|cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout (or mirror) this script belongs to, with its built _C
CPU_KERNEL_OPS = (
    "gram_update",
    "prune_mask",
    "nm_mask",
    "admm_dual_step",
    "unpack_nm",
    "sparse_nm_mm",
    "csr_mm",
)


def vex_outside_avx2(so_path: str) -> tuple[int, list[str]]:
    """(number of functions with AVX instructions inside an `avx2` namespace, names of those outside one)
    in the disassembly of `so_path`. Raises RuntimeError without objdump."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise RuntimeError("objdump not found (binutils)")
    proc = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", so_path], capture_output=True, text=True, check=True
    )
    func_re = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    vex_re = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+\s.*%[xyz]mm")
    inside, outside = set(), set()
    fn = None
    for line in proc.stdout.splitlines():
        m = func_re.match(line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and vex_re.match(line):
            (inside if "::avx2::" in fn else outside).add(fn)
    return len(inside), sorted(outside)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expect", choices=("cuda", "cpu"), required=True, help="a CUDA build or a CPU-only one")
    args = p.parse_args(argv)
    failures = []

    def report(ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    import torch

    import admm_kernels
    from admm_kernels._ops import _SCHEMAS
    from admm_kernels.backends import _extension
    from admm_kernels.backends._dispatch import CUDA_KERNEL_OPS

    mod = _extension.load()
    report(
        mod is not None,
        f"admm_kernels._C imports with torch {torch.__version__} "
        f"({mod.__file__ if mod else _extension.reason()})",
    )
    if mod is None:
        return 1
    try:
        from admm_kernels._build_info import BUILD
    except ImportError:
        BUILD = {}
    print(f"     built: {BUILD or 'no build record'}; package {admm_kernels.__file__}")

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    cuda_ops = sorted(op for op in _SCHEMAS if has(f"admm_kernels::{op}", "CUDA"))
    want = sorted(CUDA_KERNEL_OPS) if args.expect == "cuda" else []
    report(cuda_ops == want, f"CUDA kernels registered for {cuda_ops or 'no op'} (expected {want or 'none'})")
    missing_cpu = [op for op in CPU_KERNEL_OPS if not has(f"admm_kernels::{op}", "CPU")]
    report(
        not missing_cpu,
        f"CPU kernels registered for {list(CPU_KERNEL_OPS)}"
        + (f"; missing {missing_cpu}" if missing_cpu else ""),
    )

    if args.expect == "cuda":
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        s = torch.rand(4, 8)
        calls = {
            "prune_mask": (s, 3, False),
            "nm_mask": (s, 2, 4),
            "admm_dual_step": (s, s.clone(), s > 0.5, s.clone(), 0.5, s.clone()),
        }
        for op in CUDA_KERNEL_OPS:
            try:
                getattr(torch.ops.admm_kernels, op).default.redispatch(keys, *calls[op])
                report(False, f"CUDA kernel of {op} accepted CPU tensors")
            except Exception as exc:  # noqa: BLE001 - the message is the check
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                report(
                    "must be a CUDA tensor" in str(exc),
                    f"CUDA kernel of {op} runs up to its device check: {first}",
                )

    if BUILD.get("cpu_arch") == "portable":
        if sys.platform.startswith("linux") and re.search(
            r"x86_64|amd64", platform.machine(), re.I
        ):
            try:
                n_avx2, outside = vex_outside_avx2(mod.__file__)
                report(
                    not outside and n_avx2 > 0,
                    f"portable build: AVX instructions only in {n_avx2} functions of avx2 namespaces"
                    + (f"; also in {len(outside)} others, e.g. {outside[:3]}" if outside else ""),
                )
            except RuntimeError as exc:
                print(f"skip portable-build disassembly check: {exc}")
    print(
        f"{'all checks passed' if not failures else f'{len(failures)} check(s) FAILED'} ({args.expect} build)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
