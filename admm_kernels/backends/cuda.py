"""CUDA C++ kernels from admm_kernels._C (built only on a machine with a CUDA torch and nvcc)."""

from __future__ import annotations

import torch

from . import _extension

# Mask and dual-step ops: the dispatcher routes them to this backend's kernels (shared with the other one).
from ._dispatch import admm_dual_step, nm_mask, prune_mask  # noqa: F401

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


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    """G += upper triangle of xᵀx. There is no CUDA C++ Gram kernel (see csrc/cuda/ops_cuda.cu): the
    Triton kernel computes only the upper-triangle tiles (half the FLOPs of a GEMM) with bf16/fp16
    tensor-core dots and fp32 accumulation; without triton (or for an fp64 G) the product goes to cuBLAS,
    with bf16/fp16 inputs multiplied straight to an fp32 result (torch.mm out_dtype, torch >= 2.8) so
    nothing is rounded to 16 bits."""
    if G.dtype == torch.float32 and x.dtype != torch.float64 and _triton_usable():
        from .triton.gram import gram_update as triton_gram

        triton_gram(G, x)
        return
    G.add_(torch.triu(_product(x, G.dtype)))


def _product(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """xᵀx as `dtype` (fp32 or fp64) with 16-bit inputs multiplied to fp32 directly where torch can."""
    if x.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=...)
            pass
    xf = x.to(dtype)
    return xf.T @ xf
