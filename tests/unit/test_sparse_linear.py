"""SparseLinear and sparsify: equality with the dense layer, every pattern/dtype, fallbacks, generation."""

from __future__ import annotations

import pytest
import torch
from sparse_helpers import has_kernels, nm_weight, prune_linears_nm, tiny_llama, unstructured_weight
from torch import nn

from admm_kernels.sparse import SparseLinear, sparsify

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _linear(w: torch.Tensor, bias: bool) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.normal_()
    return lin


def _expect(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The dense layer in fp64: the ground truth."""
    b = None if lin.bias is None else lin.bias.double()
    return nn.functional.linear(x.double(), lin.weight.double(), b)


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 3e-2


@pytest.mark.parametrize("pattern,make", [
    ("2:4", lambda d: nm_weight(23, 148, 2, 4, d)),          # odd shapes: 148 = 9 blocks of 16 + 4
    ("1:4", lambda d: nm_weight(23, 148, 1, 4, d)),
    ("4:8", lambda d: nm_weight(23, 152, 4, 8, d)),
    ("unstructured", lambda d: unstructured_weight(23, 147, 0.9, d)),
    ("unstructured", lambda d: unstructured_weight(23, 147, 0.5, d)),  # dense fallback
])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense(pattern, make, dtype, bias):
    lin = _linear(make(dtype), bias)
    sl = SparseLinear.from_dense(lin, pattern)
    assert sl.pattern == pattern and sl.dtype == dtype
    assert torch.equal(sl.weight, lin.weight.detach())
    for shape in [(1, lin.in_features), (5, lin.in_features), (2, 3, lin.in_features), (lin.in_features,),
                  (40, lin.in_features)]:  # 40 rows: above max_sparse_batch -> unpack + dense
        x = torch.randn(*shape).to(dtype)
        y = sl(x)
        assert y.shape == (*shape[:-1], lin.out_features) and y.dtype == dtype
        scale = _expect(lin, x).abs().max().item() + 1
        assert (y.double() - _expect(lin, x)).abs().max().item() <= _tol(dtype) * scale


def test_detects_pattern_and_does_not_modify_input():
    lin = _linear(nm_weight(8, 32, 2, 4), True)
    before = lin.weight.detach().clone()
    sl = SparseLinear.from_dense(lin)
    assert sl.pattern == "2:4"
    assert torch.equal(lin.weight, before)
    assert SparseLinear.from_dense(_linear(unstructured_weight(8, 30, 0.9), False)).pattern == "unstructured"


def test_storage_dtype_conversion():
    lin = _linear(nm_weight(8, 32, 2, 4), True)
    sl = SparseLinear.from_dense(lin, dtype=torch.float16)
    assert sl.values.dtype == torch.float16 and sl.bias.dtype == torch.float16
    x = torch.randn(3, 32, dtype=torch.float16)
    torch.testing.assert_close(sl(x).float(), _expect(lin, x).float(), rtol=2e-2, atol=2e-2)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="has no zeros"):
        SparseLinear.from_dense(_linear(torch.randn(4, 8) + 10, False))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseLinear.from_dense(_linear(unstructured_weight(4, 8, 0.1), False), "2:4")
    with pytest.raises(ValueError, match="pattern must be"):
        SparseLinear.from_dense(_linear(nm_weight(4, 8, 2, 4), False), "half")
    with pytest.raises(TypeError, match="dtype must be"):
        SparseLinear.from_dense(_linear(nm_weight(4, 8, 2, 4), False), dtype=torch.int8)
    sl = SparseLinear.from_dense(_linear(nm_weight(4, 8, 2, 4), False))
    with pytest.raises(ValueError, match="in_features=8"):
        sl(torch.randn(2, 9))


def test_repr_says_how_it_computes():
    dense_fallback = SparseLinear.from_dense(_linear(unstructured_weight(16, 64, 0.5), False))
    assert "dense fallback" in repr(dense_fallback)
    if has_kernels():
        assert "sparse < 80%: the CSR kernel is slower" in repr(dense_fallback)
    sl = SparseLinear.from_dense(_linear(nm_weight(16, 64, 2, 4), False))
    if has_kernels():
        assert "compute=sparse" in repr(sl) and "pattern=2:4" in repr(sl)
    else:
        assert "dense fallback" in repr(sl)


def test_forced_reference_backend_gives_same_result(monkeypatch):
    lin = _linear(nm_weight(16, 64, 2, 4), True)
    x = torch.randn(3, 64)
    y = SparseLinear.from_dense(lin)(x)
    monkeypatch.setenv("ADMM_KERNELS_BACKEND", "reference")  # read when a layer first runs on a device
    torch.testing.assert_close(SparseLinear.from_dense(lin)(x), y, rtol=1e-5, atol=1e-5)


def test_sparsify_copies_and_converts_eligible_layers():
    model = nn.Sequential(_linear(nm_weight(16, 32, 2, 4), True), nn.ReLU(),
                          _linear(unstructured_weight(64, 16, 0.6), False),
                          _linear(torch.randn(4, 64), True))  # dense: stays nn.Linear
    x = torch.randn(5, 32)
    expect = model(x)
    out = sparsify(model)
    assert isinstance(out[0], SparseLinear) and out[0].pattern == "2:4"
    assert isinstance(out[2], SparseLinear) and out[2].pattern == "unstructured"
    assert type(out[3]) is nn.Linear
    assert all(type(m) is not SparseLinear for m in model)  # the input model is untouched
    torch.testing.assert_close(out(x), expect, rtol=1e-5, atol=1e-5)
    only24 = sparsify(model, "2:4")
    assert isinstance(only24[0], SparseLinear) and type(only24[2]) is nn.Linear
    same = sparsify(model, inplace=True)
    assert same is model and isinstance(model[0], SparseLinear)


def test_sparsify_bad_input():
    with pytest.raises(TypeError, match="model must be"):
        sparsify("model")
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(nn.Linear(4, 4), min_sparsity=2.0)


def test_tiny_llama_greedy_generation_matches_dense_pruned():
    model = tiny_llama(tie=True)
    prune_linears_nm(model, 2, 4)
    sparse = sparsify(model)
    names = [n for n, m in sparse.named_modules() if isinstance(m, SparseLinear)]
    assert len(names) == 2 * 7 and "lm_head" not in names  # q k v o gate up down per block; tied head kept
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        dense_out = model.generate(ids, max_new_tokens=12, do_sample=False)
        sparse_out = sparse.generate(ids, max_new_tokens=12, do_sample=False)
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(dense_out, sparse_out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_2_4_semi_structured(dtype):
    lin = _linear(nm_weight(128, 256, 2, 4, dtype), True).cuda()
    sl = SparseLinear.from_dense(lin).cuda()
    mode, why = sl.compute_plan(torch.device("cuda"))
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    y = sl(x)
    torch.testing.assert_close(y.float(), lin(x).float(), rtol=2e-2, atol=5e-2)
    assert "compute=" in repr(sl) and mode in ("semi-structured", "dense"), why
    x1 = torch.randn(3, 256, device="cuda", dtype=dtype)  # decode shape
    torch.testing.assert_close(sl(x1).float(), lin(x1).float(), rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
def test_cuda_unstructured_falls_back_to_dense():
    lin = _linear(unstructured_weight(64, 96, 0.9), False).cuda()
    sl = SparseLinear.from_dense(lin).cuda()
    assert sl.compute_plan(torch.device("cuda"))[0] == "dense"
    x = torch.randn(5, 96, device="cuda")
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-4, atol=1e-4)


def test_copies_and_reloads_do_not_share_bound_kernels():
    import copy

    lin = _linear(nm_weight(16, 64, 2, 4), True)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(2, 64)
    y = sl(x)
    twin = copy.deepcopy(sl)
    with torch.no_grad():
        twin.values.mul_(2.0)  # must not change the original
    torch.testing.assert_close(sl(x), y)
    torch.testing.assert_close(twin(x) - twin.bias, 2 * (y - sl.bias), rtol=1e-5, atol=1e-5)
    state = {k: (v * 3 if k == "values" else v) for k, v in sl.state_dict().items()}
    sl.load_state_dict(state, assign=True)  # new buffer objects: the layer must use them
    torch.testing.assert_close(sl(x) - sl.bias, 3 * (y - sl.bias), rtol=1e-5, atol=1e-5)


def test_without_compiled_kernels_falls_back_to_dense(monkeypatch):
    from admm_kernels.backends import cpu

    monkeypatch.setattr(cpu, "has_sparse_kernels", lambda: False)
    lin = _linear(nm_weight(16, 64, 2, 4), True)
    sl = SparseLinear.from_dense(lin)
    assert "dense fallback (compiled sparse CPU kernels unavailable" in repr(sl)
    x = torch.randn(3, 64)
    assert torch.equal(sl(x), lin(x))  # nn.Linear's own maths on the unpacked weight: bit-identical
