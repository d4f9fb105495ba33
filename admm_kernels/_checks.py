"""Argument validation shared by prune_layer, the masks and the methods (a leaf: imports only torch).

Every helper raises ValueError (bad value or shape) or TypeError (bad type or dtype) with a message that
names the argument and the offending value, and never modifies its input.
"""

from __future__ import annotations

import math
import numbers

import torch

SCHEDULES = ("constant", "cubic")

# Relative tolerance of the Gram symmetry check: |G - G^T| <= tol * max|diag G|. Grams built by
# GramAccumulator are exactly symmetric; x.T @ x from a BLAS may differ by a few ulps between triangles.
_SYM_RTOL = 1e-4


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(x: object, name: str) -> torch.Tensor:
    """x must be a torch.Tensor holding data (not on the meta device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shape {_shape(x)}, no data); materialise it first "
                         "(e.g. load the checkpoint's weights, or accumulate the Gram on a real device)")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError when x contains NaN or Inf, saying how many and where the first one is."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        value = float(x[first])
        raise ValueError(f"{name} contains NaN or Inf ({count} entries; {name}{list(first)} = {value})")


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """weight: a finite 2-D floating-point tensor (out_features, in_features) of any float dtype."""
    w = check_tensor(weight, name)
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16, float64), "
                        f"got dtype {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {_shape(w)}")
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {_shape(w)}")
    check_finite(w, name)
    return w


def check_gram(gram: object, in_features: int, name: str = "gram") -> torch.Tensor:
    """gram: a finite, symmetric (in_features, in_features) floating-point tensor."""
    g = check_tensor(gram, name)
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {g.dtype}")
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {_shape(g)}")
    if g.shape[0] != in_features:
        raise ValueError(f"shape mismatch: {name} has shape {_shape(g)} but weight has in_features="
                         f"{in_features}; expected ({in_features}, {in_features})")
    check_finite(g, name)
    scale = float(g.diagonal().abs().max()) if g.numel() else 0.0
    asym = float((g - g.T).abs().max())
    if asym > _SYM_RTOL * max(scale, 1e-30):
        raise ValueError(f"{name} is not symmetric: max |{name} - {name}.T| = {asym:.3g} "
                         f"(max |diag| = {scale:.3g}); pass the full symmetric Gram matrix")
    return g


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """A real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {sparsity!r} ({type(sparsity).__name__})")
    s = float(sparsity)
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def check_mask(mask: object, shape: torch.Size, device: torch.device, name: str = "mask") -> torch.Tensor:
    """mask: a bool tensor of exactly `shape` (True = kept); moved to `device` if elsewhere (a copy)."""
    mk = check_tensor(mask, name)
    if mk.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = kept), got dtype {mk.dtype}")
    if tuple(mk.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {_shape(mk)} but weight has shape ({', '.join(map(str, shape))})")
    return mk.to(device)


def check_schedule(schedule: object, name: str = "schedule") -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown {name} {schedule!r}; expected one of {SCHEDULES}")
    return str(schedule)


# Upper bound of every iteration count option (iters, T, cg_iters, max_iters, ...): the defaults are 10 to
# 300 and the published settings at most a few thousand; one iteration of a large layer takes up to a
# second, so more than this is a typo (`-o iters=1e20`) that would run for days instead of failing.
MAX_ITERATIONS = 100_000


def check_int(value: object, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and int(value) > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return int(value)


def check_iters(value: object, name: str, minimum: int = 0) -> int:
    """An iteration count in [minimum, MAX_ITERATIONS]."""
    return check_int(value, name, minimum, MAX_ITERATIONS)


def check_float(value: object, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real >= minimum (> minimum when strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {op} {minimum}, got {value!r}")
    return v


def check_options(options: dict, allowed: tuple[str, ...], method: str) -> None:
    """Unknown keyword options raise TypeError naming them (as Python does for unexpected keywords)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(repr(u) for u in unknown)} for method {method!r}; "
                        f"allowed: {', '.join(allowed)}")


def check_compute_device(device: object, name: str = "device") -> torch.device:
    """A device that can run kernels: a torch.device, a string such as "cuda:1", or a CUDA index.

    Refuses the meta device (it holds no data: moving a model there destroys its weights) and devices
    this machine does not have, before any work."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {device!r} is not a valid device (e.g. cpu, cuda, cuda:0)") from None
    if d.type == "meta":
        raise ValueError(f"{name} {device!r} is the meta device, which holds no data and cannot compute; "
                         "use a compute device such as cpu or cuda")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: CUDA is not available on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif d.type != "cpu":  # mps, xpu, ...: refused when torch says they are absent; others pass
        available = getattr(getattr(torch, d.type, None), "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"{name} {device!r}: device type {d.type!r} is not available on this machine")
    return d


def model_device(model: torch.nn.Module, name: str = "model") -> torch.device:
    """The device of the model's first parameter; ValueError when the model has no parameters or its
    parameters are on the meta device (no data to prune or evaluate)."""
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{name} {type(model).__name__} has no parameters")
    if p.device.type == "meta":
        raise ValueError(f"{name} {type(model).__name__} has its parameters on the meta device (no data): "
                         "load its weights first")
    return p.device
