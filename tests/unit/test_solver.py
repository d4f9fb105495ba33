"""prune_layer's ADMM-Grad against a plain fp64 transcription of its steps (admm_kernels/methods/admm.py),
plus the solver's invariants."""

import pytest
import torch
from conftest import correlated_inputs

import admm_kernels as ak
from admm_kernels import masks
from admm_kernels.patterns import parse_pattern

OUT, IN = 48, 64


def transcription(W, G, s, pattern, iters=20, T=15, rho=1.0, percdamp=0.1, schedule=None, one_shot=False):
    """The algorithm step by step in fp64 (thresholds as the released code; a linear solve per iteration)."""
    W, G = W.double(), G.double()
    d = G.diagonal().sqrt() + 1e-8
    Gh = G / d[:, None] / d[None, :]
    V = (W * d).T  # (in, out)
    Gh = Gh + percdamp * Gh.diagonal().mean() * torch.eye(len(d), dtype=G.dtype)
    B = Gh @ V
    A = Gh + rho * torch.eye(len(d), dtype=G.dtype)
    if schedule is None:
        schedule = "constant" if pattern == "unstructured" else "cubic"
    n_in, n_out = V.shape

    def select(X, st):
        a = X.abs()
        if pattern == "unstructured":
            k = int(a.numel() * st)
            mask = torch.ones(a.numel(), dtype=torch.bool)
            mask[torch.topk(a.flatten(), k, largest=False).indices] = False
            return mask.view(a.shape)
        if pattern == "per-row":  # rows of W = columns of V
            thr = a.sort(dim=0).values[int(n_in * st)]
            return a >= thr[None, :]
        n, m = (int(x) for x in pattern.split(":"))
        g = a.T.reshape(n_out, n_in // m, m)
        top = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(n, dim=2).indices, True)
        prot = torch.where(top, torch.full_like(g, float("inf")), g).reshape(n_out, n_in).T
        thr = prot.flatten().kthvalue(int(a.numel() * st) + 1).values
        return prot >= thr

    target = s if ":" not in pattern else 1 - int(pattern.split(":")[0]) / int(pattern.split(":")[1])
    Wk, U = V.clone(), torch.zeros_like(V)
    if one_shot:
        M = select(V, target)
    for t in range(iters):
        if not one_shot and t < T:
            st = target if schedule == "constant" else target - target * (1 - (t + 1) / T) ** 3
            M = select(Wk + U, st)
        Z = (Wk + U) * M
        U = U + Wk - Z
        Wk = torch.linalg.solve(A, B + rho * (Z - U))
    Z = (Wk + U) * M
    return (Z / d[:, None]).T, M.T


def layer(out=OUT, inn=IN, n=512, seed=0):
    x = correlated_inputs(n, inn, outliers=4, seed=seed)
    W = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed + 1))
    return W, ak.gram(x)


CASES = [
    ("unstructured", 0.5, {}),
    ("unstructured", 0.7, {"schedule": "cubic"}),
    ("per-row", 0.6, {}),
    ("per-row", 0.5, {"schedule": "constant"}),
    ("2:4", 0.5, {}),
    ("4:8", 0.5, {}),
    ("1:4", 0.5, {}),
    ("unstructured", 0.5, {"one_shot": True}),
    ("2:4", 0.5, {"one_shot": True}),
    ("per-row", 0.5, {"iters": 30, "T": 10, "rho": 0.5, "percdamp": 0.05}),
]


@pytest.mark.parametrize("pattern,s,opts", CASES)
def test_matches_fp64_transcription(pattern, s, opts):
    W, G = layer()
    ref_w, ref_m = transcription(W, G, s, pattern, **opts)
    res = ak.prune_layer(W.double(), G, s, pattern, compute_dtype=torch.float64, **opts)
    assert torch.equal(res.mask, ref_m)
    torch.testing.assert_close(res.weight, ref_w, rtol=1e-9, atol=1e-12)
    # The default fp32 solve agrees to fp32 accuracy (a near-tie may flip a handful of mask entries).
    res32 = ak.prune_layer(W, G, s, pattern, **opts)
    assert (res32.mask != ref_m).float().mean() < 0.01
    err_ref = ak.reconstruction_error(W, ref_w, G)
    assert res.error == pytest.approx(err_ref, rel=1e-9)
    assert res32.error == pytest.approx(err_ref, rel=2e-2)


def test_mask_only_is_wanda_on_the_layer():
    W, G = layer()
    res = ak.prune_layer(W, G, 0.5, iters=0)
    wanda = ak.prune_layer(W, G, 0.5, method="wanda", per_row=False)
    assert torch.equal(res.mask, wanda.mask)
    assert torch.equal(res.weight, W * res.mask)
    assert res.stats["iterations"] == 0


def test_one_shot_mask_is_wanda_mask_and_update_improves():
    W, G = layer()
    res = ak.prune_layer(W, G, 0.5, one_shot=True)
    wanda = ak.prune_layer(W, G, 0.5, method="wanda", per_row=False)
    assert torch.equal(res.mask, wanda.mask)
    assert res.error < wanda.error


@pytest.mark.parametrize("s", [0.3, 0.55, 0.77])
def test_exact_sparsity_per_layer(s):
    W, G = layer(37, 60)
    res = ak.prune_layer(W, G, s)
    assert int((~res.mask).sum()) == int(37 * 60 * s)
    assert bool((res.weight[~res.mask] == 0).all())
    assert res.stats["sparsity"] == pytest.approx(int(37 * 60 * s) / (37 * 60))


@pytest.mark.parametrize("s", [0.25, 0.6, 0.9])
def test_exact_sparsity_per_row(s):
    W, G = layer(37, 60)
    res = ak.prune_layer(W, G, s, "per-row")
    assert bool(((~res.mask).sum(1) == int(60 * s)).all())
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8", "1:2", "8:16"])
@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_exact_nm_counts(pattern, method):
    W, G = layer(24, 64)
    res = ak.prune_layer(W, G, pattern=pattern, method=method)
    p = parse_pattern(pattern, 64)
    masks.count_check(res.mask, p, 0.0)
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_dtype_shape_device_preserved_and_inputs_untouched(dtype, method):
    W, G = layer(20, 32)
    W = W.to(dtype)
    W0, G0 = W.clone(), G.clone()
    res = ak.prune_layer(W, G, 0.5, "per-row", method=method)
    assert res.weight.dtype == dtype and res.weight.shape == W.shape and res.weight.device == W.device
    assert res.weight.is_contiguous()
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    assert isinstance(res.error, float) and 0.0 <= res.error < 1.0
    assert torch.equal(W, W0) and torch.equal(G, G0)


def test_gram_dtype_any_float():
    W, G = layer(20, 32)
    a = ak.prune_layer(W, G.double(), 0.5)
    b = ak.prune_layer(W, G, 0.5)
    assert (a.mask != b.mask).float().mean() < 0.02


@pytest.mark.parametrize("pattern", ["unstructured", "per-row", "2:4"])
def test_deterministic(pattern):
    W, G = layer()
    a = ak.prune_layer(W, G, 0.6, pattern)
    b = ak.prune_layer(W, G, 0.6, pattern)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) and a.error == b.error


def test_update_only_returns_mask_unchanged():
    W, G = layer()
    m = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    m0 = m.clone()
    res = ak.prune_layer(W, G, mask=m)
    assert torch.equal(res.mask, m0) and torch.equal(m, m0) and res.mask is not m
    assert bool((res.weight[~m] == 0).all())
    applied = ak.reconstruction_error(W, W * m, G)
    assert res.error < applied
    assert res.stats["update_only"] and res.stats["mask_updates"] == 0


def test_dead_inputs_pruned_first_and_kept_out_of_the_solve():
    torch.manual_seed(0)
    inn, dead = 64, torch.tensor([3, 17, 40, 41, 63])
    x = correlated_inputs(512, inn, outliers=4)
    x[:, dead] = 0
    G = ak.gram(x)
    W = torch.randn(OUT, inn)
    res = ak.prune_layer(W.double(), G, 0.5, "per-row", schedule="constant", compute_dtype=torch.float64)
    assert res.stats["dead_inputs"] == len(dead)
    assert not bool(res.mask[:, dead].any()) and bool((res.weight[:, dead] == 0).all())
    # Same answer as the layer with the dead columns removed and their budget taken off each row.
    live = torch.ones(inn, dtype=torch.bool)
    live[dead] = False
    k_live = int(inn * 0.5) - len(dead)
    s_live = (k_live + 0.5) / int(live.sum())
    sub = ak.prune_layer(W[:, live].double(), G[live][:, live], s_live, "per-row", schedule="constant",
                         compute_dtype=torch.float64)
    assert torch.equal(res.mask[:, live], sub.mask)
    torch.testing.assert_close(res.weight[:, live], sub.weight, rtol=1e-9, atol=1e-12)
    assert res.error == pytest.approx(sub.error, rel=1e-9)


def test_dead_inputs_beyond_the_budget_keep_their_weight():
    x = correlated_inputs(256, 32, outliers=2)
    x[:, :20] = 0
    G = ak.gram(x)
    W = torch.randn(8, 32)
    res = ak.prune_layer(W, G, 0.25, "per-row")  # 8 pruned per row, all dead
    assert bool((~res.mask[:, :8]).all()) and bool(res.mask[:, 8:].all())
    assert torch.equal(res.weight[:, 8:20], W[:, 8:20])
    assert res.error < 1e-5  # the live part is unchanged up to fp32 scaling round trips


def test_reconstruction_error_formula():
    W, G = layer()
    P = W * (torch.rand(W.shape) > 0.3)
    D = (W - P).double()
    expect = float(torch.trace(D @ G.double() @ D.T) / torch.trace(W.double() @ G.double() @ W.T.double()))
    assert ak.reconstruction_error(W, P, G) == pytest.approx(expect, rel=1e-12)
    assert ak.reconstruction_error(W, W, G) == 0.0
    assert ak.reconstruction_error(W, torch.zeros_like(W), G) == pytest.approx(1.0, rel=1e-12)


def test_zero_sparsity_keeps_everything_and_stats():
    W, G = layer()
    res = ak.prune_layer(W, G, 0.0)
    assert bool(res.mask.all())
    assert res.error < 1e-3  # the damped ADMM iterate with nothing pruned stays at W
    st = res.stats
    for key in ("seconds", "iterations", "sparsity", "backends", "method", "pattern"):
        assert key in st
    assert st["iterations"] == 20 and set(st["seconds"]) >= {"factor", "iterations", "mask", "error", "total"}
    assert st["backends"]["admm_dual_step"] in ("reference", "cpu", "triton", "cuda")


def test_schedule_shorter_than_T_still_reaches_target():
    W, G = layer()
    res = ak.prune_layer(W, G, 0.6, "per-row", iters=5, T=15)
    assert bool(((~res.mask).sum(1) == int(IN * 0.6)).all())


def test_large_layer_error_path_agrees_with_fp64(monkeypatch):
    """Above _FP64_ERROR_MACS the error uses fp32 GEMMs and tr(WGWᵀ) from the solve: same value to ~1e-5."""
    from admm_kernels.methods import error

    W, G = layer()
    exact = ak.prune_layer(W, G, 0.6, "2:4")
    monkeypatch.setattr(error, "_FP64_ERROR_MACS", 0)
    fast = ak.prune_layer(W, G, 0.6, "2:4")
    assert torch.equal(fast.weight, exact.weight)
    assert fast.error == pytest.approx(exact.error, rel=1e-4)
    assert ak.reconstruction_error(W, fast.weight, G) == pytest.approx(exact.error, rel=1e-4)


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_non_contiguous_inputs(method):
    W, G = layer()
    Wt = W.T.contiguous().T  # same values, column-major strides
    a = ak.prune_layer(Wt, G, 0.5, "per-row", method=method)
    b = ak.prune_layer(W, G, 0.5, "per-row", method=method)
    assert not Wt.is_contiguous()
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_parameter_weights(method):
    """nn.Linear weights are Parameters requiring grad: pruned without autograd, the Parameter untouched."""
    W, G = layer(16, 32)
    lin = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    res = ak.prune_layer(lin.weight, G, 0.5, method=method)
    assert not res.weight.requires_grad and torch.equal(lin.weight.detach(), W)
    assert torch.equal(res.mask, ak.prune_layer(W, G, 0.5, method=method).mask)


def test_public_gram_is_the_function_after_submodule_import():
    import importlib

    importlib.import_module("admm_kernels.gram")
    assert callable(ak.gram) and ak.gram.__name__ == "gram"


def test_gram_float64_is_exact_and_in_features_is_checked():
    x = torch.randn(300, 17, dtype=torch.float64)
    assert torch.allclose(ak.gram(x, dtype=torch.float64), x.T @ x, rtol=1e-13, atol=1e-12)
    with pytest.raises(TypeError, match="in_features must be an int"):
        ak.GramAccumulator(True)
    with pytest.raises(ValueError, match="positive"):
        ak.GramAccumulator(0)
