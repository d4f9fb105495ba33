"""The layer entry point: `prune_layer` (validation, then the method registry), `PruneResult`, and
`reconstruction_error`. The methods themselves live in admm_kernels/methods/ (one module each).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import methods as registry
from ._checks import check_gram, check_mask, check_sparsity, check_weight
from .methods import ranges
from .methods.error import relative_error
from .patterns import parse_pattern


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


class _Default(float):
    """The default of an argument that was not given (a float, so it works as the value): prune_layer
    tells an explicit sparsity / pattern, which a mask must satisfy, from the default."""


class _DefaultPattern(str):
    """The default pattern, told apart from an explicit "unstructured" the same way."""


DEFAULT_SPARSITY = _Default(0.5)
DEFAULT_PATTERN = _DefaultPattern("unstructured")


def _check_mask_fits(mask: torch.Tensor, pat, sparsity: float, explicit_sparsity: bool,
                     explicit_pattern: bool) -> None:
    """ValueError when an explicitly given sparsity or pattern is not what `mask` prunes: the result would
    carry the mask's sparsity and pattern while the call (and its stats) said another."""
    rows, cols = mask.shape
    pruned = ~mask

    def counts(n: int) -> set[int]:  # the prune count of n entries at `sparsity`, rounded either way
        return {math.floor(n * sparsity), math.ceil(n * sparsity)}

    if pat.kind == "nm":
        kept = mask.reshape(rows, cols // pat.m, pat.m).sum(dim=2)
        if bool((kept > pat.n).any()):
            r, group = (int(i) for i in torch.nonzero(kept > pat.n)[0])
            raise ValueError(f"mask does not satisfy pattern '{pat}': row {r} keeps {int(kept[r, group])} "
                             f"of the {pat.m} inputs {group * pat.m}..{group * pat.m + pat.m - 1}, more than "
                             f"{pat.n}; pass a {pat} mask, or no pattern to prune on the mask as it is")
        return
    if pat.kind == "per-row":
        per_row = pruned.sum(dim=1)
        want = counts(cols) if explicit_sparsity else {int(per_row[0])}
        bad = [int(c) for c in per_row.unique() if int(c) not in want]
        if explicit_pattern and bad:
            raise ValueError("mask does not satisfy pattern 'per-row'"
                             + (f" at sparsity {sparsity:g}" if explicit_sparsity else "")
                             + f": its rows prune {sorted(int(c) for c in per_row.unique())} of {cols} inputs"
                             + (f", expected {sorted(want)}" if explicit_sparsity else ", not one count"))
        if explicit_pattern:
            return
    if explicit_sparsity and int(pruned.sum()) not in counts(mask.numel()):
        raise ValueError(f"mask prunes {int(pruned.sum())} of {mask.numel()} weights (sparsity "
                         f"{int(pruned.sum()) / mask.numel():.4g}), not the sparsity {sparsity:g} given; "
                         "give the mask's own sparsity, or no sparsity with a mask")


def result_summary(meth, preset, options: dict, pattern, weight: torch.Tensor, pruned: torch.Tensor,
                   kept: torch.Tensor, target: float, update_only: bool, rescaled: dict | None) -> dict:
    """The stats entries every PruneResult carries besides the method's own (prune_layer and
    batched.prune_experts): what ran, the shapes and dtype, the target and the achieved sparsity."""
    return {
        "method": meth.name, "preset": meth.check_preset(preset), "options": _recorded(options),
        "pattern": str(pattern), "shape": tuple(weight.shape),
        "dtype": str(weight.dtype).replace("torch.", ""),
        "target_sparsity": target, "sparsity": 1.0 - float(kept.sum()) / kept.numel(),
        "zeros": float((pruned == 0).sum()) / pruned.numel(), "update_only": update_only,
        "rescaled": rescaled,
    }


@torch.no_grad()  # weights are often nn.Parameters: no autograd graph, and out= GEMMs need it off
def prune_layer(weight: torch.Tensor, gram: torch.Tensor, sparsity: float = DEFAULT_SPARSITY,
                pattern: str = DEFAULT_PATTERN, method: str = "admm", mask: torch.Tensor | None = None,
                preset: str | None = None, heldout_gram: torch.Tensor | None = None,
                **options) -> PruneResult:
    """Prune one linear layer's weight (out, in) given its Gram matrix G = Σ xᵀx (in, in).

    sparsity: fraction pruned in [0, 1) (default 0.5; ignored by N:M patterns, whose sparsity is
    1 - N/M); 0 returns the weight unchanged (bit-identical), as does any call in which nothing is
    pruned; pattern: "unstructured" (per layer, the default) | "per-row" | "N:M"; method: a registered name
    (admm_kernels.methods: "admm" | "sparsegpt" | "wanda" | "magnitude" | "alps"); mask: bool (out, in),
    True = kept: update-only on exactly this mask (returned unchanged). A sparsity or pattern given with
    a mask must be what the mask prunes (ValueError otherwise: an N:M pattern keeps at most N of each
    group, per-row prunes the same count in every row, a sparsity s prunes floor or ceil of s x the
    entries, per row for per-row); without them the stats record the mask's own sparsity
    ("target_sparsity"). preset: None (the method's defaults) or one of the method's presets;
    options: the method's keyword options (they override the preset's), e.g. for admm: rho=1, iters=20,
    T=15, percdamp=0.1, schedule ("constant" for unstructured, "cubic" otherwise), one_shot=False, solve
    ("admm" | "exact": conjugate gradient on the final mask), cg_iters, cg_tol, compute_dtype
    (torch.float32 | torch.float64); iteration counts are bounded (_checks.MAX_ITERATIONS). Inputs are
    never modified; the result's weight has weight's dtype and device. heldout_gram: the Gram (in, in)
    of inputs the solve did not see (other text, or windows held out of the calibration): the error on
    it, the out-of-sample error, is stats["heldout_error"] (res.error is in-sample: measured on the Gram
    the layer was fitted to).
    """
    t0 = time.perf_counter()
    w = check_weight(weight)
    in_f = w.shape[1]
    meth = registry.get(method)
    g = check_gram(gram, in_f)
    h = check_gram(heldout_gram, in_f, "heldout_gram") if heldout_gram is not None else None
    s = check_sparsity(sparsity)
    pat = parse_pattern(pattern, in_f)
    if bool((g.diagonal() < 0).any()):
        j = int(torch.nonzero(g.diagonal() < 0)[0])
        raise ValueError(f"gram has a negative diagonal entry (gram[{j}, {j}] = {float(g[j, j])}); "
                         "a Gram matrix is positive semi-definite")
    mk = check_mask(mask, w.shape, w.device) if mask is not None else None
    if mk is not None:
        _check_mask_fits(mk, pat, s, not isinstance(sparsity, _Default),
                         not isinstance(pattern, _DefaultPattern))
    # without an explicit sparsity, a mask's own sparsity is the target recorded in the stats
    target = pat.sparsity(s if mk is None or not isinstance(sparsity, _Default)
                          else 1.0 - float(mk.sum()) / mk.numel())
    opts = meth.resolve(preset, options)
    G = g.to(w.device)
    # Extreme (finite) weights and Grams are solved on exact power-of-two rescalings (methods.ranges).
    w_run, w_exp = ranges.normalise_weight(w)
    G_run, g_exp = ranges.normalise_gram(G)
    res = meth.run(w_run, G_run, pat, s, mk, opts)
    pruned, kept, stats = res.weight, res.mask, res.stats
    if w_exp:
        pruned = ranges.finite_cast(pruned, w.dtype, w_exp, stats)
    if mk is not None:
        kept = mk.clone()
    if bool(kept.all()):
        # Nothing pruned: W itself is the exact optimum (zero error); a solver's round-off (~1e-6 from
        # ADMM) must not change a layer the user asked to keep dense (sparsity 0).
        pruned = w.clone()
    te = time.perf_counter()
    error = relative_error(w, pruned, G, None if (w_exp or g_exp) else res.denominator)
    if h is not None:
        stats["heldout_error"] = relative_error(w, pruned, h.to(w.device))
    seconds = stats.setdefault("seconds", {})
    seconds["error"] = time.perf_counter() - te
    seconds["total"] = time.perf_counter() - t0
    stats.update(result_summary(meth, preset, opts, pat, w, pruned, kept, target, mk is not None,
                                {"weight_exponent": w_exp, "gram_exponent": g_exp} if (w_exp or g_exp)
                                else None))
    return PruneResult(pruned, kept, error, stats)


__all__ = ["PruneResult", "prune_layer", "reconstruction_error"]
