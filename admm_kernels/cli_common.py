"""What the `admm-prune` subcommands share: the embedded run's defaults, the argument groups defined once
(calibration, evaluation text and windows, device/dtype/threads/quiet), option values, threads and
transformers' progress bars.

Below admm_kernels.cli, admm_kernels.bench.cli and admm_kernels.doctor, so that none of the three
imports another for these (the layer order is checked by `make lint`; see docs/DESIGN.md).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

# The embedded default run (no MODEL): SmolLM2-135M, 30 blocks, on 2 CPU cores. Measured 2026-11-28 on
# the project's 2-core machine while other jobs ran (load ~5, --threads 1): 6 min 50 s wall, 4 min 17 s
# CPU: load 12 s, tokenise 10 s, perplexity 2 x ~50 s (32 windows of 256 tokens, ~1.5 s each), pruning
# 270 s = forward passes 102 s + Gram 32 s + ADMM solves 134 s (32 x 256 = 8k calibration tokens,
# ~9 s per block). Twice the calibration tokens would add ~130 s of forward passes and Gram.
EMBEDDED_NSAMPLES = 32
EMBEDDED_SEQLEN = 256
EMBEDDED_EVAL_WINDOWS = 32
EVAL_TEXT_DEFAULT = "shakespeare:evaluation"  # how reports name the default texts (the held-out plays)
CALIB_TEXT_DEFAULT = "shakespeare:calibration"
THREADS_HELP = ("CPU threads for torch (default: torch's choice). Results depend on it (sums run in another "
                "order: SmolLM2 pruned with 1 vs 2 threads gave perplexity 64.238 vs 64.301), so give the "
                "same --threads to reproduce a run. On a machine shared with other jobs use fewer: with 2 "
                "threads on 2 busy cores a SmolLM2 forward was measured 5x slower than with 1")


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


def _dtype_value(key: str, text: str):
    import torch

    from .models.loading import parse_dtype

    name = text[len("torch."):] if text.startswith("torch.") else text
    value = getattr(torch, name, None)
    if isinstance(value, torch.dtype):
        return value
    try:
        return parse_dtype(name)  # the short names: fp32, bf16, fp16, half, ...
    except ValueError:
        raise ValueError(f"option {key}={text!r}: not a torch dtype (e.g. float32, float64, "
                         "torch.bfloat16)") from None


def parse_option_value(key: str, text: str):
    """The Python value of a method option given as text (`-o KEY=VALUE`, bench's NAME:KEY=VALUE):
    a torch.dtype for keys ending in "dtype" and for values "torch.NAME" (e.g. compute_dtype=float64),
    else int, then float, then true/false/none, else the text. ValueError naming the option for a bad
    dtype."""
    value = text.strip()
    if key.endswith("dtype") or value.startswith("torch."):
        return _dtype_value(key, value)
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


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
