"""Layer-level benchmark rows: one method at one pattern and sparsity on one real layer.

Each row records the relative reconstruction error tr(ΔGΔᵀ)/tr(WGWᵀ), the method's seconds (prune_layer's
total minus its error evaluation), the achieved sparsity, a SHA-256 of the mask (reproducibility checks),
and for ADMM variants the roofline figures of its kernels: the iteration loop's GFLOP/s (2·in²·out FLOPs
per iteration over the "iterations" phase: the fused dual step plus one GEMM) and the mask selection's
GB/s, each also as a fraction of the machine's measured matmul throughput / copy bandwidth.

The gap to the optimum: on the method's own mask, the exact least-squares optimum is, per row w,
w*_S = G_SS⁻¹ (G w)_S (S = kept inputs), solved in fp64 (Cholesky, least squares where G_SS is singular).
Since the method's output is zero off the mask too, error = optimum_error + gap with
gap = tr((W'−W*) G (W'−W*)ᵀ)/tr(WGWᵀ) ≥ 0 (Pythagoras), computed directly so it is exact to fp64.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ..patterns import parse_pattern
from .methods import MethodSpec

# Row-solve batches are cut so the gathered (rows, k, k) fp64 systems stay under ~256 MB.
_SOLVE_BYTES = 256 * 2**20
# Bytes per element and mask update of ADMM's mask selection: read W and U (fp32), write the score, read
# it back in the top-k / threshold pass, write the bool mask.
MASK_BYTES_PER_ELEMENT = 4 + 4 + 4 + 4 + 1


def _quad(A: torch.Tensor, G: torch.Tensor) -> float:
    """tr(A G Aᵀ) in fp64 for A (rows, in) fp64, G (in, in) fp64, in row chunks."""
    chunk = max(1, _SOLVE_BYTES // (8 * A.shape[1]))
    return sum(float(torch.sum(torch.mm(A[i:i + chunk], G) * A[i:i + chunk]))
               for i in range(0, A.shape[0], chunk))


@torch.no_grad()
def exact_optimum(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The least-squares optimum on a fixed mask, fp64 (out, in): per row, argmin over w' supported on
    the row's kept inputs of (w − w') G (w − w')ᵀ. weight (out, in), gram (in, in), mask bool (out, in).
    Rows with the same kept count are solved as one batch."""
    W = weight.detach().to(torch.float64)
    G = gram.detach().to(W.device, torch.float64)
    M = mask.to(W.device)
    rhs = torch.mm(W, G)  # row i: (G w_i)ᵀ, G symmetric
    out = torch.zeros_like(W)
    counts = M.sum(1)
    for k in torch.unique(counts).tolist():
        if k == 0:
            continue
        rows = torch.nonzero(counts == k).squeeze(1)
        step = max(1, _SOLVE_BYTES // (8 * k * k))
        for start in range(0, rows.numel(), step):
            r = rows[start:start + step]
            idx = torch.nonzero(M[r])[:, 1].view(r.numel(), k)  # kept inputs per row, ascending
            A = G[idx[:, :, None], idx[:, None, :]]
            b = torch.gather(rhs[r], 1, idx)
            L, info = torch.linalg.cholesky_ex(A)
            x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
            bad = torch.nonzero(info != 0).squeeze(1)
            for i in bad.tolist():  # singular G_SS (dead or dependent inputs): minimum-norm least squares
                drv = "gelsd" if A.device.type == "cpu" else None
                x[i] = torch.linalg.lstsq(A[i], b[i].unsqueeze(-1), driver=drv).solution.squeeze(-1)
            out[r] = out[r].scatter(1, idx, x)
    return out


def gap_to_optimum(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor,
                   mask: torch.Tensor) -> dict:
    """{"optimum_error", "gap", "gap_seconds"}: the optimum's relative error on `mask` and the pruned
    weight's excess over it (both relative to tr(WGWᵀ), fp64)."""
    t = time.perf_counter()
    W = weight.detach().to(torch.float64)
    G = gram.detach().to(W.device, torch.float64)
    opt = exact_optimum(W, G, mask)
    den = _quad(W, G)
    if den <= 0:
        return {"optimum_error": 0.0, "gap": 0.0, "gap_seconds": time.perf_counter() - t}
    P = pruned.detach().to(W.device, torch.float64).masked_fill(~mask.to(W.device), 0.0)
    return {"optimum_error": max(_quad(W - opt, G), 0.0) / den, "gap": max(_quad(P - opt, G), 0.0) / den,
            "gap_seconds": time.perf_counter() - t}


def mask_digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.detach().to("cpu", torch.bool).contiguous().numpy().tobytes()).hexdigest()


def row_sparsities(pattern: str, sparsities: list[float]) -> list[float]:
    """The sparsities a pattern is run at: N:M fixes its own (1 − N/M), others take the list."""
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return [1.0 - n / m]
    return list(sparsities)


def check_patterns(shapes: dict[str, tuple[int, int]], patterns: list[str]) -> None:
    """Every pattern must fit every layer ((out, in) per name); ValueError naming both otherwise."""
    for p in patterns:
        for name, (out_f, in_f) in shapes.items():
            try:
                parse_pattern(p, in_f, name="--patterns")
            except ValueError as exc:
                raise ValueError(f"{exc} (layer {name}, weight {out_f}x{in_f}); select other layers with "
                                 "--layers or drop the pattern") from None


def check_methods(specs: list[MethodSpec]) -> None:
    """Run every spec once on a tiny random layer so an unknown option fails before any real work."""
    from ..prune import prune_layer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    w = torch.randn(4, 8, generator=g)
    for spec in specs:
        try:
            prune_layer(w, x.T @ x, 0.5, "unstructured", method=spec.method, **spec.options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--methods {spec.label!r}: {exc}") from None


@dataclass(frozen=True)
class RowExtras:
    """What a row measures beyond error, time and sparsity. peaks: machine.measure()'s figures (the
    roofline fractions); gap: the exact-optimum gap (fp64 row solves); heldout: the layer's Gram on
    held-out text (in, in) on the compute device, for the out-of-sample "heldout_error"."""

    peaks: dict | None = None
    gap: bool = False
    heldout: torch.Tensor | None = None


def _admm_roofline(res, shape: tuple[int, int], peaks: dict | None) -> dict:
    """An ADMM row's kernel figures: the iteration loop's GFLOP/s, the mask selection's GB/s, and their
    fractions of the machine's peaks."""
    out_f, in_f = shape
    sec = res.stats.get("seconds", {})
    fig = {}
    live = in_f - int(res.stats.get("dead_inputs", 0))
    it_s, n_it = sec.get("iterations", 0.0), int(res.stats.get("iterations") or 0)
    if n_it and it_s > 0:
        fig["gflops"] = 2.0 * live * live * out_f * n_it / it_s / 1e9
    n_upd = int(res.stats.get("mask_updates") or 0) or 1  # mask-only / one-shot select once
    if sec.get("mask", 0.0) > 0:
        fig["mask_gbps"] = MASK_BYTES_PER_ELEMENT * out_f * in_f * n_upd / sec["mask"] / 1e9
    if peaks:
        if "gflops" in fig:
            fig["frac_matmul"] = fig["gflops"] / peaks["matmul_gflops"]
        if "mask_gbps" in fig:
            fig["frac_copy"] = fig["mask_gbps"] / peaks["copy_gbps"]
    return fig


def run_row(weight: torch.Tensor, gram: torch.Tensor, spec: MethodSpec, pattern: str, sparsity: float,
            extras: RowExtras = RowExtras()) -> dict:
    """Prune one layer with one method; return the row's figures (no layer/model identification).

    weight (out, in) and gram (in, in) on the compute device; extras: the roofline peaks, the gap to the
    optimum and the held-out Gram, when wanted."""
    from ..prune import prune_layer

    res = prune_layer(weight, gram, sparsity, pattern, method=spec.method, heldout_gram=extras.heldout,
                      **spec.options)
    sec = res.stats.get("seconds", {})
    row = {
        "error": float(res.error),
        "heldout_error": res.stats.get("heldout_error"),
        "seconds": max(sec.get("total", 0.0) - sec.get("error", 0.0), 0.0),
        "error_seconds": sec.get("error", 0.0),
        "target_sparsity": float(res.stats["target_sparsity"]),
        "achieved_sparsity": float(res.stats["sparsity"]),
        "mask_sha256": mask_digest(res.mask),
        "optimum_error": None, "gap": None, "gap_seconds": None,
        "iterations": res.stats.get("iterations"),
        "gflops": None, "frac_matmul": None, "mask_gbps": None, "frac_copy": None,
        "backends": ";".join(f"{k}={v}" for k, v in sorted((res.stats.get("backends") or {}).items())),
    }
    if spec.is_admm:
        row.update(_admm_roofline(res, tuple(weight.shape), extras.peaks))
    if extras.gap:
        row.update(gap_to_optimum(weight, res.weight, gram, res.mask))
    return row
