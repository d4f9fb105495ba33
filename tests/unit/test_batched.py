"""prune_experts: batched expert solves give prune_layer's result for every expert (masks identical,
weights equal within fp32 rounding: bit-identical on this CPU), and fall back to prune_layer where the
batch cannot follow it."""

import pytest
import torch

import admm_kernels as ak
from admm_kernels.batched import prune_experts

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(E=5, out_f=13, in_f=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out_f, in_f, generator=g)
    X = torch.randn(E, 3 * in_f, in_f, generator=g) * torch.linspace(0.2, 3, in_f)
    return W.to(dtype), torch.bmm(X.transpose(1, 2), X)


def _same(batched, looped, exact=True):
    for a, b in zip(batched, looped, strict=True):
        assert torch.equal(a.mask, b.mask)
        if exact:
            assert torch.equal(a.weight, b.weight)
        else:
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        assert a.error == pytest.approx(b.error, rel=1e-6, abs=1e-9)
        assert a.weight.dtype == b.weight.dtype


@pytest.mark.parametrize("pattern,kwargs", [
    ("unstructured", {}), ("2:4", {}), ("4:8", {"iters": 7, "T": 5}), ("per-row", {"scaling": "obs"}),
    ("unstructured", {"preset": "fast"}), ("unstructured", {"mask_iters": 18, "T": 10}),
])
def test_batched_admm_equals_prune_layer_per_expert(pattern, kwargs):
    W, G = _problem()
    batched = prune_experts(W, G, 0.6, pattern, batched=True, **kwargs)
    assert all(r.stats["batched"] == 5 for r in batched)
    _same(batched, [ak.prune_layer(W[e], G[e], 0.6, pattern, **kwargs) for e in range(5)])


def test_batches_smaller_than_the_expert_count_and_lists_of_views():
    W, G = _problem(E=7, out_f=16, in_f=32)
    views = [w.t().contiguous().t() for w in W]  # non-contiguous (out, in) views
    batched = prune_experts(views, list(G), 0.5, batch=3, batched=True)
    assert [r.stats["batched"] for r in batched] == [3, 3, 3, 3, 3, 3, 1]
    _same(batched, [ak.prune_layer(W[e], G[e], 0.5) for e in range(7)])


def test_bf16_weights_keep_their_dtype():
    W, G = _problem(dtype=torch.bfloat16)
    _same(prune_experts(W, G, 0.5, batched=True), [ak.prune_layer(W[e], G[e], 0.5) for e in range(5)])


@pytest.mark.parametrize("method,kwargs", [("admm", {"preset": "accurate"}), ("sparsegpt", {}),
                                           ("wanda", {}), ("magnitude", {}), ("alps", {"max_iters": 20}),
                                           ("admm", {"one_shot": True}), ("admm", {"solve": "exact"})])
def test_other_methods_and_options_run_one_expert_at_a_time(method, kwargs):
    W, G = _problem(E=3)
    got = prune_experts(W, G, 0.5, method=method, batched=True, **kwargs)
    assert all("batched" not in r.stats for r in got)
    _same(got, [ak.prune_layer(W[e], G[e], 0.5, method=method, **kwargs) for e in range(3)])


def test_an_expert_with_dead_inputs_or_extreme_values_is_solved_alone():
    W, G = _problem(E=4)
    G[1, 3, :] = 0
    G[1, :, 3] = 0  # input 3 of expert 1 never fired
    W[2] *= 1e30    # rescaled by prune_layer
    got = prune_experts(W, G, 0.5, batched=True)
    assert ["batched" in r.stats for r in got] == [True, False, False, True]
    _same(got, [ak.prune_layer(W[e], G[e], 0.5) for e in range(4)])


def test_bad_input_names_the_problem():
    W, G = _problem(E=2)
    with pytest.raises(ValueError, match="2 weights and 1 grams"):
        prune_experts(W, G[:1])
    with pytest.raises(ValueError, match="one shape"):
        prune_experts([W[0], W[1][:, :16]], list(G))
    with pytest.raises(ValueError, match="batch must be a positive int"):
        prune_experts(W, G, batch=0)
    with pytest.raises(ValueError, match=r"\(experts, rows, cols\)"):
        prune_experts(W[0], G)
    with pytest.raises(ValueError, match="iters"):
        prune_experts(W, G, iters=-1)
    with pytest.raises(TypeError, match="batched must be None, True or False"):
        prune_experts(W, G, batched="yes")


def test_the_cpu_default_solves_one_expert_at_a_time():
    W, G = _problem(E=3)
    got = prune_experts(W, G, 0.5)
    assert all("batched" not in r.stats for r in got)
    _same(got, prune_experts(W, G, 0.5, batched=True))


def test_pipeline_solves_experts_in_batches_with_the_looped_result(monkeypatch):
    """The pipeline hands each experts projection to prune_experts as one job; forced batched, the model
    is bit-identical to the one solved one expert at a time."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import tiny_model, tiny_tokens

    from admm_kernels import batched as batched_mod

    real = batched_mod.prune_experts
    calls = []

    def forced(weights, grams, *args, **kw):
        calls.append(len(weights))
        return real(weights, grams, *args, batched=True, **kw)
    monkeypatch.setattr(batched_mod, "prune_experts", forced)
    ids = tiny_tokens(4, 32)
    model = tiny_model("qwen3_moe")
    report = ak.prune_model(model, ids, sparsity=0.5, iters=6, T=4)
    experts = [r for r in report["layers"] if "tokens" in r]
    assert experts and all(r["batch"] == 4 for r in experts) and calls == [4] * 6  # 2 blocks x 3 projections

    def looped(weights, grams, sparsity, pattern, method, **kw):
        return [ak.prune_layer(w, g, sparsity, pattern, method, **kw) for w, g in zip(weights, grams)]
    monkeypatch.setattr(batched_mod, "prune_experts", looped)
    other = tiny_model("qwen3_moe")
    ak.prune_model(other, ids, sparsity=0.5, iters=6, T=4)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n


def test_sparsity_zero_returns_every_expert_bit_identical():
    W, G = _problem(E=3)
    got = prune_experts(W, G, 0.0, batched=True)
    _same(got, [ak.prune_layer(W[e], G[e], 0.0) for e in range(3)])
    assert all(torch.equal(r.weight, W[e]) and r.error == 0 for e, r in enumerate(got))
