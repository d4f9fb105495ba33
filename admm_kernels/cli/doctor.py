"""`admm-prune doctor`: its options, the text form of admm_kernels.doctor.report(), exit status 0 when
every check passed, 1 otherwise; `--json` prints the report as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from .. import doctor
from .common import positive


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
    for c in rep.get("error_path_checks", []):
        lines.append(f"  {c['check']} on {c['device']}: {'ok' if c['ok'] else 'FAIL'}")
        if not c["ok"]:
            lines.append(f"      {c['error']}")
    checks = doctor.all_checks(rep)
    failed = sum(not c["ok"] for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """doctor's options (`admm-prune doctor`, also `python -m admm_kernels.cli.doctor`)."""
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--repeat",
        type=positive("--repeat"),
        default=doctor.REPEAT,
        help=f"timed runs of each check, median reported (default {doctor.REPEAT})",
    )


def run(args: argparse.Namespace) -> int:
    """Print the report (text or --json); 0 when every check passed, else 1."""
    rep = doctor.report(args.repeat)
    if args.json:
        print(json.dumps(_json_safe(rep), indent=2, allow_nan=False))
    else:
        print(format_text(rep))
    return 0 if all(c["ok"] for c in doctor.all_checks(rep)) else 1


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
    p = argparse.ArgumentParser(prog="admm-prune doctor", description=doctor.__doc__.splitlines()[0],
                                allow_abbrev=False)
    add_arguments(p)
    args = p.parse_args(argv)
    from .._signals import Terminated, sigterm_raises, stopped

    try:
        with sigterm_raises():
            return run(args)
    except (Terminated, KeyboardInterrupt) as exc:  # nothing is written: nothing to continue
        return stopped("admm-prune doctor", exc)


if __name__ == "__main__":
    sys.exit(main())
