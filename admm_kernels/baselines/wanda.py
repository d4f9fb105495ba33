"""Wanda (Sun et al. 2023): score |W_ij| * ||x_j||_2, pruned per output row, no weight update.

||x_j|| = sqrt(G_jj). The paper compares scores within each output row; so does pattern "unstructured"
here unless per_row=False (then one layer-wide threshold). N:M keeps the N best of every M inputs.
"""

from __future__ import annotations

import time

import torch

from .. import masks
from .._checks import Pattern, check_options


def scores(weight: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Wanda scores (out, in) float32: |W| * sqrt(diag G); dead inputs (diag G == 0) get masks.DEAD_SCORE."""
    diag = G.diagonal().float()
    s = weight.abs().float() * torch.sqrt(diag.clamp_min(0))
    return masks.with_dead(s, diag <= 0)


def prune(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float,
          mask: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Options: per_row (bool, default True): the grouping of "unstructured". A given mask is applied."""
    check_options(options, ("per_row",), "wanda")
    per_row = options.get("per_row", True)
    if not isinstance(per_row, bool):
        raise TypeError(f"per_row must be a bool, got {per_row!r}")
    t0 = time.perf_counter()
    used: dict[str, str] = {}
    if mask is None:
        group = Pattern("per-row") if (pattern.kind == "unstructured" and per_row) else pattern
        mask = masks.select(scores(weight, G), group, pattern.sparsity(sparsity), used=used)
    pruned = weight.masked_fill(~mask, 0)
    return pruned, mask, {"seconds": {"mask": time.perf_counter() - t0}, "backends": used}
