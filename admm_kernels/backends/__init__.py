"""The kernel registry: which implementation of each op runs for a tensor's device.

Backends (one module each): ``reference`` (pure torch, any device, always there), ``cpu`` (C++ kernels in
``admm_kernels._C``), ``triton`` (Triton kernels, CUDA tensors), ``cuda`` (CUDA C++ kernels in ``_C``).
Every backend module exposes ``NAME``, ``is_available()``, ``supports(device)`` and a function per op it
implements (same signature as the reference). An op a backend lacks falls through to the next one.

Selection for a device: the first available backend in ``PREFERENCE[device.type]`` that implements the
op; when that is the reference although a faster backend was expected, one log line says why.
``ADMM_KERNELS_BACKEND=reference|cpu|triton|cuda`` forces one backend for every op it implements (ops
it lacks use the reference); a forced backend that is unavailable or cannot run on the device raises.

Kernels that check themselves (backends/selfcheck.py): the first time a kernel of a GPU backend
(``cuda``, ``triton``: never run by CI) is selected for a device in this process, it runs once on small
inputs against the reference. One that raises or disagrees is logged once as a warning and skipped for
the rest of the process (the next backend in the preference order is used, ultimately the reference);
a forced backend that fails its check raises instead. ``ADMM_KERNELS_SELF_CHECK=0`` turns checks off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from . import selfcheck
from ._modules import BACKENDS, get  # noqa: F401  (public: backends.get, backends.BACKENDS)

log = logging.getLogger("admm_kernels")

OPS = ("gram_update", "prune_mask", "nm_mask", "admm_dual_step")
# Fastest first, by measurement (see benchmarks/RESULTS.md).
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
ENV_VAR = "ADMM_KERNELS_BACKEND"

_warned: set[tuple[str, str]] = set()


def available() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [b for b in BACKENDS if get(b).is_available()]


def _forced() -> str | None:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    return name or None


def select(op: str, device: torch.device | str) -> tuple[str, Callable]:
    """(backend name, implementation) of `op` for tensors on `device`."""
    if op not in OPS and not hasattr(get("reference"), op):
        raise ValueError(f"unknown op {op!r}")
    device = torch.device(device)
    forced = _forced()
    if forced is not None:
        mod = get(forced)
        if not mod.is_available():
            raise RuntimeError(
                f"{ENV_VAR}={forced!r} but that backend is not available: {mod.unavailable_reason()}")
        if not mod.supports(device):
            raise RuntimeError(f"{ENV_VAR}={forced!r} cannot run on device {device}")
        fn = getattr(mod, op, None)
        if fn is not None:
            if not _self_check_ok(forced, op, device, fn):
                result = selfcheck.passed(forced, op, device, fn)
                raise RuntimeError(f"{ENV_VAR}={forced!r}: the {forced} kernel of {op} failed its self-check "
                                   f"on {result.device}: {result.error}")
            return forced, fn
        return "reference", getattr(get("reference"), op)
    prefs = PREFERENCE.get(device.type, ("reference",))
    for name in prefs:
        mod = get(name)
        fn = getattr(mod, op, None)
        if fn is not None and mod.is_available() and mod.supports(device):
            if not _self_check_ok(name, op, device, fn):
                continue  # logged once by selfcheck.passed; the next backend (ultimately the reference)
            if name == "reference" and prefs[0] != "reference" and (op, device.type) not in _warned:
                _warned.add((op, device.type))
                fast = get(prefs[0])
                why = fast.unavailable_reason() if hasattr(fast, "unavailable_reason") else ""
                log.info("admm_kernels: %s on %s uses the pure-torch reference (%s)", op, device.type, why)
            return name, fn
    return "reference", getattr(get("reference"), op)


def _self_check_ok(backend: str, op: str, device: torch.device, fn: Callable) -> bool:
    """True unless `backend` is self-checked, checks are on, and its kernel of `op` failed on `device`."""
    if backend not in selfcheck.SELF_CHECKED or op not in selfcheck.CASES or not selfcheck.enabled():
        return True
    return selfcheck.passed(backend, op, device, fn).ok


def implementation(op: str, device: torch.device | str, *, reference: bool = False,
                   used: dict | None = None) -> Callable:
    """The implementation of `op` for tensors on `device`: select(op, device)[1], or the reference's when
    `reference`. `used`, when given, records the backend that runs it (used[op] = its name): the solvers
    report which kernels computed a result."""
    if reference:
        backend, fn = "reference", getattr(get("reference"), op)
    else:
        backend, fn = select(op, device)
    if used is not None:
        used[op] = backend
    return fn
