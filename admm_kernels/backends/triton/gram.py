"""Triton Gram update: G[i, j] += sum_r x[r, i] * x[r, j] on the upper triangle only (half the FLOPs).

Grid: one program per (BLOCK x BLOCK) tile of the upper triangle, numbered column by column
(tile (i, j), i <= j, is program j*(j+1)/2 + i), so no program is launched for the lower triangle.
Each program loops over the rows of x in chunks of BLOCK_K and accumulates x[:, I]^T x[:, J] in fp32.

Precision: bf16/fp16 inputs go to tl.dot natively with an fp32 accumulator (their products are exact in
fp32); fp32 inputs use input_precision="ieee" (no TF32). Measured on an H100 (triton 3.6; x of 2048 x 4097
standard normals, largest |G| ~2.3e3), the largest error against an fp64 product: bf16 1.34e-2, fp16
2.40e-2, fp32 4.57e-3; torch's own product at the same input precision (cuBLAS, fp32 output): 7.57e-3,
1.36e-2, 2.29e-3. That is 1.8x, 1.8x and 2.0x, within the 2x tests/kernels/test_gpu.py allows. The bf16
input converted to fp32 first gave 1.28e-2: the gap to cuBLAS is this kernel's summation order, not the
16-bit dot. Under TRITON_INTERPRET=1 every input is upcast to fp32 before tl.dot: the interpreter's bf16
tl.dot gives wrong results (measured with triton 3.8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_same_device, check_tensor, interpreting


@triton.jit
def _tile_of(pid):
    """(i, j) of the pid-th upper-triangle tile in column-major order: pid = j*(j+1)/2 + i, 0 <= i <= j."""
    j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # fp32 sqrt can be one off for large pid: correct both ways.
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    i = pid - j * (j + 1) // 2
    return i, j


@triton.jit
def _gram_kernel(
    x_ptr, g_ptr, n_rows, d,
    stride_xn, stride_xd, stride_gi, stride_gj,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    ti, tj = _tile_of(tl.program_id(0))
    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    ri64 = ri.to(tl.int64)
    rj64 = rj.to(tl.int64)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        rows = (k0 + rk).to(tl.int64)
        in_rows = rows < n_rows
        # Both operands are loaded as (BLOCK_K, BLOCK) slabs of x; the left one is transposed in registers.
        a = tl.load(x_ptr + rows[:, None] * stride_xn + ri64[None, :] * stride_xd,
                    mask=in_rows[:, None] & (ri[None, :] < d), other=0.0)
        b = tl.load(x_ptr + rows[:, None] * stride_xn + rj64[None, :] * stride_xd,
                    mask=in_rows[:, None] & (rj[None, :] < d), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    # Diagonal tiles: write only i <= j (the strict lower triangle is neither read nor written).
    keep = (ri[:, None] < d) & (rj[None, :] < d) & (ri[:, None] <= rj[None, :])
    g_ptrs = g_ptr + ri64[:, None] * stride_gi + rj64[None, :] * stride_gj
    g = tl.load(g_ptrs, mask=keep, other=0.0)
    tl.store(g_ptrs, g + acc, mask=keep)


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes. GPU: 128x128 tiles (the usual sweet spot for Hopper tensor-core GEMMs in Triton; not
    autotuned here, since autotuning an in-place accumulation would add into G once per trial).
    Interpreter: small tiles keep the numpy emulation quick at the test shapes."""
    if interpreting():
        return {"BLOCK": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    return {"BLOCK": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def gram_update(G: torch.Tensor, x: torch.Tensor) -> None:
    """In place: G[i, j] += sum_r x[r, i] x[r, j] for i <= j. G: (in, in) float32; x: (n, in) fp32/bf16/fp16.

    Any strides for x and G. G float64 (or x float64) is handed to the pure-torch reference: the Triton
    kernel accumulates in fp32, which would silently lose the precision an fp64 Gram is asked for.
    """
    check_tensor(G, "G", 2)
    check_tensor(x, "x", 2)
    check_float(x, "x")
    if G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square, got shape {tuple(G.shape)}")
    if x.shape[1] != G.shape[0]:
        raise ValueError(f"x has {x.shape[1]} columns but G is {tuple(G.shape)}")
    check_same_device(G=G, x=x)
    if G.dtype == torch.float64 or x.dtype == torch.float64:
        from .. import reference

        reference.gram_update(G, x)
        return
    if G.dtype != torch.float32:
        raise TypeError(f"G must be float32 or float64, got {G.dtype}")
    n, d = x.shape
    if n == 0 or d == 0:
        return
    cfg = _config(x.dtype)
    tiles = triton.cdiv(d, cfg["BLOCK"])
    grid = (tiles * (tiles + 1) // 2,)
    _gram_kernel[grid](
        x, G, n, d, x.stride(0), x.stride(1), G.stride(0), G.stride(1),
        BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"],
        UPCAST=interpreting(), IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
