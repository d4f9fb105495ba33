"""CUDA C++ kernels from admm_kernels._C (built only on a machine with a CUDA torch and nvcc)."""

from __future__ import annotations

import torch

from . import _extension

NAME = "cuda"


def is_available() -> bool:
    return torch.cuda.is_available() and _extension.has_cuda_kernels()


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _extension.load() is None:
        return _extension.reason()
    return "admm_kernels._C was built without CUDA sources"


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    return torch.ops.admm_kernels.prune_mask(scores, k, per_row)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.ops.admm_kernels.nm_mask(scores, n, m)


def admm_dual_step(W, U, M, B, rho: float, R) -> None:
    torch.ops.admm_kernels.admm_dual_step(W, U, M, B, rho, R)
