"""The W-update of the scaled ADMM problems: W ← (Ĝ + ρI)⁻¹ R, for the current ρ, as one GEMM.

Two ways to hold (Ĝ + ρI)⁻¹, both forming the explicit inverse so that each iteration is one GEMM:
- "cholesky" (ADMM-Grad, step 3 in admm_kernels/methods/admm.py): a Cholesky factorisation of Ĝ + ρI,
  then its inverse from the factor (never torch.inverse). At in = out = 2048 on this CPU: cholesky
  0.05 s, cholesky_inverse 0.13 s, one GEMM A⁻¹R 0.11 s, one cholesky_solve 0.20 s, so the inverse pays
  for itself after two iterations (20 iterations: 2.4 s vs 4.0 s). A new ρ re-factors.
- "eigh" (ALPS, growing-ρ schedules): Ĝ = Q diag(λ) Qᵀ once; any ρ then costs one GEMM,
  (Ĝ + ρI)⁻¹ = Q diag(1/(λ + ρ)) Qᵀ.

Lazy re-factoring (refactor_ratio > 1): a new ρ within that factor of the factored ρ_f keeps the old
inverse, and the update solves (Ĝ + ρI)W = R by one fixed-point step from the previous W:
(Ĝ + ρ_f I)W = R + (ρ_f − ρ)W_prev, exact once the iterates settle (W = W_prev). Measured with the
"accurate" preset's growing ρ on SmolLM2 layers: ratio 1.5 halved the factorisations (12.9 → 6.2 per layer)
with the same errors (median within 0.3 %, slightly lower); ratio 2 lost up to 25 % on single layers.
"""

from __future__ import annotations

import torch

from .lapack import one_thread

MODES = ("cholesky", "eigh")


class WUpdate:
    """(Ĝ + ρI)⁻¹ for a changing ρ. G_hat: (n, n) symmetric positive semi-definite (float32/float64); in
    "cholesky" mode its storage is taken over (factored in place; `gram()` gives Ĝ back exactly when
    keep_gram). eigh_dtype: the dtype of the eigendecomposition (default: G_hat's); the inverse is formed
    in G_hat's dtype. `eigenvalues` (eigh mode): Ĝ's, ascending."""

    def __init__(self, G_hat: torch.Tensor, rho: float, mode: str = "cholesky", keep_gram: bool = True,
                 eigh_dtype: torch.dtype | None = None, refactor_ratio: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"unknown W-update mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.refactor_ratio = refactor_ratio
        self.factored_rho: float | None = None  # the ρ the inverse was formed for
        self.dtype = G_hat.dtype
        self.keep_gram = keep_gram
        self.rho: float | None = None
        self.inverse: torch.Tensor | None = None
        self.factorizations = 0
        if mode == "cholesky":
            self._A = G_hat
            self._diag = G_hat.diagonal().clone()
        else:
            with one_thread(G_hat.device):
                lam, Q = torch.linalg.eigh(G_hat.to(eigh_dtype or G_hat.dtype))
            # The inverse is formed in G_hat's dtype: at n = 1536 on this CPU a float64 eigh takes 0.72 s
            # (float32: 0.38 s) but a float64 GEMM Q diag Qᵀ 0.17 s against 0.08 s, and ALPS forms a new
            # inverse every 3 iterations.
            self.eigenvalues, self._Q = lam.to(self.dtype), Q.to(self.dtype)
            self._A = G_hat if keep_gram else None
        self.set_rho(rho)

    def set_rho(self, rho: float) -> None:
        """Form (Ĝ + ρI)⁻¹ for this ρ (nothing to do when ρ is unchanged, or, with refactor_ratio > 1,
        within that factor of the factored ρ: apply() then corrects for the difference)."""
        if rho == self.rho:
            return
        f = self.factored_rho
        if f is not None and self.inverse is not None and max(rho / f, f / rho) <= self.refactor_ratio:
            self.rho = rho
            return
        self.inverse = None  # free the old inverse before forming the new one
        if self.mode == "cholesky":
            if self._A is None:
                raise RuntimeError("WUpdate(keep_gram=False) cannot change rho after the first factorisation")
            A = self._A
            A.diagonal().copy_(self._diag).add_(rho)
            with one_thread(A.device):
                L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                raise ValueError(f"gram: the scaled, damped Gram + rho*I is not positive definite (Cholesky "
                                 f"failed at column {int(info)}); increase percdamp or rho (got {rho})")
            with one_thread(L.device):
                self.inverse = torch.cholesky_inverse(L)
            del L
            if not self.keep_gram:
                self._A = None  # frees n² floats during the loop (the caller dropped its reference)
        else:
            Q = self._Q
            self.inverse = torch.mm(Q * (1.0 / (self.eigenvalues + rho)), Q.T)
        self.rho = self.factored_rho = rho
        self.factorizations += 1

    def apply(self, R: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = (Ĝ + ρI)⁻¹ R (R, out: (n, cols)); when the inverse is of an older ρ_f (lazy
        re-factoring), out must hold the previous iterate and R gets + (ρ_f − ρ)·out first."""
        if self.rho != self.factored_rho:
            R.add_(out, alpha=self.factored_rho - self.rho)
        return torch.mm(self.inverse, R, out=out)

    def gram(self) -> torch.Tensor:
        """Ĝ itself (needs keep_gram=True)."""
        if self._A is None:
            raise RuntimeError("WUpdate was built with keep_gram=False")
        if self.mode == "cholesky":
            self._A.diagonal().copy_(self._diag)
            self.rho = self.factored_rho = None  # the storage holds Ĝ again, not Ĝ + ρI
        return self._A

    def release(self) -> None:
        """Drop the inverse and the factors."""
        self.inverse = None
        if self.mode == "eigh":
            self._Q = None
