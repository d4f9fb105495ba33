"""How every command ends on SIGINT (Ctrl-C) and SIGTERM (what `timeout`, Slurm, `docker stop` and
Kubernetes send): one message and the shell's conventional status, 128 + the signal's number (130 and
143).

SIGTERM's default action kills the process on the spot: no message, no `finally` blocks, so no lock
released in order and no temporary folder removed. While a command runs, SIGTERM therefore raises
Terminated in the main thread, which unwinds like the KeyboardInterrupt that SIGINT raises; the command
catches both at its top and prints what happened and what to do next (only prune and bench can be
resumed)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """SIGTERM, raised where the main thread was (a BaseException, like KeyboardInterrupt, so that
    `except Exception` in library code does not swallow it)."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (main thread only: elsewhere signals cannot be
    handled); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(exc: BaseException) -> int:
    """128 + the signal's number: 143 for Terminated (SIGTERM), 130 for KeyboardInterrupt (SIGINT)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def stopped(prog: str, exc: BaseException, next_step: str = "") -> int:
    """Print the one line of a command stopped by a signal (`next_step`: what to do about it, if
    anything) and return its exit status."""
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (SIGINT)"
    print(f"{prog}: {what}" + (f"; {next_step}" if next_step else ""), file=sys.stderr, flush=True)
    return exit_status(exc)
