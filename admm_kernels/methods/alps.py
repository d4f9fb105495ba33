"""ALPS (Meng, Behdin, Wang, Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning"): ℓ0-constrained ADMM with a penalty ρ that grows as the support settles, then a PCG refit.

Written from the paper and the facts of its released code (constants and order of steps; no code copied).
In the scaled space of admm_kernels.methods.scaling, with Ŵ = V = D Wᵀ (in, out):
1. ridge λ = ridge · mean(diag G) [ridge 0.01] added to G, then the unit-diagonal scaling
   d = sqrt(diag(G + λI)) + ε, Ĝ = D⁻¹(G + λI)D⁻¹; the target is Ĝ Ŵ;
2. Ĝ = Q diag(λ_i) Qᵀ once, so (Ĝ + ρI)⁻¹ = Q diag(1/(λ_i + ρ)) Qᵀ costs one GEMM for any ρ (WUpdate "eigh");
3. start: D = the pattern's projection of Ŵ (the top-k of |W|·sqrt(G_jj + λ), the Wanda score), Y = 0,
   ρ = rho [0.1];
4. iterate (at most max_iters [300]):  B = (Ĝ + ρI)⁻¹ (Ĝ Ŵ − Y + ρD);  D = project(B + Y/ρ);
   Y ← Y + ρ(B − D);  every `update_every` [3] iterations: s = the number of support entries that changed
   since the previous check, k = the kept count, and
     s > 0.1 k: ρ ×1.3;  s > 0.005 k: ρ ×1.2;  s ≥ 1: ρ ×1.1 once ρ has grown, else ρ /5 and restart from
     the start (D, Y) (ρ₀ was too large: the support froze at once);  s = 0: stop once ρ has grown, else
     ρ /5;  ρ ≤ rho_max [1e6];  then stop if the iteration index ≥ min_iters [30] and s/k < stop_change
     [3e-4];
5. finally D = project(B), then preconditioned CG (cg_iters [10], relative tolerance cg_tol [1e-4]) on
   min ½ xᵀĜx − (ĜŴ)ᵀx over each output row's kept inputs, from D; W' = (D / d)ᵀ.
The CG's preconditioner is Jacobi, which is the identity on the unit-diagonal Ĝ: the scaling is the
preconditioning (methods.refit).

Where this deviates from the released code, and why:
- Masks: "unstructured" prunes exactly int(out·in·s) entries (the released code keeps round((1−s)·numel),
  which can differ by one); "per-row" (int(in·s) per row) is added (the released code has per-layer and
  N:M only); N:M works for any N:M whose M divides in (as every method here). Ties go by index.
- Dead inputs (diag G == 0) are pruned first and kept out of the solve (as every method here): pruning
  them costs no error, while the released code's ridge makes them cost λ·w² and compete for the budget.
  The ridge's mean(diag G) is taken over the live inputs.
- ε = 1e-8 · min(1, sqrt(mean diag)) in the scaling (methods.scaling) instead of 1e-8, so the result does
  not depend on the Gram's overall scale (the same d for Grams whose mean diagonal is >= 1).
- The relative error the released code evaluates every 3 iterations (one extra GEMM, printed only) is
  not computed. Its CG stops on the full (unmasked) residual, which in practice never meets the
  tolerance, so it always runs 10 iterations; here the residual on the support is used (the masked
  problem's own residual), so CG may stop earlier once it has converged.
- The eigendecomposition runs in float64 (as released) but (Ĝ + ρI)⁻¹ is formed in the compute dtype
  (the released code forms it in float64, then casts): half the time per ρ change on this CPU.
- Update-only (a given mask): only the refit (step 5) runs, from Ŵ ⊙ mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks
from .._checks import check_float, check_iters
from ..patterns import Pattern
from .ranges import finite_cast
from .refit import masked_cg
from .registry import Method, MethodResult, Option, check_compute_dtype, float_dtype_option
from .rho import change_class, check_growth
from .scaling import ScaledProblem, scale
from .timer import Timer
from .wupdate import WUpdate


def _positive_float(name: str):
    return lambda v: check_float(v, name, 0.0, strict=True)


OPTIONS = (
    Option("rho", 0.1, _positive_float("rho"), "initial ADMM penalty ρ₀"),
    Option("ridge", 0.01, lambda v: check_float(v, "ridge"), "ridge λ = ridge · mean(diag G) (before scaling)"
           ),
    Option("max_iters", 300, lambda v: check_iters(v, "max_iters"), "most ADMM iterations"),
    Option("min_iters", 30, lambda v: check_iters(v, "min_iters"),
           "no convergence stop before this iteration"),
    Option("update_every", 3, lambda v: check_iters(v, "update_every", 1), "iterations between ρ updates"),
    Option("stop_change", 3e-4, lambda v: check_float(v, "stop_change"),
           "stop when the support change s/k falls below this (after min_iters)"),
    Option("rho_growth", (1.3, 1.2, 1.1), check_growth,
           "ρ factors for support changes > 0.1k, > 0.005k, ≥ 1"),
    Option("rho_max", 1e6, _positive_float("rho_max"), "upper bound of ρ"),
    Option("cg_iters", 10, lambda v: check_iters(v, "cg_iters"), "PCG iterations of the final refit"),
    Option("cg_tol", 1e-4, _positive_float("cg_tol"), "PCG relative residual tolerance"),
    Option("eigh_dtype", torch.float64, float_dtype_option("eigh_dtype"), "dtype of the eigendecomposition"),
    Option("compute_dtype", torch.float32, check_compute_dtype, "torch.float32 or torch.float64"),
)

_RESTART_DIVISOR = 5.0


@dataclass(frozen=True)
class _Job:
    """What one run keeps at hand: the pattern, its effective sparsity s, the options `o`, ref (fp64
    through the reference ops), the timer, the backends used and the stats being filled."""

    pattern: Pattern
    s: float
    o: dict
    ref: bool
    timer: Timer
    used: dict
    stats: dict

    def select(self, problem: ScaledProblem, X: torch.Tensor, buf=None):
        """The pattern's projection of X (in_live, out): (M, Mfull or None, buf) as select_mask."""
        return problem.select_mask(X, None, self.pattern, self.s, reference=self.ref, used=self.used, buf=buf)


@dataclass
class _Iterate:
    """The ADMM iterate in the scaled space, (in_live, out) each: D the projected (sparse) iterate, Y the
    dual, B the W-update's result, R and X work buffers; D0 the start (restarts go back to it); V0 = Ŵ."""

    D0: torch.Tensor
    V0: torch.Tensor
    D: torch.Tensor
    Y: torch.Tensor
    B: torch.Tensor
    R: torch.Tensor
    X: torch.Tensor

    @classmethod
    def start(cls, V0: torch.Tensor, M0: torch.Tensor) -> _Iterate:
        D0 = V0.masked_fill(~M0, 0)
        # B = Ŵ if no iteration runs
        return cls(D0=D0, V0=V0, D=D0.clone(), Y=torch.zeros_like(V0), B=V0.clone(), R=torch.empty_like(V0),
                   X=torch.empty_like(V0))

    def restart(self) -> None:
        self.D.copy_(self.D0)
        self.Y.zero_()
        self.B.copy_(self.V0)


@dataclass
class _Penalty:
    """ρ and what its updates remember: whether it has grown, and the support at the previous check."""

    rho: float
    M_prev: torch.Tensor
    grown: bool = False

    def update(self, M: torch.Tensor, change: int, k: int, job: _Job, it: _Iterate) -> bool:
        """One support check (step 4's rule) after `change` of the k kept entries moved. Returns True to
        stop (converged); may restart the iterate. Leaves self.rho to be clipped and applied by the
        caller."""
        large, medium, small = job.o["rho_growth"]
        moved = change_class(change, k)
        if moved in ("large", "medium"):
            self.grown, self.rho = True, self.rho * (large if moved == "large" else medium)
        elif moved == "small":
            if self.grown:
                self.rho *= small
            else:  # the support froze before ρ grew: ρ₀ was too large, restart with a smaller one
                self.rho /= _RESTART_DIVISOR
                it.restart()
                job.stats["restarts"] += 1
        elif self.grown:  # the support stopped moving after ρ grew: converged
            return True
        else:
            self.rho /= _RESTART_DIVISOR
        self.M_prev = M
        return False


def _iterate(problem: ScaledProblem, target: torch.Tensor, solver: WUpdate, job: _Job) -> tuple[
        torch.Tensor, float, object]:
    """Steps 3-4: (B (in_live, out), the final ρ, the mask selection's buffer)."""
    o, timer, stats = job.o, job.timer, job.stats
    M0, _, buf = job.select(problem, problem.V)  # 3.
    k = max(1, int(M0.sum()))  # kept entries (dead inputs never change)
    it = _Iterate.start(problem.V, M0)
    penalty = _Penalty(o["rho"], M0)
    timer.lap("mask")
    for i in range(o["max_iters"]):  # 4.
        rho = penalty.rho
        torch.add(target, it.D, alpha=rho, out=it.R).sub_(it.Y)  # Ĝ Ŵ − Y + ρD
        solver.apply(it.R, out=it.B)
        torch.add(it.B, it.Y, alpha=1.0 / rho, out=it.X)
        timer.lap("iterations")
        M, _, buf = job.select(problem, it.X, buf)
        timer.lap("mask")
        it.D.copy_(it.X).masked_fill_(~M, 0)
        it.Y.add_(torch.sub(it.B, it.D, out=it.R), alpha=rho)
        stats["iterations"] = i + 1
        timer.lap("iterations")
        if (i + 1) % o["update_every"]:
            continue
        change = int((M != penalty.M_prev).sum())
        frac = change / k
        if penalty.update(M, change, k, job, it):
            break
        penalty.rho = min(penalty.rho, o["rho_max"])
        solver.set_rho(penalty.rho)
        stats["rho_updates"] += 1
        timer.lap("factor")
        if i >= o["min_iters"] and frac < o["stop_change"]:
            break
    return it.B, penalty.rho, buf


def _all_dead(weight: torch.Tensor, problem: ScaledProblem, mask: torch.Tensor | None,
              job: _Job) -> MethodResult:
    """Every input dead: nothing to solve on; the mask (given, or the pattern's on the Wanda score)."""
    Mfull = mask if mask is not None else masks.select(
        problem.full_scores(problem.V, None), job.pattern, job.s, reference=job.ref, used=job.used)
    job.timer.lap("mask")
    job.stats["seconds"] = job.timer.seconds
    return MethodResult(weight.masked_fill(~Mfull, 0), Mfull, job.stats)


def run(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float, mask: torch.Tensor | None,
        o: dict) -> MethodResult:
    """ALPS on one layer (validated inputs and options)."""
    cd = o["compute_dtype"]
    timer = Timer(weight.device)
    Gc = G.to(cd)
    live_diag = Gc.diagonal()[Gc.diagonal() > 0]
    ridge = o["ridge"] * float(live_diag.mean()) if live_diag.numel() else 0.0
    problem = scale(weight, Gc, cd, ridge=ridge)  # 1.
    del Gc
    used: dict[str, str] = {}
    job = _Job(pattern=pattern, s=pattern.sparsity(sparsity), o=o, ref=cd == torch.float64, timer=timer,
               used=used, stats={"dead_inputs": problem.n_dead, "ridge": ridge, "iterations": 0,
                                 "rho_updates": 0, "restarts": 0, "backends": used})
    if problem.n_live == 0:
        return _all_dead(weight, problem, mask, job)
    problem.form_scaled_gram()
    target = problem.damp(0.0)  # Ĝ Ŵ
    timer.lap("factor")

    if mask is not None:  # update-only: the refit on the given mask
        Mfull = mask
        M = problem.live_part(mask)
        Z = problem.V.masked_fill(~M, 0)
    else:
        # 2. the eigendecomposition, once
        solver = WUpdate(problem.G_hat, o["rho"], mode="eigh", keep_gram=True, eigh_dtype=o["eigh_dtype"])
        timer.lap("factor")
        B, job.stats["rho"], buf = _iterate(problem, target, solver, job)
        M, Mfull, _ = job.select(problem, B, buf)  # 5.
        del buf
        if Mfull is None:
            Mfull = M.T.contiguous()
        Z = B.masked_fill_(~M, 0)
        job.stats["eigh_dtype"] = str(o["eigh_dtype"]).replace("torch.", "")
        solver.release()
        timer.lap("mask")
    Z, cg_it, cg_res = masked_cg(problem.G_hat, target, M, Z, o["cg_iters"], o["cg_tol"])
    Z.masked_fill_(~M, 0)
    timer.lap("refit")
    pruned = finite_cast(problem.to_output(Z, Mfull), weight.dtype, stats=job.stats)
    timer.lap("output")
    job.stats.update({"cg_iterations": cg_it, "cg_residual": cg_res, "seconds": timer.seconds})
    return MethodResult(pruned, Mfull, job.stats)


METHOD = Method(
    name="alps", run=run, options=OPTIONS,
    summary="ALPS (Meng et al. 2024): l0-constrained ADMM with a support-driven growing rho from 0.1, "
            "then a PCG refit (slower than admm)",
    grouping="unstructured = one top-k over the whole layer, exactly int(out*in*s) pruned",
)
