"""Triton fused ADMM element-wise step: one read of W, U, M, B and one write of U, R per element.

    Z = (W + U) * M;  U <- U + W - Z;  R <- B + rho * (Z - U_new)

Kept entries (M true): Z = W + U, U_new = 0, R = B + rho * Z. Pruned ones: Z = 0, U_new = W + U,
R = B - rho * U_new. 25 bytes move per element (4 fp32 reads, a 1-byte mask, 2 fp32 writes).
Tensors of one common contiguous layout are processed as one flat row (widest vector loads); others
through 2-D strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_bytes, check_same_device, check_tensor, interpreting


@triton.jit
def _dual_step_kernel(
    w_ptr, u_ptr, m_ptr, b_ptr, r_ptr, rho, rows, cols,
    swr, swc, sur, suc, smr, smc, sbr, sbc, srr, src,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Columns on grid axis 0 (up to 2**31 programs), rows on axis 1 (at most 65535 programs).
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    w = tl.load(w_ptr + r[:, None] * swr + c[None, :] * swc, mask=inside, other=0.0)
    u = tl.load(u_ptr + r[:, None] * sur + c[None, :] * suc, mask=inside, other=0.0)
    m = tl.load(m_ptr + r[:, None] * smr + c[None, :] * smc, mask=inside, other=0)
    b = tl.load(b_ptr + r[:, None] * sbr + c[None, :] * sbc, mask=inside, other=0.0)
    s = w + u
    z = tl.where(m != 0, s, 0.0)
    u_new = s - z
    tl.store(u_ptr + r[:, None] * sur + c[None, :] * suc, u_new, mask=inside)
    tl.store(r_ptr + r[:, None] * srr + c[None, :] * src, b + rho * (z - u_new), mask=inside)


def _flat_ok(*ts: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in ts)


def admm_dual_step(
    W: torch.Tensor, U: torch.Tensor, M: torch.Tensor, B: torch.Tensor, rho: float, R: torch.Tensor
) -> None:
    """In place on U and R. W, U, B, R: (rows, cols) float32 (any strides); M: (rows, cols) bool."""
    for name, t in (("W", W), ("U", U), ("M", M), ("B", B), ("R", R)):
        check_tensor(t, name, 2)
        if t.shape != W.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected W's {tuple(W.shape)}")
        if name != "M" and t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if M.dtype != torch.bool:
        raise TypeError(f"M must be a bool tensor, got {M.dtype}")
    check_same_device(W=W, U=U, M=M, B=B, R=R)
    rho = float(rho)
    rows, cols = W.shape
    if W.numel() == 0:
        return
    mb = as_bytes(M)
    if _flat_ok(W, U, M, B, R):
        rows, cols = 1, W.numel()
        strides = [(cols, 1)] * 5
    else:
        strides = [t.stride() for t in (W, U, mb, B, R)]
    if interpreting():
        block_r, block_c, warps = 4, 256, 4
    elif rows == 1:
        block_r, block_c, warps = 1, 2048, 4
    else:
        block_r, block_c, warps = 4, 512, 4
    grid = (triton.cdiv(cols, block_c), triton.cdiv(rows, block_r))
    if grid[1] > 65535:
        raise ValueError(f"W has {rows} rows; the Triton dual step supports at most {65535 * block_r}")
    flat_strides = [s for pair in strides for s in pair]
    _dual_step_kernel[grid](
        W, U, mb, B, R, rho, rows, cols, *flat_strides,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
