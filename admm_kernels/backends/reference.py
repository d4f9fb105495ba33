"""Pure-torch reference implementations of every op: the ground truth the other backends are tested against.

Runs on any device and dtype. Clarity over speed; each function states the exact contract (including
tie-breaking) that every backend must reproduce bit-for-bit for masks and to fp32 rounding for values.
"""

from __future__ import annotations

import torch

NAME = "reference"


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    """G[i, j] += sum_r x[r, i] * x[r, j] for i <= j (upper triangle incl. diagonal), in place.

    G: (in, in) float32 or float64. x: (n, in), any float dtype, any strides; converted to G's dtype.
    The strict lower triangle of G is neither read nor written (callers mirror it on read).
    """
    xf = x.to(G.dtype)
    G.add_(torch.triu(xf.T @ xf))


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Bool mask (True = kept) that prunes exactly k entries of `scores` (rows, cols).

    per_row=False: the k smallest of the whole tensor; per_row=True: the k smallest of every row.
    Order: ascending score; among equal scores the smaller (flat, resp. column) index is pruned first.
    scores: any float dtype, no NaN. 0 <= k <= numel (resp. cols).
    """
    rows, cols = scores.shape
    s = scores.float()
    if per_row:
        order = torch.sort(s, dim=1, stable=True).indices[:, :k]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, order, False)
        return mask
    order = torch.sort(s.reshape(-1), stable=True).indices[:k]
    mask = torch.ones(rows * cols, dtype=torch.bool, device=scores.device)
    mask[order] = False
    return mask.view(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest of every m consecutive entries of each row of `scores` (rows, cols).

    cols % m == 0, 0 <= n <= m. Among equal scores the smaller column index is kept.
    """
    rows, cols = scores.shape
    g = scores.float().reshape(rows, cols // m, m)
    keep = torch.sort(g, dim=2, descending=True, stable=True).indices[:, :, :n]
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, keep, True)
    return mask.view(rows, cols)


def admm_dual_step(
    W: torch.Tensor, U: torch.Tensor, M: torch.Tensor, B: torch.Tensor, rho: float, R: torch.Tensor
) -> None:
    """One fused ADMM element-wise step, in place on U and R (all (rows, cols); W, U, B, R float32, M bool).

    Z = (W + U) * M;  U <- U + W - Z;  R <- B + rho * (Z - U_new).
    (Z itself is not stored: Z = W + U_old - U_new, and after the loop the solver forms it once more.)
    """
    Z = (W + U) * M
    U.add_(W).sub_(Z)
    torch.add(B, Z - U, alpha=rho, out=R)


def unavailable_reason() -> str:
    return ""
