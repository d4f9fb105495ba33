"""The `admm-prune` command (also `python -m admm_kernels`): prune a causal LM (or the embedded SmolLM2
default), evaluate perplexity, benchmark methods, check this machine.

    admm-prune prune [MODEL] --sparsity 0.5 --pattern unstructured --method admm --out DIR   (prune.py)
    admm-prune eval [MODEL] --eval-text PATH                                                 (eval.py)
    admm-prune bench [MODEL] ...                                            (admm_kernels.cli.bench)
    admm-prune doctor                                                                        (doctor.py)

This package is argument parsing and printing only: the work is the library's (a prune run is
admm_kernels.run.PruneRun). Errors are printed as one line "admm-prune: error: ..." with exit status 2, a
failed write too (a full, read-only or forbidden disk: admm_kernels._io.WriteError). SIGINT and SIGTERM
end a command with one line and status 130 / 143 (admm_kernels._signals). Option groups shared by the
subcommands are defined once in common.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..output import PACKED_NAME, REPORT_NAME  # noqa: F401  (public: the output folder's file names)
from .common import (  # noqa: F401  (public: the embedded run's defaults)
    CALIB_TEXT_DEFAULT,
    EMBEDDED_EVAL_WINDOWS,
    EMBEDDED_NSAMPLES,
    EMBEDDED_SEQLEN,
    EVAL_TEXT_DEFAULT,
    FLAGS,
    CliError,
    flag_words,
    hf_progress_bars,
    set_threads,
)

# What to do after a prune run stopped part-way (its state is saved after every block).
RESUME_STEP = "rerun with --resume to continue from the last finished block"
RESUME_STEP_RANKS = ("rerun the same command (same number of ranks) with --resume to continue from the last "
                     "block every rank finished")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `admm-prune` with its prune and eval subcommands (bench and doctor parse their own
    arguments)."""
    import torch

    from .. import __version__
    from . import eval as eval_cli
    from . import prune as prune_cli
    from .bench import HELP as BENCH_HELP

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
    prune_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    # Parsed by admm_kernels.cli.bench (main() hands it every argument after "bench").
    sub.add_parser("bench", help=f"{BENCH_HELP} (admm-prune bench --help lists its options)", add_help=False,
                   allow_abbrev=False)
    sub.add_parser("doctor", add_help=False, allow_abbrev=False,
                   help="versions, devices, backends and every kernel's check against the reference on this "
                        "machine (admm_kernels/doctor.py)")
    return p


def _start_distributed(args):
    """The Comm of this process: under torchrun with several ranks, the rank's device (cuda ->
    cuda:LOCAL_RANK) and the process group; else LOCAL."""
    from ..models import distributed
    from ..run import check_device

    if distributed.launched_world_size() <= 1:
        return distributed.LOCAL
    try:
        device = distributed.rank_device(check_device(args.device, "--device"))
        args.device = str(device)
        comm = distributed.init_from_environment(device, args.dist_backend, args.dist_timeout)
    except ValueError as exc:  # an ArgumentError names the argument: say which flag gave it
        argument = getattr(exc, "argument", None)
        raise CliError((f"{FLAGS[argument]}: " if argument in FLAGS else "") + flag_words(str(exc))) from None
    return comm


def _run_command(args) -> int:
    from .eval import cmd_eval
    from .prune import cmd_prune

    comm = _start_distributed(args)
    with hf_progress_bars(not args.quiet and comm.is_main):
        return cmd_prune(args, comm) if args.command == "prune" else cmd_eval(args, comm)


def main(argv: list[str] | None = None) -> int:
    """Run `admm-prune ARGV` (default sys.argv[1:]); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv and argv[0] == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    from .._io import WriteError
    from .._signals import Terminated, sigterm_raises, stopped
    from ..models.distributed import DistributedError, launched_world_size, shutdown

    args = build_parser().parse_args(argv)
    args.argv = argv
    set_threads(args.threads)
    many = launched_world_size() > 1
    who = f" (rank {os.environ.get('RANK', '?')})" if many else ""
    # prune saves its state after every block, so it can continue; eval has nothing to continue from.
    next_step = "" if args.command != "prune" else RESUME_STEP_RANKS if many else RESUME_STEP
    try:
        with sigterm_raises():
            return _run_command(args)
    except (CliError, WriteError) as exc:  # WriteError: any write the commands did not word themselves
        print(f"admm-prune: error{who}: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        advice = f"; {RESUME_STEP_RANKS}" if exc.peer_failed and args.command == "prune" else ""
        print(f"admm-prune: error{who}: {flag_words(str(exc))}{advice}", file=sys.stderr)
        return 3
    except (Terminated, KeyboardInterrupt) as exc:
        if many and isinstance(exc, Terminated):
            next_step = "; ".join(filter(None, ["torchrun stops every rank when one fails: see the failing "
                                                "rank's message", next_step]))
        return stopped(f"admm-prune{who}", exc, next_step)
    finally:
        if many:
            shutdown()
