"""Pure-torch reference implementations of every op: the ground truth the other backends are tested against.

Runs on any device and dtype. Clarity over speed; each function states the exact contract (including
tie-breaking) that every backend must reproduce bit-for-bit for masks and to fp32 rounding for values.
"""

from __future__ import annotations

import torch

from .. import _ops
from .._ops import nm_meta_bits, nm_meta_bytes  # noqa: F401  (part of the packed layout below)

NAME = "reference"


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    """G[i, j] += sum_r x[r, i] * x[r, j] for i <= j (upper triangle incl. diagonal), in place.

    G: (in, in) float32 or float64. x: (n, in), any float dtype, any strides; converted to G's dtype.
    The strict lower triangle of G is neither read nor written (callers mirror it on read).
    """
    xf = x.to(G.dtype)
    G.add_(torch.triu(xf.T @ xf))


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Bool mask (True = kept) that prunes exactly k entries of `scores` (rows, cols).

    per_row=False: the k smallest of the whole tensor; per_row=True: the k smallest of every row.
    Order: ascending score; among equal scores the smaller (flat, resp. column) index is pruned first.
    scores: any float dtype, no NaN. 0 <= k <= numel (resp. cols).
    """
    rows, cols = scores.shape
    s = scores.float()
    if per_row:
        order = torch.sort(s, dim=1, stable=True).indices[:, :k]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, order, False)
        return mask
    order = torch.sort(s.reshape(-1), stable=True).indices[:k]
    mask = torch.ones(rows * cols, dtype=torch.bool, device=scores.device)
    mask[order] = False
    return mask.view(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest of every m consecutive entries of each row of `scores` (rows, cols).

    cols % m == 0, 0 <= n <= m. Among equal scores the smaller column index is kept.
    """
    rows, cols = scores.shape
    g = scores.float().reshape(rows, cols // m, m)
    keep = torch.sort(g, dim=2, descending=True, stable=True).indices[:, :, :n]
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, keep, True)
    return mask.view(rows, cols)


def admm_dual_step(
    W: torch.Tensor, U: torch.Tensor, M: torch.Tensor, B: torch.Tensor, rho: float, R: torch.Tensor
) -> None:
    """One fused ADMM element-wise step, in place on U and R (all (rows, cols); W, U, B, R float32, M bool).

    Z = (W + U) * M;  U <- U + W - Z;  R <- B + rho * (Z - U_new).
    (Z itself is not stored: Z = W + U_old - U_new, and after the loop the solver forms it once more.)
    """
    Z = (W + U) * M
    U.add_(W).sub_(Z)
    torch.add(B, Z - U, alpha=rho, out=R)


def unavailable_reason() -> str:
    return ""


# === sparse inference ops (admm_kernels/sparse) ======================================================
# Packed N:M layout (shared by every backend and by the checkpoint format):
#   values (rows, cols*n/m), the weight's dtype: the n kept entries of each group of m consecutive inputs,
#     in ascending position order (value j of a row belongs to group j // n).
#   meta (rows, nm_meta_bytes(cols, n, m)) uint8: the position (0..m-1) of value j inside its group,
#     nm_meta_bits(m) bits each, at bit offset j*bits of the row's little-endian bit stream (bit i of a
#     row is bit i % 8 of byte i // 8). For 2:4 that is 2 bits a value: byte j // 4, shift 2*(j % 4).
# Groups holding fewer than n non-zeros are filled with zero entries at the smallest free positions, so
# positions inside a group are distinct and unpack is a plain scatter. Zeros are stored as +0.0.


def _bits_pack(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, k) int64 fields < 2**bits -> (rows, ceil(k*bits/8)) uint8 little-endian bit stream."""
    rows, k = fields.shape
    dev = fields.device
    stream = ((fields.unsqueeze(-1) >> torch.arange(bits, device=dev)) & 1).reshape(rows, k * bits)
    nbytes = (k * bits + 7) // 8
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - k * bits))
    weights = torch.arange(8, device=dev)
    return (stream.view(rows, nbytes, 8) << weights).sum(-1).to(torch.uint8)


def _bits_unpack(meta: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of _bits_pack: (rows, nbytes) uint8 -> (rows, k) int64."""
    rows = meta.shape[0]
    dev = meta.device
    stream = (meta.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=dev)) & 1
    stream = stream.reshape(rows, -1)[:, : k * bits].view(rows, k, bits)
    return (stream << torch.arange(bits, device=dev)).sum(-1)


def pack_nm(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an N:M-sparse weight (rows, cols), cols % m == 0, 1 <= n < m, into (values, meta) (layout above).

    A group with more than n non-zeros keeps its first n non-zeros by position (callers check the pattern
    first: admm_kernels.sparse.formats does). values keep weight's dtype; meta is uint8.
    """
    rows, cols = weight.shape
    dev = weight.device
    g = weight.reshape(rows, cols // m, m)
    # Non-zeros first (by position), then zeros (by position): unique keys, so the sort is deterministic.
    key = (g == 0).to(torch.int64) * m + torch.arange(m, device=dev)
    pos = torch.sort(torch.sort(key, dim=2).indices[:, :, :n], dim=2).values
    vals = torch.gather(g, 2, pos)
    vals = torch.where(vals == 0, torch.zeros((), dtype=vals.dtype, device=dev), vals)
    meta = _bits_pack(pos.reshape(rows, -1), nm_meta_bits(m))
    return vals.reshape(rows, -1).contiguous(), meta


def unpack_nm(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """Dense (rows, cols) weight, values' dtype, from packed (values (rows, cols*n/m), meta uint8)."""
    rows = values.shape[0]
    groups = cols // m
    pos = _bits_unpack(meta, groups * n, nm_meta_bits(m)).view(rows, groups, n)
    out = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
    out.scatter_(2, pos, values.reshape(rows, groups, n))
    return out.view(rows, cols)


def sparse_nm_mm(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, m: int, cols: int
) -> torch.Tensor:
    """y = x @ Wᵀ for a packed N:M weight W (rows, cols). x: (batch, cols) any float dtype.

    Computed in fp32 (values converted on the fly); y: (batch, rows) in x's dtype.
    """
    w = unpack_nm(values, meta, n, m, cols).float()
    return (x.float() @ w.T).to(x.dtype)


def csr_mm(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, cols: int
) -> torch.Tensor:
    """y = x @ Wᵀ for a CSR weight W (rows, cols): crow int64 (rows+1), col int16/int32 (nnz), values (nnz).

    Column indices within a row are ascending. x: (batch, cols) any float dtype; fp32 compute; y: (batch,
    rows) in x's dtype.
    """
    rows = crow.numel() - 1
    counts = crow[1:] - crow[:-1]
    row_idx = torch.repeat_interleave(torch.arange(rows, device=x.device), counts)
    w = torch.zeros(rows, cols, dtype=torch.float32, device=x.device)
    w[row_idx, col.to(torch.int64)] = values.float()
    return (x.float() @ w.T).to(x.dtype)


# Every op's default kernel on every device (CompositeExplicitAutograd): the compiled CPU and CUDA kernels
# override it for their device. Registered from here, not from _ops, so that _ops imports no backend.
for _name in _ops._SCHEMAS:
    _ops.register_reference(_name, globals()[_name])
del _name
