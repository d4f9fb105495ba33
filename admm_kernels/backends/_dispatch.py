"""Mask and dual-step ops routed through the dispatcher (torch.ops.admm_kernels.*), shared by the ``cpu``
and ``cuda`` backends: _C registers a CPU and a CUDA kernel under the same op name, and the dispatcher
picks the one for the tensors' device."""

from __future__ import annotations

import torch

# The ops _C registers a CUDA kernel for (csrc/cuda/ops_cuda.cu); gram_update has none on purpose (the
# cuda backend runs the Triton triangle kernel or cuBLAS). tools/gpu_build_checks.py checks that a CUDA
# build registers exactly these.
CUDA_KERNEL_OPS = ("prune_mask", "nm_mask", "admm_dual_step")


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    return torch.ops.admm_kernels.prune_mask(scores, k, per_row)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.ops.admm_kernels.nm_mask(scores, n, m)


def admm_dual_step(W, U, M, B, rho: float, R) -> None:
    torch.ops.admm_kernels.admm_dual_step(W, U, M, B, rho, R)
