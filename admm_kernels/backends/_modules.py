"""The backend modules by name, imported on first use.

Separate from the package's __init__ so that selfcheck.py, which the selection in __init__ calls, can
look a backend up without importing its own importer.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("reference", "cpu", "triton", "cuda")


def get(name: str) -> ModuleType:
    """The backend module `name` (imported lazily). Raises ValueError for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return importlib.import_module(f"{__package__}.{name}")
