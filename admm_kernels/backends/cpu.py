"""C++ CPU kernels from admm_kernels._C, called through the dispatcher (torch.ops.admm_kernels.*)."""

from __future__ import annotations

import torch

from . import _extension

# Mask and dual-step ops: the dispatcher routes them to this backend's kernels (shared with the other one).
from ._dispatch import admm_dual_step, nm_mask, prune_mask  # noqa: F401

NAME = "cpu"


def is_available() -> bool:
    return _extension.load() is not None


def unavailable_reason() -> str:
    return _extension.reason()


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    torch.ops.admm_kernels.gram_update(G, x)


# --- sparse inference ops (admm_kernels/sparse); C++ kernels in csrc/cpu/sparse_*.cpp -----------------
# pack_nm has no C++ kernel (a one-off conversion): the dispatcher runs the reference for it.

def pack_nm(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.admm_kernels.pack_nm(weight, n, m)


def unpack_nm(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    return torch.ops.admm_kernels.unpack_nm(values, meta, n, m, cols)


def sparse_nm_mm(x, values, meta, n: int, m: int, cols: int) -> torch.Tensor:
    return torch.ops.admm_kernels.sparse_nm_mm(x, values, meta, n, m, cols)


def csr_mm(x, crow, col, values, cols: int) -> torch.Tensor:
    return torch.ops.admm_kernels.csr_mm(x, crow, col, values, cols)


def has_sparse_kernels() -> bool:
    """True when _C registers the C++ CPU sparse matmul kernels (not just the reference)."""
    if not is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("admm_kernels::sparse_nm_mm", "CPU") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("admm_kernels::csr_mm", "CPU")
