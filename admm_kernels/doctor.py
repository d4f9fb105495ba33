"""`admm-prune doctor`: what this machine runs, and whether each kernel agrees with the reference here.

Prints the versions (Python, admm_kernels, torch and its CUDA, triton, numpy, transformers), how the
compiled extension was built, the devices, which backends are available (and why not), and for every
available backend, op and device its self-check (backends/selfcheck.py: small inputs against the pure-
torch reference) with the kernel's time next to the reference's. The first thing to run on a new GPU
machine, and what a bug report should contain. report() gathers it all as one dict; the command's options
and its text form live in admm_kernels/cli/doctor.py.
"""

from __future__ import annotations

import torch

from . import backends
from .backends import _extension, selfcheck
from .environment import versions

# Timed repetitions of each check (medians reported): enough for a stable median at these sizes.
REPEAT = 5


def extension() -> dict:
    """Whether _C imports, whether it registers CUDA kernels, and what setup.py recorded about its build."""
    built = _extension.load() is not None
    try:
        from ._build_info import BUILD as info
    except ImportError:
        info = None
    return {
        "importable": built,
        "reason": "" if built else _extension.reason(),
        "cuda_kernels": _extension.has_cuda_kernels(),
        "build": info,
    }


def devices() -> list[dict]:
    from .bench.machine import describe

    cpu = describe("cpu")
    out = [
        {"device": "cpu", "name": cpu["cpu"], "cores": cpu["cores"], "torch_threads": cpu["torch_threads"]}
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append(
                {
                    "device": f"cuda:{i}",
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return out


def backend_table() -> list[dict]:
    rows = []
    for name in backends.BACKENDS:
        mod = backends.get(name)
        ok = bool(mod.is_available())
        reason = "" if ok else (mod.unavailable_reason() if hasattr(mod, "unavailable_reason") else "")
        rows.append({"backend": name, "available": ok, "reason": reason})
    return rows


def run_checks(repeat: int = REPEAT) -> list[dict]:
    """Every available non-reference backend x op with a self-check x device it supports."""
    out = []
    devs = [torch.device(d["device"]) for d in devices()]
    for name in backends.BACKENDS:
        mod = backends.get(name)
        if name == "reference" or not mod.is_available():
            continue
        for op in selfcheck.CASES:
            fn = getattr(mod, op, None)
            if fn is None:
                continue
            for dev in devs:
                if mod.supports(dev):
                    out.append(selfcheck.check(name, op, dev, fn, repeat=repeat).as_dict())
    return out


def solver_checks(repeat: int = REPEAT) -> list[dict]:
    """Per device, the batched expert solve (admm_kernels.batched.prune_experts, what MoE models run)
    against prune_layer one expert at a time on 4 small random experts: masks identical and weights
    equal within fp32 rounding. Timings are medians of `repeat` calls of each after one untimed call of
    each: the first call on a device pays the kernels' self-check and library start-up, which made the
    batched solve (timed first) look 3.4x slower than the loop on an H100."""
    import statistics

    from .batched import prune_experts
    from .prune import prune_layer

    out = []
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 24, 64, generator=g)
    X = torch.randn(4, 192, 64, generator=g)
    G = torch.bmm(X.transpose(1, 2), X)

    def median_seconds(fn, dev: torch.device) -> float:
        return statistics.median(selfcheck.timed(fn, dev) for _ in range(max(repeat, 1)))

    for d in devices():
        dev = torch.device(d["device"])
        row = {"check": "batched experts (ADMM-Grad)", "device": str(dev), "ok": False,
               "seconds": float("nan"), "looped_seconds": float("nan"), "error": ""}
        try:
            w, gram = W.to(dev), G.to(dev)

            def run_batched(w=w, gram=gram):
                return prune_experts(w, gram, 0.5, batched=True)

            def run_looped(w=w, gram=gram):
                return [prune_layer(w[e], gram[e], 0.5) for e in range(w.shape[0])]

            batched, looped = run_batched(), run_looped()
            bad = [e for e, (a, b) in enumerate(zip(batched, looped))
                   if not torch.equal(a.mask, b.mask) or not torch.allclose(a.weight, b.weight, rtol=1e-5,
                                                                             atol=1e-6)]
            row["ok"] = not bad
            row["error"] = f"experts {bad} differ from prune_layer's result" if bad else ""
            row["seconds"] = median_seconds(run_batched, dev)
            row["looped_seconds"] = median_seconds(run_looped, dev)
        except Exception as exc:  # a broken device or kernel is a failed check, not a crash of doctor
            row["error"] = f"{type(exc).__name__}: {exc}"
        out.append(row)
    return out


# Run in a child process by error_path_checks: bad input to a compiled kernel, which must raise.
_BAD_INPUT_PROBE = """
import sys, torch
from admm_kernels.backends import _extension
_extension.load()
try:
    torch.ops.admm_kernels.nm_mask(torch.zeros(2, 6, device=sys.argv[1]), 2, 4)
except Exception as e:
    print("raised", type(e).__name__ + ":", str(e).splitlines()[0])
"""


def error_path_checks() -> list[dict]:
    """Per device with compiled kernels, bad input to one of them (nm_mask with 6 columns, m=4) in a child
    process: it must raise an exception, not end the process. A build whose compiler linked a private copy
    of the C++ runtime into _C passes every numeric check and dies here (seen on an H100 machine; setup.py
    now refuses such a compiler, tools/build_flags.py says why)."""
    import subprocess
    import sys

    if _extension.load() is None:
        return []
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _extension.has_cuda_kernels() else [])
    out = []
    for dev in devs:
        row = {"check": "bad input raises, not crashes (child process)", "device": dev, "ok": False,
               "error": ""}
        try:
            proc = subprocess.run([sys.executable, "-c", _BAD_INPUT_PROBE, dev], capture_output=True,
                                  text=True, timeout=300)
            row["ok"] = proc.returncode == 0 and proc.stdout.startswith("raised ")
            if not row["ok"]:
                tail = (proc.stderr.strip().splitlines() or [""])[-1]
                row["error"] = f"exit status {proc.returncode}: {tail}"
        except subprocess.TimeoutExpired:
            row["error"] = "timed out after 300 s"
        out.append(row)
    return out


def all_checks(rep: dict) -> list[dict]:
    """Every check of a report(): kernels, solver, error path (each a dict with an "ok" key)."""
    return rep["checks"] + rep.get("solver_checks", []) + rep.get("error_path_checks", [])


def report(repeat: int = REPEAT) -> dict:
    return {
        "versions": versions(detail=True),
        "extension": extension(),
        "devices": devices(),
        "backends": backend_table(),
        "self_check_at_first_use": {
            "enabled": selfcheck.enabled(),
            "env_var": selfcheck.ENV_VAR,
            "backends": list(selfcheck.SELF_CHECKED),
        },
        "checks": run_checks(repeat),
        "solver_checks": solver_checks(repeat),
        "error_path_checks": error_path_checks(),
    }
