"""The method registry: every `prune_layer(method=...)` name, its options (defaults and validators), its
presets and the one-line description of its grouping, in one place.

`prune_layer`, the CLI's --method choices and help and the bench's method list all read this registry; a
method is added by writing its module under admm_kernels/methods/ and registering its `METHOD` in
admm_kernels/methods/__init__.py.

A method's `run(weight, G, pattern, sparsity, mask, options) -> MethodResult` receives validated inputs:
weight (out, in) of any float dtype, G (in, in) float on weight's device, a parsed Pattern, the requested
sparsity in [0, 1), mask None or bool (out, in) on weight's device (update-only), and `options`: every
option of the method, resolved (defaults <- preset <- explicit) and validated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from .._checks import check_options


@dataclass(frozen=True)
class Option:
    """name: keyword of prune_layer; default; check(value) -> the validated value (raises ValueError /
    TypeError naming the option and the value); help: one line for documentation."""

    name: str
    default: object
    check: Callable[[object], object]
    help: str = ""


@dataclass
class MethodResult:
    """weight: pruned (out, in) in weight's dtype and device; mask: bool (out, in), True = kept; stats:
    method-specific entries (seconds per phase, iterations, backends, ...); denominator: tr(W G Wᵀ) when the
    method computed it anyway (prune_layer then saves a GEMM in the error evaluation), else None."""

    weight: torch.Tensor
    mask: torch.Tensor
    stats: dict
    denominator: float | None = None


@dataclass(frozen=True)
class Method:
    """A registered method. summary: one line; grouping: one line saying which entries compete for the
    budget of pattern "unstructured" for this method (per-row and N:M are the same for every method),
    shown by `admm-prune --help`;
    presets: name -> option overrides (applied over the defaults, under explicit options)."""

    name: str
    run: Callable[..., MethodResult]
    options: tuple[Option, ...]
    summary: str
    grouping: str
    presets: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def check_preset(self, preset: object) -> str | None:
        """None, or the name of one of this method's presets (ValueError / TypeError otherwise)."""
        if preset is None:
            return None
        if not isinstance(preset, str):
            raise TypeError(f"preset must be a str or None, got {preset!r} ({type(preset).__name__})")
        name = preset.strip().lower()
        if name not in self.presets:
            known = ", ".join(repr(p) for p in self.presets) or "none yet"
            raise ValueError(f"unknown preset {preset!r} for method {self.name!r}; available: {known} "
                             "(or preset=None: the method's defaults)")
        return name

    def resolve(self, preset: object, given: Mapping[str, object]) -> dict:
        """The options that run: defaults, overridden by the preset's, overridden by `given`; each checked
        by its option's validator. Unknown names raise TypeError naming them."""
        check_options(dict(given), self.option_names, self.name)
        name = self.check_preset(preset)
        values = {o.name: o.default for o in self.options}
        if name is not None:
            values.update(self.presets[name])
        values.update(given)
        return {o.name: o.check(values[o.name]) for o in self.options}


# --- validators shared by the methods' options ------------------------------------------------------------

def bool_option(name: str) -> Callable[[object], bool]:
    """Validator of a bool option (an int is refused: `one_shot=1` is a TypeError)."""
    def check(v: object) -> bool:
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
        return v
    return check


def choice_option(name: str, choices: tuple[str, ...]) -> Callable[[object], str]:
    """Validator of an option that takes one of `choices`."""
    def check(v: object) -> str:
        if v not in choices:
            raise ValueError(f"unknown {name} {v!r}; expected {' or '.join(repr(c) for c in choices)}")
        return v
    return check


def float_dtype_option(name: str) -> Callable[[object], torch.dtype]:
    """Validator of a float32 / float64 dtype option; the names "float32" / "float64" are accepted too, so
    the option can be given as text (`admm-prune prune -o compute_dtype=float64`, bench specs)."""
    names = {"float32": torch.float32, "float64": torch.float64}

    def check(v: object) -> torch.dtype:
        if isinstance(v, str) and v.strip().lower().removeprefix("torch.") in names:
            return names[v.strip().lower().removeprefix("torch.")]
        if v not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be torch.float32 or torch.float64 (or 'float32' / 'float64'), "
                            f"got {v!r}")
        return v
    return check


check_compute_dtype = float_dtype_option("compute_dtype")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` (its name must be new and lower-case); returns it."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.name != method.name.strip().lower():
        raise ValueError(f"method names are lower-case without spaces, got {method.name!r}")
    for p, opts in method.presets.items():
        unknown = sorted(set(opts) - set(method.option_names))
        if unknown:
            raise ValueError(f"preset {p!r} of method {method.name!r} sets unknown option(s) {unknown}")
    _REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def methods() -> Mapping[str, Method]:
    """name -> Method (read-only view)."""
    return MappingProxyType(_REGISTRY)


def get(method: object, name: str = "method") -> Method:
    """The registered Method called `method` (case and surrounding spaces ignored)."""
    if not isinstance(method, str):
        raise TypeError(f"{name} must be a str, one of {names()}, got {method!r}")
    key = method.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown {name} {method!r}; expected one of {names()}")
    return _REGISTRY[key]
