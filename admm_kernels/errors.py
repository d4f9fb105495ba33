"""Errors that name the Python argument they are about (a leaf: imports nothing of the package).

The library's messages name its own arguments ("tune_epochs must be >= 0 ..."); a caller with other
names for them (the command line's flags) reads `.argument` and maps it with one table, instead of
parsing the message. ArgumentError is a ValueError and ArgumentTypeError a TypeError, so code that
catches those keeps working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class InvalidArgument(Exception):
    """Base of the two errors below. argument: the name of the Python argument at fault, as the function
    that raised spells it ("sparsity", "owl_m", "layers", ...)."""

    def __init__(self, message: str, argument: str):
        super().__init__(message)
        self.argument = argument

    def __reduce__(self):  # pickling (a distributed run broadcasts rank 0's errors) keeps the argument
        return type(self), (str(self), self.argument)


class ArgumentError(InvalidArgument, ValueError):
    """A bad value of one argument (a ValueError)."""


class ArgumentTypeError(InvalidArgument, TypeError):
    """An argument of the wrong type (a TypeError)."""


@contextlib.contextmanager
def about(argument: str) -> Iterator[None]:
    """Inside the block, a ValueError / TypeError that does not name its argument yet becomes an
    ArgumentError / ArgumentTypeError naming `argument`, with the same message and traceback. For
    checks written elsewhere (shared helpers that only know how to word the message)."""
    try:
        yield
    except InvalidArgument:
        raise
    except TypeError as exc:
        raise ArgumentTypeError(str(exc), argument).with_traceback(exc.__traceback__) from None
    except ValueError as exc:
        raise ArgumentError(str(exc), argument).with_traceback(exc.__traceback__) from None
