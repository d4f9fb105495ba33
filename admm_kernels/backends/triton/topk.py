"""Triton top-k pruning mask (per layer or per row) with the reference's exact tie rule, by radix select.

Contract (backends/reference.py): prune exactly k entries, the k smallest scores, ties broken by the
smaller (flat, resp. column) index first. Equivalently, prune the k smallest of the compound key
(score, index). We find that k-th compound key by radix select, never sorting:

1. keys: each score (as fp32, -0.0 canonicalised to +0.0 so the two compare equal, as in torch.sort) is
   mapped to a 32-bit pattern whose unsigned order is the float order (flip all bits of negatives, the
   sign bit of positives); stored as int32 bits.
2. four histogram passes, 8 bits each, most significant first: each program histograms (tl.histogram)
   the digit of the keys that still match the prefix chosen so far, into a (problem, 256) table; a tiny
   select kernel scans it (tl.cumsum), picks the bin holding the k-th key and reduces k. No host sync.
   After them the threshold key T and kk = how many entries equal to T must be pruned are known.
3. if kk equals the number of entries equal to T, all of them go (common: no tie straddles the cut) and
   the index passes exit at once; else up to four more passes select, the same way, the kk-th smallest
   index among the entries equal to T (only as many 8-bit passes as the index width needs).
4. one pass writes the mask: keep = key > T or (key == T and index > I).

A "problem" is the whole layer (per_row=False: 1 problem of rows*cols entries, flat row-major index)
or one row (per_row=True: rows problems of cols entries). Cost: ~10 streaming passes over 4-byte keys,
no sort; sizes up to 2**31 - 1 entries and 65535 rows per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_tensor, interpreting


@triton.jit
def _keys_kernel(s_ptr, key_ptr, rows, cols, stride_r, stride_c,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    s = tl.load(s_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0).to(tl.float32)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0
    bits = s.to(tl.int32, bitcast=True)
    # Unsigned-order key: negatives (sign bit set) get every bit flipped, non-negatives only the sign bit.
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648)
    tl.store(key_ptr + r[:, None] * cols + c[None, :], key, mask=inside)


@triton.jit
def _hist_kernel(
    key_ptr, prefix_ptr, tkey_ptr, skip_ptr, hist_ptr, length,
    SHIFT: tl.constexpr, HIMASK: tl.constexpr, INDEX_STAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(1)
    if INDEX_STAGE:
        if tl.load(skip_ptr + p) != 0:
            return
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = e < length
    key = tl.load(key_ptr + p.to(tl.int64) * length + e, mask=inside, other=0)
    prefix = tl.load(prefix_ptr + p)
    if INDEX_STAGE:
        match = inside & (key == tl.load(tkey_ptr + p)) & (((e ^ prefix) & HIMASK) == 0)
        digit = (e >> SHIFT) & 255
    else:
        match = inside & (((key ^ prefix) & HIMASK) == 0)
        digit = (key >> SHIFT) & 255
    # Entries that do not match go to bin 256 (of 512: tl.histogram wants a power of two), never added.
    h = tl.histogram(tl.where(match, digit, 256), 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(hist_ptr + p * 256 + bins, h, mask=(bins < 256) & (h > 0))


@triton.jit
def _select_kernel(hist_ptr, prefix_ptr, kk_ptr, skip_ptr, SHIFT: tl.constexpr, INDEX_STAGE: tl.constexpr,
                   LAST_KEY_PASS: tl.constexpr):
    p = tl.program_id(0)
    if INDEX_STAGE:
        if tl.load(skip_ptr + p) != 0:
            return
    bins = tl.arange(0, 256)
    h = tl.load(hist_ptr + p * 256 + bins)
    cum = tl.cumsum(h, 0)
    kk = tl.load(kk_ptr + p)
    b = tl.sum((cum < kk).to(tl.int32), 0)  # the bin holding the kk-th smallest (1-based)
    below = tl.sum(tl.where(bins < b, h, 0), 0)
    in_bin = tl.sum(tl.where(bins == b, h, 0), 0)
    kk = kk - below
    tl.store(kk_ptr + p, kk)
    tl.store(prefix_ptr + p, tl.load(prefix_ptr + p) | (b << SHIFT))
    if LAST_KEY_PASS:
        # All entries equal to the threshold are pruned: no tie-break by index needed.
        tl.store(skip_ptr + p, (kk == in_bin).to(tl.int32))


@triton.jit
def _mask_kernel(key_ptr, tkey_ptr, tidx_ptr, skip_ptr, out_ptr, length, BLOCK: tl.constexpr):
    p = tl.program_id(1)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = e < length
    flat = p.to(tl.int64) * length + e
    key = tl.load(key_ptr + flat, mask=inside, other=0)
    t = tl.load(tkey_ptr + p)
    # Unsigned comparison through the signed one: flip the sign bits of both sides.
    above = (key ^ -2147483648) > (t ^ -2147483648)
    tie_kept = (key == t) & (tl.load(skip_ptr + p) == 0) & (e > tl.load(tidx_ptr + p))
    tl.store(out_ptr + flat, (above | tie_kept).to(tl.uint8), mask=inside)


def _himask(shift: int) -> int:
    """int32 bit pattern selecting the bits above digit `shift` (the already-chosen prefix)."""
    if shift + 8 >= 32:
        return 0
    v = (-1 << (shift + 8)) & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def prune_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """Bool (rows, cols) mask (True = kept) pruning exactly the k smallest scores of the layer (per_row=False)
    or of every row (per_row=True); ties: the smaller flat (resp. column) index is pruned first.

    scores: (rows, cols) float tensor, any strides, no NaN; 0 <= k <= rows*cols (resp. cols).
    """
    check_tensor(scores, "scores", 2)
    check_float(scores, "scores")
    rows, cols = scores.shape
    problems, length = (rows, cols) if per_row else (1, rows * cols)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= length:
        raise ValueError(f"k must be an int in [0, {length}], got {k!r}")
    dev = scores.device
    if k == 0 or rows * cols == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=dev)
    if k == length:
        return torch.zeros(rows, cols, dtype=torch.bool, device=dev)
    if rows * cols >= 1 << 31 or problems > 65535:
        raise ValueError(f"scores of shape {tuple(scores.shape)} exceed the Triton top-k limits "
                         "(< 2**31 entries, <= 65535 rows when per_row)")
    block = 1024 if interpreting() else 4096
    warps = 4 if interpreting() else 8

    keys = torch.empty(rows * cols, dtype=torch.int32, device=dev)
    kb_r, kb_c = (4, 256) if interpreting() else (4, 1024)
    _keys_kernel[(triton.cdiv(cols, kb_c), triton.cdiv(rows, kb_r))](
        scores, keys, rows, cols, scores.stride(0), scores.stride(1), BLOCK_R=kb_r, BLOCK_C=kb_c, num_warps=4)

    tkey = torch.zeros(problems, dtype=torch.int32, device=dev)   # threshold key (prefix during stage 1)
    tidx = torch.zeros(problems, dtype=torch.int32, device=dev)   # threshold index (stage 2)
    kk = torch.full((problems,), k, dtype=torch.int32, device=dev)
    skip = torch.zeros(problems, dtype=torch.int32, device=dev)
    index_passes = max(1, ((length - 1).bit_length() + 7) // 8)
    passes = [(s, False) for s in (24, 16, 8, 0)] + [(8 * i, True) for i in reversed(range(index_passes))]
    hist = torch.zeros(len(passes), problems, 256, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(length, block), problems)
    for i, (shift, index_stage) in enumerate(passes):
        prefix = tidx if index_stage else tkey
        _hist_kernel[grid](keys, prefix, tkey, skip, hist[i], length, SHIFT=shift, HIMASK=_himask(shift),
                           INDEX_STAGE=index_stage, BLOCK=block, num_warps=warps)
        _select_kernel[(problems,)](hist[i], prefix, kk, skip, SHIFT=shift, INDEX_STAGE=index_stage,
                                    LAST_KEY_PASS=(not index_stage and shift == 0), num_warps=1)
    out = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    _mask_kernel[grid](keys, tkey, tidx, skip, out, length, BLOCK=block, num_warps=warps)
    return out.view(torch.bool)
