"""Baselines behind prune_layer, and the ordering ADMM-Grad < SparseGPT < Wanda <= magnitude on layers with
correlated inputs and outlier features (like LLM activations)."""

import pytest
import torch
from conftest import correlated_inputs

import admm_kernels as ak
from admm_kernels import masks
from admm_kernels.patterns import parse_pattern

METHODS = ("admm", "sparsegpt", "wanda", "magnitude")


@pytest.mark.parametrize("sparsity,pattern", [(0.5, "unstructured"), (0.6, "unstructured"),
                                              (0.7, "unstructured"), (0.8, "unstructured"), (0.5, "2:4")])
def test_error_ordering(llm_like_layer, sparsity, pattern):
    W, G = llm_like_layer
    err = {m: ak.prune_layer(W, G, sparsity, pattern, method=m).error for m in METHODS}
    assert err["admm"] < err["sparsegpt"] < err["wanda"] <= err["magnitude"], err


def small(out=24, inn=64, seed=0):
    x = correlated_inputs(256, inn, outliers=4, seed=seed)
    return torch.randn(out, inn, generator=torch.Generator().manual_seed(seed + 1)), ak.gram(x)


def test_magnitude_masks():
    W, G = small()
    a = W.abs()
    res = ak.prune_layer(W, G, 0.5, method="magnitude")
    thr = a.flatten().kthvalue(int(a.numel() * 0.5)).values
    assert torch.equal(res.mask, a > thr)
    row = ak.prune_layer(W, G, 0.25, "per-row", method="magnitude")
    assert torch.equal(row.mask, a > a.kthvalue(16, dim=1, keepdim=True).values)
    nm = ak.prune_layer(W, G, pattern="2:4", method="magnitude")
    g = a.view(24, 16, 4)
    assert torch.equal(nm.mask.view(24, 16, 4), g >= g.topk(2, dim=2).values[..., 1:])
    assert torch.equal(res.weight, W * res.mask)


def test_wanda_scores_and_grouping():
    W, G = small()
    score = W.abs() * G.diagonal().sqrt()
    res = ak.prune_layer(W, G, 0.5, method="wanda")  # per output row, as in the paper
    assert torch.equal(res.mask, score > score.kthvalue(32, dim=1, keepdim=True).values)
    layer = ak.prune_layer(W, G, 0.5, method="wanda", per_row=False)
    assert torch.equal(layer.mask, score > score.flatten().kthvalue(int(score.numel() * 0.5)).values)
    assert not torch.equal(res.mask, layer.mask)
    assert torch.equal(res.weight, W * res.mask)


def obs_reference(W, G, keep, percdamp=0.01):
    """Unblocked OBS on a fixed mask in fp64: columns left to right, each pruned entry's error spread over
    the later columns along the row of the upper Cholesky factor of H^-1 (the paper's Algorithm 1)."""
    W = W.double().clone()
    G = G.double()
    H = G + percdamp * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    for j in range(W.shape[1]):
        q = W[:, j] * keep[:, j]
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        W[:, j] = q
    return W


@pytest.mark.parametrize("blocksize", [128, 16, 7])
def test_sparsegpt_blocking_equals_unblocked_obs_on_a_fixed_mask(blocksize):
    W, G = small(inn=64)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    res = ak.prune_layer(W.double(), G, mask=keep, method="sparsegpt", blocksize=blocksize,
                         compute_dtype=torch.float64)
    torch.testing.assert_close(res.weight.double(), obs_reference(W, G, keep), rtol=1e-9, atol=1e-9)
    assert torch.equal(res.mask, keep)
    assert res.error < ak.reconstruction_error(W, W * keep, G)


@pytest.mark.parametrize("pattern,s", [("unstructured", 0.55), ("per-row", 0.7), ("4:8", 0.5), ("1:4", 0.0)])
def test_sparsegpt_exact_counts_and_dtype(pattern, s):
    W, G = small(out=20, inn=256)
    res = ak.prune_layer(W.to(torch.bfloat16), G, s, pattern, method="sparsegpt", blocksize=64)
    assert res.weight.dtype == torch.bfloat16
    p = parse_pattern(pattern, 256)
    masks.count_check(res.mask, p, s)
    assert bool((res.weight[~res.mask] == 0).all())


def test_sparsegpt_with_dead_inputs():
    x = correlated_inputs(256, 64, outliers=2)
    x[:, [5, 9]] = 0
    G = ak.gram(x)
    W = torch.randn(16, 64)
    res = ak.prune_layer(W, G, 0.5, "per-row", method="sparsegpt")
    assert not bool(res.mask[:, [5, 9]].any())
    assert res.stats["dead_inputs"] == 2 and res.error < 0.1


def test_given_mask_is_applied_by_wanda_and_magnitude():
    W, G = small()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) > 0.3
    for method in ("wanda", "magnitude"):
        res = ak.prune_layer(W, G, mask=keep, method=method)
        assert torch.equal(res.weight, W * keep) and torch.equal(res.mask, keep)


def test_admm_update_beats_sparsegpt_update_on_the_same_mask(llm_like_layer):
    W, G = llm_like_layer
    keep = ak.prune_layer(W, G, 0.6, method="wanda").mask
    admm = ak.prune_layer(W, G, mask=keep)
    obs = ak.prune_layer(W, G, mask=keep, method="sparsegpt")
    assert admm.error < obs.error < ak.reconstruction_error(W, W * keep, G)
