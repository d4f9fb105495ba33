"""Wanda (Sun et al. 2023): score |W_ij| * ||x_j||_2, pruned per output row, no weight update.

||x_j|| = sqrt(G_jj). The paper compares scores within each output row; so does pattern "unstructured"
here unless per_row=False (then one layer-wide threshold). N:M keeps the N best of every M inputs.
"""

from __future__ import annotations

import time

import torch

from .. import masks
from .._checks import Pattern
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
        group = Pattern("per-row") if (pattern.kind == "unstructured" and per_row) else pattern
        mask = masks.select(scores(weight, G), group, pattern.sparsity(sparsity), used=used)
    pruned = weight.masked_fill(~mask, 0)
    return MethodResult(pruned, mask, {"seconds": {"mask": time.perf_counter() - t0}, "backends": used})


METHOD = Method(
    name="wanda", run=run, options=OPTIONS,
    summary="Wanda (Sun et al. 2023): score |W|*||x||, no weight update",
    grouping="unstructured = per output row as in the paper, int(in*s) per row (per_row=False: one "
             "layer threshold)",
)
