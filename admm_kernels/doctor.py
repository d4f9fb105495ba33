"""`admm-prune doctor`: what this machine runs, and whether each kernel agrees with the reference here.

Prints the versions (Python, admm_kernels, torch and its CUDA, triton, numpy, transformers), how the
compiled extension was built, the devices, which backends are available (and why not), and for every
available backend, op and device its self-check (backends/selfcheck.py: small inputs against the pure-
torch reference) with the kernel's time next to the reference's. The first thing to run on a new GPU
machine, and what a bug report should contain. `--json` prints the same as one JSON object. Exit status
0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import backends
from .backends import _extension, selfcheck
from .cli_common import positive
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


def solver_checks() -> list[dict]:
    """Per device, the batched expert solve (admm_kernels.batched.prune_experts, what MoE models run)
    against prune_layer one expert at a time on 4 small random experts: masks identical and weights
    equal within fp32 rounding, with both timings."""
    import time

    from .batched import prune_experts
    from .prune import prune_layer

    out = []
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 24, 64, generator=g)
    X = torch.randn(4, 192, 64, generator=g)
    G = torch.bmm(X.transpose(1, 2), X)
    for d in devices():
        dev = torch.device(d["device"])
        row = {"check": "batched experts (ADMM-Grad)", "device": str(dev), "ok": False,
               "seconds": float("nan"), "looped_seconds": float("nan"), "error": ""}
        try:
            w, gram = W.to(dev), G.to(dev)
            t = time.perf_counter()
            batched = prune_experts(w, gram, 0.5, batched=True)
            row["seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            looped = [prune_layer(w[e], gram[e], 0.5) for e in range(4)]
            row["looped_seconds"] = time.perf_counter() - t
            bad = [e for e, (a, b) in enumerate(zip(batched, looped))
                   if not torch.equal(a.mask, b.mask) or not torch.allclose(a.weight, b.weight, rtol=1e-5,
                                                                             atol=1e-6)]
            row["ok"] = not bad
            row["error"] = f"experts {bad} differ from prune_layer's result" if bad else ""
        except Exception as exc:  # a broken device or kernel is a failed check, not a crash of doctor
            row["error"] = f"{type(exc).__name__}: {exc}"
        out.append(row)
    return out


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
        "solver_checks": solver_checks(),
    }


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e3:.3f}"  # NaN -> "-"


def format_text(rep: dict) -> str:
    v = rep["versions"]
    lines = [
        f"admm_kernels {v['admm_kernels']}  Python {v['python']}  torch {v['torch']} "
        f"(CUDA {v['torch_cuda'] or '-'})  triton {v['triton'] or '-'}  numpy {v['numpy'] or '-'}  "
        f"transformers {v['transformers'] or '-'}"
    ]
    ext = rep["extension"]
    if ext["importable"]:
        b = ext["build"] or {}
        built = ", ".join(
            f"{k} {b[k]}" for k in ("torch", "cxx_std", "cpu_arch", "cuda_arch_list") if b.get(k)
        )
        lines.append(
            f"extension _C: built ({built or 'no build record'}); CUDA kernels "
            f"{'registered' if ext['cuda_kernels'] else 'not built'}"
        )
    else:
        lines.append(f"extension _C: not importable: {ext['reason']}")
    lines.append("devices:")
    for d in rep["devices"]:
        extra = (
            f"{d['cores']} cores, {d['torch_threads']} torch threads"
            if d["device"] == "cpu"
            else f"compute capability {d['capability']}, {d['memory_gib']} GiB"
        )
        lines.append(f"  {d['device']:8s} {d['name']} ({extra})")
    if len(rep["devices"]) == 1:
        lines.append("  (no CUDA device visible)")
    lines.append("backends:")
    for b in rep["backends"]:
        lines.append(
            f"  {b['backend']:10s} {'available' if b['available'] else 'unavailable: ' + b['reason']}"
        )
    sc = rep["self_check_at_first_use"]
    lines.append(
        f"self-check of {'/'.join(sc['backends'])} kernels before first use: "
        f"{'on' if sc['enabled'] else 'OFF'} ({sc['env_var']}=0 turns it off)"
    )
    lines.append("kernel checks against the reference (small inputs; median of the timed runs):")
    lines.append(
        f"  {'backend':8s} {'op':15s} {'device':8s} {'result':6s} {'kernel ms':>10s} {'ref ms':>10s} "
        f"{'speed-up':>8s}"
    )
    for c in rep["checks"]:
        ok = c["ok"]
        speed = f"{c['reference_seconds'] / c['seconds']:.2f}x" if ok and c["seconds"] > 0 else "-"
        lines.append(
            f"  {c['backend']:8s} {c['op']:15s} {c['device']:8s} {'ok' if ok else 'FAIL':6s} "
            f"{_ms(c['seconds']):>10s} {_ms(c['reference_seconds']):>10s} {speed:>8s}"
        )
        if not ok:
            lines.append(f"      {c['error']}")
    if not rep["checks"]:
        lines.append("  (no backend besides the reference is available)")
    for c in rep.get("solver_checks", []):
        speed = f"{c['looped_seconds'] / c['seconds']:.2f}x" if c["ok"] and c["seconds"] > 0 else "-"
        lines.append(f"  {c['check']} on {c['device']}: {'ok' if c['ok'] else 'FAIL'} (batched "
                     f"{_ms(c['seconds'])} ms, one at a time {_ms(c['looped_seconds'])} ms, {speed})")
        if not c["ok"]:
            lines.append(f"      {c['error']}")
    checks = rep["checks"] + rep.get("solver_checks", [])
    failed = sum(not c["ok"] for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """doctor's options (shared by `admm-prune doctor` and `python -m admm_kernels.doctor`)."""
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--repeat",
        type=positive("--repeat"),
        default=REPEAT,
        help=f"timed runs of each check, median reported (default {REPEAT})",
    )


def run(args: argparse.Namespace) -> int:
    """Print the report (text or --json); 0 when every check passed, else 1."""
    rep = report(args.repeat)
    if args.json:
        print(json.dumps(_json_safe(rep), indent=2, allow_nan=False))
    else:
        print(format_text(rep))
    return 0 if all(c["ok"] for c in rep["checks"] + rep["solver_checks"]) else 1


def _json_safe(obj):
    """NaN (a time that could not be measured) -> None, recursively: strict JSON has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="admm-prune doctor", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    add_arguments(p)
    args = p.parse_args(argv)
    from ._signals import Terminated, sigterm_raises, stopped

    try:
        with sigterm_raises():
            return run(args)
    except (Terminated, KeyboardInterrupt) as exc:  # nothing is written: nothing to continue
        return stopped("admm-prune doctor", exc)


if __name__ == "__main__":
    sys.exit(main())
