"""Every bad-input path of prune_layer / reconstruction_error raises ValueError or TypeError naming the
argument and the value, and nothing is modified in place on the way."""

import math

import pytest
import torch

import admm_kernels as ak

OUT, IN = 8, 16


@pytest.fixture
def layer():
    x = torch.randn(64, IN)
    return torch.randn(OUT, IN), x.T @ x


def test_shape_mismatch_between_weight_and_gram(layer):
    W, G = layer
    with pytest.raises(ValueError, match=r"shape mismatch: gram has shape \(12, 12\).*in_features=16"):
        ak.prune_layer(W, G[:12, :12])


def test_non_square_gram(layer):
    W, G = layer
    with pytest.raises(ValueError, match=r"gram must be a square 2-D matrix, got shape \(16, 15\)"):
        ak.prune_layer(W, G[:, :15])
    with pytest.raises(ValueError, match=r"gram must be a square 2-D matrix, got shape \(16\)"):
        ak.prune_layer(W, G[0])


def test_non_symmetric_gram(layer):
    W, G = layer
    G2 = G.clone()
    G2[0, 1] += 1.0
    with pytest.raises(ValueError, match=r"gram is not symmetric: max \|gram - gram.T\| = 1"):
        ak.prune_layer(W, G2)


def test_negative_gram_diagonal(layer):
    W, G = layer
    G2 = G.clone()
    G2[3, 3] = -1.0
    with pytest.raises(ValueError, match=r"gram has a negative diagonal entry \(gram\[3, 3\] = -1.0\)"):
        ak.prune_layer(W, G2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_in_weight(layer, bad):
    W, G = layer
    W2 = W.clone()
    W2[2, 5] = bad
    msg = rf"weight contains NaN or Inf \(1 entries; weight\[2, 5\] = {bad}\)"
    with pytest.raises(ValueError, match=msg):
        ak.prune_layer(W2, G)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_gram(layer, bad):
    W, G = layer
    G2 = G.clone()
    G2[4, 4] = bad
    with pytest.raises(ValueError, match=rf"gram contains NaN or Inf \(1 entries; gram\[4, 4\] = {bad}\)"):
        ak.prune_layer(W, G2)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_sparsity_out_of_range(layer, s):
    W, G = layer
    with pytest.raises(ValueError, match=rf"sparsity must be in \[0, 1\), got {s}"):
        ak.prune_layer(W, G, sparsity=s)


@pytest.mark.parametrize("s", ["0.5", None, True])
def test_sparsity_wrong_type(layer, s):
    W, G = layer
    with pytest.raises(TypeError, match=r"sparsity must be a float in \[0, 1\), got " + repr(s)):
        ak.prune_layer(W, G, sparsity=s)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4"])
def test_nm_with_n_not_below_m(layer, pattern):
    W, G = layer
    with pytest.raises(ValueError, match=rf"pattern '{pattern}': N:M needs 1 <= N < M"):
        ak.prune_layer(W, G, pattern=pattern)


def test_nm_m_not_dividing_in_features(layer):
    W, G = layer
    with pytest.raises(ValueError, match=r"pattern '2:5': M=5 does not divide in_features=16"):
        ak.prune_layer(W, G, pattern="2:5")


@pytest.mark.parametrize("pattern", ["diagonal", "2:4:8", "a:b", "2-4", ""])
def test_unknown_pattern(layer, pattern):
    W, G = layer
    with pytest.raises(ValueError, match=r"pattern"):
        ak.prune_layer(W, G, pattern=pattern)
    with pytest.raises(ValueError, match=repr(pattern)):
        ak.prune_layer(W, G, pattern=pattern)


def test_pattern_wrong_type(layer):
    W, G = layer
    with pytest.raises(TypeError, match=r"pattern must be a str .* got \(2, 4\)"):
        ak.prune_layer(W, G, pattern=(2, 4))


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_mask_wrong_shape(layer, method):
    W, G = layer
    with pytest.raises(ValueError, match=r"mask has shape \(16, 8\) but weight has shape \(8, 16\)"):
        ak.prune_layer(W, G, mask=torch.ones(IN, OUT, dtype=torch.bool), method=method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_mask_wrong_dtype(layer, dtype):
    W, G = layer
    with pytest.raises(TypeError, match=rf"mask must be a bool tensor \(True = kept\), got dtype {dtype}"):
        ak.prune_layer(W, G, mask=torch.ones(OUT, IN, dtype=dtype))


def test_unknown_method(layer):
    W, G = layer
    with pytest.raises(ValueError, match=r"unknown method 'obs'; expected one of \('admm', 'sparsegpt'"):
        ak.prune_layer(W, G, method="obs")
    with pytest.raises(TypeError, match=r"method must be a str"):
        ak.prune_layer(W, G, method=None)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.bool])
def test_integer_weights(layer, dtype):
    W, G = layer
    with pytest.raises(TypeError, match=rf"weight must be a floating-point tensor .* got dtype {dtype}"):
        ak.prune_layer(W.to(dtype), G)


def test_integer_gram(layer):
    W, G = layer
    with pytest.raises(TypeError, match=r"gram must be a floating-point tensor, got dtype torch.int64"):
        ak.prune_layer(W, G.long())


def test_not_tensors(layer):
    W, G = layer
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        ak.prune_layer(W.tolist(), G)
    with pytest.raises(TypeError, match=r"gram must be a torch.Tensor, got ndarray"):
        ak.prune_layer(W, G.numpy())


def test_weight_not_2d(layer):
    W, G = layer
    msg = r"weight must be 2-D \(out_features, in_features\), got shape \(2, 4, 16\)"
    with pytest.raises(ValueError, match=msg):
        ak.prune_layer(W.reshape(2, 4, IN), G)


@pytest.mark.parametrize("opts,exc,msg", [
    ({"iters": -1}, ValueError, r"iters must be >= 0, got -1"),
    ({"iters": 2.5}, TypeError, r"iters must be an int >= 0, got 2.5"),
    ({"rho": 0}, ValueError, r"rho must be a finite number > 0.0, got 0"),
    ({"percdamp": -0.1}, ValueError, r"percdamp must be a finite number >= 0.0, got -0.1"),
    ({"T": "15"}, TypeError, r"T must be an int >= 0, got '15'"),
    ({"schedule": "linear"}, ValueError, r"unknown schedule 'linear'; expected one of \('constant'"),
    ({"solve": "lu"}, ValueError, r"unknown solve 'lu'; expected 'admm' or 'exact'"),
    ({"one_shot": 1}, TypeError, r"one_shot must be a bool, got 1"),
    ({"compute_dtype": torch.float16}, TypeError, r"compute_dtype must be torch.float32 or torch.float64"),
    ({"iterations": 5}, TypeError, r"unknown option\(s\) 'iterations' for method 'admm'"),
])
def test_bad_admm_options(layer, opts, exc, msg):
    W, G = layer
    with pytest.raises(exc, match=msg):
        ak.prune_layer(W, G, **opts)


@pytest.mark.parametrize("method,opts,exc,msg", [
    ("sparsegpt", {"blocksize": 0}, ValueError, r"blocksize must be >= 1, got 0"),
    ("sparsegpt", {"rho": 1.0}, TypeError, r"unknown option\(s\) 'rho' for method 'sparsegpt'"),
    ("wanda", {"per_row": "yes"}, TypeError, r"per_row must be a bool, got 'yes'"),
    ("magnitude", {"iters": 3}, TypeError, r"unknown option\(s\) 'iters' for method 'magnitude'"),
])
def test_bad_baseline_options(layer, method, opts, exc, msg):
    W, G = layer
    with pytest.raises(exc, match=msg):
        ak.prune_layer(W, G, method=method, **opts)


def test_reconstruction_error_bad_input(layer):
    W, G = layer
    with pytest.raises(ValueError, match=r"shape mismatch: pruned has shape \(8, 12\), weight has \(8, 16\)"):
        ak.reconstruction_error(W, W[:, :12], G)
    with pytest.raises(TypeError, match=r"pruned must be a floating-point tensor"):
        ak.reconstruction_error(W, W.long(), G)
    with pytest.raises(ValueError, match=r"shape mismatch: gram has shape \(8, 8\)"):
        ak.reconstruction_error(W, W, G[:8, :8])


def test_failed_calls_leave_inputs_untouched(layer):
    W, G = layer
    W0, G0 = W.clone(), G.clone()
    mask = torch.ones(OUT, IN, dtype=torch.bool)
    for kwargs in ({"pattern": "3:5"}, {"sparsity": 2.0}, {"method": "x"}, {"mask": mask[:, :4]}):
        with pytest.raises((ValueError, TypeError)):
            ak.prune_layer(W, G, **kwargs)
    assert torch.equal(W, W0) and torch.equal(G, G0) and bool(mask.all())


@pytest.mark.parametrize("bad,first", [(96, 96), (-1, -1), (10_000, 10_000)])
def test_perplexity_token_ids_outside_the_vocabulary(one_thread, bad, first):
    pytest.importorskip("transformers")
    from tiny_models import VOCAB, tiny_model

    from admm_kernels.eval import evaluate_perplexity

    ids = torch.arange(64) % VOCAB
    ids[37] = bad
    msg = (rf"token ids must be in \[0, {VOCAB}\) \(the model's vocabulary size is {VOCAB}\).*"
           rf"1 out of range, the first {first} at position 37")
    with pytest.raises(ValueError, match=msg):
        evaluate_perplexity(tiny_model("llama"), ids, seqlen=16)
    # ids beyond the evaluated windows are checked too: they mean the text was tokenised for another model
    with pytest.raises(ValueError, match="out of range"):
        evaluate_perplexity(tiny_model("llama"), ids, seqlen=16, max_windows=1)


# --- arguments that conflict -------------------------------------------------------------------------

def _half_mask():
    torch.manual_seed(1)
    return torch.rand(OUT, IN) > 0.5


def test_mask_with_a_sparsity_it_does_not_have_is_an_error(layer):
    """prune_layer(W, G, sparsity=0.9, mask=m) ignored the sparsity silently."""
    W, G = layer
    m = _half_mask()
    pruned = int((~m).sum())
    with pytest.raises(ValueError, match=rf"mask prunes {pruned} of 128 weights .* not the sparsity 0.9"):
        ak.prune_layer(W, G, sparsity=0.9, mask=m)
    res = ak.prune_layer(W, G, sparsity=pruned / 128, mask=m)  # its own sparsity is fine
    assert torch.equal(res.mask, m) and res.stats["target_sparsity"] == pytest.approx(pruned / 128)


def test_mask_without_a_sparsity_records_its_own(layer):
    W, G = layer
    m = _half_mask()
    res = ak.prune_layer(W, G, mask=m)
    own = 1.0 - float(m.sum()) / m.numel()
    assert res.stats["target_sparsity"] == res.stats["sparsity"] == own != 0.5


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "wanda", "magnitude"])
def test_mask_that_breaks_an_nm_pattern_is_an_error(layer, method):
    """pattern='2:4' with a non-2:4 mask returned a result breaking 2:4 while its stats said 2:4."""
    W, G = layer
    with pytest.raises(ValueError, match=r"mask does not satisfy pattern '2:4': row 0 keeps 4 of the 4 "
                                         r"inputs 0..3, more than 2"):
        ak.prune_layer(W, G, pattern="2:4", mask=torch.ones(OUT, IN, dtype=torch.bool), method=method)
    nm = ak.prune_layer(W, G, pattern="2:4", method="magnitude").mask
    res = ak.prune_layer(W, G, pattern="2:4", mask=nm, method=method)
    assert torch.equal(res.mask, nm) and res.stats["pattern"] == "2:4"
    assert int((res.weight.reshape(OUT, IN // 4, 4) != 0).sum(dim=2).max()) <= 2


def test_mask_that_is_not_per_row_is_an_error(layer):
    W, G = layer
    with pytest.raises(ValueError, match=r"mask does not satisfy pattern 'per-row': its rows prune"):
        ak.prune_layer(W, G, pattern="per-row", mask=_half_mask())
    row = ak.prune_layer(W, G, pattern="per-row", sparsity=0.25, method="magnitude").mask
    with pytest.raises(ValueError, match=r"pattern 'per-row' at sparsity 0.5: its rows prune \[4\] of 16"):
        ak.prune_layer(W, G, pattern="per-row", sparsity=0.5, mask=row)
    assert torch.equal(ak.prune_layer(W, G, pattern="per-row", sparsity=0.25, mask=row).mask, row)


@pytest.mark.parametrize("method,option", [("admm", "iters"), ("admm", "T"), ("admm", "cg_iters"),
                                           ("alps", "max_iters"), ("alps", "cg_iters")])
def test_iteration_counts_have_an_upper_bound(layer, method, option):
    """-o iters=100000000000000000000 ran without end."""
    from admm_kernels._checks import MAX_ITERATIONS

    W, G = layer
    with pytest.raises(ValueError, match=rf"{option} must be at most {MAX_ITERATIONS}, got 10{'0' * 19}"):
        ak.prune_layer(W, G, method=method, **{option: 10 ** 20})


@pytest.mark.parametrize("method", ["admm", "alps", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsity_zero_returns_the_weights_bit_identical(layer, method, dtype):
    """ADMM and ALPS changed the weights by ~1e-6 at sparsity 0."""
    W, G = layer
    W = (W * 3).to(dtype)
    res = ak.prune_layer(W, G, sparsity=0.0, method=method)
    assert torch.equal(res.weight, W) and res.weight.dtype == dtype and res.error == 0.0
    assert bool(res.mask.all()) and res.weight is not W
    res = ak.prune_layer(W, G, mask=torch.ones(OUT, IN, dtype=torch.bool), method=method)
    assert torch.equal(res.weight, W)


def test_prune_model_at_sparsity_zero_leaves_the_model_bit_identical(one_thread):
    pytest.importorskip("transformers")
    from tiny_models import tiny_model, tiny_tokens

    from admm_kernels.models import prune_model

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, tiny_tokens(4, 16), sparsity=0.0, method="admm", iters=4, T=3, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_block_tuning_epochs_have_an_upper_bound():
    from admm_kernels.models.block_tune import MAX_TUNE_EPOCHS, check_block_tune

    assert check_block_tune(MAX_TUNE_EPOCHS, 1e-4, 4).epochs == MAX_TUNE_EPOCHS
    with pytest.raises(ValueError, match=rf"tune_epochs must be at most {MAX_TUNE_EPOCHS}, got 10000000000"):
        check_block_tune(10 ** 10, 1e-4, 4)
