"""The pruning methods behind `prune_layer`, one module each, as peers: admm (ADMM-Grad, in named steps),
sparsegpt, wanda, magnitude, alps. Shared steps live once: scaling.py (dead inputs, unit-diagonal scaling,
damping), wupdate.py ((Ĝ + ρI)⁻¹ by Cholesky or eigendecomposition), refit.py (batched preconditioned CG on
a fixed mask), error.py (the relative reconstruction error), timer.py. registry.py holds every method's
name, options, presets and grouping; this package registers them in the order listed here.
"""

from __future__ import annotations

from . import admm, alps, magnitude, sparsegpt, wanda
from .registry import Method, MethodResult, Option, get, methods, names, register

for _module in (admm, sparsegpt, wanda, magnitude, alps):
    register(_module.METHOD)
del _module

__all__ = ["Method", "MethodResult", "Option", "get", "methods", "names", "register"]
