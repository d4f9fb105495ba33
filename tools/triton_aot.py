#!/usr/bin/env python3
"""Compile every Triton kernel of admm_kernels/backends/triton/ ahead of time for an sm_90 GPU (no GPU
needed), exactly as the JIT would for real launches, and record each compiled kernel's resources.

How: Triton's active driver is replaced by a stand-in that reports an sm_90 target, and the
jit_cache_hook knob captures what the JIT is about to compile (signature, the integer and alignment
specialisations of the actual arguments, constexprs, num_warps/num_stages) and stops the launch. Each
launch function of the backend is then *called* (with CPU tensors standing in for CUDA ones, outside the
interpreter) for the inputs of LAUNCHES below, so the block sizes are the ones the launchers pick,
not a copy of them here. Every distinct kernel variant is compiled with triton.compile for
GPUTarget("cuda", 90, 32) and ptxas's log is parsed: registers, spills, stack, shared memory, warps.

LAUNCHES covers each configuration the launchers can pick and each dtype they accept: gram_update
x fp32/bf16/fp16 (contiguous and transposed), the dual step flat and strided, nm_mask for m from 2 to 64
(block sizes 1024/m) and a non-power-of-two m, every score dtype, and prune_mask per layer and per row
with a layer of more than 2**24 entries (so all four index passes of the radix select run).

Writes OUT/triton-<version>.json; exit status 1 when a compile fails or a kernel spills registers.
Run with the Triton to check first on the path, e.g. PYTHONPATH=DIR_OF_TRITON_3_6 python tools/triton_aot.py.

Usage: python tools/triton_aot.py [--out build/gpu-check] [--arch 90]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick their GPU configurations
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas runs (and logs) even for kernels in Triton's cache
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from ptxas_report import parse_ptxas_log  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _TargetOnlyDriver:
    """Just enough of a Triton driver for the JIT to specialise and hand a kernel to its compile hook."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"the ahead-of-time driver has no {name!r}: nothing may run on a device here")


def _t(*shape, dtype=torch.float32, transposed=False):
    if transposed:
        return torch.randn(*reversed(shape)).to(dtype).T
    return torch.randn(*shape).to(dtype)


def _launches():
    """(label, callable) pairs; each call runs one launch function of the Triton backend."""
    from admm_kernels.backends.triton import dual_step, gram, nm, topk

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        out.append(
            (
                f"gram_update x {name}",
                lambda d=dtype: gram.gram_update(torch.zeros(320, 320), _t(512, 320, dtype=d)),
            )
        )
    out.append(
        (
            "gram_update x float32 transposed",
            lambda: gram.gram_update(torch.zeros(320, 320), _t(512, 320, transposed=True)),
        )
    )

    def step(transposed):
        W, U, B, R = (_t(64, 320, transposed=transposed) for _ in range(4))
        dual_step.admm_dual_step(W, U, W > 0, B, 0.5, R)

    out.append(("admm_dual_step contiguous (flat)", lambda: step(False)))
    out.append(("admm_dual_step strided (2-D)", lambda: step(True)))
    for n, m in ((1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (3, 6)):
        out.append((f"nm_mask {n}:{m} float32", lambda n=n, m=m: nm.nm_mask(_t(16, 192).abs(), n, m)))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        name = str(dtype).replace("torch.", "")
        out.append((f"nm_mask 2:4 {name}", lambda d=dtype: nm.nm_mask(_t(16, 192, dtype=d), 2, 4)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        name = str(dtype).replace("torch.", "")
        out.append(
            (f"prune_mask per row {name}", lambda d=dtype: topk.prune_mask(_t(64, 512, dtype=d), 100, True))
        )
    # 4100 x 4100 > 2**24 entries: the per-layer select needs all four 8-bit index passes.
    out.append(
        (
            "prune_mask per layer float32 (2**24+ entries)",
            lambda: topk.prune_mask(torch.rand(4100, 4100), 4100 * 2050, False),
        )
    )
    return out


def _capture(target: GPUTarget) -> list[dict]:
    """Every distinct kernel variant the launch functions ask the JIT for, in launch order."""
    seen: dict[str, dict] = {}

    def hook(*, key, fn, compile, **_):
        k = f"{fn.name}:{key}"
        if k not in seen:
            seen[k] = {"fn": fn.jit_function, "name": fn.name, "compile": compile, "launch": current[0]}
        return True  # do not compile or launch here

    current = [""]
    driver.set_active(_TargetOnlyDriver(target))
    knobs.runtime.jit_cache_hook = hook
    try:
        for label, call in _launches():
            current[0] = label
            call()
    finally:
        knobs.runtime.jit_cache_hook = None  # the stand-in driver stays: this process never runs a kernel
    return list(seen.values())


def _constexprs(fn, constants: dict) -> dict:
    names = fn.arg_names
    return {
        names[k[0]] if isinstance(k, tuple) else k: (v if isinstance(v, int | float | bool | str) else str(v))
        for k, v in constants.items()
    }


def compile_variant(v: dict, target: GPUTarget) -> dict:
    c = v["compile"]
    options = {
        "num_warps": c["num_warps"],
        "num_stages": c["num_stages"],
        "num_ctas": c["num_ctas"],
        "enable_fp_fusion": c["enable_fp_fusion"],
    }
    src = ASTSource(v["fn"], c["signature"], c["constants"], c["configs"][0])
    rec = {
        "kernel": v["name"],
        "launch": v["launch"],
        "signature": {k: t for k, t in c["signature"].items() if t != "constexpr"},
        "constexprs": _constexprs(v["fn"], c["constants"]),
        **options,
    }
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=target, options=options)
    except Exception as exc:  # noqa: BLE001 - reported per kernel
        rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        return rec
    rec["compile_seconds"] = round(time.perf_counter() - t0, 2)
    md = compiled.metadata
    logs = parse_ptxas_log(buf.getvalue())
    ptx = logs[-1] if logs else {}
    rec.update(
        ok=True,
        arch=ptx.get("arch"),
        registers=ptx.get("registers"),
        spill_stores=ptx.get("spill_stores"),
        spill_loads=ptx.get("spill_loads"),
        stack=ptx.get("stack"),
        shared=int(getattr(md, "shared", 0)),
        num_warps_compiled=int(md.num_warps),
    )
    if not logs:
        rec["note"] = "no ptxas log captured"
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-check"))
    p.add_argument(
        "--arch", type=int, default=90, help="compute capability as an int (default 90: H100/H200)"
    )
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    t0 = time.perf_counter()
    variants = _capture(target)
    results = [compile_variant(v, target) for v in variants]
    failed = [r for r in results if not r["ok"]]
    spills = [r for r in results if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    report = {
        "triton": triton.__version__,
        "triton_path": os.path.dirname(triton.__file__),
        "target": f"cuda sm_{args.arch}",
        "seconds": round(time.perf_counter() - t0, 1),
        "kernels": results,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"triton-{triton.__version__}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    for r in results:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper())
        if r["ok"]:
            print(
                f"ok   {r['kernel']:18s} warps {r['num_warps']} stages {r['num_stages']} "
                f"regs {r['registers']} spills {r['spill_stores']}/{r['spill_loads']} smem {r['shared']:6d}  "
                f"[{cx}]  ({r['launch']})"
            )
        else:
            print(f"FAIL {r['kernel']:18s} [{cx}] ({r['launch']}): {r['error'].splitlines()[0]}")
    print(
        f"triton {triton.__version__}: {len(results) - len(failed)}/{len(results)} kernel variants compiled "
        f"for sm_{args.arch}, {len(spills)} spill, {report['seconds']} s; {path}"
    )
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
