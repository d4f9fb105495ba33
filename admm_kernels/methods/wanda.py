"""Wanda (Sun et al. 2023): score |W_ij| * ||x_j||_2, pruned per output row, no weight update.

||x_j|| = sqrt(G_jj). The paper compares scores within each output row (its LLM results are better that
way than with one layer threshold), so pattern "unstructured" does too, with the layer's total exact:
every row prunes int(out*in*s) // out, and the remainder goes to the rows whose next-smallest score is
lowest (masks.select_rows_balanced); per_row=False uses one layer-wide threshold instead. "per-row" prunes
int(in*s) in every row (the paper's own count); N:M keeps the N best of every M inputs.
"""

from __future__ import annotations

import time

import torch

from .. import masks
from ..patterns import Pattern
from .registry import Method, MethodResult, Option, bool_option

OPTIONS = (Option("per_row", True, bool_option("per_row"), "compare scores within each output row"),)


def scores(weight: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Wanda scores (out, in) float32: |W| * sqrt(diag G); dead inputs (diag G == 0) get masks.DEAD_SCORE."""
    diag = G.diagonal().float()
    s = weight.abs().float() * torch.sqrt(diag.clamp_min(0))
    return masks.with_dead(s, diag <= 0)


def run(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float, mask: torch.Tensor | None,
        options: dict) -> MethodResult:
    """Options: per_row (bool, default True): the grouping of "unstructured". A given mask is applied."""
    per_row = options["per_row"]
    t0 = time.perf_counter()
    used: dict[str, str] = {}
    if mask is None:
        sc = scores(weight, G)
        if pattern.kind == "unstructured" and per_row:
            mask = masks.select_rows_balanced(sc, int(sc.numel() * sparsity), used=used)
        else:
            mask = masks.select(sc, pattern, pattern.sparsity(sparsity), used=used)
    pruned = weight.masked_fill(~mask, 0)
    return MethodResult(pruned, mask, {"seconds": {"mask": time.perf_counter() - t0}, "backends": used})


METHOD = Method(
    name="wanda", run=run, options=OPTIONS,
    summary="Wanda (Sun et al. 2023): score |W|*||x||, no weight update",
    grouping="unstructured = per output row as in the paper: int(out*in*s) // out per row, the remainder on "
             "the rows with the lowest next score (layer total exact; per_row=False: one layer threshold)",
)
