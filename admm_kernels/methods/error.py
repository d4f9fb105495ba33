"""The relative reconstruction error tr((W-W')G(W-W')ᵀ) / tr(W G Wᵀ), evaluated once for every
method. weight, pruned: (out, in) of any float dtypes; G: (in, in) on the same device.
"""

from __future__ import annotations

import torch

from . import ranges

# Above this many multiply-adds (out * in^2) a CPU error evaluation uses fp32 GEMMs with fp64 sums (and
# prune_layer reuses tr(WGW^T) from the solve, so the error costs one GEMM): an fp64 GEMM runs at ~14
# GFLOP/s here against ~60-150 for fp32 (ENVIRONMENT.md; 2048^3 fp32 GEMM: 0.11 s). Measured at 1024x1024:
# the fp64 error took 0.26 s against 0.97 s for the 20 ADMM GEMMs. fp32 GEMMs leave ~1e-5 relative error.
_FP64_ERROR_MACS = 2**28
# Row chunk of the error evaluation: bounds the (chunk, in) temporary to ~256 MB.
_ERROR_CHUNK_BYTES = 256 * 2**20


def quad_trace(A: torch.Tensor, G: torch.Tensor, fp64: bool) -> float:
    """tr(A G A^T) for A (rows, in), G (in, in); fp64 GEMMs, or fp32 GEMMs with fp64 accumulation."""
    dt = torch.float64 if fp64 else torch.float32
    Gc = G.to(dt)
    chunk = max(1, _ERROR_CHUNK_BYTES // (A.shape[1] * 8))
    total = 0.0
    for start in range(0, A.shape[0], chunk):
        a = A[start:start + chunk].to(dt)
        total += float(torch.sum(torch.mm(a, Gc) * a, dtype=torch.float64))
    return total


def use_fp64(weight: torch.Tensor) -> bool:
    """fp64 GEMMs off the CPU and for small layers; fp32 GEMMs with fp64 sums for large CPU layers."""
    out, inn = weight.shape
    return weight.device.type != "cpu" or out * inn * inn <= _FP64_ERROR_MACS


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, G: torch.Tensor,
                   denominator: float | None = None) -> float:
    """tr(ΔGΔᵀ)/tr(WGWᵀ) as a float; `denominator` = tr(WGWᵀ) if known (used on the fp32 path only).

    Weights or Grams outside ranges.WEIGHT_RANGE / GRAM_DIAG_RANGE are first scaled by powers of two (the
    ratio does not change; the fp32 path would overflow or underflow otherwise); `denominator` is then
    ignored."""
    e_w = ranges.pow2_exponent(float(weight.abs().max()), *ranges.WEIGHT_RANGE)
    e_g = ranges.pow2_exponent(float(G.diagonal().abs().max()), *ranges.GRAM_DIAG_RANGE, even=True)
    if e_w or e_g:
        scale = 2.0 ** -e_w
        weight, pruned = weight.to(torch.float64) * scale, pruned.to(torch.float64) * scale
        G, denominator = G.to(torch.float64) * 2.0 ** -e_g, None
    fp64 = use_fp64(weight)
    dt = torch.float64 if fp64 else torch.float32
    num = quad_trace(weight.to(dt) - pruned.to(dt), G, fp64)
    den = denominator if (denominator is not None and not fp64) else quad_trace(weight, G, fp64)
    if den <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return max(num, 0.0) / den
