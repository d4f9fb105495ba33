"""Method specs of the benchmark: a label -> (prune_layer method, options).

Grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``admm-grad``, ``sparsegpt:blocksize=64``,
``admm:iters=5``, ``admm:preset=NAME``. Names (`aliases()`):
    every method of the registry (admm_kernels.methods), with its defaults
    METHOD-PRESET                 every preset of every method (same as METHOD:preset=PRESET)
    admm-grad                     ADMM-Grad with the released code's defaults (gradual mask, 20 iterations)
    admm-oneshot                  one-shot: the Wanda-score mask fixed at t = 0, then the ADMM update
    admm-mask                     mask only (iters = 0): the ADMM-Grad score at t = 0, no update
    admm-exact                    ADMM-Grad then an exact (conjugate-gradient) solve on its final mask
Values are parsed as `admm-prune prune -o` parses them (admm_kernels.methods.options.parse_option_value: a
torch dtype for *dtype keys, int, float, true/false/none, else text); the key ``preset`` selects one of the
method's presets. The label of a row is the spec as written, so ``admm:iters=5`` and ``admm:iters=50``
are separate curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import methods as registry
from ..methods.options import parse_option_value

# Variants of ADMM-Grad by their options (the registry's methods and presets are added by aliases()).
ADMM_VARIANTS: dict[str, dict] = {
    "admm-grad": {},
    "admm-oneshot": {"one_shot": True},
    "admm-mask": {"iters": 0},
    "admm-exact": {"solve": "exact"},
}


def aliases() -> dict[str, tuple[str, dict]]:
    """Every spec name -> (prune_layer method, options), read from the method registry."""
    out: dict[str, tuple[str, dict]] = {}
    for name, method in registry.methods().items():
        out[name] = (name, {})
        for preset in method.presets:
            out[f"{name}-{preset}"] = (name, {"preset": preset})
    for name, options in ADMM_VARIANTS.items():
        out[name] = ("admm", dict(options))
    return out


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
        default = next(o.default for o in registry.get("admm").options if o.name == "iters")
        return self.is_admm and self.options.get("iters", default) > 0


def parse_method(spec: str, name: str = "--methods") -> MethodSpec:
    """Parse one method spec; ValueError naming `name` and the spec on a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{name}: empty method spec in {spec!r}")
    label = spec.strip()
    base, _, tail = label.partition(":")
    base = base.strip().lower()
    known = aliases()
    if base not in known:
        raise ValueError(f"{name}: unknown method {base!r} in {label!r}; expected one of "
                         f"{', '.join(known)} (optionally with :key=value,... options)")
    method, options = known[base]
    options = dict(options)
    for item in filter(None, (t.strip() for t in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{name}: option {item!r} in {label!r} is not KEY=VALUE")
        try:
            options[key.strip()] = parse_option_value(key.strip(), value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} in {label!r}") from None
    return MethodSpec(label, method, options)


def split_specs(text: str | list[str]) -> list[str]:
    """The method specs in `text` (one string, or a list from argparse nargs="+"), unparsed: each item
    split at ';' when it has options (':') or ';', else at commas; empty pieces dropped."""
    items = text if isinstance(text, (list, tuple)) else [text]
    parts = [p for item in items
             for p in (item.split(";") if ";" in item or ":" in item else item.split(","))]
    return [p.strip() for p in parts if p.strip()]


def parse_methods(text: str | list[str], name: str = "--methods") -> list[MethodSpec]:
    """Comma-separated specs are ambiguous with options, so specs are separated by spaces or ';' (a
    list from argparse nargs="+"), or by commas when no spec has options."""
    out = [parse_method(p, name) for p in split_specs(text)]
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"{name}: method(s) given twice: {', '.join(dup)}")
    if not out:
        raise ValueError(f"{name}: no method given")
    return out
