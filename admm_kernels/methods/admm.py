"""ADMM-Grad (Boža 2024) as its released code runs it, in named steps that presets recombine.

Steps (each a function or object here; `run` is the seed's recipe, preset=None):
1. scale   — `scaling.scale`: dead inputs out, d = sqrt(diag G) + ε, V = D Wᵀ (in_live, out);
2. damp    — `ScaledProblem.damp`: Ĝ + λI with λ = percdamp · mean(diag Ĝ), B = Ĝ V;
3. factor  — `WUpdate`: (Ĝ + ρI)⁻¹ by Cholesky then its inverse (or an eigendecomposition for cheap ρ
             changes), so each iteration is one GEMM;
4. iterate — `iterate`: per iteration an optional mask update (`gradual_mask`: the mask from |W + U| at
             s_t), the fused dual step (Z = (W+U)⊙M; U += W − Z; R = B + ρ(Z − U)), W = (Ĝ+ρI)⁻¹ R; then
             an optional ρ-schedule callback (U is rescaled by ρ_old/ρ_new: it is the scaled dual) and an
             optional stopping rule;
5. finish  — `finish`: Z = (W + U) ⊙ M (exactly sparse), optionally the exact refit on M (`refit`),
             then W' = (Z / d)ᵀ with dead columns restored (`ScaledProblem.to_output`).
Shapes: weight (out, in) any float dtype; inside, everything is (in_live, out) in float32 (or float64 with
compute_dtype=torch.float64, which runs every op through the pure-torch reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import backends, masks
from .._checks import check_float, check_iters, check_schedule
from ..patterns import Pattern
from .ranges import finite_cast
from .refit import masked_cg
from .registry import Method, MethodResult, Option, bool_option, check_compute_dtype, choice_option
from .rho import check_growth, growth_factor
from .scaling import ScaledProblem, scale
from .timer import Timer
from .wupdate import WUpdate

# --- options ---------------------------------------------------------------------------------------------

SCALINGS = ("jacobi", "obs")
# μ of the OBS metric 1/[(Ĝ + μI)⁻¹]_jj (ScaledProblem.rescale_obs): 0.01 beat 0.1 and 0.001 (measured).
OBS_DAMP = 0.01


OPTIONS = (
    Option("rho", 1.0, lambda v: check_float(v, "rho", 0.0, strict=True), "ADMM penalty ρ"),
    Option("iters", 20, lambda v: check_iters(v, "iters"), "ADMM iterations (0: mask only)"),
    Option("T", 15, lambda v: check_iters(v, "T"), "iterations that re-select the mask"),
    Option("percdamp", 0.1, lambda v: check_float(v, "percdamp"), "damping λ = percdamp · mean(diag Ĝ)"),
    Option("schedule", None, lambda v: v if v is None else check_schedule(v),
           "'constant' or 'cubic' sparsity schedule (default: constant for unstructured, cubic otherwise)"),
    Option("one_shot", False, bool_option("one_shot"), "fix the Wanda-score mask at t = 0"),
    Option("solve", "admm", choice_option("solve", ("admm", "exact")),
           "'exact': conjugate gradient on the final mask after the iterations"),
    Option("cg_iters", 300, lambda v: check_iters(v, "cg_iters"), "CG iterations of solve='exact'"),
    Option("cg_tol", 1e-6, lambda v: check_float(v, "cg_tol", 0.0, strict=True), "CG relative tolerance"),
    Option("compute_dtype", torch.float32, check_compute_dtype, "torch.float32 or torch.float64"),
    # Beyond the seed (preset "accurate"; each kept because a benchmark showed the gain, see PRESETS):
    Option("scaling", "jacobi", choice_option("scaling", SCALINGS),
           "'jacobi': unit-diagonal Ĝ (the seed); 'obs': the Optimal-Brain-Surgeon metric 1/[Ĝ⁻¹]_jj"),
    Option("rho_schedule", "constant", choice_option("rho_schedule", ("constant", "support")),
           "'support': grow ρ every rho_every iterations by how much the mask moved (rho_growth)"),
    Option("rho_every", 4, lambda v: check_iters(v, "rho_every", 1), "iterations between support checks"),
    Option("rho_growth", (1.4, 1.25, 1.12), check_growth,
           "ρ factors for support changes > 0.1k, > 0.005k, ≥ 1 (rho_schedule='support')"),
    Option("rho_refactor", 1.0, lambda v: check_float(v, "rho_refactor", 1.0),
           "re-factor only when ρ moved by more than this factor (lazy W-update correction; 1: always)"),
    Option("mask_iters", None, lambda v: v if v is None else check_iters(v, "mask_iters"),
           "iterations that re-select the mask (None: T; the sparsity schedule still spans T)"),
    Option("stop_change", 0.0, lambda v: check_float(v, "stop_change"),
           "stop once a support check sees fewer than stop_change·k entries move (0: never)"),
    Option("min_iters", 30, lambda v: check_iters(v, "min_iters"),
           "no early stop before this many iterations"),
)

# --- step 4: the iteration loop ----------------------------------------------------------------------------


@dataclass
class AdmmState:
    """The iterate. W, U: (in_live, out) primal and scaled dual; M: bool (in_live, out) mask in the solve
    layout; Mfull: bool (out, in) in the weight's layout, where known (None while the loop selects masks in
    the solve layout); rho: the current ρ; counters of iterations and mask updates."""

    W: torch.Tensor
    U: torch.Tensor
    M: torch.Tensor | None
    Mfull: torch.Tensor | None
    rho: float
    iterations: int = 0
    mask_updates: int = 0

    @classmethod
    def start(cls, problem: ScaledProblem, rho: float, Mfull: torch.Tensor | None = None,
              copy: bool = False) -> AdmmState:
        """W = V, U = 0. Without copy, W takes over V's storage (the seed's memory use): problem.V is then
        overwritten by the loop."""
        W = problem.V.clone() if copy else problem.V
        M = problem.live_part(Mfull) if Mfull is not None else None
        return cls(W=W, U=torch.zeros_like(W), M=M, Mfull=Mfull, rho=rho)


MaskSchedule = Callable[[int, AdmmState], bool]
RhoSchedule = Callable[[int, AdmmState], "float | None"]
StopRule = Callable[[int, AdmmState], bool]


@dataclass(frozen=True)
class MaskSteps:
    """When gradual_mask re-selects the mask: at iterations t < steps with the sparsity of `schedule`
    ("constant" | "cubic", masks.sparsity_at) rising to the target at t = steps, and, when updates >
    steps, on until iteration `updates` at the target sparsity (None: stop at steps)."""

    steps: int
    schedule: str
    updates: int | None = None


def gradual_mask(problem: ScaledProblem, pattern: Pattern, sparsity: float, when: MaskSteps, timer: Timer,
                 reference: bool = False, used: dict | None = None) -> MaskSchedule:
    """The seed's mask schedule: while t < when.steps, M from |W + U| at s_t (masks.sparsity_at), selected
    by ScaledProblem.select_mask (in the solve layout for unstructured masks without dead inputs); then
    at the target sparsity until when.updates."""
    buf: list[torch.Tensor | None] = [None]
    last = when.steps if when.updates is None else max(when.steps, when.updates)

    def update(t: int, state: AdmmState) -> bool:
        if t >= last:
            return False
        timer.lap("iterations")
        s_t = masks.sparsity_at(t, when.steps, sparsity, when.schedule)
        state.M, state.Mfull, buf[0] = problem.select_mask(state.W, state.U, pattern, s_t,
                                                           reference=reference, used=used, buf=buf[0])
        state.mask_updates += 1
        timer.lap("mask")
        return True

    update.release = lambda: buf.__setitem__(0, None)  # type: ignore[attr-defined]
    return update


def iterate(problem: ScaledProblem, solver: WUpdate, state: AdmmState, iters: int, step,
            mask_schedule: MaskSchedule | None = None, rho_schedule: RhoSchedule | None = None,
            stop: StopRule | None = None) -> AdmmState:
    """Run up to `iters` iterations on `state` in place (step 4 of the module docstring). step: the fused
    dual-step op (backends.implementation("admm_dual_step", ...)). rho_schedule(t, state) -> a new ρ or
    None, after iteration t; stop(t, state) -> True ends the loop after iteration t."""
    R = torch.empty_like(state.W)
    for t in range(iters):
        if mask_schedule is not None:
            mask_schedule(t, state)
        step(state.W, state.U, state.M, problem.B, state.rho, R)
        solver.apply(R, out=state.W)
        state.iterations += 1
        if rho_schedule is not None:
            rho = rho_schedule(t, state)
            if rho is not None and rho != state.rho:
                state.U.mul_(state.rho / rho)  # U = y / ρ: the unscaled dual y is kept
                solver.set_rho(rho)
                state.rho = rho
        if stop is not None and stop(t, state):
            break
    return state


class SupportWatch:
    """Every `every` iterations: how many mask entries changed since the previous check (`change`, of
    `kept` kept entries); the first iteration's mask is the baseline. `checked` is True right after a
    check. Shared by the support ρ schedule and the stopping rule (one count per iteration)."""

    def __init__(self, every: int):
        self.every = every
        self.last: torch.Tensor | None = None
        self.kept = 1
        self.change: int | None = None
        self.checked = False
        self._t = -1

    def observe(self, t: int, state: AdmmState) -> None:
        if t == self._t:
            return
        self._t = t
        self.checked = False
        if self.last is None:
            self.last, self.kept = state.M, max(1, int(state.M.sum()))
        if (t + 1) % self.every:
            return
        self.change = int((state.M != self.last).sum())  # 0 when the loop no longer re-selects masks
        self.last, self.checked = state.M, True


def support_rho(watch: SupportWatch, growth: tuple[float, float, float]) -> RhoSchedule:
    """ρ ×growth_factor(change) after each support check (methods.rho: the ALPS rule)."""
    def schedule(t: int, state: AdmmState) -> float | None:
        watch.observe(t, state)
        return state.rho * growth_factor(watch.change, watch.kept, growth) if watch.checked else None
    return schedule


def settled(watch: SupportWatch, stop_change: float, min_iters: int) -> StopRule:
    """Stop after a support check that saw fewer than stop_change·kept entries move, from min_iters on."""
    def stop(t: int, state: AdmmState) -> bool:
        watch.observe(t, state)
        return watch.checked and t + 1 >= min_iters and watch.change < stop_change * watch.kept
    return stop


# --- step 5: finish ---------------------------------------------------------------------------------------


def finish(state: AdmmState) -> torch.Tensor:
    """Z = (W + U) ⊙ M (in_live, out), a new tensor: the exactly sparse ADMM output (step 5 of the module
    docstring); also sets state.Mfull when the loop selected masks in the solve layout."""
    if state.Mfull is None:
        state.Mfull = state.M.T.contiguous()
    return (state.W + state.U).masked_fill_(~state.M, 0)


def refit(G_hat: torch.Tensor, B: torch.Tensor, M: torch.Tensor, Z: torch.Tensor, iters: int,
          tol: float) -> tuple[torch.Tensor, int, float]:
    """The least-squares optimum of the damped scaled problem on the fixed mask M, from Z (CG)."""
    Z, it, res = masked_cg(G_hat, B, M, Z, iters, tol)
    return Z.masked_fill_(~M, 0), it, res


# --- the seed's recipe ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What one run keeps at hand: the pattern, its effective sparsity s, the options `o`, the compute
    dtype (ref: fp64 runs through the reference ops: the kernels are fp32), the sparsity schedule, the
    timer and the backends used."""

    pattern: Pattern
    s: float
    o: dict
    ref: bool
    schedule: str
    timer: Timer
    used: dict

    @property
    def exact(self) -> bool:
        return self.o["solve"] == "exact"


@dataclass
class _Outcome:
    """What the solve reports beyond the pruned weight (stats of `run`)."""

    rho_final: float
    iterations: int = 0
    mask_updates: int = 0
    factorizations: int = 0
    cg_iterations: int = 0
    cg_residual: float | None = None
    clamp: dict = field(default_factory=dict)


def _admm_loop(problem: ScaledProblem, job: _Job, Mfull: torch.Tensor | None, update_mask: bool,
               outcome: _Outcome) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 3-5 up to the exactly sparse Z: (Z (in_live, out), M (in_live, out), Mfull (out, in), Ĝ for
    the exact refit or None)."""
    o, timer, ref, iters = job.o, job.timer, job.ref, job.o["iters"]
    support = o["rho_schedule"] == "support"
    solver = WUpdate(problem.take_gram(), o["rho"], keep_gram=job.exact or support,  # 3.
                     refactor_ratio=o["rho_refactor"])
    timer.lap("factor")
    state = AdmmState.start(problem, o["rho"], Mfull)
    # With iters < T the schedule is compressed into the iterations that exist, so the final mask still has
    # the target sparsity (the released code would stop short of it).
    T_eff = min(o["T"], iters)
    mask_iters = T_eff if o["mask_iters"] is None else min(o["mask_iters"], iters)
    schedule_fn = gradual_mask(problem, job.pattern, job.s, MaskSteps(T_eff, job.schedule, mask_iters), timer,
                               ref, job.used) if update_mask else None
    watch = SupportWatch(o["rho_every"])
    rho_fn = support_rho(watch, o["rho_growth"]) if support else None
    stop_fn = settled(watch, o["stop_change"], o["min_iters"]) if o["stop_change"] > 0 else None
    step = backends.implementation("admm_dual_step", problem.V.device, reference=ref, used=job.used)
    iterate(problem, solver, state, iters, step, schedule_fn, rho_fn, stop_fn)  # 4.
    if schedule_fn is not None:
        if mask_iters > T_eff and state.mask_updates == state.iterations:
            # Still re-selecting when the loop ended: the mask of the last iterate (as ALPS ends).
            state.M, state.Mfull, _ = problem.select_mask(state.W, state.U, job.pattern, job.s, reference=ref,
                                                          used=job.used)
            timer.lap("mask")
        schedule_fn.release()
    outcome.rho_final, outcome.factorizations = state.rho, solver.factorizations
    solver.inverse = None
    outcome.iterations, outcome.mask_updates = state.iterations, state.mask_updates
    Z = finish(state)  # 5.
    timer.lap("iterations")
    return Z, state.M, state.Mfull, solver.gram() if job.exact else None


def _solve(weight: torch.Tensor, problem: ScaledProblem, job: _Job, Mfull: torch.Tensor | None,
           flags: tuple[bool, bool], outcome: _Outcome) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Steps 2-5 on a problem with live inputs: (pruned weight (out, in), Mfull (out, in), the error's
    denominator). flags: (run the ADMM loop, re-select the mask in it)."""
    run_admm, update_mask = flags
    o, timer = job.o, job.timer
    problem.form_scaled_gram()  # 2.
    if o["scaling"] == "obs":
        problem.rescale_obs(OBS_DAMP)
    problem.damp(o["percdamp"] * float(problem.G_hat.diagonal().mean()))
    denominator = problem.denominator()
    timer.lap("factor")
    if run_admm:
        Z, M, Mfull, G_hat = _admm_loop(problem, job, Mfull, update_mask, outcome)
    else:
        M = problem.live_part(Mfull)
        Z = problem.V.masked_fill(~M, 0)
        G_hat = problem.G_hat
    if job.exact:
        Z, outcome.cg_iterations, outcome.cg_residual = refit(G_hat, problem.B, M, Z, o["cg_iters"],
                                                               o["cg_tol"])
        timer.lap("exact")
    pruned = finite_cast(problem.to_output(Z, Mfull), weight.dtype, stats=outcome.clamp)  # (out, in)
    return pruned, Mfull, denominator


def _stats(job: _Job, problem: ScaledProblem, outcome: _Outcome) -> dict:
    o = job.o
    stats = {
        "iterations": outcome.iterations, "mask_updates": outcome.mask_updates,
        "rho": o["rho"], "percdamp": o["percdamp"], "schedule": job.schedule, "one_shot": o["one_shot"],
        "solve": o["solve"], "dead_inputs": problem.n_dead, "seconds": job.timer.seconds,
        "backends": job.used, **outcome.clamp,
    }
    if job.exact:
        stats["cg_iterations"], stats["cg_residual"] = outcome.cg_iterations, outcome.cg_residual
    if o["rho_schedule"] != "constant" or o["scaling"] != "jacobi" or o["stop_change"] > 0:
        stats.update(rho_final=outcome.rho_final, factorizations=outcome.factorizations, scaling=o["scaling"],
                     stopped_early=bool(outcome.iterations < o["iters"]))
    return stats


def run(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float, mask: torch.Tensor | None,
        o: dict) -> MethodResult:
    """ADMM-Grad on one layer (validated inputs, validated options `o`)."""
    cd = o["compute_dtype"]
    job = _Job(pattern=pattern, s=pattern.sparsity(sparsity), o=o, ref=cd == torch.float64,
               schedule=o["schedule"] or masks.default_schedule(pattern), timer=Timer(weight.device), used={})
    problem = scale(weight, G, cd)  # 1.
    run_admm = o["iters"] > 0 and problem.n_live > 0 and not (mask is not None and job.exact)
    update_mask = mask is None and not o["one_shot"] and o["T"] > 0 and run_admm

    Mfull = mask
    if Mfull is None and not update_mask:  # mask only, one-shot: the Wanda score |W_ij| * ||x_j|| at s
        Mfull = masks.select(problem.full_scores(problem.V, None), pattern, job.s, reference=job.ref,
                             used=job.used)
    job.timer.lap("mask")

    outcome = _Outcome(rho_final=o["rho"])
    denominator = None
    if problem.n_live and (run_admm or job.exact):
        pruned, Mfull, denominator = _solve(weight, problem, job, Mfull, (run_admm, update_mask), outcome)
    else:  # mask only (iters = 0), or no live input at all
        pruned = weight.masked_fill(~Mfull, 0)
    job.timer.lap("output")
    return MethodResult(pruned, Mfull, _stats(job, problem, outcome), denominator)


# Presets: option sets over the seed's defaults; explicit options override them. Chosen by
# measurement on SmolLM2-135M's real layers (benchmarks/RESULTS.md, "ADMM presets"):
# - "accurate": the OBS metric (ScaledProblem.rescale_obs), ρ grown from 0.15 by the support rule
#   (methods.rho: ×1.2 / ×1.1 / ×1.05 as the support moves much / some / at all) checked every 3
#   iterations, re-factored lazily (once ρ has moved 1.5×), the mask re-selected in every iteration, stop
#   once the support has settled (fewer than 3e-4·k entries moved between checks, from iteration 40; at
#   most 80), damping 0.003. In the lab the support rule alone (ALPS's ρ dynamics on ADMM-Grad's scaled
#   problem) gave 0.80-0.84x ADMM-Grad's error; the OBS metric a further 2-2.5 %; damping 0.1 -> 0.003
#   0.5-4 %; growing ρ from 0.15 by 1.2/1.1/1.05 instead of from 0.1 by 1.25/1.15/1.08 a further 0.1-0.3 %
#   (median over 42 layers: 0.9712 -> 0.9689 of ALPS's error at 70 %, 0.9602 -> 0.9595 at 50 %, 0.9692 ->
#   0.9675 at 2:4). A final exact refit and a 1-swap local search on the final mask changed < 0.1 %: the
#   growing-ρ fixed point is already 1-swap optimal nearly everywhere, so neither is in the preset.
# - "fast": 8 iterations (mask re-selected in the first 6), ρ = 0.5, damping 0.01: a smaller ρ moves the
#   mask further per iteration, which is what 8 iterations need.
PRESETS = {
    "accurate": {"scaling": "obs", "rho_schedule": "support", "rho": 0.15, "rho_every": 3,
                 "rho_growth": (1.2, 1.1, 1.05), "rho_refactor": 1.5, "stop_change": 3e-4,
                 "min_iters": 40, "iters": 80, "T": 10, "mask_iters": 80, "percdamp": 0.003},
    "fast": {"iters": 8, "T": 6, "rho": 0.5, "percdamp": 0.01},
}

METHOD = Method(
    name="admm", run=run, options=OPTIONS, presets=PRESETS,
    summary="ADMM-Grad (Boza 2024): gradual mask from the ADMM iterate, 20 iterations (the default)",
    grouping="unstructured = one top-k over the whole layer, exactly int(out*in*s) pruned",
)
