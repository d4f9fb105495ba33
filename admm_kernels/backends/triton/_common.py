"""Helpers shared by the Triton launch functions: interpreter detection and argument checks."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(t: object, name: str, ndim: int | None = None) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` unless t is a tensor (with `ndim` dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_float(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The common device of `tensors`; ValueError naming them when they differ."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"tensors must share one device, got {devices}")
    return first


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor reinterpreted as uint8 (same storage): Triton loads/stores bytes portably."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
