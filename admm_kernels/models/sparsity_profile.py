"""How sparse each decoder block is pruned: one target for every block ("uniform", the default), a
per-block list given by the user, or OWL's outlier-weighted allocation (admm_kernels.models.owl).

`check_profile` validates the request before any work (it needs only the number of blocks and the
pattern) and returns it as plain data (`ProfileRequest`); `owl.resolve_profile` turns it into the
`BlockSparsity` the pipeline asks, block by block (`of(b)`), and records in its report and resume
fingerprint. This module runs no model: owl.py, which does, builds on it and not the other way round.

Averages: a target sparsity s means that the model's selected linear weights are pruned to s overall,
so a non-uniform profile is centred on s with weights = the number of selected weights of each block
(Σ_b n_b s_b = s Σ_b n_b). OWL's released code centres on the plain mean over blocks; the two agree
whenever the blocks are equal in size (LLaMA, SmolLM2 and every model of the test suite), and only the
weighted mean keeps the overall sparsity at the target when they are not (a `layers` filter, or models
whose blocks differ).

N:M patterns fix every layer at 1 - N/M, so a profile cannot act there: "owl" and per-block lists are
refused with an N:M pattern (OWL's authors also published a mixed-N:M variant that rounds the
allocation to integer N per block; it is not implemented here).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._checks import check_float, check_sparsity
from ..errors import ArgumentError, ArgumentTypeError, about

PROFILES = ("uniform", "owl")

# OWL's published hyper-parameters (Yin et al. 2024, ICML; README and run script of the authors'
# released code for LLaMA-7B at 70 % unstructured, Wanda and SparseGPT alike): a weight is an outlier
# when its Wanda score exceeds M = 5 times its block's mean score; the block sparsities span 2λ around
# the target with λ = 0.08 (s_b in [s - 2λ, s + 2λ], max - min = 2λ).
OWL_M = 5.0
OWL_LAMBDA = 0.08


@dataclass(frozen=True)
class BlockSparsity:
    """The sparsity of every decoder block of one run: the one place the pipeline asks (`of(b)`).

    values[b] in [0, 1) for each of the model's blocks (blocks with no selected layer hold the target
    and prune nothing). target: the parameter-weighted mean over the blocks with selected layers.
    details: JSON-able facts of the profile (OWL: m, lambda, outlier_ratios)."""

    profile: str
    values: tuple[float, ...]
    target: float
    details: dict = field(default_factory=dict)

    def of(self, block: int) -> float:
        """The sparsity of block `block` (0-based)."""
        return self.values[block]

    def report(self) -> dict:
        """JSON-able: name, target, block_sparsity (and OWL's owl_m, owl_lambda, outlier_ratios)."""
        return {"name": self.profile, "target": self.target, "block_sparsity": list(self.values),
                **self.details}

    def fingerprint(self) -> dict:
        """What a resumed run must repeat: the profile's name, settings and every block's sparsity (the
        outlier ratios follow from the model and calibration, fingerprinted on their own)."""
        return {k: v for k, v in self.report().items() if k not in ("target", "outlier_ratios")}


@dataclass(frozen=True)
class ProfileRequest:
    """A validated sparsity request, before any model pass (made by check_profile): plain data.
    admm_kernels.models.owl.resolve_profile turns it into the run's BlockSparsity (OWL needs the model).

    name: "uniform" | "owl" | "list"; n_blocks: the model's decoder blocks; target: the requested
    overall sparsity (None for "list", whose target is its weighted mean); values: the user's list."""

    name: str
    n_blocks: int
    target: float | None
    values: tuple[float, ...] | None = None
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA

    def planned(self) -> tuple[float, ...]:
        """The block sparsities known before any pass (OWL: the target, until its pre-pass has run)."""
        return self.values if self.values is not None else (self.target,) * self.n_blocks


def _check_value_list(values: object, n_blocks: int, name: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ArgumentTypeError(f"{name} must be a float or a sequence of {n_blocks} floats (one per block), "
                                f"got {values!r}", name)
    if len(values) != n_blocks:
        raise ArgumentError(f"{name} has {len(values)} per-block values but the model has {n_blocks} "
                            f"decoder blocks: give one value per block", name)
    with about(name):
        return tuple(check_sparsity(v, f"{name}[{i}]") for i, v in enumerate(values))


def check_profile(sparsity: object, sparsity_profile: object, n_blocks: int, pattern: object,
                  owl_m: object = None, owl_lambda: object = None) -> ProfileRequest:
    """Validate prune_model's sparsity arguments; raise admm_kernels.errors.ArgumentError (a ValueError)
    / ArgumentTypeError (a TypeError) whose message and `.argument` name the argument.

    sparsity: a float in [0, 1) (the target), or one float in [0, 1) per decoder block (n_blocks).
    sparsity_profile: "uniform" or "owl" (for a float sparsity). owl_m, owl_lambda: OWL's M (> 0) and
    λ (>= 0, 2λ < 1), only with "owl" (None = the published 5 and 0.08). pattern: prune_layer's
    (only whether it is N:M matters here; its syntax is checked per layer by the pipeline).
    """
    nm_pattern = isinstance(pattern, str) and ":" in pattern
    name = _check_profile_name(sparsity_profile)
    if name != "owl":
        for opt, value in (("owl_m", owl_m), ("owl_lambda", owl_lambda)):
            if value is not None:
                raise ArgumentError(f"{opt}={value!r} is an option of sparsity_profile='owl', got "
                                    f"sparsity_profile={sparsity_profile!r}", opt)
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool):
        if isinstance(sparsity, Sequence) and not isinstance(sparsity, (str, bytes)) and name == "owl":
            raise ArgumentError("sparsity_profile='owl' computes the per-block sparsities from one target: "
                                "pass sparsity as one float, not a per-block list", "sparsity")
        values = _check_value_list(sparsity, n_blocks, "sparsity")
        if nm_pattern:
            raise ArgumentError("a per-block sparsity list cannot apply to an N:M pattern, which prunes "
                                "every layer to 1 - N/M: use an unstructured or per-row pattern", "sparsity")
        return ProfileRequest("list", n_blocks, None, values)
    with about("sparsity"):
        target = check_sparsity(sparsity)
    if name == "uniform":
        return ProfileRequest("uniform", n_blocks, target)
    if nm_pattern:
        raise ArgumentError("sparsity_profile='owl' applies to unstructured and per-row patterns; an N:M "
                            "pattern prunes every layer to 1 - N/M (OWL's mixed-N:M variant is not "
                            "implemented)", "sparsity_profile")
    with about("owl_m"):
        m = OWL_M if owl_m is None else check_float(owl_m, "owl_m", 0.0, strict=True)
    with about("owl_lambda"):
        lam = OWL_LAMBDA if owl_lambda is None else check_float(owl_lambda, "owl_lambda", 0.0)
    if 2 * lam >= 1:
        raise ArgumentError(f"owl_lambda={owl_lambda!r} is too large: the block sparsities span twice "
                            "owl_lambda, which must be < 1 to fit in [0, 1)", "owl_lambda")
    return ProfileRequest("owl", n_blocks, target, owl_m=m, owl_lambda=lam)


def _check_profile_name(sparsity_profile: object) -> str:
    """The profile's name, stripped and lower-cased; ArgumentError / ArgumentTypeError otherwise."""
    if not isinstance(sparsity_profile, str):
        raise ArgumentTypeError(f"sparsity_profile must be a str, one of {PROFILES}, got "
                                f"{sparsity_profile!r}", "sparsity_profile")
    name = sparsity_profile.strip().lower()
    if name not in PROFILES:
        raise ArgumentError(f"unknown sparsity_profile {sparsity_profile!r}; expected one of {PROFILES} "
                            "(pass a per-block list as sparsity=[...])", "sparsity_profile")
    return name


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """Σ w_b v_b / Σ w_b over the blocks with w_b > 0 (0.0 when none has)."""
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights) if w) / total if total else 0.0


def parse_profile_text(text: str, flag: str = "--sparsity-profile") -> str | list[float]:
    """The CLI's profile: "uniform", "owl", comma-separated per-block values ("0.6,0.7,0.8"), or the
    path of a JSON file holding a list of per-block values or an object with a "block_sparsity" list
    (an earlier prune_report.json, or its "sparsity_profile" entry). Raises ValueError naming flag.
    Values are range-checked later, against the model's number of blocks."""
    t = text.strip()
    if t.lower() in PROFILES:
        return t.lower()
    if "," in t or _is_number(t):
        try:
            return [float(v) for v in t.split(",")]
        except ValueError:
            raise ValueError(f"{flag} {text!r}: comma-separated per-block values must all be "
                             "numbers") from None
    path = Path(t).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag} {text!r} is neither {' nor '.join(PROFILES)}, nor comma-separated "
                         "per-block values, nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} file {str(path)!r} is not readable JSON: {exc}") from None
    if isinstance(data, dict):  # a prune_report.json, or its sparsity_profile entry
        data = data.get("sparsity_profile", data)
        data = data.get("block_sparsity") if isinstance(data, dict) else None
    if not isinstance(data, list) or not data or not all(_is_real(v) for v in data):
        raise ValueError(f"{flag} file {str(path)!r} must hold a non-empty JSON list of numbers (one per "
                         "block) or an object with such a 'block_sparsity' list")
    return [float(v) for v in data]


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
