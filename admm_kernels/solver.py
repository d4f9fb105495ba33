"""The layer solver: `prune_layer` (ADMM-Grad and the baselines behind one API) and `reconstruction_error`.

ADMM-Grad follows SPEC §1 (the released code of Boža 2024). Shapes: weight (out, in) of any float dtype;
gram G (in, in); inside the solve everything is in the (in, out) layout of V = D W^T, in float32 (or
float64 with compute_dtype=torch.float64, which runs every op through the pure-torch reference).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import masks
from ._checks import (
    Pattern,
    check_float,
    check_gram,
    check_int,
    check_mask,
    check_method,
    check_options,
    check_schedule,
    check_sparsity,
    check_weight,
    parse_pattern,
)

# Above this many multiply-adds (out * in^2) a CPU error evaluation uses fp32 GEMMs with fp64 sums (and
# prune_layer reuses tr(WGW^T) from the solve, so the error costs one GEMM): an fp64 GEMM runs at ~14
# GFLOP/s here against ~60-150 for fp32 (ENVIRONMENT.md; 2048^3 fp32 GEMM: 0.11 s). Measured at 1024x1024:
# the fp64 error took 0.26 s against 0.97 s for the 20 ADMM GEMMs. fp32 GEMMs leave ~1e-5 relative error.
_FP64_ERROR_MACS = 2**28
# Row chunk of the error evaluation: bounds the (chunk, in) temporary to ~256 MB.
_ERROR_CHUNK_BYTES = 256 * 2**20

ADMM_OPTIONS = ("rho", "iters", "T", "percdamp", "schedule", "one_shot", "solve", "cg_iters", "cg_tol",
                "compute_dtype")


@dataclass
class PruneResult:
    """weight: pruned (out, in), same dtype/device as the input; mask: bool (out, in), True = kept;
    error: relative reconstruction error tr(ΔGΔᵀ)/tr(WGWᵀ) (float64); stats: timings, counts, backends."""

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    stats: dict = field(default_factory=dict)


# --- reconstruction error -------------------------------------------------------------------------------

def _quad_trace(A: torch.Tensor, G: torch.Tensor, fp64: bool) -> float:
    """tr(A G A^T) for A (rows, in), G (in, in); fp64 GEMMs, or fp32 GEMMs with fp64 accumulation."""
    dt = torch.float64 if fp64 else torch.float32
    Gc = G.to(dt)
    chunk = max(1, _ERROR_CHUNK_BYTES // (A.shape[1] * 8))
    total = 0.0
    for start in range(0, A.shape[0], chunk):
        a = A[start:start + chunk].to(dt)
        total += float(torch.sum(torch.mm(a, Gc) * a, dtype=torch.float64))
    return total


def _use_fp64(weight: torch.Tensor) -> bool:
    out, inn = weight.shape
    return weight.device.type != "cpu" or out * inn * inn <= _FP64_ERROR_MACS


def _relative_error(weight: torch.Tensor, pruned: torch.Tensor, G: torch.Tensor,
                    denominator: float | None = None) -> float:
    fp64 = _use_fp64(weight)
    num = _quad_trace(weight.to(torch.float64 if fp64 else torch.float32) - pruned.to(
        torch.float64 if fp64 else torch.float32), G, fp64)
    den = denominator if (denominator is not None and not fp64) else _quad_trace(weight, G, fp64)
    if den <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return max(num, 0.0) / den


@torch.no_grad()
def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative reconstruction error tr((W-W')G(W-W')^T) / tr(W G W^T) as a Python float (float64).

    weight, pruned: (out, in), any float dtypes, same shape; gram: (in, in) symmetric. Computed in fp64
    (fp32 GEMMs with fp64 sums for large layers on the CPU, see _FP64_ERROR_MACS).
    """
    w = check_weight(weight, "weight")
    p = check_weight(pruned, "pruned")
    if p.shape != w.shape:
        raise ValueError(f"shape mismatch: pruned has shape {tuple(p.shape)}, weight has {tuple(w.shape)}")
    g = check_gram(gram, w.shape[1]).to(w.device)
    return _relative_error(w, p.to(w.device), g)


# --- ADMM-Grad ------------------------------------------------------------------------------------------

class _Timer:
    """Accumulates seconds per phase; synchronises CUDA so the phases are real."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + (now - self._t)
        self._t = now


def _admm_options(options: dict) -> dict:
    check_options(options, ADMM_OPTIONS, "admm")
    o = {
        "rho": check_float(options.get("rho", 1.0), "rho", 0.0, strict=True),
        "iters": check_int(options.get("iters", 20), "iters"),
        "T": check_int(options.get("T", 15), "T"),
        "percdamp": check_float(options.get("percdamp", 0.1), "percdamp"),
        "schedule": options.get("schedule"),
        "one_shot": options.get("one_shot", False),
        "solve": options.get("solve", "admm"),
        "cg_iters": check_int(options.get("cg_iters", 300), "cg_iters"),
        "cg_tol": check_float(options.get("cg_tol", 1e-6), "cg_tol", 0.0, strict=True),
        "compute_dtype": options.get("compute_dtype", torch.float32),
    }
    if o["schedule"] is not None:
        check_schedule(o["schedule"])
    if not isinstance(o["one_shot"], bool):
        raise TypeError(f"one_shot must be a bool, got {o['one_shot']!r}")
    if o["solve"] not in ("admm", "exact"):
        raise ValueError(f"unknown solve {o['solve']!r}; expected 'admm' or 'exact'")
    if o["compute_dtype"] not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {o['compute_dtype']!r}")
    return o


def _cg(Gd: torch.Tensor, B: torch.Tensor, M: torch.Tensor, X: torch.Tensor, iters: int, tol: float):
    """Batched conjugate gradient on the fixed mask: for every column j of X (in, out), minimise
    ½ x^T Gd x - b_j^T x over x supported on M[:, j] (Gd (in, in) SPD). Returns (X, iterations, residual),
    residual = max over columns of ||r|| / ||b||."""
    Mf = M.to(X.dtype)
    X = X * Mf
    b = B * Mf
    r = b - torch.mm(Gd, X) * Mf
    p = r.clone()
    rs = (r * r).sum(0)
    bn = (b * b).sum(0).clamp_min(torch.finfo(X.dtype).tiny)
    it = 0
    res = float(torch.sqrt((rs / bn).max())) if rs.numel() else 0.0
    while it < iters and res > tol:
        Ap = torch.mm(Gd, p) * Mf
        pAp = (p * Ap).sum(0)
        alpha = torch.where(pAp > 0, rs / pAp.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(rs))
        X.add_(p * alpha)
        r.sub_(Ap * alpha)
        rs_new = (r * r).sum(0)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(rs))
        p = r + p * beta
        rs = rs_new
        it += 1
        res = float(torch.sqrt((rs / bn).max()))
    return X, it, res


def admm_prune(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float,
               mask: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, torch.Tensor, dict,
                                                                        float | None]:
    """ADMM-Grad on one layer (validated inputs: weight (out, in), G (in, in) on weight's device).

    Returns (pruned weight in weight's dtype, mask (out, in) bool, stats, tr(WGW^T) or None).
    """
    o = _admm_options(options)
    cd = o["compute_dtype"]
    ref = cd == torch.float64  # the kernels are fp32; fp64 runs through the reference ops
    schedule = o["schedule"] or masks.default_schedule(pattern)
    rho, iters, percdamp = o["rho"], o["iters"], o["percdamp"]
    dev = weight.device
    out_f, in_f = weight.shape
    s = pattern.sparsity(sparsity)
    used: dict[str, str] = {}
    timer = _Timer(dev)

    # 1. Scaling; dead inputs (diag G == 0) are pruned first and kept out of the solve.
    Gc = G.to(cd)
    diag = Gc.diagonal()
    dead = diag <= 0
    n_dead = int(dead.sum())
    live_idx = torch.nonzero(~dead).squeeze(1) if n_dead else None
    Gl = Gc[live_idx][:, live_idx] if n_dead else Gc
    d = torch.sqrt(Gl.diagonal()) + 1e-8
    Wc = weight.to(cd)
    V = ((Wc[:, live_idx] if n_dead else Wc) * d).T.contiguous()  # (in_live, out)
    n_live = V.shape[0]

    def full_scores(W: torch.Tensor, U: torch.Tensor | None, S: torch.Tensor | None = None) -> torch.Tensor:
        """|W + U| (in_live, out) -> scores (out, in) in the weight's layout (into S if given; its dead
        columns must hold DEAD_SCORE already), dead columns = DEAD_SCORE."""
        if S is None:
            S = torch.full((out_f, in_f), masks.DEAD_SCORE, dtype=cd, device=dev) if n_dead else \
                torch.empty(out_f, in_f, dtype=cd, device=dev)
        if n_dead:
            S[:, live_idx] = (W if U is None else W + U).abs().T
        else:  # one strided pass straight into the (out, in) layout, then abs in place
            if U is None:
                S.copy_(W.T)
            else:
                torch.add(W.T, U.T, out=S)
            S.abs_()
        return S

    def live_part(Mfull: torch.Tensor) -> torch.Tensor:
        return (Mfull[:, live_idx] if n_dead else Mfull).T.contiguous()

    run_admm = iters > 0 and n_live > 0 and not (mask is not None and o["solve"] == "exact")
    update_mask = mask is None and not o["one_shot"] and o["T"] > 0 and run_admm
    # With iters < T the schedule is compressed into the iterations that exist, so the final mask still has
    # the target sparsity (the released code would stop short of it).
    T_eff = min(o["T"], iters)

    Mfull = mask
    if Mfull is None and not update_mask:  # mask only, one-shot: the Wanda score |W_ij| * ||x_j|| at s
        Mfull = masks.select(full_scores(V, None), pattern, s, reference=ref, used=used)
    timer.lap("mask")

    denominator = None
    iters_run = cg_it = 0
    cg_res = None
    if n_live and (run_admm or o["solve"] == "exact"):
        # 2. Damping and right-hand side; 3. one Cholesky, then A^-1 once: at in=out=2048 on this CPU
        # cholesky 0.05 s, cholesky_inverse 0.13 s, one GEMM A^-1 R 0.11 s, one cholesky_solve 0.20 s, so
        # the inverse pays for itself after two iterations (20 iterations: 2.4 s vs 4.0 s).
        Gh = Gl / d[:, None]
        Gh.div_(d[None, :])
        lam = percdamp * float(Gh.diagonal().mean())
        Gh.diagonal().add_(lam)
        B = torch.mm(Gh, V)
        denominator = float(torch.sum(V * B, dtype=torch.float64)) - lam * float(
            torch.sum(V * V, dtype=torch.float64))
        timer.lap("factor")
        M = live_part(Mfull) if Mfull is not None else None
        if run_admm:
            A = Gh
            A.diagonal().add_(rho)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                raise ValueError(f"gram: the scaled, damped Gram + rho*I is not positive definite (Cholesky "
                                 f"failed at column {int(info)}); increase percdamp (got {percdamp}) or rho")
            Ainv = torch.cholesky_inverse(L)
            del L
            if o["solve"] == "exact":
                A.diagonal().sub_(rho)  # back to the damped Gram, for the exact solve
            else:
                del A, Gh  # frees in^2 floats during the loop
            timer.lap("factor")
            step = masks.op("admm_dual_step", dev, ref, used)
            W, U, R = V, torch.zeros_like(V), torch.empty_like(V)  # W takes over V's storage
            # Unstructured masks without dead inputs are selected in the solve's (in, out) layout: a
            # per-layer top-k does not care about layout, and this saves two transposed copies per update
            # (~8 and ~3 ms each at 1024x1024 against a 20-60 ms GEMM). Only exact ties in |W + U| see a
            # different index order than the weight's layout, and |W + U| ties are measure-zero events.
            solve_layout = pattern.kind == "unstructured" and not n_dead
            S = None
            # 4. The iterations: mask from |W + U|, fused dual step, one GEMM.
            for t in range(iters):
                if update_mask and t < T_eff:
                    timer.lap("iterations")
                    s_t = masks.sparsity_at(t, T_eff, s, schedule)
                    if solve_layout:
                        S = torch.add(W, U, out=S if S is not None else torch.empty_like(W)).abs_()
                        M = masks.select(S, pattern, s_t, reference=ref, used=used)
                    else:
                        S = full_scores(W, U, S)
                        Mfull = masks.select(S, pattern, s_t, reference=ref, used=used)
                        M = live_part(Mfull)
                    timer.lap("mask")
                step(W, U, M, B, rho, R)
                torch.mm(Ainv, R, out=W)
                iters_run += 1
            del Ainv, R, S
            if update_mask and solve_layout:
                Mfull = M.T.contiguous()
            # 5. Z = (W + U) ⊙ M: exactly sparse.
            Z = (W + U).masked_fill_(~M, 0)
            timer.lap("iterations")
        else:
            Z = V.masked_fill(~M, 0)
        if o["solve"] == "exact":
            Z, cg_it, cg_res = _cg(Gh, B, M, Z, o["cg_iters"], o["cg_tol"])
            Z.masked_fill_(~M, 0)
            timer.lap("exact")
        if n_dead:
            out = torch.empty(out_f, in_f, dtype=cd, device=dev)
            out[:, live_idx] = (Z / d[:, None]).T
            dead_idx = torch.nonzero(dead).squeeze(1)
            # Dead inputs never reach the output: kept ones (only when the budget prunes fewer than all of
            # them) keep their original weight, since the data says nothing about them.
            out[:, dead_idx] = Wc[:, dead_idx].masked_fill(~Mfull[:, dead_idx], 0)
        else:
            out = (Z / d[:, None]).T
        pruned = out.to(weight.dtype).contiguous()  # row-major (out, in), whatever the solve layout
    else:  # mask only (iters = 0), or no live input at all
        pruned = weight.masked_fill(~Mfull, 0)
    timer.lap("output")
    stats = {
        "iterations": iters_run,
        "mask_updates": min(T_eff, iters_run) if update_mask else 0,
        "rho": rho, "percdamp": percdamp, "schedule": schedule, "one_shot": o["one_shot"],
        "solve": o["solve"], "dead_inputs": n_dead, "seconds": timer.seconds, "backends": used,
    }
    if o["solve"] == "exact":
        stats["cg_iterations"], stats["cg_residual"] = cg_it, cg_res
    return pruned, Mfull, stats, denominator


# --- the public entry point -----------------------------------------------------------------------------

def _dispatch(method: str):
    if method == "admm":
        return admm_prune
    from .baselines import magnitude, sparsegpt, wanda

    return {"sparsegpt": sparsegpt.prune, "wanda": wanda.prune, "magnitude": magnitude.prune}[method]


@torch.no_grad()  # weights are often nn.Parameters: no autograd graph, and out= GEMMs need it off
def prune_layer(weight: torch.Tensor, gram: torch.Tensor, sparsity: float = 0.5,
                pattern: str = "unstructured", method: str = "admm", mask: torch.Tensor | None = None,
                **options) -> PruneResult:
    """Prune one linear layer's weight (out, in) given its Gram matrix G = Σ xᵀx (in, in).

    sparsity: fraction pruned in [0, 1) (ignored by N:M patterns, whose sparsity is 1 - N/M);
    pattern: "unstructured" (per layer) | "per-row" | "N:M"; method: "admm" | "sparsegpt" | "wanda" |
    "magnitude"; mask: bool (out, in), True = kept: update-only on exactly this mask (returned unchanged).
    options (admm): rho=1, iters=20, T=15, percdamp=0.1, schedule ("constant" for unstructured, "cubic"
    otherwise), one_shot=False, solve ("admm" | "exact": conjugate gradient on the final mask), cg_iters,
    cg_tol, compute_dtype (torch.float32 | torch.float64). Baselines: see admm_kernels/baselines.
    Inputs are never modified; the result's weight has weight's dtype and device.
    """
    t0 = time.perf_counter()
    w = check_weight(weight)
    out_f, in_f = w.shape
    meth = check_method(method)
    g = check_gram(gram, in_f)
    s = check_sparsity(sparsity)
    pat = parse_pattern(pattern, in_f)
    if bool((g.diagonal() < 0).any()):
        j = int(torch.nonzero(g.diagonal() < 0)[0])
        raise ValueError(f"gram has a negative diagonal entry (gram[{j}, {j}] = {float(g[j, j])}); "
                         "a Gram matrix is positive semi-definite")
    mk = check_mask(mask, w.shape, w.device) if mask is not None else None
    G = g.to(w.device)
    pruned, kept, stats, denominator = (_dispatch(meth)(w, G, pat, s, mk, **options) + (None,))[:4]
    te = time.perf_counter()
    error = _relative_error(w, pruned, G, denominator)
    seconds = stats.setdefault("seconds", {})
    seconds["error"] = time.perf_counter() - te
    seconds["total"] = time.perf_counter() - t0
    if mk is not None:
        kept = mk.clone()
    stats.update({
        "method": meth, "pattern": str(pat), "shape": (out_f, in_f),
        "dtype": str(w.dtype).replace("torch.", ""),
        "target_sparsity": pat.sparsity(s), "sparsity": 1.0 - float(kept.sum()) / kept.numel(),
        "zeros": float((pruned == 0).sum()) / pruned.numel(), "update_only": mk is not None,
    })
    return PruneResult(pruned, kept, error, stats)


__all__ = ["PruneResult", "prune_layer", "reconstruction_error", "admm_prune"]
