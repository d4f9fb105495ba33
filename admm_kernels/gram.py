"""Gram (Hessian) accumulation G = sum over calibration rows of x^T x, in fp32 (fp64 optional).

Only the upper triangle is computed by the kernels (half the FLOPs); `GramAccumulator.gram` mirrors it.
"""

from __future__ import annotations

import torch

from . import backends

# Rows converted per kernel call: bounds the temporary fp32 copy of bf16/fp16 inputs on CPUs
# (4096 rows x 11008 features x 4 B = 180 MB).
_CHUNK_ROWS = 4096


def _check_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., in_features), got a 0-d tensor")


class GramAccumulator:
    """Accumulates G = sum x^T x over batches of inputs x of shape (..., in_features).

    G is kept in float32 (or float64 with dtype=torch.float64) on `device`; inputs of any float dtype and
    device are moved and converted chunk by chunk. `gram` returns the full symmetric (in, in) matrix
    (a new tensor); `count` is the number of rows (tokens) added.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if not isinstance(in_features, int) or isinstance(in_features, bool):
            raise TypeError(f"in_features must be an int, got {in_features!r}")
        if in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._upper = torch.zeros(in_features, in_features, dtype=dtype, device=self.device)
        self.count = 0

    @property
    def dtype(self) -> torch.dtype:
        return self._upper.dtype

    def add(self, x: torch.Tensor) -> None:
        """Add x^T x for x of shape (..., in_features), any float dtype."""
        _check_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has {x.shape[-1]} features in its last dimension, expected {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        if x2.device != self.device:
            # Asynchronous only host -> device: a device -> host copy must finish before the CPU reads it.
            x2 = x2.to(self.device, non_blocking=self.device.type == "cuda")
        if not torch.isfinite(x2).all():
            raise ValueError("x contains NaN or Inf")
        update = backends.implementation("gram_update", self.device)
        for start in range(0, x2.shape[0], _CHUNK_ROWS):
            chunk = x2[start:start + _CHUNK_ROWS]
            if self.device.type == "cpu" and chunk.dtype in (torch.bfloat16, torch.float16):
                # CPU bf16/fp16 GEMMs are ~90x slower than fp32 here: convert blockwise.
                chunk = chunk.float()
            update(self._upper, chunk)
        self.count += x2.shape[0]

    @property
    def gram(self) -> torch.Tensor:
        """The symmetric (in, in) Gram matrix, float32 (or float64), a new tensor."""
        upper = torch.triu(self._upper)
        return upper + torch.triu(upper, diagonal=1).T

    def reset(self) -> None:
        self._upper.zero_()
        self.count = 0


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G = x^T x for x of shape (..., in), any float dtype; returns (in, in) float32 (or float64)."""
    _check_input(x)
    acc = GramAccumulator(x.shape[-1], device=x.device, dtype=dtype)
    acc.add(x)
    return acc.gram
