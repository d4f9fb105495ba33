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


# Launch functions, same signatures as backends/reference.py. The kernel modules import triton, so they
# are imported on first use: importing this package works without triton installed.

def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    """G += upper triangle of xᵀx (see triton/gram.py)."""
    from .gram import gram_update as impl

    impl(G, x)


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Exact top-k pruning mask by radix select (see triton/topk.py)."""
    from .topk import prune_mask as impl

    return impl(scores, k, per_row)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask, any n <= m (see triton/nm.py)."""
    from .nm import nm_mask as impl

    return impl(scores, n, m)


def admm_dual_step(
    W: torch.Tensor, U: torch.Tensor, M: torch.Tensor, B: torch.Tensor, rho: float, R: torch.Tensor
) -> None:
    """Fused ADMM element-wise step, in place on U and R (see triton/dual_step.py)."""
    from .dual_step import admm_dual_step as impl

    impl(W, U, M, B, rho, R)
