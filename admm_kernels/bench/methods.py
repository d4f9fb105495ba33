"""Method specs of the benchmark: a label -> (prune_layer method, options).

Grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``admm-grad``, ``sparsegpt:blocksize=64``,
``admm:iters=5``. Names:
    magnitude, wanda, sparsegpt   the baselines
    admm, admm-grad               ADMM-Grad with the released code's defaults (gradual mask, 20 iterations)
    admm-oneshot                  one-shot: the Wanda-score mask fixed at t = 0, then the ADMM update
    admm-mask                     mask only (iters = 0): the ADMM-Grad score at t = 0, no update
    admm-exact                    ADMM-Grad then an exact (conjugate-gradient) solve on its final mask
Values are parsed as `admm-prune prune -o` parses them (admm_kernels.cli.parse_option_value: a torch
dtype for *dtype keys, int, float, true/false/none, else text). The label of a row is the spec as written,
so ``admm:iters=5`` and ``admm:iters=50`` are separate curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._checks import METHODS
from ..cli import parse_option_value

ALIASES: dict[str, tuple[str, dict]] = {
    "magnitude": ("magnitude", {}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "admm": ("admm", {}),
    "admm-grad": ("admm", {}),
    "admm-oneshot": ("admm", {"one_shot": True}),
    "admm-mask": ("admm", {"iters": 0}),
    "admm-exact": ("admm", {"solve": "exact"}),
}
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt", "admm-oneshot", "admm-grad")


@dataclass(frozen=True)
class MethodSpec:
    """label: the spec as written; method: prune_layer's method; options: its keyword options."""

    label: str
    method: str
    options: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def is_admm(self) -> bool:
        return self.method == "admm"

    @property
    def iterates(self) -> bool:
        """True when ADMM iterations run (not mask-only)."""
        return self.is_admm and self.options.get("iters", 20) > 0


def parse_method(spec: str, name: str = "--methods") -> MethodSpec:
    """Parse one method spec; ValueError naming `name` and the spec on a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{name}: empty method spec in {spec!r}")
    label = spec.strip()
    base, _, tail = label.partition(":")
    base = base.strip().lower()
    if base not in ALIASES:
        raise ValueError(f"{name}: unknown method {base!r} in {label!r}; expected one of "
                         f"{', '.join(ALIASES)} (optionally with :key=value,... options)")
    method, options = ALIASES[base]
    options = dict(options)
    for item in filter(None, (t.strip() for t in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{name}: option {item!r} in {label!r} is not KEY=VALUE")
        try:
            options[key.strip()] = parse_option_value(key.strip(), value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} in {label!r}") from None
    assert method in METHODS
    return MethodSpec(label, method, options)


def parse_methods(text: str | list[str], name: str = "--methods") -> list[MethodSpec]:
    """Comma-separated specs are ambiguous with options, so specs are separated by spaces or ';' (a
    list from argparse nargs="+"), or by commas when no spec has options."""
    items = text if isinstance(text, (list, tuple)) else [text]
    out: list[MethodSpec] = []
    for item in items:
        parts = item.split(";") if ";" in item or ":" in item else item.split(",")
        out.extend(parse_method(p, name) for p in parts if p.strip())
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"{name}: method(s) given twice: {', '.join(dup)}")
    if not out:
        raise ValueError(f"{name}: no method given")
    return out
