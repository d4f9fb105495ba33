#!/usr/bin/env python3
"""GPU kernel benchmarks, every ratio measured in the same run (never across runs).

Sections (each one's failure is recorded and the others still run):
  gram      Gram from bf16 (Triton upper-triangle kernel, the registry's CUDA choice, the torch
            reference) vs the bf16 matmul x^T x (cuBLAS) of the same shape: time, TFLOP/s counting the
            triangle's useful FLOPs (n*d*(d+1)), and the fraction of the matmul's FLOP/s.
  step      fused ADMM step (CUDA C++, Triton, reference) vs a plain fp32 copy: GB/s (25 B per element
            for the step, 8 B for the copy) and the fraction of the copy's bandwidth.
  masks     per-layer / per-row top-k and 2:4 masks per backend vs torch.topk / torch.kthvalue.
  prune     a whole ADMM-Grad prune_layer on a (rows, cols) weight, fp32 with TF32 matmuls.
  sparse    2:4 GEMM through admm_kernels.sparsify (if the sparse module provides it) and torch's
            semi-structured sparsity vs dense cuBLAS.

Usage: bench_gpu.py --out DIR [--rows 4096 --cols 11008 --tokens 8192 --gram-d 4096,11008 --reps 10]
Writes DIR/results.json (rewritten atomically after every section) and DIR/results.md.
On a machine without CUDA it runs on the CPU (use small sizes: it is only a check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from admm_kernels import backends  # noqa: E402
from admm_kernels.backends import reference  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `reps` runs after `warmup` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _backend_modules(device: torch.device) -> dict:
    """name -> backend module for every backend that can run on `device` (reference always)."""
    mods = {}
    for name in backends.BACKENDS:
        mod = backends.get(name)
        try:
            if mod.is_available() and mod.supports(device):
                mods[name] = mod
        except Exception:  # a backend that cannot even say whether it is available is not benchmarked
            continue
    return mods


class Results:
    def __init__(self, out_dir: str, meta: dict):
        self.out_dir = out_dir
        self.data = {"meta": meta, "sections": {}}

    def section(self, name: str, payload: dict) -> None:
        self.data["sections"][name] = payload
        self._write("results.json", json.dumps(self.data, indent=2, default=str))

    def _write(self, filename: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{filename}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.out_dir, filename))

    def markdown(self) -> None:
        m = self.data["meta"]
        lines = [f"# GPU kernel benchmarks ({m['date']})", "",
                 f"Device: {m['device_name']}; torch {m['torch']}, triton {m['triton']}, "
                 f"commit {m['commit']}.", ""]
        for name, sec in self.data["sections"].items():
            lines.append(f"## {name}")
            lines.append("")
            if "error" in sec:
                lines += [f"FAILED: `{sec['error']}`", ""]
            rows = sec.get("rows", [])
            if rows:
                keys = list(dict.fromkeys(k for r in rows for k in r))
                lines.append("| " + " | ".join(keys) + " |")
                lines.append("|" + "---|" * len(keys))
                for r in rows:
                    lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
                lines.append("")
            for note in sec.get("notes", []):
                lines.append(f"- {note}")
            lines.append("")
        self._write("results.md", "\n".join(lines))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_section(results: Results, name: str, fn: Callable[[], dict]) -> None:
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        payload = fn()
    except Exception as e:  # record and go on: one broken section must not hide the others
        traceback.print_exc()
        payload = {"error": f"{type(e).__name__}: {e}"}
    payload["section_seconds"] = round(time.perf_counter() - t0, 2)
    for r in payload.get("rows", []):
        print("   ", {k: _fmt(v) for k, v in r.items()}, flush=True)
    results.section(name, payload)


# --- sections ----------------------------------------------------------------------------------------

def _gram_rows(device, args, d: int, dtype: torch.dtype, notes: list) -> list[dict]:
    n = args.tokens
    x = torch.randn(n, d, device=device).to(dtype)
    G = torch.zeros(d, d, device=device)
    t_mm = timeit(lambda: x.T @ x, device, args.reps)
    mm_rate = 2 * n * d * d / t_mm
    rows = [{"d": d, "impl": f"matmul x^T x ({dtype})", "ms": t_mm * 1e3, "TFLOP/s": mm_rate / 1e12,
             "of matmul": 1.0}]
    useful = n * d * (d + 1)  # FLOPs of the upper triangle incl. the diagonal
    mods = _backend_modules(device)
    impls = {name: mod.gram_update for name, mod in mods.items() if hasattr(mod, "gram_update")}
    if device.type == "cuda" and "triton" not in impls:
        notes.append("triton backend unavailable: " + backends.get("triton").unavailable_reason())
    for name, fn in impls.items():
        t = timeit(lambda fn=fn: fn(G, x), device, args.reps)
        rate = useful / t
        rows.append({"d": d, "impl": f"gram_update [{name}]", "ms": t * 1e3, "TFLOP/s": rate / 1e12,
                     "of matmul": rate / mm_rate})
    return rows


def bench_gram(device, args) -> dict:
    rows, notes = [], []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for d in args.gram_d:
        rows += _gram_rows(device, args, d, dtype, notes)
    notes.append("TFLOP/s of gram_update counts only the triangle's useful FLOPs n*d*(d+1); 'of matmul' is "
                 "that rate over the full bf16 matmul's (target >= 0.7 on an H200).")
    return {"rows": rows, "notes": notes}


def bench_step(device, args) -> dict:
    r, c = args.rows, args.cols
    numel = r * c
    W, U, B = (torch.randn(r, c, device=device) for _ in range(3))
    M = torch.rand(r, c, device=device) > 0.5
    R = torch.empty_like(W)
    dst = torch.empty_like(W)
    t_copy = timeit(lambda: dst.copy_(W), device, args.reps)
    copy_bw = 8 * numel / t_copy
    rows = [{"impl": "copy fp32", "ms": t_copy * 1e3, "GB/s": copy_bw / 1e9, "of copy": 1.0}]
    for name, mod in _backend_modules(device).items():
        t = timeit(lambda mod=mod: mod.admm_dual_step(W, U, M, B, 1.0, R), device, args.reps)
        bw = 25 * numel / t
        rows.append({"impl": f"admm_dual_step [{name}]", "ms": t * 1e3, "GB/s": bw / 1e9,
                     "of copy": bw / copy_bw})
    return {"rows": rows, "shape": [r, c],
            "notes": ["step traffic: 4 fp32 reads + 1-byte mask + 2 fp32 writes = 25 B/element; "
                      "copy 8 B/element"]}


def bench_masks(device, args) -> dict:
    r, c = args.rows, args.cols
    s = torch.randn(r, c, device=device).abs()
    k_layer, k_row = int(r * c * 0.5), int(c * 0.5)
    flat = s.reshape(-1)
    rows = []
    t = timeit(lambda: torch.topk(flat, k_layer, largest=False), device, args.reps)
    rows.append({"op": "per-layer top-k", "impl": "torch.topk", "ms": t * 1e3})
    try:
        t = timeit(lambda: torch.kthvalue(flat, k_layer), device, args.reps)
        rows.append({"op": "per-layer top-k", "impl": "torch.kthvalue", "ms": t * 1e3})
    except RuntimeError as e:  # kthvalue may be missing for a device/dtype
        rows.append({"op": "per-layer top-k", "impl": "torch.kthvalue", "ms": f"n/a ({e})"[:60]})
    t = timeit(lambda: torch.topk(s, k_row, dim=1, largest=False), device, args.reps)
    rows.append({"op": "per-row top-k", "impl": "torch.topk", "ms": t * 1e3})
    for name, mod in _backend_modules(device).items():
        for op, fn in (("per-layer top-k", lambda mod=mod: mod.prune_mask(s, k_layer, False)),
                       ("per-row top-k", lambda mod=mod: mod.prune_mask(s, k_row, True)),
                       ("2:4", lambda mod=mod: mod.nm_mask(s, 2, 4)),
                       ("4:8", lambda mod=mod: mod.nm_mask(s, 4, 8))):
            t = timeit(fn, device, args.reps)
            rows.append({"op": op, "impl": name, "ms": t * 1e3, "GB/s (4 B/score read)": 4 * r * c / t / 1e9})
    return {"rows": rows, "shape": [r, c]}


def bench_prune(device, args) -> dict:
    import admm_kernels as ak

    r, c = args.rows, args.cols
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, c, device=device, generator=g)
    x = x + 0.5 * torch.randn(args.tokens, 1, device=device, generator=g)  # correlated features
    G = x.T @ x
    del x
    W = torch.randn(r, c, device=device, generator=g) / c ** 0.5
    rows = []
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32/TF32 setting of the target
    try:
        for pattern in ("unstructured", "2:4"):
            res = {}

            def run(pattern=pattern, res=res):
                res["r"] = ak.prune_layer(W, G, sparsity=0.5, pattern=pattern)

            t = timeit(run, device, max(1, args.reps // 3), warmup=1)
            st = res["r"].stats
            phases = {k: round(v * 1e3, 2) for k, v in st.get("seconds", {}).items()}
            rows.append({"pattern": pattern, "ms": t * 1e3, "error": res["r"].error,
                         "phases (ms)": json.dumps(phases),
                         "backends": json.dumps(st.get("backends", st.get("backend", "")))})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"rows": rows, "shape": [r, c],
            "notes": ["ADMM-Grad defaults (20 iterations, 15 mask updates); TF32 matmuls; target < 100 ms"]}


def bench_sparse(device, args) -> dict:
    if device.type != "cuda":
        return {"notes": ["skipped: 2:4 GEMMs need CUDA"]}
    r, c, n = args.rows, args.cols, args.tokens
    dtype = torch.float16
    w = torch.randn(r, c, device=device, dtype=dtype)
    w = w * reference.nm_mask(w.abs(), 2, 4)
    x = torch.randn(n, c, device=device, dtype=dtype)
    lin = torch.nn.Linear(c, r, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    rows, notes = [], []
    with torch.no_grad():
        t_dense = timeit(lambda: lin(x), device, args.reps)
        rows.append({"impl": "dense cuBLAS (fp16)", "ms": t_dense * 1e3,
                     "TFLOP/s": 2 * n * r * c / t_dense / 1e12, "speed-up": 1.0})
        try:
            import admm_kernels as ak

            model = ak.sparsify(torch.nn.Sequential(lin))
            t = timeit(lambda: model(x), device, args.reps)
            rows.append({"impl": f"admm_kernels.sparsify -> {type(model[0]).__name__}", "ms": t * 1e3,
                         "TFLOP/s": 2 * n * r * c / t / 1e12, "speed-up": t_dense / t})
        except Exception as e:
            notes.append(f"admm_kernels.sparsify not benchmarked: {type(e).__name__}: {e}"[:300])
        try:
            from torch.sparse import to_sparse_semi_structured

            ws = to_sparse_semi_structured(w)
            t = timeit(lambda: torch.nn.functional.linear(x, ws), device, args.reps)
            rows.append({"impl": "torch to_sparse_semi_structured", "ms": t * 1e3,
                         "TFLOP/s": 2 * n * r * c / t / 1e12, "speed-up": t_dense / t})
        except Exception as e:
            notes.append(f"torch semi-structured not benchmarked: {type(e).__name__}: {e}"[:300])
    return {"rows": rows, "notes": notes, "shape": [n, r, c]}


SECTIONS = {"gram": bench_gram, "step": bench_step, "masks": bench_masks, "prune": bench_prune,
            "sparse": bench_sparse}


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return vals


def _positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--rows", type=_positive, default=4096)
    p.add_argument("--cols", type=_positive, default=11008)
    p.add_argument("--tokens", type=_positive, default=8192, help="calibration rows for gram/prune")
    p.add_argument("--gram-d", type=_ints, default=[4096, 11008], help="Gram sizes, e.g. 4096,11008")
    p.add_argument("--reps", type=_positive, default=10)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        p.error(f"unknown --sections {unknown}; choose from {list(SECTIONS)}")
    if args.cols % 8:
        p.error(f"--cols must be a multiple of 8 (for the 2:4 and 4:8 masks), got {args.cols}")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    commit = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip() or "unknown"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "torch": torch.__version__, "triton": triton_version, "commit": commit, "args": vars(args),
            "backends": list(_backend_modules(device))}
    print(json.dumps(meta, default=str), flush=True)
    results = Results(args.out, meta)
    for name in wanted:
        run_section(results, name, lambda name=name: SECTIONS[name](device, args))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.markdown()
    failed = [n for n, s in results.data["sections"].items() if "error" in s]
    print(f"done; failed sections: {failed or 'none'}; results in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
