"""Triton N:M mask: keep the n largest of every m consecutive entries of each row (any n <= m).

One program handles BLOCK_G groups; a group is a (row, g) pair, cols // m groups per row. The rank of
entry j in its group is #{i : s_i > s_j} + #{i < j : s_i == s_j} (a stable descending order), computed
by a loop over the m members, so ties keep the smaller column index exactly as the reference's stable
sort does, and any m works (the loop is O(m) per entry: fine for the usual m <= 32). Scores are compared
in fp32, like the reference (which calls .float()).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_tensor, interpreting


@triton.jit
def _nm_kernel(
    s_ptr, out_ptr, n_groups, groups_per_row, cols, stride_r, stride_c,
    N: tl.constexpr, M: tl.constexpr, M_POW2: tl.constexpr, BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, M_POW2)
    valid_g = g < n_groups
    row = g // groups_per_row
    col0 = (g % groups_per_row) * M
    base = s_ptr + row * stride_r + col0 * stride_c
    valid = valid_g[:, None] & (j[None, :] < M)
    s = tl.load(base[:, None] + j[None, :] * stride_c, mask=valid, other=0.0).to(tl.float32)
    rank = tl.zeros((BLOCK_G, M_POW2), dtype=tl.int32)
    for i in range(M):
        si = tl.load(base + i * stride_c, mask=valid_g, other=0.0).to(tl.float32)[:, None]
        before = (si > s) | ((si == s) & (i < j[None, :]))
        rank += before.to(tl.int32)
    keep = rank < N
    out = out_ptr + row[:, None] * cols + col0[:, None] + j[None, :]
    tl.store(out, keep.to(tl.uint8), mask=valid)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool (rows, cols) mask, True = kept: the n largest of every m consecutive entries of each row.

    scores: (rows, cols) float tensor, any strides, cols % m == 0, 0 <= n <= m. Ties: smaller column kept.
    """
    check_tensor(scores, "scores", 2)
    check_float(scores, "scores")
    if not isinstance(m, int) or m <= 0:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if not isinstance(n, int) or not 0 <= n <= m:
        raise ValueError(f"n must be an int in [0, m={m}], got {n!r}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"scores has {cols} columns, not a multiple of m={m}")
    out = torch.empty(rows, cols, dtype=torch.uint8, device=scores.device)
    n_groups = rows * (cols // m)
    if n_groups == 0:
        return out.view(torch.bool)
    m_pow2 = triton.next_power_of_2(m)
    # ~1024 (GPU) / 256 (interpreter) entries per program.
    per_prog = 256 if interpreting() else 1024
    block_g = max(1, per_prog // m_pow2)
    grid = (triton.cdiv(n_groups, block_g),)
    _nm_kernel[grid](
        scores, out, n_groups, cols // m, cols, scores.stride(0), scores.stride(1),
        N=n, M=m, M_POW2=m_pow2, BLOCK_G=block_g, num_warps=4,
    )
    return out.view(torch.bool)
