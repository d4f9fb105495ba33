"""Magnitude pruning: drop the entries of smallest |W|, per layer, per row or per N:M group (data-free)."""

from __future__ import annotations

import time

import torch

from .. import masks
from ..patterns import Pattern
from .registry import Method, MethodResult


def run(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float, mask: torch.Tensor | None,
        options: dict) -> MethodResult:
    """weight (out, in) any float dtype; G is unused (data-free). A given mask is applied."""
    t0 = time.perf_counter()
    used: dict[str, str] = {}
    if mask is None:
        mask = masks.select(weight.abs().float(), pattern, pattern.sparsity(sparsity), used=used)
    pruned = weight.masked_fill(~mask, 0)
    return MethodResult(pruned, mask, {"seconds": {"mask": time.perf_counter() - t0}, "backends": used})


METHOD = Method(
    name="magnitude", run=run, options=(),
    summary="magnitude pruning: drop the smallest |W| (data-free)",
    grouping="unstructured = one top-k of |W| over the layer, exactly int(out*in*s) pruned",
)
