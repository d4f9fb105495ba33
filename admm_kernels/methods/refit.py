"""The fixed-mask refit shared by the methods: batched preconditioned conjugate gradient.

For every column j of X (in, out) it minimises ½ xᵀ A x − b_jᵀ x over x supported on M[:, j], i.e. the
least-squares optimum of one output row on its kept inputs; all columns advance together, so one
iteration is one (in, in) x (in, out) GEMM. In the scaled space of ADMM-Grad and ALPS the Gram has a
(constant) unit diagonal, where the Jacobi preconditioner is the identity: the scaling already is the
preconditioning, so those callers pass `precondition=None`. Other callers (an unscaled Gram) pass the
diagonal of A.
"""

from __future__ import annotations

import torch


def masked_cg(A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, X: torch.Tensor, iters: int, tol: float,
              precondition: torch.Tensor | None = None) -> tuple[torch.Tensor, int, float]:
    """A (in, in) symmetric positive definite; B, X (in, out): right-hand sides and the start; M bool
    (in, out): the supports; precondition: None or (in,) positive (Jacobi: diag A). Stops after `iters`
    iterations or once every column's relative residual ||r|| / ||b|| (on the support) is <= tol.
    Returns (X on the support, iterations run, the largest relative residual)."""
    tiny = torch.finfo(X.dtype).tiny
    Mf = M.to(X.dtype)
    X = X * Mf
    b = B * Mf
    r = b - torch.mm(A, X) * Mf
    inv_diag = None if precondition is None else (1.0 / precondition.to(X.dtype))[:, None]
    z = r if inv_diag is None else r * inv_diag
    p = z.clone()
    rz = (r * z).sum(0)
    rs = (r * r).sum(0) if inv_diag is not None else rz
    bn = (b * b).sum(0).clamp_min(tiny)
    it = 0
    res = float(torch.sqrt((rs / bn).max())) if rs.numel() else 0.0
    while it < iters and res > tol:
        Ap = torch.mm(A, p) * Mf
        pAp = (p * Ap).sum(0)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(tiny), torch.zeros_like(rz))
        X.add_(p * alpha)
        r.sub_(Ap * alpha)
        z = r if inv_diag is None else r * inv_diag
        rz_new = (r * z).sum(0)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + p * beta
        rz = rz_new
        rs = (r * r).sum(0) if inv_diag is not None else rz
        it += 1
        res = float(torch.sqrt((rs / bn).max()))
    return X, it, res
