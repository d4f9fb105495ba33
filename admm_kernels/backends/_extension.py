"""Loads the compiled extension admm_kernels._C once; the package works without it."""

from __future__ import annotations

import importlib

_state: dict[str, object] = {}


def load():
    """The _C module, or None when it is not built (the reason is kept for error messages)."""
    if "module" not in _state:
        from .. import _ops  # noqa: F401  (schemas must exist before the kernels register against them)

        try:
            _state["module"] = importlib.import_module("admm_kernels._C")
            _state["reason"] = ""
        except ImportError as e:  # not built, or built against another torch
            _state["module"] = None
            _state["reason"] = f"admm_kernels._C not importable ({e}); build it with `make build`"
    return _state["module"]


def reason() -> str:
    load()
    return str(_state["reason"])


def has_cuda_kernels() -> bool:
    """True when _C was built with the CUDA sources: every op of _dispatch.CUDA_KERNEL_OPS has a CUDA
    kernel (asked of torch's dispatcher, which needs no GPU)."""
    import torch

    from ._dispatch import CUDA_KERNEL_OPS

    if load() is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"admm_kernels::{op}", "CUDA")
               for op in CUDA_KERNEL_OPS)
