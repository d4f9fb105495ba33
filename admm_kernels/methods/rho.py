"""The support-driven penalty rule shared by ALPS and ADMM's "support" ρ schedule.

Every few iterations the number of mask entries that changed since the previous check, s, is compared
with the kept count k: a support still moving a lot means ρ may grow fast, a settling one slowly, and a
frozen one not at all (ALPS, Meng et al. 2024: s > 0.1k → the large factor, s > 0.005k → the medium one,
s ≥ 1 → the small one). Growing ρ as the support settles lets the mask move freely while ρ is small and
forces W and Z together once it has found its place.
"""

from __future__ import annotations

from .._checks import check_float

# Support-change thresholds, as fractions of the kept count k (the released ALPS code's).
LARGE_CHANGE = 0.1
MEDIUM_CHANGE = 0.005


def check_growth(v: object, name: str = "rho_growth") -> tuple[float, float, float]:
    """(×large, ×medium, ×small): the ρ factors for support changes > 0.1k, > 0.005k and ≥ 1, each > 1."""
    if not isinstance(v, (tuple, list)) or len(v) != 3:
        raise TypeError(f"{name} must be a tuple of 3 floats (for large, medium, small support changes), "
                        f"got {v!r}")
    return tuple(check_float(x, name, 1.0, strict=True) for x in v)


def change_class(change: int, kept: int) -> str:
    """'large', 'medium', 'small' or 'none': how much the support moved (change entries of kept)."""
    frac = change / max(1, kept)
    if frac > LARGE_CHANGE:
        return "large"
    if frac > MEDIUM_CHANGE:
        return "medium"
    return "small" if change >= 1 else "none"


def growth_factor(change: int, kept: int, growth: tuple[float, float, float]) -> float:
    """The factor ρ is multiplied by after a check that saw `change` of `kept` entries move (1 when none)."""
    large, medium, small = growth
    return {"large": large, "medium": medium, "small": small, "none": 1.0}[change_class(change, kept)]
