"""The layer entry point: `prune_layer` (validation, then the method registry), `PruneResult`, and
`reconstruction_error`. The methods themselves live in admm_kernels/methods/ (one module each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import methods as registry
from ._checks import check_gram, check_mask, check_sparsity, check_weight, parse_pattern
from .methods import ranges
from .methods.error import relative_error


@dataclass
class PruneResult:
    """weight: pruned (out, in), same dtype/device as the input; mask: bool (out, in), True = kept;
    error: relative reconstruction error tr(ΔGΔᵀ)/tr(WGWᵀ) (float64); stats: timings, counts, backends,
    the method's options that ran ("options") and the preset ("preset")."""

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative reconstruction error tr((W-W')G(W-W')^T) / tr(W G W^T) as a Python float (float64).

    weight, pruned: (out, in), any float dtypes, same shape; gram: (in, in) symmetric. Computed in fp64
    (fp32 GEMMs with fp64 sums for large layers on the CPU, see methods.error._FP64_ERROR_MACS).
    """
    w = check_weight(weight, "weight")
    p = check_weight(pruned, "pruned")
    if p.shape != w.shape:
        raise ValueError(f"shape mismatch: pruned has shape {tuple(p.shape)}, weight has {tuple(w.shape)}")
    g = check_gram(gram, w.shape[1]).to(w.device)
    return relative_error(w, p.to(w.device), g)


def _recorded(options: dict) -> dict:
    """The options that ran, JSON-friendly (dtypes as their names)."""
    return {k: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v for k, v in options.items()}


@torch.no_grad()  # weights are often nn.Parameters: no autograd graph, and out= GEMMs need it off
def prune_layer(weight: torch.Tensor, gram: torch.Tensor, sparsity: float = 0.5,
                pattern: str = "unstructured", method: str = "admm", mask: torch.Tensor | None = None,
                preset: str | None = None, **options) -> PruneResult:
    """Prune one linear layer's weight (out, in) given its Gram matrix G = Σ xᵀx (in, in).

    sparsity: fraction pruned in [0, 1) (ignored by N:M patterns, whose sparsity is 1 - N/M);
    pattern: "unstructured" (per layer) | "per-row" | "N:M"; method: a registered name
    (admm_kernels.methods: "admm" | "sparsegpt" | "wanda" | "magnitude" | "alps"); mask: bool (out, in),
    True = kept: update-only on exactly this mask (returned unchanged); preset: None (the method's
    defaults) or one of the method's presets; options: the method's keyword options (they override the
    preset's), e.g. for admm: rho=1, iters=20, T=15, percdamp=0.1, schedule ("constant" for unstructured,
    "cubic" otherwise), one_shot=False, solve ("admm" | "exact": conjugate gradient on the final mask),
    cg_iters, cg_tol, compute_dtype (torch.float32 | torch.float64). Inputs are never modified; the
    result's weight has weight's dtype and device.
    """
    t0 = time.perf_counter()
    w = check_weight(weight)
    out_f, in_f = w.shape
    meth = registry.get(method)
    g = check_gram(gram, in_f)
    s = check_sparsity(sparsity)
    pat = parse_pattern(pattern, in_f)
    if bool((g.diagonal() < 0).any()):
        j = int(torch.nonzero(g.diagonal() < 0)[0])
        raise ValueError(f"gram has a negative diagonal entry (gram[{j}, {j}] = {float(g[j, j])}); "
                         "a Gram matrix is positive semi-definite")
    mk = check_mask(mask, w.shape, w.device) if mask is not None else None
    opts = meth.resolve(preset, options)
    G = g.to(w.device)
    # Extreme (finite) weights and Grams are solved on exact power-of-two rescalings (methods.ranges).
    w_run, w_exp = ranges.normalise_weight(w)
    G_run, g_exp = ranges.normalise_gram(G)
    res = meth.run(w_run, G_run, pat, s, mk, opts)
    pruned, kept, stats = res.weight, res.mask, res.stats
    if w_exp:
        pruned = ranges.finite_cast(pruned, w.dtype, w_exp, stats)
    te = time.perf_counter()
    error = relative_error(w, pruned, G, None if (w_exp or g_exp) else res.denominator)
    seconds = stats.setdefault("seconds", {})
    seconds["error"] = time.perf_counter() - te
    seconds["total"] = time.perf_counter() - t0
    if mk is not None:
        kept = mk.clone()
    stats.update({
        "method": meth.name, "preset": meth.check_preset(preset), "options": _recorded(opts),
        "pattern": str(pat), "shape": (out_f, in_f), "dtype": str(w.dtype).replace("torch.", ""),
        "target_sparsity": pat.sparsity(s), "sparsity": 1.0 - float(kept.sum()) / kept.numel(),
        "zeros": float((pruned == 0).sum()) / pruned.numel(), "update_only": mk is not None,
        "rescaled": {"weight_exponent": w_exp, "gram_exponent": g_exp} if (w_exp or g_exp) else None,
    })
    return PruneResult(pruned, kept, error, stats)


__all__ = ["PruneResult", "prune_layer", "reconstruction_error"]
