"""Triton kernels for CUDA tensors (and, with TRITON_INTERPRET=1, CPU tensors for tests).

Each op: a @triton.jit kernel, a launch function with the reference's signature, in one module per op.
"""

from __future__ import annotations

import os

import torch

NAME = "triton"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpret()


def unavailable_reason() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton not importable ({e})"
    return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpret())
