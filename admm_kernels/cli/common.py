"""What the `admm-prune` subcommands share: the argument groups defined once (calibration, evaluation text
and windows, protocol, tasks, device/dtype/threads/quiet, streaming, torchrun), the table that words the
library's arguments as flags, the one-line CliError, threads, transformers' progress bars and deprecated
option names.

A leaf of admm_kernels.cli: prune.py, eval.py and doctor.py import it, it imports none of them. The
embedded run's defaults are defined once in admm_kernels.defaults (the library run needs them too).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys

from ..defaults import (  # noqa: F401  (re-exported: bench's and the help texts' one source)
    CALIB_TEXT_DEFAULT,
    EMBEDDED_EVAL_WINDOWS,
    EMBEDDED_NSAMPLES,
    EMBEDDED_SEQLEN,
    EVAL_TEXT_DEFAULT,
)

THREADS_HELP = ("CPU threads for torch (default: torch's choice). Results depend on it (sums run in another "
                "order: SmolLM2 pruned with 1 vs 2 threads gave perplexity 64.238 vs 64.301), so give the "
                "same --threads to reproduce a run. On a machine shared with other jobs use fewer: with 2 "
                "threads on 2 busy cores a SmolLM2 forward was measured 5x slower than with 1")

# How the command line words the library's arguments (admm_kernels.run's messages name them through this
# table: Frontend.names). One entry per argument a run or an eval check can name.
FLAGS = {
    "model": "MODEL", "out": "--out", "overwrite": "--overwrite", "resume": "--resume",
    "save_format": "--save-format", "calib": "--calib", "eval_text": "--eval-text", "seqlen": "--seqlen",
    "protocol": "--protocol", "corpus": "--corpus", "offload_dir": "--offload-dir", "stream": "--stream",
    "device": "--device", "pattern": "--pattern", "sparsity_profile": "--sparsity-profile",
    "tasks": "--tasks", "tasks_path": "--tasks-path", "num_fewshot": "--num-fewshot",
    "evaluate_tasks": "`admm-prune eval --tasks`", "owl_m": "--owl-m", "owl_lambda": "--owl-lambda",
    "tune_epochs": "--tune-epochs", "tune_lr": "--tune-lr", "tune_batch": "--tune-batch",
    "tune_patience": "--tune-patience", "tune_holdout": "--tune-holdout",
    "moe_calibration": "--moe-calibration", "layers": "--layers", "timeout_s": "--dist-timeout",
}


def flag_words(message: str) -> str:
    """A library message with the Python arguments it names worded as FLAGS says (identifiers with an
    underscore only: "model" or "out" are words in prose too)."""
    import re

    for argument, flag in FLAGS.items():
        if "_" in argument:
            message = re.sub(rf"\b{argument}\b", flag, message)
    return message


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def logger(quiet: bool):
    """print to stderr, or nothing under --quiet."""
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def help_width() -> int:
    """The width argparse wraps its help to (the terminal's, less 2)."""
    return max(60, shutil.get_terminal_size().columns - 2)


def seconds(flag: str):
    """An argparse type: a positive finite number of seconds, or an error naming `flag`."""
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


def positive(flag: str):
    """An argparse type: a positive int, or an error naming `flag`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}")
        return v
    return parse


def deprecated_alias(new_flag: str):
    """An argparse action for an old option name: stores like `new_flag` and warns on stderr."""
    class DeprecatedAlias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"admm-prune: warning: {option_string} is deprecated, use {new_flag}", file=sys.stderr)
            setattr(namespace, self.dest, values)
    return DeprecatedAlias


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """--nsamples, --seqlen and --calib, shared by `admm-prune prune` and `admm-prune bench`."""
    p.add_argument("--nsamples", type=positive("--nsamples"), default=None,
                   help=f"calibration windows (default 128; {EMBEDDED_NSAMPLES} for the embedded model)")
    p.add_argument("--seqlen", type=positive("--seqlen"), default=None,
                   help="tokens per calibration / evaluation window (default 2048 clipped to the model's "
                        f"maximum; {EMBEDDED_SEQLEN} for the embedded model)")
    p.add_argument("--calib", metavar="PATH", default=None,
                   help="calibration text: file, folder, .jsonl or saved dataset (default: Shakespeare "
                        "calibration plays)")


def add_eval_text_argument(p: argparse.ArgumentParser, help_text: str, old: str | None = None) -> None:
    """--eval-text PATH (dest eval_path), the evaluation text's one name in prune, eval and bench; `old`:
    the command's earlier spelling, still accepted with a deprecation warning."""
    p.add_argument("--eval-text", metavar="PATH", default=None, dest="eval_path", help=help_text)
    if old is not None:
        p.add_argument(old, metavar="PATH", dest="eval_path", action=deprecated_alias("--eval-text"),
                       help=argparse.SUPPRESS)


def add_eval_windows_argument(p: argparse.ArgumentParser, default_help: str = "") -> None:
    """--eval-windows, shared by prune, eval and bench."""
    p.add_argument("--eval-windows", type=positive("--eval-windows"), default=None, metavar="N",
                   help=f"evaluate perplexity on at most N windows (default: all; {EMBEDDED_EVAL_WINDOWS} "
                        f"for the embedded model{default_help})")


def add_run_arguments(p: argparse.ArgumentParser, quiet_help: str) -> None:
    """--device, --dtype, --threads and --quiet, shared by prune, eval and bench."""
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype to load the model in (default float32 on the CPU, auto elsewhere)")
    p.add_argument("--threads", type=positive("--threads"), default=None, help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true",
                   help=f"{quiet_help} (transformers' loading and saving bars included; warnings and the "
                        "result are still printed)")


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads) when given (--threads)."""
    if threads:
        import torch
        torch.set_num_threads(threads)


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """transformers' own progress bars ("Loading weights", "Writing model shards", the GGUF conversion's),
    off while disabled (--quiet) and restored after."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def add_protocol_arguments(p: argparse.ArgumentParser,
                           windows: str = "calibration windows and perplexity windows",
                           report_note: str = "; for eval, what MODEL's prune report records") -> None:
    """--protocol, --corpus and --text-field, shared by `admm-prune prune`, `eval` and `bench` (what each
    protocol computes: admm_kernels/protocols.py). windows: which windows the text becomes (bench has
    held-out ones too); report_note: where the default comes from besides the flag's own default."""
    p.add_argument("--protocol", choices=("default", "sparsegpt"), default=None,
                   help=f"how text becomes {windows}. default: text joined "
                        "by blank lines, no special tokens, non-overlapping windows. sparsegpt: the "
                        "SparseGPT/Wanda/ADMM papers' convention (WikiText-2 test records joined by '\\n\\n' "
                        "or the C4 validation convention, special tokens, every window; C4-style random "
                        "calibration windows from random documents); see README 'Evaluation protocols' "
                        f"(default: default{report_note})")
    p.add_argument("--corpus", choices=("wikitext2", "c4"), default=None,
                   help="with --protocol sparsegpt: the evaluation convention of this corpus (wikitext2: "
                        "all windows of the joined test split; c4: the first 1100 validation documents "
                        "joined by spaces, first 256 x seqlen tokens) (default wikitext2)")
    p.add_argument("--text-field", default=None, metavar="FIELD",
                   help="field / column holding the text in JSON-lines, JSON and datasets sources "
                        f"(default 'text'{report_note})")


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
    p.add_argument("--tasks-limit", type=positive("--tasks-limit"), default=None, metavar="N",
                   help="evaluate only the first N documents of each task (quick checks; not comparable "
                        "with published numbers)")


def add_stream_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--stream, for prune and eval."""
    p.add_argument("--stream", action="store_true", help=f"models larger than memory: {what}")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """--dist-backend and --dist-timeout, for prune and eval run under torchrun."""
    from ..models.distributed import BACKENDS, DEFAULT_TIMEOUT_S

    p.add_argument("--dist-backend", default="auto", choices=BACKENDS,
                   help="under torchrun: the torch.distributed backend (auto: gloo for --device cpu, NCCL "
                        "between GPUs with gloo for host tensors for --device cuda; gloo forces gloo)")
    p.add_argument("--dist-timeout", type=seconds("--dist-timeout"), default=DEFAULT_TIMEOUT_S,
                   metavar="SECONDS",
                   help="under torchrun: a rank that dies or stops answering for this long makes every other "
                        f"rank stop with an error (default {DEFAULT_TIMEOUT_S:g}; it must exceed the longest "
                        "wait of a rank for another, e.g. rank 0 saving a block's state)")


def task_settings(args):
    """The run's TaskSettings of --tasks, --tasks-path, --num-fewshot, --tasks-limit, or None without
    --tasks (--tasks-path alone is an error)."""
    from ..run import TaskSettings

    if args.tasks is None:
        if args.tasks_path is not None:
            raise CliError("--tasks-path needs --tasks (the task names to run)")
        return None
    return TaskSettings(args.tasks, args.tasks_path, args.num_fewshot, args.tasks_limit)


@contextlib.contextmanager
def flag_wording():
    """The library's refusals (admm_kernels.run.RunError, worded with FLAGS) as CliError."""
    from ..run import RunError

    try:
        yield
    except RunError as exc:
        raise CliError(str(exc)) from None
