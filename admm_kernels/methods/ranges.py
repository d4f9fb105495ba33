"""Keeping finite inputs finite: power-of-two normalisation of extreme weights and Grams,
and the cast of a method's float32/float64 result to the weight's dtype without overflow.

Every method is linear in the weight (ADMM, ALPS and SparseGPT's updates are linear in W for a given mask,
and every mask score scales with |W|) and invariant to the Gram's overall scale, so prune_layer may solve
on W·2⁻ᵉ and 4⁻ʲ·G and multiply the result back by 2ᵉ. Multiplying by a power of two is exact in binary
floating point (barring underflow to subnormals), so this changes nothing but the range: it is applied
only to weights whose largest |entry| is outside [2^-20, 2^20] and to Grams whose largest diagonal entry
is outside [2^-64, 2^64]. Inside those ranges the float32 solves cannot overflow: with |W| <= 2^20 and
diag G <= 2^64, V = D Wᵀ stays below 2^52 and tr(W G Wᵀ)'s float32 partial sums below 2^118 for
in <= 2^14 (float32's largest finite value is ~2^128). Outside them, |W| = 1e37 in float32 made ADMM
return NaN and SparseGPT's OBS scores w²/d² overflow to inf (its mask then ties; measured error 0.49
against 0.0013 for the same layer at unit scale).
"""

from __future__ import annotations

import math
import warnings

import torch

WEIGHT_RANGE = (2.0 ** -20, 2.0 ** 20)
GRAM_DIAG_RANGE = (2.0 ** -64, 2.0 ** 64)


def pow2_exponent(largest: float, lo: float, hi: float, even: bool = False) -> int:
    """The exponent e such that largest·2⁻ᵉ lies in [0.5, 1) (e rounded up to even when `even`: a Gram
    scaled by 4⁻ʲ keeps sqrt exact), or 0 when `largest` is already in [lo, hi] or is zero."""
    if largest == 0.0 or lo <= largest <= hi:
        return 0
    e = math.frexp(largest)[1]
    return e + (e % 2) if even else e


def _times_pow2(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """x·2^exponent computed in float64 (exact; 2^±128 is not a float32 number), in float64."""
    return x.to(torch.float64) * (2.0 ** exponent)


def normalise_weight(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(w·2⁻ᵉ, e): the weight scaled exactly so its largest |entry| is in [0.5, 1), or (w, 0) when it is in
    WEIGHT_RANGE already. A new tensor in w's dtype when scaled."""
    e = pow2_exponent(float(w.abs().max()), *WEIGHT_RANGE)
    return (w if e == 0 else _times_pow2(w, -e).to(w.dtype)), e


def normalise_gram(G: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(G·2⁻ᵉ, e) with e even, or (G, 0) when its largest diagonal entry is in GRAM_DIAG_RANGE already."""
    e = pow2_exponent(float(G.diagonal().abs().max()), *GRAM_DIAG_RANGE, even=True)
    return (G if e == 0 else _times_pow2(G, -e).to(G.dtype)), e


def finite_cast(x: torch.Tensor, dtype: torch.dtype, exponent: int = 0, stats: dict | None = None,
                name: str = "weight") -> torch.Tensor:
    """x·2^exponent cast to `dtype` as a contiguous tensor; entries beyond dtype's finite range are clamped
    to ±its largest value (the nearest representable weight; counted in stats["clamped"], one warning).
    A NaN (a method failing on finite inputs) raises ValueError naming `name` instead of being returned."""
    if exponent:
        x = _times_pow2(x, exponent)
    if bool(torch.isnan(x).any()):
        raise ValueError(f"pruning {name} produced NaN from finite inputs ({int(torch.isnan(x).sum())} "
                         "entries); please report this with the layer's weight and Gram")
    limit = torch.finfo(dtype).max
    over = x.abs() > limit
    n_over = int(over.sum())
    if n_over:
        x = torch.where(over, torch.copysign(torch.full_like(x, limit), x), x)
        warnings.warn(f"{n_over} pruned {name} entries exceed the largest finite "
                      f"{str(dtype).replace('torch.', '')} ({limit:g}) and were clamped to it; the reported "
                      "error is that of the clamped weight", RuntimeWarning, stacklevel=3)
    if stats is not None:
        stats["clamped"] = stats.get("clamped", 0) + n_over
    return x.to(dtype).contiguous()
