"""Coverage sweep: prune a tiny random model of every decoder-only causal-LM architecture of the installed
transformers and check the sparsity really reached.

For each architecture (tests/arch_sweep.py: causal_lm_architectures, build_tiny from the default config
shrunk generically), it builds the model, runs
``admm_kernels.prune_model(model, ids, sparsity=0.5, method="magnitude")`` on 2 windows of 32 random
tokens, and checks every pruned layer of the report (error not None): the zeros of its actual (out, in)
weight must equal numel - kept and the exact magnitude target int(numel * 0.5); the pruned model's logits
must be finite. Status per architecture:

- pruned-verified: pruned, every pruned layer verified, finite logits;
- partial: pruned, but some layer's zeros differ from the target (or no layer was pruned), or the pruned
  model's logits are not finite;
- error: prune_model raised (the exception's type and first line are recorded), or the time ran out;
- build-failed: the tiny model could not be built ("build failed: <reason>"), or the dense model's own
  forward on the calibration tokens fails (e.g. an assistant model that needs its main model's states):
  there is no causal LM to prune.

    OMP_NUM_THREADS=1 python benchmarks/arch_coverage.py --out arch_coverage.md
    OMP_NUM_THREADS=1 python benchmarks/arch_coverage.py --only llama,mixtral,jamba

Progress goes to stderr; each architecture gets --timeout seconds (signal.alarm, default 60).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SPARSITY = 0.5
NSAMPLES, SEQLEN = 2, 32


class ArchTimeout(Exception):
    """The architecture's time (--timeout) ran out."""


def _on_alarm(signum, frame):
    raise ArchTimeout("timed out")


def first_line(e: BaseException) -> str:
    """Type and first line of an exception's message (with the next line when the first only
    introduces it, as transformers' config validation errors do)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    msg = lines[0] if lines else ""
    if len(lines) > 1 and msg.endswith(":"):
        msg = f"{msg} {lines[1]}"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


def layer_modules(model) -> dict:
    """{full name: module} of every prunable layer inside the decoder blocks."""
    from admm_kernels.models.discovery import find_blocks, prunable_layers

    blocks_name, blocks = find_blocks(model)
    modules = {}
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}"
        for rel, module in prunable_layers(block, prefix).items():
            modules[f"{prefix}.{rel}"] = module
    return modules


def zero_counts(model) -> dict[str, int]:
    """{layer name: zeros in its weight}, taken before pruning to explain a mismatch."""
    from admm_kernels.models.discovery import get_weight

    try:
        return {name: int((get_weight(m) == 0).sum()) for name, m in layer_modules(model).items()}
    except Exception:  # find_blocks refuses the model: prune_model will say why
        return {}


def verify(model, report: dict, before: dict[str, int] | None = None) -> tuple[int, list[str]]:
    """(number of pruned layers checked, problems): each pruned layer's zeros in its actual weight must
    equal numel - kept and int(numel * SPARSITY)."""
    from admm_kernels.models.discovery import get_weight

    modules = layer_modules(model)
    before = before or {}
    checked, problems = 0, []
    for rec in report["layers"]:
        if rec.get("error") is None:
            continue
        module = modules.get(rec["name"])
        if module is None:
            problems.append(f"{rec['name']}: not found among the blocks' prunable layers")
            continue
        w = get_weight(module)
        numel = w.numel()
        zeros = int((w == 0).sum())
        target = int(numel * SPARSITY)
        checked += 1
        if numel != rec["numel"] or zeros != numel - rec["kept"] or zeros != target:
            had = before.get(rec["name"])
            problems.append(f"{rec['name']}: {zeros} zeros, numel - kept = {rec['numel'] - rec['kept']}, "
                            f"target {target}" + (f" ({had} zeros before pruning)" if had else ""))
    return checked, problems


def finite_logits(model, ids) -> list[str]:
    """[] when the pruned model's logits on the first calibration window are finite, else the problem."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids[:1], use_cache=False).logits
    return [] if bool(torch.isfinite(logits).all()) else ["the pruned model's logits are not finite"]


def sweep_one(arch: str, timeout: int) -> dict:
    """Build, prune and verify one architecture; a row of the table."""
    from arch_sweep import build_tiny, tokens

    import admm_kernels

    row = {"arch": arch, "status": "", "share": None, "note": "", "seconds": 0.0, "params": None}
    t0 = time.perf_counter()
    signal.alarm(timeout)
    try:
        try:
            model = build_tiny(arch)
        except ArchTimeout:
            row.update(status="build-failed", note=f"build failed: timed out after {timeout} s")
            return row
        except Exception as e:
            row.update(status="build-failed", note=f"build failed: {first_line(e)}")
            return row
        row["params"] = sum(p.numel() for p in model.parameters())
        ids = tokens(NSAMPLES, SEQLEN, seed=0)
        try:
            import torch
            with torch.no_grad():
                model(input_ids=ids[:1], use_cache=False)
        except ArchTimeout:
            raise
        except Exception as e:
            row.update(status="build-failed", note=f"its own forward fails: {first_line(e)}")
            return row
        before = zero_counts(model)
        try:
            report = admm_kernels.prune_model(model, ids, sparsity=SPARSITY, method="magnitude")
        except ArchTimeout:
            row.update(status="error", note=f"prune timed out after {timeout} s")
            return row
        except Exception as e:
            row.update(status="error", note=f"{first_line(e)} ({_where(e)})")
            return row
        cov = report.get("coverage", {})
        row["share"] = cov.get("share")
        checked, problems = verify(model, report, before)
        logits = finite_logits(model, ids)
        if problems or not checked or logits:
            row["status"] = "partial"
            row["note"] = (f"{len(problems)} of {checked} pruned layers off target: "
                           + "; ".join(problems[:3]) if problems else "no layer pruned" if not checked
                           else logits[0])
        else:
            row["status"] = "pruned-verified"
            row["note"] = f"{checked} layers"
        left = [g for g in cov.get("left_out", []) if g.get("reason") not in ("norm",)]
        if row["share"] is not None and row["share"] < 1.0 and left:
            reasons = {}
            for g in left:
                reasons[g["reason"]] = reasons.get(g["reason"], 0) + g["weights"]
            row["note"] += "; left out: " + ", ".join(f"{r} ({n:,} w)" for r, n in sorted(reasons.items()))
        return row
    except ArchTimeout:
        row.update(status="error", note=f"timed out after {timeout} s (verification)")
        return row
    finally:
        signal.alarm(0)
        row["seconds"] = time.perf_counter() - t0


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], seconds: float) -> str:
    import transformers

    lines = [f"# Architecture coverage (transformers {transformers.__version__})", "",
             f"magnitude, unstructured, sparsity {SPARSITY}, calibration {NSAMPLES} x {SEQLEN} random "
             "tokens; tiny models from tests/arch_sweep.py", "",
             "| architecture | status | coverage share | note |", "|---|---|---|---|"]
    for r in rows:
        share = f"{r['share']:.3f}" if r["share"] is not None else "-"
        lines.append(f"| {r['arch']} | {r['status']} | {share} | {_cell(r['note'])} |")
    lines += ["", summary(rows, seconds), ""]
    return "\n".join(lines)


def summary(rows: list[dict], seconds: float) -> str:
    total = len(rows)
    built = sum(r["status"] != "build-failed" for r in rows)
    verified = sum(r["status"] == "pruned-verified" for r in rows)
    partial = sum(r["status"] == "partial" for r in rows)
    errors = sum(r["status"] == "error" for r in rows)
    pct = 100.0 * verified / built if built else 0.0
    return (f"{built} of {total} architectures built, {verified} pruned with verified sparsity "
            f"({pct:.1f}% of those built, {100.0 * verified / max(total, 1):.1f}% of all); "
            f"{partial} partial, {errors} errors, {total - built} build failures; {seconds:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="markdown file to write (default: stdout)")
    parser.add_argument("--only", help="comma-separated model types to run (default: every architecture)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per architecture (default 60)")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    import torch
    from arch_sweep import causal_lm_architectures
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _on_alarm)
    archs = causal_lm_architectures()
    if args.only:
        wanted = [a.strip() for a in args.only.split(",") if a.strip()]
        unknown = [a for a in wanted if a not in archs]
        if unknown:
            print(f"not decoder-only causal-LM architectures here: {', '.join(unknown)}", file=sys.stderr)
        archs = [a for a in wanted if a in archs]
    start = time.perf_counter()
    rows = []
    for i, arch in enumerate(archs, 1):
        row = sweep_one(arch, args.timeout)
        rows.append(row)
        share = f" share {row['share']:.3f}" if row["share"] is not None else ""
        print(f"[{i}/{len(archs)}] {arch}: {row['status']}{share} ({row['seconds']:.2f} s) "
              f"{row['note'][:160]}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    text = markdown(rows, seconds)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(summary(rows, seconds), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
