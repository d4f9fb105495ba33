"""Nothing silently wrong in prune_layer (and clear errors): extreme but finite weights,
the Gram's overall scale, exact targets for every method, meta tensors, non-ASCII pattern digits."""

import math
import warnings

import pytest
import torch
from conftest import correlated_inputs

import admm_kernels as ak
from admm_kernels import methods
from admm_kernels.methods import ranges

ALL = methods.names()


def layer(out=16, inn=32, seed=0):
    x = correlated_inputs(256, inn, outliers=2, seed=seed)
    return torch.randn(out, inn, generator=torch.Generator().manual_seed(seed + 1)), ak.gram(x)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype,largest", [(torch.float32, 2.0 ** 123), (torch.bfloat16, 2.0 ** 123),
                                           (torch.float32, 2.0 ** -100), (torch.float16, 6e4),
                                           (torch.float16, 65504.0)])
def test_extreme_weights_give_finite_results_equal_to_the_rescaled_layer(method, dtype, largest):
    """|W| = 1e37 in fp32 gave NaN weights and error=nan (ADMM) or error 0.49 instead of 0.0013 (SparseGPT,
    whose w²/d² scores overflowed): now the same mask and relative error as the unit-scale layer (largest
    |W| a power of two here, 2^123 ≈ 1.1e37, so that the big layer is exactly the unit one rescaled)."""
    W, G = layer()
    unit = (W / W.abs().max()).to(dtype)
    big = (unit.double() * largest).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 at its largest value may clamp
        res = ak.prune_layer(big, G, 0.5, method=method)
    assert bool(torch.isfinite(res.weight).all()) and math.isfinite(res.error) and res.error >= 0
    assert res.weight.dtype == dtype and bool((res.weight[~res.mask] == 0).all())
    ref = ak.prune_layer(unit, G, 0.5, method=method)
    if dtype != torch.float16:  # fp16 is not a power-of-two rescaling of itself at 6e4
        assert torch.equal(res.mask, ref.mask)
        assert res.error == pytest.approx(ref.error, rel=1e-3)
        assert res.stats["rescaled"]["weight_exponent"] != 0


def test_fp16_overflowing_update_is_clamped_and_counted():
    """An update that moves a kept fp16 weight past 65504 returns 65504 (the nearest finite value), counts
    it and warns, with the error of the clamped weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    x[:, 1] = x[:, 0] + 1e-3 * torch.randn(512, generator=g)  # input 1 ~ input 0: pruning 0 moves it to 1
    G = ak.gram(x)
    W = torch.full((1, 8), 1.0)
    W[0, 0], W[0, 1] = 60000.0, 60000.0
    W = W.half()
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.warns(RuntimeWarning, match=r"exceed the largest finite float16 \(65504\) and were clamped"):
        res = ak.prune_layer(W, G, mask=mask, method="sparsegpt")
    assert res.stats["clamped"] >= 1 and float(res.weight[0, 1]) == 65504.0
    assert bool(torch.isfinite(res.weight).all()) and math.isfinite(res.error)
    assert res.error == pytest.approx(ak.reconstruction_error(W, res.weight, G), rel=1e-12)


def test_reconstruction_error_of_extreme_weights_on_the_fp32_path(monkeypatch):
    from admm_kernels.methods import error

    W, G = layer()
    P = W * (torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) > 0.5)
    expect = ak.reconstruction_error(W, P, G)
    monkeypatch.setattr(error, "_FP64_ERROR_MACS", 0)  # the fp32-GEMM path of large layers
    for c in (1e36, 1e-36):
        assert ak.reconstruction_error(W * c, P * c, G) == pytest.approx(expect, rel=1e-4)
    assert ak.reconstruction_error(W, P, G * (1e35 / float(G.max()))) == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("pattern", ["unstructured", "per-row", "2:4"])
def test_result_does_not_depend_on_the_gram_scale(method, pattern):
    """prune_layer(W, c·G) for c in {1e-20, 1e-10, 1, 1e10}: the same mask, weights equal to fp32 accuracy.
    Before, the absolute +1e-8 in d = sqrt(diag G) + 1e-8 changed 46 of 512 mask entries at c = 1e-20."""
    W, G = layer()
    ref = ak.prune_layer(W, G, 0.5, pattern, method=method)
    for c in (1e-20, 1e-10, 1e10):
        res = ak.prune_layer(W, G * c, 0.5, pattern, method=method)
        assert torch.equal(res.mask, ref.mask), c
        torch.testing.assert_close(res.weight, ref.weight, rtol=1e-4, atol=1e-4 * float(W.abs().max()))
        assert res.error == pytest.approx(ref.error, rel=1e-3)


def test_tiny_gram_admm_beats_magnitude():
    """The case that was once wrong: diag G ≈ 1e-14 made ADMM no better than magnitude pruning."""
    W, G = layer(64, 64)
    G = G * (1e-14 / float(G.diagonal().mean()))
    admm = ak.prune_layer(W, G, 0.6).error
    assert admm < 0.5 * ak.prune_layer(W, G, 0.6, method="magnitude").error


def test_seed_scaling_unchanged_for_normal_grams():
    from admm_kernels.methods.scaling import SCALE_EPS, scale_eps

    assert scale_eps(1.0) == SCALE_EPS == scale_eps(1e6) and scale_eps(1e-4) == pytest.approx(1e-10)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape,s", [((7, 1), 0.5), ((16, 64), 0.999), ((5, 3), 0.4), ((37, 60), 0.55)])
def test_unstructured_target_is_exact_for_every_method(method, shape, s):
    out, inn = shape
    x = correlated_inputs(64, inn, outliers=1)
    W = torch.randn(out, inn, generator=torch.Generator().manual_seed(5))
    res = ak.prune_layer(W, ak.gram(x), s, method=method)
    assert int((~res.mask).sum()) == int(out * inn * s)
    assert bool((res.weight[~res.mask] == 0).all())


def test_wanda_unstructured_is_per_row_with_the_remainder_on_the_cheapest_rows():
    W, G = layer(6, 10)
    score = W.abs() * G.diagonal().sqrt()
    res = ak.prune_layer(W, G, 0.35, method="wanda")  # 21 pruned: 3 per row + 3 extra
    pruned_per_row = (~res.mask).sum(1)
    assert int(pruned_per_row.sum()) == 21 and set(pruned_per_row.tolist()) == {3, 4}
    fourth = score.sort(dim=1).values[:, 3]
    assert set(torch.nonzero(pruned_per_row == 4).squeeze(1).tolist()) == set(fourth.argsort()[:3].tolist())
    for i in range(6):  # each row prunes its smallest scores
        k = int(pruned_per_row[i])
        assert torch.equal(res.mask[i], score[i] > score[i].sort().values[k - 1])


def test_meta_tensors_give_a_clear_error():
    W, G = layer()
    with pytest.raises(ValueError, match=r"gram is on the meta device \(shape \(32, 32\), no data\)"):
        ak.prune_layer(W, G.to("meta"))
    with pytest.raises(ValueError, match=r"weight is on the meta device"):
        ak.prune_layer(W.to("meta"), G)
    with pytest.raises(ValueError, match=r"mask is on the meta device"):
        ak.prune_layer(W, G, mask=torch.ones(W.shape, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("pattern", ["２:４", "٢:٤", "2:４", "²:4", "2:⁴"])
def test_non_ascii_pattern_digits_are_refused(pattern):
    W, G = layer()
    with pytest.raises(ValueError, match=r"is not of the form 'N:M' with integers N and M \(ASCII digits"):
        ak.prune_layer(W, G, pattern=pattern)


def test_pow2_helpers():
    assert ranges.pow2_exponent(1.0, *ranges.WEIGHT_RANGE) == 0
    assert ranges.pow2_exponent(0.0, *ranges.WEIGHT_RANGE) == 0
    e = ranges.pow2_exponent(3e38, *ranges.WEIGHT_RANGE)
    assert 0.5 <= 3e38 * 2.0 ** -e < 1
    assert ranges.pow2_exponent(3e30, *ranges.GRAM_DIAG_RANGE, even=True) % 2 == 0
    w = torch.tensor([[3e38, -1e30]], dtype=torch.float32)
    scaled, e = ranges.normalise_weight(w)
    assert torch.equal(ranges.finite_cast(scaled, torch.float32, e), w)
    with pytest.raises(ValueError, match="produced NaN"):
        ranges.finite_cast(torch.tensor([float("nan")]), torch.float32)


@pytest.mark.parametrize("pattern", ["²:4", "2:⁴", "２:４"])
def test_non_ascii_pattern_digits_are_refused_by_the_commands(pattern, tmp_path, capsys):
    """The commands' early syntax checks gave int()'s "invalid literal" for '²' (str.isdigit accepts it)."""
    from admm_kernels.cli import main as cli_main
    from admm_kernels.cli.bench import main as bench_main

    assert cli_main(["prune", "--pattern", pattern, "--out", str(tmp_path / "o")]) == 2
    assert bench_main(["--patterns", pattern, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("(ASCII digits 0-9)") == 2 and "invalid literal" not in err
