"""Packed sparse weight formats: N:M (values + bit-packed positions) and unstructured (CSR).

Both hold a weight W of shape (out, in) = (rows, cols) exactly: ``unpack()`` returns the dense weight
bit for bit, except that a stored zero is always +0.0 (a pruned ``-0.0`` comes back as ``+0.0``; the two
compare equal and give identical products).

PackedNM (the layout of admm_kernels/backends/reference.py, "sparse inference ops"):
    values (rows, cols*n/m) in the weight's dtype (fp32/bf16/fp16): the n kept entries of each group of m.
    meta   (rows, ceil(cols/m * n * bits / 8)) uint8, bits = ceil(log2 m): each value's in-group position.
    For 2:4 a weight costs 1/2 value + 2/16 byte of metadata per dense entry: 53.1 % of fp16 dense.
PackedCSR:
    crow (rows+1,) int64, col (nnz,) int16 when cols <= 32767 else int32 (ascending within a row),
    values (nnz,) in the weight's dtype. Worth it for storage below ~50 % density (fp16 + int16
    index = 4 bytes a kept weight) and for speed at >= 80 % sparsity (see SparseLinear).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..backends import reference as _ref
from ..patterns import Pattern

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# N:M patterns sparsify() recognises on its own, most useful first (2:4 has the fast CPU/CUDA kernels).
DETECT_M = (4, 8)
# Weights at least this sparse are described as unstructured even when an N:M test passes.
UNSTRUCTURED_FIRST = 0.8


def parse_packed_pattern(pattern: str) -> Pattern:
    """The Pattern of a stored layout: Pattern("nm", n, m) for "N:M" (1 <= n < m <= 256),
    Pattern("unstructured") for "unstructured" (per-row is a way to prune, not a way to store).

    Looser than admm_kernels.patterns.parse_pattern (no in_features to divide), stricter on M (the
    metadata packs positions in at most 8 bits). Raises ValueError naming `pattern` otherwise.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str like '2:4' or 'unstructured', got {type(pattern).__name__}")
    if pattern.strip().lower() == "unstructured":
        return Pattern("unstructured")
    match = _NM_RE.match(pattern)
    if match is None:
        raise ValueError(f"pattern must be 'N:M' (e.g. '2:4') or 'unstructured', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not (1 <= n < m <= 256):
        raise ValueError(f"pattern {pattern!r}: need 1 <= N < M <= 256")
    return Pattern("nm", n, m)


def _check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {weight.dtype}")


def max_group_count(weight: torch.Tensor, m: int) -> int:
    """Largest number of non-zeros in any group of m consecutive inputs of a row (cols % m == 0)."""
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        return 0
    return int((weight != 0).reshape(rows, cols // m, m).sum(-1).max())


def detect_pattern(weight: torch.Tensor) -> str | None:
    """The pattern a (rows, cols) weight satisfies: "unstructured" when >= 80 % sparse, else "2:4" or another
    "N:M" with N/M <= 1/2 (M in 4, 8), else "unstructured" when it has zeros, None when it has none."""
    _check_weight(weight)
    cols = weight.shape[1]
    if weight.numel() and sparsity(weight) >= UNSTRUCTURED_FIRST:
        # Very sparse weights often also pass an N:M test by chance; CSR stores and multiplies them
        # with far less (a 95 % sparse weight packed 2:4 would still keep half its entries).
        return "unstructured"
    for m in DETECT_M:
        if cols % m:
            continue
        count = max_group_count(weight, m)
        if count <= m // 2:
            if m == 4:  # an all-zero weight is 2:4 too; 1:4 is kept apart (half the storage of 2:4)
                return "1:4" if count == 1 else "2:4"
            return f"{max(count, 1)}:{m}"
    if weight.numel() and bool((weight == 0).any()):
        return "unstructured"
    return None


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / max(1, weight.numel())


@dataclass
class PackedNM:
    """N:M weight: values (rows, cols*n/m), meta (rows, meta_bytes) uint8; see the module docstring."""

    values: torch.Tensor
    meta: torch.Tensor
    n: int
    m: int
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: torch.Tensor, n: int, m: int) -> PackedNM:
        """Pack `weight` (rows, cols); raises ValueError if cols % m != 0 or a group has > n non-zeros."""
        _check_weight(weight)
        rows, cols = weight.shape
        if cols % m:
            raise ValueError(f"pattern {n}:{m} needs in_features divisible by {m}, got weight shape "
                f"{(rows, cols)}")
        count = max_group_count(weight, m)
        if count > n:
            g = (weight != 0).reshape(rows, cols // m, m).sum(-1)
            r, grp = (g > n).nonzero()[0].tolist()
            raise ValueError(
                f"weight is not {n}:{m} sparse: row {r}, inputs {grp * m}..{grp * m + m - 1} hold "
                    f"{int(g[r, grp])} "
                f"non-zeros (at most {n} allowed)"
            )
        values, meta = torch.ops.admm_kernels.pack_nm(weight.detach(), n, m)
        return cls(values, meta, n, m, (rows, cols))

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def unpack(self) -> torch.Tensor:
        """Dense (rows, cols) weight in the stored dtype."""
        return torch.ops.admm_kernels.unpack_nm(self.values, self.meta, self.n, self.m, self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.meta}

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    def validate(self) -> None:
        """Check shapes, dtypes and position ranges (e.g. after loading a file); raises ValueError."""
        rows, cols = self.shape
        n, m = self.n, self.m
        if not (1 <= n < m <= 256) or cols % m:
            raise ValueError(f"bad N:M format: n={n}, m={m}, shape={self.shape}")
        k = cols // m * n
        if tuple(self.values.shape) != (rows, k) or self.values.dtype not in FLOAT_DTYPES:
            raise ValueError(f"N:M values must be float ({rows}, {k}), got {self.values.dtype} "
                f"{tuple(self.values.shape)}")
        mb = _ref.nm_meta_bytes(cols, n, m)
        if tuple(self.meta.shape) != (rows, mb) or self.meta.dtype != torch.uint8:
            raise ValueError(f"N:M meta must be uint8 ({rows}, {mb}), got {self.meta.dtype} "
                f"{tuple(self.meta.shape)}")
        if m & (m - 1) and rows and k:  # positions can exceed m-1 only when m is not a power of two
            pos = _ref._bits_unpack(self.meta, k, _ref.nm_meta_bits(m))
            if int(pos.max()) >= m:
                raise ValueError(f"N:M meta holds a position >= m={m}")


@dataclass
class PackedCSR:
    """Unstructured weight in CSR: crow (rows+1) int64, col (nnz) int16/int32, values (nnz)."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: torch.Tensor) -> PackedCSR:
        _check_weight(weight)
        rows, cols = weight.shape
        w = weight.detach()
        nz = w != 0
        counts = nz.sum(1)
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
        crow[1:] = torch.cumsum(counts, 0)
        idx = nz.nonzero()  # row-major order: rows ascending, columns ascending within a row
        col_dtype = torch.int16 if cols <= 32767 else torch.int32
        col = idx[:, 1].to(col_dtype)
        values = w[nz].contiguous()
        return cls(crow, col, values, (rows, cols))

    pattern = "unstructured"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def unpack(self) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(rows, cols, dtype=self.values.dtype, device=self.values.device)
        counts = self.crow[1:] - self.crow[:-1]
        row_idx = torch.repeat_interleave(torch.arange(rows, device=out.device), counts)
        out[row_idx, self.col.to(torch.int64)] = self.values
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crow": self.crow, "col": self.col, "values": self.values}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def validate(self) -> None:
        """Check shapes, dtypes, monotone row pointers and column range (the C++ kernel trusts them)."""
        rows, cols = self.shape
        if self.crow.dtype != torch.int64 or tuple(self.crow.shape) != (rows + 1,):
            raise ValueError(f"CSR crow must be int64 ({rows + 1},), got {self.crow.dtype} "
                f"{tuple(self.crow.shape)}")
        if self.col.dtype not in (torch.int16, torch.int32) or self.col.dim() != 1:
            raise ValueError(f"CSR col must be 1-D int16/int32, got {self.col.dtype} {tuple(self.col.shape)}")
        v = self.values
        if v.dim() != 1 or v.numel() != self.col.numel() or v.dtype not in FLOAT_DTYPES:
            raise ValueError("CSR values must be a 1-D float tensor as long as col")
        monotone = not bool((self.crow.diff() < 0).any())
        if int(self.crow[0]) != 0 or int(self.crow[-1]) != self.values.numel() or not monotone:
            raise ValueError("CSR crow must start at 0, be non-decreasing and end at nnz")
        if self.col.numel() and (int(self.col.min()) < 0 or int(self.col.max()) >= cols):
            raise ValueError(f"CSR col indices must lie in [0, {cols})")
