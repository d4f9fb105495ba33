"""bench's Grams are prune's Grams: the per-layer Gram `admm-prune bench` caches equals, bit for bit, the
one prune_model's block loop hands to the solver for the same calibration windows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("transformers")
from tiny_models import tiny_model, tiny_tokens  # noqa: E402

from admm_kernels import batched as batched_mod  # noqa: E402
from admm_kernels import prune as prune_mod  # noqa: E402
from admm_kernels.bench import grams as grams_mod  # noqa: E402
from admm_kernels.models import prune_model  # noqa: E402
from admm_kernels.models.discovery import get_weight, named_layers  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # one BLAS split for both runs (and fast on the shared machine)
    yield
    torch.set_num_threads(old)


def _prune_grams(model, ids, gram_dtype, monkeypatch) -> dict[str, torch.Tensor]:
    """{layer name: the Gram prune_model solved it with}: magnitude at sparsity 0 leaves every weight as
    it was, so each block's inputs are the dense model's, as bench's are."""
    by_ptr = {get_weight(m).data_ptr(): name for name, m in named_layers(model).items()}
    seen: dict[str, torch.Tensor] = {}
    real = prune_mod.prune_layer

    def recording(weight, gram, *args, **kwargs):
        name = by_ptr.get(weight.data_ptr())  # None: prune_model's option check on a random layer
        if name is not None:
            seen[name] = gram.detach().clone()
        return real(weight, gram, *args, **kwargs)

    monkeypatch.setattr(prune_mod, "prune_layer", recording)
    monkeypatch.setattr(batched_mod, "prune_layer", recording)  # experts: prune_experts solves each alone
    before = {n: get_weight(m).detach().clone() for n, m in named_layers(model).items()}
    prune_model(model, ids, sparsity=0.0, method="magnitude", gram_dtype=gram_dtype)
    assert all(torch.equal(get_weight(m), before[n]) for n, m in named_layers(model).items())
    return seen


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_bench_gram_equals_prune_models_gram(arch, gram_dtype, tmp_path, monkeypatch):
    model = tiny_model(arch)
    ids = tiny_tokens(8, 48, seed=3)  # MoE: enough tokens per expert that prune needs no pooled Gram
    refs = grams_mod.select_layers(model)
    store, hit = grams_mod.load_or_compute(model, ids, refs, tmp_path, "cpu", gram_dtype)
    assert not hit and store.index["not_called"] == []
    pruned = _prune_grams(model, ids, gram_dtype, monkeypatch)
    assert sorted(pruned) == sorted(r.name for r in refs)
    for name, gram in pruned.items():
        ours = store.gram(name)
        assert ours.dtype == gram.dtype == gram_dtype and torch.equal(ours, gram), name


def test_cache_key_follows_the_model_digest(tmp_path):
    """The cache is keyed by the model's content: a changed weight is a miss, the same model a hit."""
    model = tiny_model("llama")
    ids = tiny_tokens(3, 16)
    refs = grams_mod.select_layers(model, ["mlp.down_proj"], max_layers=1)
    first, hit = grams_mod.load_or_compute(model, ids, refs, tmp_path)
    assert not hit
    again, hit = grams_mod.load_or_compute(model, ids, refs, tmp_path)
    assert hit and again.key == first.key and torch.equal(again.gram(refs[0].name), first.gram(refs[0].name))
    with torch.no_grad():
        get_weight(refs[0].module)[0, 0] += 1.0
    changed, hit = grams_mod.load_or_compute(model, ids, refs, tmp_path)
    assert not hit and changed.key != first.key
