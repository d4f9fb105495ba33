"""Packed formats (N:M values + bit-packed positions, CSR) and the sparse matmul ops of every backend."""

from __future__ import annotations

import pytest
import torch
from sparse_helpers import has_kernels, nm_weight, unstructured_weight

from admm_kernels.backends import reference as ref
from admm_kernels.sparse import PackedCSR, PackedNM, detect_pattern, parse_packed_pattern

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATTERNS = ((2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (2, 3), (5, 16))
needs_kernels = pytest.mark.skipif(not has_kernels(), reason="admm_kernels._C sparse kernels not built")


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_round_trip_exact(n, m, dtype):
    w = nm_weight(13, m * 7, n, m, dtype)
    p = PackedNM.pack(w, n, m)
    assert p.values.shape == (13, 7 * n) and p.values.dtype == dtype
    assert p.meta.dtype == torch.uint8 and p.meta.shape == (13, ref.nm_meta_bytes(m * 7, n, m))
    assert torch.equal(p.unpack(), w)
    assert torch.equal(ref.unpack_nm(p.values, p.meta, n, m, m * 7), w)


def test_nm_groups_with_fewer_nonzeros_and_negative_zero():
    w = nm_weight(4, 16, 2, 4)
    w[0, :4] = 0.0                      # empty group
    w[1, 4:8] = torch.tensor([0.0, 3.0, 0.0, 0.0])   # one non-zero
    w[2, 8:12] = torch.tensor([-0.0, 0.0, -1.0, 2.0])
    p = PackedNM.pack(w, 2, 4)
    back = p.unpack()
    assert torch.equal(back, w)
    assert not torch.signbit(back[2, 8])  # stored zeros are canonical +0.0


def test_meta_bit_layout_2_4():
    # Row: groups keep positions (1, 3), (0, 2): value j's 2 bits sit at bit 2j -> 0b10_00_11_01 = 0x8D.
    w = torch.zeros(1, 8)
    w[0, [1, 3, 4, 6]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = PackedNM.pack(w, 2, 4)
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert p.meta.tolist() == [[0b10001101]]


def test_meta_bits_and_size():
    assert [ref.nm_meta_bits(m) for m in (2, 3, 4, 5, 8, 16)] == [1, 2, 2, 3, 3, 4]
    # 4:8 -> 3 bits a value, 4 values a group: 12 bits; 5 groups = 60 bits = 8 bytes.
    assert ref.nm_meta_bytes(40, 4, 8) == 8


def test_pack_rejects_wrong_pattern():
    w = nm_weight(3, 16, 3, 4)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0"):
        PackedNM.pack(w, 2, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        PackedNM.pack(torch.zeros(2, 6), 2, 4)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        PackedNM.pack(torch.zeros(2, 8, dtype=torch.int32), 2, 4)


@pytest.mark.parametrize("bad", ["2:2", "0:4", "x", "2:4:8", "5:3"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_packed_pattern(bad)


def test_detect_pattern():
    assert detect_pattern(nm_weight(8, 32, 2, 4)) == "2:4"
    assert detect_pattern(nm_weight(8, 32, 1, 4)) == "1:4"
    assert detect_pattern(nm_weight(8, 32, 4, 8)) == "4:8"
    assert detect_pattern(unstructured_weight(8, 32, 0.5)) == "unstructured"
    assert detect_pattern(unstructured_weight(64, 64, 0.95)) == "unstructured"
    assert detect_pattern(torch.randn(8, 32) + 10) is None
    assert detect_pattern(nm_weight(8, 30, 1, 2)) == "unstructured"  # 30 % 4 != 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sp", [0.0, 0.5, 0.9, 1.0])
def test_csr_round_trip(dtype, sp):
    w = unstructured_weight(11, 37, sp, dtype)
    p = PackedCSR.pack(w)
    p.validate()
    assert p.col.dtype == torch.int16 and p.crow.dtype == torch.int64
    assert torch.equal(p.unpack(), w)


def test_csr_wide_uses_int32():
    w = unstructured_weight(2, 40000, 0.99)
    p = PackedCSR.pack(w)
    assert p.col.dtype == torch.int32
    assert torch.equal(p.unpack(), w)


def test_validate_rejects_bad_tensors():
    p = PackedCSR.pack(unstructured_weight(4, 10, 0.5))
    bad = PackedCSR(p.crow, p.col.clone(), p.values, p.shape)
    bad.col[0] = 10
    with pytest.raises(ValueError, match=r"col indices must lie in \[0, 10\)"):
        bad.validate()
    q = PackedNM.pack(nm_weight(4, 12, 2, 3), 2, 3)
    meta = q.meta.clone()
    meta[0, 0] = 0xFF  # position 3 in a group of 3
    with pytest.raises(ValueError, match="position >= m=3"):
        PackedNM(q.values, meta, 2, 3, q.shape).validate()


# --- matmul ops: every backend against an fp64 reference (the tolerance rule) -----------------------

def _fp64(x, w):
    return x.double() @ w.double().T


def _check(y, x, w):
    """The tolerance rule: the kernel's error against fp64 at most 2x the fp32 reference's (Frobenius norms,
    so a single lucky output of the reference does not decide), plus 1e-7 relative for sums of ~10 terms where
    both errors are a few ulps."""
    exact = _fp64(x, w)
    ref_err = torch.linalg.norm((x.float() @ w.float().T).double() - exact).item()
    err = torch.linalg.norm(y.double() - exact).item()
    assert err <= 2 * ref_err + 1e-7 * torch.linalg.norm(exact).item(), (err, ref_err)


@needs_kernels
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 5, 21])
def test_sparse_nm_mm_cpu_kernel(n, m, dtype, batch):
    cols = m * 41 if m != 4 else 4 * 39  # 156: 9 full 16-input blocks + a tail
    w = nm_weight(23, cols, n, m, dtype)
    v, meta = ref.pack_nm(w, n, m)
    x = torch.randn(batch, cols)
    y = torch.ops.admm_kernels.sparse_nm_mm(x, v, meta, n, m, cols)
    assert y.shape == (batch, 23) and y.dtype == x.dtype
    _check(y, x, w)


@needs_kernels
@pytest.mark.parametrize("xdtype", DTYPES)
def test_sparse_nm_mm_input_dtypes_and_strides(xdtype):
    w = nm_weight(17, 64, 2, 4)
    v, meta = ref.pack_nm(w, 2, 4)
    x = torch.randn(64, 6).to(xdtype).T  # non-contiguous (6, 64)
    y = torch.ops.admm_kernels.sparse_nm_mm(x, v, meta, 2, 4, 64)
    assert y.dtype == xdtype
    expect = ref.sparse_nm_mm(x, v, meta, 2, 4, 64)
    torch.testing.assert_close(y, expect, rtol=1e-2 if xdtype != torch.float32 else 1e-5, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("n,m", [(2, 4), (3, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_nm_cpu_kernel_exact(n, m, dtype):
    w = nm_weight(9, m * 5, n, m, dtype)
    v, meta = ref.pack_nm(w, n, m)
    assert torch.equal(torch.ops.admm_kernels.unpack_nm(v, meta, n, m, m * 5), w)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 9, 40])
@pytest.mark.parametrize("sp", [0.5, 0.9, 1.0])
def test_csr_mm_cpu_kernel(dtype, batch, sp):
    w = unstructured_weight(29, 123, sp, dtype)
    p = PackedCSR.pack(w)
    x = torch.randn(batch, 123)
    y = torch.ops.admm_kernels.csr_mm(x, p.crow, p.col, p.values, 123)
    assert y.shape == (batch, 29)
    _check(y, x, w)


@needs_kernels
def test_csr_mm_int32_indices():
    w = unstructured_weight(3, 33000, 0.99)
    p = PackedCSR.pack(w)
    x = torch.randn(2, 33000)
    _check(torch.ops.admm_kernels.csr_mm(x, p.crow, p.col, p.values, 33000), x, w)


@pytest.mark.parametrize("batch", [1, 4])
def test_reference_ops_match_dense(batch):
    w = nm_weight(7, 24, 2, 4)
    v, meta = ref.pack_nm(w, 2, 4)
    x = torch.randn(batch, 24)
    _check(ref.sparse_nm_mm(x, v, meta, 2, 4, 24), x, w)
    p = PackedCSR.pack(unstructured_weight(7, 24, 0.8))
    _check(ref.csr_mm(x, p.crow, p.col, p.values, 24), x, p.unpack())


def test_fake_functions_trace():
    """The fake (meta) functions give the right shapes, so torch.compile can trace the ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = nm_weight(5, 16, 2, 4)
    with FakeTensorMode() as mode:
        fw = mode.from_tensor(w)
        v, meta = torch.ops.admm_kernels.pack_nm(fw, 2, 4)
        assert v.shape == (5, 8) and meta.shape == (5, 2) and meta.dtype == torch.uint8
        assert torch.ops.admm_kernels.unpack_nm(v, meta, 2, 4, 16).shape == (5, 16)
        x = mode.from_tensor(torch.randn(3, 16))
        assert torch.ops.admm_kernels.sparse_nm_mm(x, v, meta, 2, 4, 16).shape == (3, 5)
        crow = mode.from_tensor(torch.zeros(6, dtype=torch.int64))
        col = mode.from_tensor(torch.zeros(0, dtype=torch.int16))
        assert torch.ops.admm_kernels.csr_mm(x, crow, col, col.float(), 16).shape == (3, 5)


@needs_kernels
def test_kernel_rejects_bad_shapes():
    w = nm_weight(4, 16, 2, 4)
    v, meta = ref.pack_nm(w, 2, 4)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.admm_kernels.sparse_nm_mm(torch.randn(2, 12), v, meta, 2, 4, 16)
    with pytest.raises(RuntimeError, match="meta must be uint8"):
        torch.ops.admm_kernels.sparse_nm_mm(torch.randn(2, 16), v, meta[:, :1], 2, 4, 16)


@needs_kernels
def test_cpu_kernels_reject_out_of_range_positions():
    """With M not a power of two the position bits can encode values >= M: corrupt metadata must raise,
    never read or write outside the group."""
    w = nm_weight(4, 6, 1, 3, torch.float32)
    pk = PackedNM.pack(w, 1, 3)
    bad = torch.full_like(pk.meta, 255)
    with pytest.raises(RuntimeError, match="unpack_nm: position 3 out of range for m=3"):
        torch.ops.admm_kernels.unpack_nm(pk.values, bad, 1, 3, 6)
    with pytest.raises(RuntimeError, match="sparse_nm_mm: position 3 out of range for m=3"):
        torch.ops.admm_kernels.sparse_nm_mm(torch.randn(2, 6), pk.values, bad, 1, 3, 6)
    assert torch.equal(torch.ops.admm_kernels.unpack_nm(pk.values, pk.meta, 1, 3, 6), w)
