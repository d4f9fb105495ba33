"""Sequential pruning inside a block: the layer groups are pruned in the block's call order,
each group's Gram taken from the block with the earlier groups already pruned."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.gram import GramAccumulator  # noqa: E402
from admm_kernels.models import find_blocks, get_weight  # noqa: E402
from admm_kernels.models.state import StateError  # noqa: E402

FAST = dict(iters=4, T=3)
pytestmark = pytest.mark.usefixtures("one_thread")


def _recording(monkeypatch):
    """Patch prune_layer to record (weight shape, Gram) of every pipeline call, in call order."""
    from admm_kernels import prune as prune_module

    real, seen = prune_module.prune_layer, []

    def recording(weight, gram, **kw):
        if weight.shape[0] != 4:  # not the up-front option check on a 4-row dummy layer
            seen.append(gram.clone())
        return real(weight, gram, **kw)

    monkeypatch.setattr(prune_module, "prune_layer", recording)
    return seen


def _block0_input_gram(model, layer: str, ids) -> torch.Tensor:
    """Gram of the inputs of block 0's `layer` when running `model` on every window of ids."""
    module = model.model.layers[0].get_submodule(layer)
    acc = GramAccumulator(get_weight(module).shape[1])
    hook = module.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    try:
        with torch.no_grad():
            for j in range(ids.shape[0]):
                model(ids[j:j + 1])
    finally:
        hook.remove()
    return acc.gram


def test_later_grams_see_the_pruned_earlier_groups(monkeypatch):
    """Block 0 of a LLaMA (call order q,k,v | o | gate,up | down): in sequential mode o_proj's Gram equals
    the Gram of o's inputs computed with the pruned q/k/v (and the dense rest), and differs from the
    non-sequential Gram, which is the dense model's; down_proj's Gram is the one with q..up pruned."""
    ids = tiny_tokens(3, 16)
    seen = _recording(monkeypatch)
    plain = tiny_model("llama")
    dense = copy.deepcopy(plain)
    ak.prune_model(plain, ids, sparsity=0.6, **FAST)
    plain_grams, seen[:] = list(seen), []
    seq = tiny_model("llama")
    report = ak.prune_model(seq, ids, sparsity=0.6, sequential=True, **FAST)
    seq_grams = list(seen)
    names = [r["name"].split(".", 3)[-1] for r in report["layers"][:7]]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [r["stage"] for r in report["layers"][:7]] == [0, 0, 0, 1, 2, 2, 3]

    torch.testing.assert_close(plain_grams[3], _block0_input_gram(dense, "self_attn.o_proj", ids),
                               rtol=1e-5, atol=1e-4)
    partly = copy.deepcopy(dense)  # block 0 with only q/k/v pruned, as the sequential run pruned them
    for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        partly.model.layers[0].get_submodule(rel).weight.data.copy_(seq.model.layers[0].get_submodule(rel).weight)
    expected_o = _block0_input_gram(partly, "self_attn.o_proj", ids)
    torch.testing.assert_close(seq_grams[3], expected_o, rtol=1e-5, atol=1e-4)
    assert float((seq_grams[3] - plain_grams[3]).abs().max()) > 1e-2 * float(plain_grams[3].abs().max())
    for rel in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        partly.model.layers[0].get_submodule(rel).weight.data.copy_(seq.model.layers[0].get_submodule(rel).weight)
    torch.testing.assert_close(seq_grams[6], _block0_input_gram(partly, "mlp.down_proj", ids),
                               rtol=1e-5, atol=1e-4)
    # q/k/v see the block's unchanged input: the same Gram in both modes.
    torch.testing.assert_close(seq_grams[0], plain_grams[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch,stages", [
    ("gpt2", {"attn.c_attn": 0, "attn.c_proj": 1, "mlp.c_fc": 2, "mlp.c_proj": 3}),
    ("opt", {"self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.q_proj": 0, "self_attn.out_proj": 1,
             "fc1": 2, "fc2": 3}),
    ("phi3", {"self_attn.qkv_proj": 0, "self_attn.o_proj": 1, "mlp.gate_up_proj": 2, "mlp.down_proj": 3}),
])
def test_stages_follow_the_call_order_of_any_architecture(arch, stages):
    model = tiny_model(arch)
    report = ak.prune_model(model, tiny_tokens(2, 16), sparsity=0.5, method="sparsegpt", sequential=True)
    name, blocks = find_blocks(model)
    for r in report["layers"]:
        rel = r["name"].removeprefix(f"{name}.{r['block']}.")
        assert r["stage"] == stages[rel], (arch, rel)
    assert report["sequential"] is True


def test_sequential_is_part_of_the_resume_fingerprint(tmp_path):
    ids, folder = tiny_tokens(3, 16), tmp_path / "s"
    with pytest.raises(Interrupt):
        ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, state_dir=folder, callback=stop_after(0),
                       **FAST)
    with pytest.raises(StateError, match="sequential: saved None, now True"):
        ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, state_dir=folder, sequential=True, **FAST)
    with pytest.raises(TypeError, match="sequential must be a bool, got 'yes'"):
        ak.prune_model(tiny_model("llama"), ids, sequential="yes")
