"""Mask selection (the ADMM projection) on top of the kernel registry's "prune_mask" and "nm_mask" ops.

Scores are (out_features, in_features) tensors in the weight's layout, larger = more important; a mask is
a bool tensor of the same shape, True = kept. Counts are exact, ties go by index (the ops' contract in
backends/reference.py): the released ADMM code keeps every score >= a threshold, so it may keep a few
more than asked when scores tie exactly at the threshold; we prune exactly the requested number and, among
equal scores, the smaller index first. On real-valued weights exact ties are rare (zeros being the usual
case, where which of the equal zeros is pruned does not change the output).

Patterns:
- unstructured: the k = int(numel * s) smallest scores of the layer are pruned;
- per-row: the k = int(in * s) smallest of every row;
- N:M: at the pattern's own sparsity 1 - N/M, the N largest of each M consecutive inputs are kept; below
  it (early steps of the cubic schedule) the N largest of every group are protected (as if +inf) and the
  int(numel * s_t) smallest of the rest of the layer are pruned (the released code's kthvalue rule).
Dead inputs (diag G == 0) get the score -1, below every |score|, so they are pruned first.
(The solver's unstructured ADMM iterations pass |W + U| in its (in, out) solve layout when no input is
dead, which changes only the index order of exact ties; see methods.admm.gradual_mask.)
Scores may hold +inf (protected N:M entries) and DEAD_SCORE; every backend's kernels must accept both.
"""

from __future__ import annotations

import torch

from . import backends
from .patterns import Pattern

DEAD_SCORE = -1.0


def default_schedule(pattern: Pattern) -> str:
    """The released code's schedule: constant for per-layer masks, cubic for per-row and N:M."""
    return "constant" if pattern.kind == "unstructured" else "cubic"


def sparsity_at(t: int, T: int, sparsity: float, schedule: str) -> float:
    """s_t of step t (0-based) out of T mask-update steps: cubic s - s(1 - (t+1)/T)^3, or constant s."""
    if schedule == "constant" or T <= 0:
        return sparsity
    frac = min(1.0, (t + 1) / T)
    return sparsity - sparsity * (1.0 - frac) ** 3


def with_dead(scores: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """scores (out, in) with the columns where `dead` (bool (in,)) is True set to DEAD_SCORE (a copy)."""
    if dead is None or not bool(dead.any()):
        return scores
    out = scores.clone()
    out[:, dead] = DEAD_SCORE
    return out


def select(scores: torch.Tensor, pattern: Pattern, sparsity: float, *, reference: bool = False,
           used: dict | None = None) -> torch.Tensor:
    """Bool mask (out, in), True = kept, for `scores` (out, in) float32/float64 at sparsity `sparsity`.

    For N:M patterns `sparsity` is the current step's s_t <= 1 - N/M (the pattern's own sparsity when
    equal or above it).
    """
    scores = scores.contiguous()  # the C++/Triton kernels are written for row-major scores
    rows, cols = scores.shape
    dev = scores.device
    if pattern.kind == "unstructured":
        k = int(scores.numel() * sparsity)
        return backends.implementation("prune_mask", dev, reference=reference, used=used)(scores, k, False)
    if pattern.kind == "per-row":
        k = int(cols * sparsity)
        return backends.implementation("prune_mask", dev, reference=reference, used=used)(scores, k, True)
    n, m = pattern.n, pattern.m
    keep = backends.implementation("nm_mask", dev, reference=reference, used=used)(scores, n, m)
    if sparsity >= pattern.sparsity(sparsity):
        return keep
    # Gradual N:M: protect the N largest of each group (+inf), then prune the int(numel * s_t) smallest of
    # the layer; since s_t < 1 - N/M, at most the unprotected entries are pruned, so N:M stays reachable.
    protected = scores.masked_fill(keep, float("inf"))
    k = int(scores.numel() * sparsity)
    return backends.implementation("prune_mask", dev, reference=reference, used=used)(protected, k, False)


def select_rows_balanced(scores: torch.Tensor, k: int, *, reference: bool = False,
                         used: dict | None = None) -> torch.Tensor:
    """Bool mask (out, in), True = kept, pruning exactly k entries of `scores` (out, in) in a per-row
    grouping: every row prunes its q = k // out smallest, and the r = k % out remaining prunes go to the r
    rows whose next candidate (their (q+1)-th smallest score) is smallest, ties by row index. This is
    Wanda's per-output comparison with the layer's total exact (a per-row int(in * s) misses it: a 7x1
    layer at 0.5 pruned nothing, 16x64 at 0.999 pruned 1008 of 1022)."""
    rows, cols = scores.shape
    if not 0 <= k <= rows * cols:
        raise ValueError(f"k must be in [0, {rows * cols}], got {k}")
    q, r = divmod(k, rows)
    prune_rows = backends.implementation("prune_mask", scores.device, reference=reference, used=used)
    keep = prune_rows(scores.contiguous(), q, True)
    if r:
        nxt = scores.kthvalue(q + 1, dim=1).values  # q < cols whenever r > 0
        extra = torch.sort(nxt, stable=True).indices[:r]
        keep[extra] = prune_rows(scores[extra].contiguous(), q + 1, True)
    return keep


def count_check(mask: torch.Tensor, pattern: Pattern, sparsity: float) -> None:
    """Assert-style sanity check used by tests and debug runs: the mask has the pattern's exact counts."""
    rows, cols = mask.shape
    pruned = int((~mask).sum())
    if pattern.kind == "unstructured":
        expect = int(mask.numel() * sparsity)
        if pruned != expect:
            raise AssertionError(f"mask prunes {pruned} entries, expected {expect}")
    elif pattern.kind == "per-row":
        per_row = (~mask).sum(dim=1)
        expect = int(cols * sparsity)
        if not bool((per_row == expect).all()):
            raise AssertionError(f"per-row pruned counts {per_row.unique().tolist()}, expected {expect}")
    else:
        kept = mask.reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
        if not bool((kept == pattern.n).all()):
            raise AssertionError(f"N:M kept counts {kept.unique().tolist()}, expected {pattern.n}")
