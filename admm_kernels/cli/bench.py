"""The `admm-prune bench` subcommand: `register(subparsers)` adds it to admm-prune's parser, `run(args)`
executes it; `main(argv)` runs it standalone (python -m admm_kernels.cli.bench ...).

    admm-prune bench                                   # embedded SmolLM2-135M, default methods, 50 %
    admm-prune bench MODEL --methods wanda sparsegpt admm-grad admm:iters=5 --sparsities 0.5 0.7 \
        --patterns unstructured 2:4 --layers 'mlp.*' --max-layers 12 --out out/bench --resume

Everything cheap is validated before the model is loaded (errors: one line, exit status 2).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import CALIB_TEXT_DEFAULT, EVAL_TEXT_DEFAULT

if TYPE_CHECKING:
    import torch

PROG = "admm-prune bench"
HELP = "compare pruning methods on a model's real layers"
DESCRIPTION = (
    "Compare pruning methods (magnitude, Wanda, SparseGPT, ALPS, ADMM variants and presets) x sparsities x "
    "patterns on a "
    "causal LM's real layers: per-layer Grams from real calibration text (one dense pass, cached on disk by "
    "a content hash), relative reconstruction error, seconds, achieved sparsity, ADMM's gap to the exact "
    "least-squares optimum on its own mask, roofline fractions; optionally end-to-end perplexity. Prints a "
    "summary table and writes layers.csv, summary.csv, results.json, errors.png, times.png and pareto.png "
    "(error vs time, with each pattern's Pareto front) to --out. "
    "Give MODEL first: the list options (--methods, --sparsities, ...) take every word that follows them. "
    "Regenerate benchmarks/RESULTS.md from output folders with: python -m admm_kernels.bench.results_md "
    "OUTDIR...")


class BenchError(Exception):
    """A user error: printed as one line, exit status 2."""


def _split(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.methods import DEFAULT_METHODS, aliases
    from . import common

    p.add_argument("model", nargs="?", default=None,
                   help="local transformers model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
                   help=f"methods: {', '.join(aliases())}, each optionally with options as "
                        f"NAME:key=value,... (e.g. admm:iters=5, admm:preset=NAME); "
                        f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--sparsities", nargs="+", default=["0.5"], metavar="S",
                   help="sparsities in [0, 1) for unstructured / per-row patterns (N:M fixes its own); "
                        "space- or comma-separated (default 0.5)")
    p.add_argument("--patterns", nargs="+", default=["unstructured"], metavar="P",
                   help="unstructured, per-row, N:M such as 2:4 (default unstructured)")
    p.add_argument("--layers", nargs="+", default=None, metavar="GLOB",
                   help="only linears whose name inside a block (e.g. 'mlp.*', 'self_attn.q_proj') or full "
                        "name matches (default: every linear in the decoder blocks)")
    p.add_argument("--max-layers", type=common.positive("--max-layers"), default=None, metavar="N",
                   help="only the first N selected layers, in model order")
    common.add_calibration_arguments(p)
    common.add_protocol_arguments(p, windows="calibration, held-out and perplexity windows",
                                  report_note="")
    p.add_argument("--perplexity", action="store_true",
                   help="also prune the selected layers end to end with each method (prune_model) and "
                        "evaluate perplexity")
    common.add_eval_text_argument(
        p, "evaluation text for --perplexity (default: held-out Shakespeare plays)", old="--eval")
    common.add_eval_windows_argument(p)
    p.add_argument("--heldout-windows", type=int, default=None, metavar="N",
                   help="windows of held-out text whose Grams give every row's out-of-sample error "
                        "(heldout_error, beside the in-sample error on the calibration Gram; the Pareto "
                        "front uses it); default as many as calibration windows, 0 = off")
    p.add_argument("--heldout-text", metavar="PATH", default=None,
                   help="the held-out text (default the evaluation text, --eval-text or the held-out "
                        "Shakespeare plays); it may not be the calibration text")
    p.add_argument("--gap", choices=("admm", "all", "none"), default="admm",
                   help="rows that get the gap to the exact least-squares optimum on their own mask (fp64 "
                        "row solves): ADMM variants (default), all methods, or none")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default out/bench-<model>)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished rows in --out (rows.jsonl) and compute only the missing ones")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw and of every row")
    common.add_run_arguments(p, "no progress bars and no log lines")
    p.add_argument("--gram-dtype", choices=("float32", "float64"), default="float32",
                   help="Gram accumulation dtype (default float32)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="Gram cache folder (default $ADMM_KERNELS_CACHE/bench, else "
                        "~/.cache/admm_kernels/bench)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to admm-prune's subparsers; returns its parser."""
    p = subparsers.add_parser("bench", help=HELP, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a shortened or misspelt flag must not be read as another one silently.
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def _settings(args):
    """BenchSettings from parsed args; BenchError on a bad value (before any heavy work)."""
    import torch

    from ..bench.layers import check_methods
    from ..bench.methods import parse_methods
    from ..bench.runner import BenchSettings
    from ..patterns import parse_pattern, pattern_group

    try:
        methods = parse_methods(args.methods)
        check_methods(methods)  # unknown options fail now, not after loading the model
        patterns = _split(args.patterns)
        for pat in patterns:  # syntax only: M must divide in_features, checked per layer later
            parse_pattern(pat, pattern_group(pat), name="--patterns")
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    sparsities = []
    for text in _split(args.sparsities):
        try:
            s = float(text)
        except ValueError:
            raise BenchError(f"--sparsities must be numbers in [0, 1), got {text!r}") from None
        if not 0.0 <= s < 1.0:
            raise BenchError(f"--sparsities must be numbers in [0, 1), got {text!r}")
        sparsities.append(s)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise BenchError(f"--device {args.device!r} is not a valid device (e.g. cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device!r}: CUDA is not available on this machine")
    return BenchSettings(methods=methods, sparsities=sparsities, patterns=patterns, layers=args.layers,
                         max_layers=args.max_layers, seed=args.seed, device=str(device), gap=args.gap,
                         perplexity=args.perplexity, eval_windows=args.eval_windows,
                         gram_dtype=getattr(torch, args.gram_dtype), cache_dir=args.cache_dir,
                         resume=args.resume, progress=not args.quiet)


def _check_swallowed_model(args) -> None:
    """The list options take every word that follows them, MODEL included when it comes after one; a
    model folder among their values would otherwise run the embedded model instead, or fail later on a
    confusing 'unknown method'."""
    if args.model is not None:
        return
    for flag in ("--methods", "--sparsities", "--patterns", "--layers"):
        for value in getattr(args, flag[2:]) or []:
            if (Path(value).expanduser() / "config.json").is_file():
                raise BenchError(f"{flag} took the model folder {value!r} as one of its values: give MODEL "
                                 f"before the list options, or end the list with -- before MODEL")


def _same_text(a: str | None, b: str | None) -> bool:
    """Whether two text arguments name the same file or folder (None: the default text of its role, the
    calibration and evaluation plays, which differ)."""
    if a is None or b is None:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise BenchError(f"--out {str(out)!r} is not empty; pass --resume to continue its run or "
                         "--overwrite to start afresh")
    from .._io import nearest_existing, unwritable_reason

    # before the model is loaded and the Grams computed, not after
    reason = unwritable_reason(f"--out {str(out)!r}", nearest_existing(out))
    if reason is not None:
        raise BenchError(reason)


def run(args: argparse.Namespace) -> int:
    """Execute `admm-prune bench` with parsed args; returns the exit status."""
    from .._signals import Terminated, sigterm_raises, stopped
    from .common import hf_progress_bars, set_threads

    set_threads(args.threads)
    try:
        with sigterm_raises(), hf_progress_bars(not args.quiet):
            return _run(args)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:  # the journal holds every finished row
        return stopped(PROG, exc, "rerun with --resume to keep the finished rows")


@dataclass(frozen=True)
class _Texts:
    """What bench reads, resolved from the arguments: the paths (None: the default Shakespeare plays of
    that role) and how they become tokens (admm_kernels.protocols)."""

    calib: str | None
    eval_path: str | None
    heldout: str | None
    protocol: str
    corpus: str
    field: str

    def meta(self, perplexity: bool, heldout: bool) -> dict:
        """The results' record of the texts (meta), as prune's report names them."""
        return {"calibration_source": self.calib or CALIB_TEXT_DEFAULT,
                "heldout_source": (self.heldout or EVAL_TEXT_DEFAULT) if heldout else None,
                "eval_source": (self.eval_path or EVAL_TEXT_DEFAULT) if perplexity else None,
                "protocol": self.protocol, "corpus": self.corpus if self.protocol == "sparsegpt" else None,
                "text_field": self.field}


def _check_texts(args: argparse.Namespace) -> _Texts:
    """The text arguments checked (paths exist and read as text, the held-out text is not the
    calibration text, --corpus only with --protocol sparsegpt), before the model is loaded."""
    from ..data import check_text_source

    if args.corpus is not None and args.protocol != "sparsegpt":
        raise BenchError(f"--corpus {args.corpus} applies to --protocol sparsegpt only")
    # the names reports give the default texts choose them, as in prune and eval
    calib = None if args.calib == CALIB_TEXT_DEFAULT else args.calib
    eval_path = None if args.eval_path == EVAL_TEXT_DEFAULT else args.eval_path
    if args.heldout_windows is not None and args.heldout_windows < 0:
        raise BenchError(f"--heldout-windows must be >= 0, got {args.heldout_windows}")
    heldout = args.heldout_text if args.heldout_text is not None else eval_path
    if _same_text(heldout, calib):
        raise BenchError("the held-out text is the calibration text: an out-of-sample error needs text "
                         "the calibration never saw (give another --heldout-text, or --heldout-windows 0)")
    for path, flag in ((calib, "--calib"), (eval_path, "--eval-text"), (args.heldout_text, "--heldout-text")):
        if path is not None and not Path(path).expanduser().exists():
            raise BenchError(f"{flag} path {path!r} does not exist")
        try:  # before the model is loaded
            if path is not None:
                check_text_source(path)
        except ValueError as exc:
            raise BenchError(f"{flag}: {exc}") from None
    return _Texts(calib, eval_path, heldout, args.protocol or "default", args.corpus or "wikitext2",
                  args.text_field or "text")


@dataclass(frozen=True)
class _Tokens:
    """The token ids of a run: calibration windows (N, L), evaluation stream (n,) or None, held-out
    windows (M, L) or None."""

    calib: torch.Tensor
    eval_ids: torch.Tensor | None
    heldout: torch.Tensor | None


def _tokenise(tok, texts: _Texts, windows: tuple[int, int, int], seqlen: int, perplexity: bool) -> _Tokens:
    """Every text through the protocols functions prune uses. windows: (calibration windows, held-out
    windows (0: none), seed)."""
    from .. import data, protocols

    nsamples, n_held, seed = windows
    read = {"protocol": texts.protocol, "field": texts.field}
    calib = protocols.calibration_windows(tok, texts.calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                          **read)

    def evaluation(path):
        return protocols.evaluation_tokens(tok, path, corpus=texts.corpus, seqlen=seqlen, **read)

    eval_ids = evaluation(texts.eval_path) if perplexity else None
    heldout = None
    if n_held:
        what = f"held-out text {texts.heldout!r}" if texts.heldout else "the held-out Shakespeare plays"
        heldout = data.sample_windows(evaluation(texts.heldout), n_held, seqlen, seed, source=what)
    if eval_ids is not None and eval_ids.numel() < seqlen:
        raise BenchError(f"evaluation text is too short: found {eval_ids.numel()} tokens, need at least "
                         f"--seqlen = {seqlen} tokens for one window")
    return _Tokens(calib, eval_ids, heldout)


def _output_folder(args: argparse.Namespace, name: str) -> Path:
    """--out (default out/bench-<model>), checked; emptied first with --overwrite (without --resume)."""
    out = Path(args.out) if args.out else Path("out") / f"bench-{name}"
    _check_out(out, args.resume, args.overwrite)
    if args.overwrite and not args.resume and out.is_dir():
        shutil.rmtree(out)
    return out


def _run(args: argparse.Namespace) -> int:
    from .. import data
    from ..bench.runner import run_bench
    from ..models import max_positions
    from ..models.loading import check_model_path, load_model, parse_dtype
    from .common import EMBEDDED_EVAL_WINDOWS, EMBEDDED_NSAMPLES, EMBEDDED_SEQLEN

    _check_swallowed_model(args)
    settings = _settings(args)
    embedded = args.model is None
    if not embedded:
        try:
            check_model_path(args.model, name="MODEL")
        except (FileNotFoundError, ValueError) as exc:
            raise BenchError(str(exc)) from None
    texts = _check_texts(args)
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    out = _output_folder(args, name)
    # the sparsegpt protocol evaluates every window, as the papers do (and as prune does)
    if embedded and settings.eval_windows is None and texts.protocol == "default":
        settings.eval_windows = EMBEDDED_EVAL_WINDOWS
    nsamples = args.nsamples or (EMBEDDED_NSAMPLES if embedded else data.DEFAULT_NSAMPLES)
    n_held = nsamples if args.heldout_windows is None else args.heldout_windows
    dtype = args.dtype or ("float32" if settings.device == "cpu" else "auto")
    try:
        model, tok, path = load_model(args.model, dtype=dtype if dtype == "auto" else parse_dtype(dtype))
        seqlen = data.resolve_seqlen(args.seqlen or (EMBEDDED_SEQLEN if embedded else None),
                                     max_positions(model), name="--seqlen")
        if tok is None:
            raise BenchError(f"model folder {str(path)!r} has no tokenizer, needed to tokenize text")
        tokens = _tokenise(tok, texts, (nsamples, n_held, args.seed), seqlen, settings.perplexity)
        meta = {"command": "admm-prune bench " + " ".join(getattr(args, "argv", []) or sys.argv[2:]),
                "model_path": str(path), **texts.meta(settings.perplexity, bool(n_held))}
        result = run_bench(model, tokens.calib, out, settings, eval_ids=tokens.eval_ids, seqlen=seqlen,
                           model_name=name, meta=meta, heldout_ids=tokens.heldout)
    except (ValueError, TypeError, OSError) as exc:  # OSError: unwritable --out or cache folder
        raise BenchError(str(exc)) from None
    _print_result(result, out)
    return 0


def _print_result(result: dict, out: Path) -> None:
    """The summary tables and the closing lines on stdout."""
    from ..bench import report

    print(report.text_table(result["summary"], report.SUMMARY_COLUMNS))
    if any(".experts." in r["projection"] for r in result["by_projection"]):  # MoE: experts per projection
        print()
        print(report.text_table(result["by_projection"], report.PROJECTION_COLUMNS))
    if result["perplexity"]:
        print()
        print(report.text_table(result["perplexity"], report.PPL_COLUMNS))
    peaks, g, r = result["machine"], result["grams"], result["run"]
    gram_roof = (f", Gram kernel {g['gflops']:.1f} GFLOP/s = {g['frac_matmul']:.2f} of matmul"
                 if "gflops" in g else "")
    print(f"\nmachine: fp32 matmul {peaks['matmul_gflops']:.1f} GFLOP/s, copy {peaks['copy_gbps']:.1f} GB/s"
          f"{gram_roof}; Grams: {g['cache']} ({g['layers']} layers, {g['tokens']} tokens)")
    print(f"{r['rows']} rows ({r['computed']} computed, {r['reused']} reused) in {r['seconds']:.1f} s; "
          f"wrote {out}/results.json, layers.csv, summary.csv, projections.csv, errors.png, times.png, "
          "pareto.png")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
