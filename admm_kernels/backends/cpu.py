"""C++ CPU kernels from admm_kernels._C, called through the dispatcher (torch.ops.admm_kernels.*)."""

from __future__ import annotations

import torch

from . import _extension

NAME = "cpu"


def is_available() -> bool:
    return _extension.load() is not None


def unavailable_reason() -> str:
    return _extension.reason()


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    torch.ops.admm_kernels.gram_update(G, x)


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    return torch.ops.admm_kernels.prune_mask(scores, k, per_row)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.ops.admm_kernels.nm_mask(scores, n, m)


def admm_dual_step(W, U, M, B, rho: float, R) -> None:
    torch.ops.admm_kernels.admm_dual_step(W, U, M, B, rho, R)
