"""On a fixed mask ADMM converges to the (damped) masked least-squares optimum (fp64 row-by-row solves)."""

import pytest
import torch
from conftest import correlated_inputs

import admm_kernels as ak


def masked_optimum(W, G, mask, percdamp):
    """Row by row: argmin (w - w')ᵀ Gd (w - w') over w' supported on the row's mask, fp64.

    Gd = G + λ diag(G) with λ = percdamp · mean(diag Ĝ): the damping of the ADMM solve mapped back from the
    scaled space (Ĝ = D⁻¹GD⁻¹, d = sqrt(diag G) + 1e-8)."""
    W, G = W.double(), G.double()
    d = G.diagonal().sqrt() + 1e-8
    lam = percdamp * float((G.diagonal() / (d * d)).mean())
    Gd = G + lam * torch.diag(d * d)
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        S = mask[i]
        out[i, S] = torch.linalg.solve(Gd[S][:, S], (Gd @ W[i])[S])
    return out


def setup(out=32, inn=64, seed=0):
    x = correlated_inputs(512, inn, outliers=4, seed=seed)
    G = ak.gram(x, dtype=torch.float64)
    W = torch.randn(out, inn, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))
    return W, G


def masks_for(W, G):
    g = torch.Generator().manual_seed(5)
    return {
        "random": torch.rand(W.shape, generator=g) > 0.4,
        "wanda-row": ak.prune_layer(W, G, 0.6, method="wanda").mask,
        "2:4": ak.prune_layer(W, G, pattern="2:4", method="magnitude").mask,
    }


@pytest.mark.parametrize("kind", ["random", "wanda-row", "2:4"])
@pytest.mark.parametrize("percdamp", [0.1, 0.0])
def test_admm_reaches_masked_least_squares(kind, percdamp):
    W, G = setup()
    mask = masks_for(W, G)[kind]
    best = masked_optimum(W, G, mask, percdamp)
    res = ak.prune_layer(W, G, mask=mask, iters=400, percdamp=percdamp, compute_dtype=torch.float64)
    assert torch.equal(res.mask, mask)
    torch.testing.assert_close(res.weight, best, rtol=0, atol=1e-8 * float(W.abs().max()))
    # 20 iterations (the default) are not yet there: the check is able to fail.
    short = ak.prune_layer(W, G, mask=mask, iters=20, percdamp=percdamp, compute_dtype=torch.float64)
    assert float((short.weight - best).abs().max()) > 1e-6


def test_undamped_optimum_is_the_best_error_on_the_mask():
    W, G = setup(seed=1)
    mask = masks_for(W, G)["wanda-row"]
    exact = ak.reconstruction_error(W, masked_optimum(W, G, mask, 0.0), G)
    damped = ak.prune_layer(W, G, mask=mask, iters=400, percdamp=0.1, compute_dtype=torch.float64).error
    undamped = ak.prune_layer(W, G, mask=mask, iters=400, percdamp=0.0, compute_dtype=torch.float64).error
    assert undamped == pytest.approx(exact, rel=1e-9)
    assert exact <= damped


def test_fp32_admm_close_to_the_optimum():
    W, G = setup()
    mask = masks_for(W, G)["random"]
    best = ak.reconstruction_error(W, masked_optimum(W, G, mask, 0.1), G)
    res = ak.prune_layer(W.float(), G.float(), mask=mask, iters=300)
    assert res.weight.dtype == torch.float32
    assert res.error == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("percdamp", [0.1, 0.0])
def test_exact_solve_on_a_given_mask(percdamp):
    W, G = setup()
    mask = masks_for(W, G)["wanda-row"]
    best = masked_optimum(W, G, mask, percdamp)
    res = ak.prune_layer(W, G, mask=mask, solve="exact", percdamp=percdamp, cg_tol=1e-12, cg_iters=500,
                         compute_dtype=torch.float64)
    assert res.stats["iterations"] == 0 and res.stats["cg_residual"] <= 1e-12
    torch.testing.assert_close(res.weight, best, rtol=0, atol=1e-8 * float(W.abs().max()))


def test_exact_solve_after_admm_mask_selection():
    W, G = setup()
    admm = ak.prune_layer(W, G, 0.6, "per-row", compute_dtype=torch.float64)
    res = ak.prune_layer(W, G, 0.6, "per-row", solve="exact", cg_tol=1e-12, cg_iters=500,
                         compute_dtype=torch.float64)
    assert torch.equal(res.mask, admm.mask)
    torch.testing.assert_close(res.weight, masked_optimum(W, G, res.mask, 0.1), rtol=0,
                               atol=1e-8 * float(W.abs().max()))
