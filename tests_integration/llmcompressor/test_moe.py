"""ADMMPruningModifier on mixture-of-experts models (tiny Qwen3-MoE / Mixtral / Qwen2-MoE from configs).

llm-compressor 0.13's oneshot replaces each transformers 5.x fused experts module by a LinearExperts2D (one
nn.Linear per expert projection) before the modifier starts, and by default (moe_calibrate_all_experts=
True) runs every token through every expert during calibration; with moe_calibrate_all_experts=False each
expert sees the tokens its router sends it. The modifier must match admm_kernels' own prune_model with
moe_calibration="all" / "routed" respectively. Experts llm-compressor leaves fused (here: linearization
switched off) are calibrated by the modifier's own hook and pruned in place in the fused parameters.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

llmcompressor = pytest.importorskip("llmcompressor")

from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D  # noqa: E402
from tiny_models import tiny_model, tiny_tokenizer, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.integrations.llmcompressor import ADMMPruningModifier  # noqa: E402
from admm_kernels.models.discovery import get_weight, named_layers  # noqa: E402
from admm_kernels.models.experts import MIN_EXPERT_TOKENS, ExpertProjection  # noqa: E402

NSAMPLES, SEQLEN = 8, 32
IGNORE = ["re:.*lm_head"]
ARCHS = ("qwen3_moe", "mixtral")
EXPERTS = 4  # tiny_models' MoE configs


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    return tiny_tokens(NSAMPLES, SEQLEN, seed=1)


@pytest.fixture(scope="module")
def dense_models():
    return {arch: tiny_model(arch) for arch in (*ARCHS, "qwen2_moe")}


@pytest.fixture
def keep_fused(monkeypatch):
    """oneshot as for a MoE whose experts llm-compressor cannot linearize: they stay fused."""
    monkeypatch.setattr(sys.modules["llmcompressor.entrypoints.oneshot"], "get_non_linearized_moes",
                        lambda model: [])


def run_oneshot(model, ids: torch.Tensor, recipe, all_experts: bool = True) -> None:
    """oneshot over exactly these windows, in order, one per batch (as prune_model feeds them)."""
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tiny_tokenizer(), dataset=ds, recipe=recipe,
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            pipeline="sequential", moe_calibrate_all_experts=all_experts)


def layer_weights(model) -> dict[str, torch.Tensor]:
    """{name: (out, in) weight} of every prunable layer, experts as "<experts>.<e>.<projection>" whether
    they are fused (views into the fused parameters) or linearized (nn.Linear)."""
    return {n: (m.weight_view() if isinstance(m, ExpertProjection) else get_weight(m)).detach().clone()
            for n, m in named_layers(model).items()}


def three_d_parameters(model) -> dict[str, tuple]:
    """{name: (storage address, shape)} of the fused experts parameters."""
    return {n: (p.data_ptr(), p.shape) for n, p in model.named_parameters() if p.dim() == 3}


def is_expert(name: str) -> bool:
    return ".experts." in name


def check_pattern(name: str, w: torch.Tensor, mask_structure: str) -> None:
    kept = w != 0
    if mask_structure == "2:4":
        assert bool((kept.view(w.shape[0], -1, 4).sum(-1) == 2).all()), name
    else:
        assert int((~kept).sum()) == w.numel() // 2, name


@pytest.mark.parametrize("fused", [False, True], ids=["linearized", "fused"])
@pytest.mark.parametrize("mask_structure", ["0:0", "2:4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_reaches_the_pattern_and_routers_stay_dense(dense_models, calib_ids, arch,
                                                                 mask_structure, fused, request):
    if fused:
        request.getfixturevalue("keep_fused")
    dense = dense_models[arch]
    model = copy.deepcopy(dense)
    before = layer_weights(dense)
    fused_params = three_d_parameters(model)
    mod = ADMMPruningModifier(sparsity=None if mask_structure == "2:4" else 0.5,
                              mask_structure=mask_structure, ignore=IGNORE)
    run_oneshot(model, calib_ids, [mod])

    experts_modules = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert len(experts_modules) == 2
    assert all(isinstance(m, LinearExperts2D) != fused for m in experts_modules)
    if fused:  # pruned in place: the same fused parameters, no copy
        assert three_d_parameters(model) == fused_params
    after = layer_weights(model)
    assert after.keys() == before.keys()
    expert_names = {n for n in after if is_expert(n)}
    assert len(expert_names) == 2 * EXPERTS * 3
    for name, w in after.items():  # attention and every expert's gate / up / down
        check_pattern(name, w, mask_structure)
    routers = {n: p for n, p in dense.named_parameters() if n.endswith("mlp.gate.weight")}  # TopKRouter
    assert len(routers) == 2
    assert all(torch.equal(model.get_parameter(n), p) for n, p in routers.items())
    report = {r["name"]: r for r in mod.layer_report}
    assert report.keys() == after.keys()
    for name in expert_names:
        r = report[name]
        assert r["sparsity"] == 0.5 and 0.0 < r["error"] < 1.0, r
        assert r["tokens"] == NSAMPLES * SEQLEN and "fallback" not in r, r  # every token to every expert
    with torch.no_grad():
        assert bool(torch.isfinite(model(calib_ids[:2]).logits).all())


@pytest.mark.parametrize("fused", [False, True], ids=["linearized", "fused"])
@pytest.mark.parametrize("routing", ["all", "routed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_equals_prune_model_with_the_same_routing(dense_models, calib_ids, arch, routing, fused, request):
    """The same windows, one per batch; llm-compressor's moe_calibrate_all_experts=True is prune_model's
    moe_calibration="all", False is "routed"; hessian="admm_kernels" (ak.GramAccumulator, as prune_model).

    Experts kept fused: bit-identical (the modifier's hook is prune_model's). Linearized experts compute
    the same function in another order: LinearExperts2D runs gate and up as two matmuls (the fused module
    one matmul with the fused gate_up weight), with all-experts calibration on every token before
    selecting the routed rows, and gathers an expert's routed rows in (top-k slot, token) order (the fused
    module and prune_model's hook in token order). The down inputs and the block outputs (the next block's
    inputs) therefore differ by fp32 rounding, ~1e-7 relative, which ADMM's iterations carry to at most
    7e-6 of max|W| here (measured): masks identical, weights within 2e-5 of max|W|, the tolerance of
    test_modifier's Hessian conversion."""
    if fused:
        request.getfixturevalue("keep_fused")
    ref = copy.deepcopy(dense_models[arch])
    expected_report = ak.prune_model(ref, calib_ids, sparsity=0.5, moe_calibration=routing)["layers"]
    expected = layer_weights(ref)

    model = copy.deepcopy(dense_models[arch])
    mod = ADMMPruningModifier(sparsity=0.5, ignore=IGNORE, hessian="admm_kernels")
    run_oneshot(model, calib_ids, [mod], all_experts=routing == "all")
    got = layer_weights(model)
    assert got.keys() == expected.keys()
    for name, w in got.items():
        e = expected[name]
        if fused:
            assert torch.equal(w, e), name
        else:
            assert torch.equal(w != 0, e != 0), name
            assert float((w - e).abs().max()) <= 2e-5 * float(e.abs().max()), name
    ours = {r["name"]: r for r in mod.layer_report}
    for r in expected_report:
        if is_expert(r["name"]):
            assert ours[r["name"]]["tokens"] == r["tokens"], r["name"]


@pytest.mark.parametrize("fused", [False, True], ids=["linearized", "fused"])
def test_starved_experts_use_the_pooled_gram_as_prune_model(dense_models, fused, request):
    """Routed calibration on 4 windows of 8 tokens: some experts receive fewer than MIN_EXPERT_TOKENS
    tokens and are solved on the sum of their module's experts' Grams, the same ones as in prune_model."""
    if fused:
        request.getfixturevalue("keep_fused")
    ids = tiny_tokens(4, 8, seed=3)
    ref = copy.deepcopy(dense_models["qwen3_moe"])
    expected_report = {r["name"]: r for r in ak.prune_model(ref, ids, sparsity=0.5)["layers"]}
    expected = layer_weights(ref)
    starved = {n for n, r in expected_report.items() if r.get("fallback") == "pooled"}
    assert starved and starved != {n for n in expected if is_expert(n)}  # some experts, not all

    model = copy.deepcopy(dense_models["qwen3_moe"])
    mod = ADMMPruningModifier(sparsity=0.5, ignore=IGNORE, hessian="admm_kernels")
    run_oneshot(model, ids, [mod], all_experts=False)
    ours = {r["name"]: r for r in mod.layer_report}
    assert {n for n, r in ours.items() if r.get("fallback") == "pooled"} == starved
    assert all(ours[n]["tokens"] < MIN_EXPERT_TOKENS for n in starved)
    for name, w in layer_weights(model).items():
        e = expected[name]
        assert torch.equal(w != 0, e != 0), name
        assert float((w - e).abs().max()) <= 2e-5 * float(e.abs().max()), name


def test_router_linears_dense_unless_asked(dense_models, calib_ids):
    """Qwen2-MoE's shared_expert_gate is an nn.Linear with one output (the routers of the routed experts
    are not linears): left dense by default, pruned with prune_routers=True."""
    dense = dense_models["qwen2_moe"]
    name = "model.layers.0.mlp.shared_expert_gate"
    kept = copy.deepcopy(dense)
    mod = ADMMPruningModifier(sparsity=0.5, ignore=IGNORE)
    run_oneshot(kept, calib_ids, [mod])
    assert torch.equal(kept.get_submodule(name).weight, dense.get_submodule(name).weight)
    assert name not in {r["name"] for r in mod.layer_report}

    pruned = copy.deepcopy(dense)
    mod = ADMMPruningModifier(sparsity=0.5, ignore=IGNORE, prune_routers=True)
    run_oneshot(pruned, calib_ids, [mod])
    assert int((pruned.get_submodule(name).weight == 0).sum()) == 16
    assert name in {r["name"] for r in mod.layer_report}


def test_unknown_fused_layout_is_an_error_naming_it(dense_models, calib_ids, keep_fused):
    model = copy.deepcopy(dense_models["qwen3_moe"])
    experts = model.get_submodule("model.layers.1.mlp.experts")
    e, h, i = experts.down_proj.shape
    experts.down_proj = torch.nn.Parameter(torch.zeros(e, h + 1, i))  # fits no layout
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts .*down_proj \(4, 33, 32\)"):
        run_oneshot(model, calib_ids, [ADMMPruningModifier(sparsity=0.5, ignore=IGNORE)])


def test_ignored_experts_stay_dense(dense_models, calib_ids, keep_fused):
    """`ignore` names expert projections ("<experts>.<e>.<projection>", here by regex) or a whole fused
    experts module."""
    dense = dense_models["mixtral"]
    model = copy.deepcopy(dense)
    mod = ADMMPruningModifier(sparsity=0.5, ignore=[*IGNORE, "re:.*experts.*down_proj",
                                                    "model.layers.1.mlp.experts"])
    run_oneshot(model, calib_ids, [mod])
    before, after = layer_weights(dense), layer_weights(model)
    for name, w in after.items():
        if is_expert(name):
            left = name.endswith("down_proj") or name.startswith("model.layers.1.")
            assert torch.equal(w, before[name]) == left, name
    reported = {r["name"] for r in mod.layer_report}
    assert {n for n in after if is_expert(n)} & reported == {
        f"model.layers.0.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj")}


def test_a_fused_experts_module_never_called_is_an_error(dense_models, calib_ids, keep_fused):
    """A targeted fused experts module the calibration forward never runs cannot be pruned: oneshot fails
    naming it rather than leaving it dense unreported."""
    model = copy.deepcopy(dense_models["qwen3_moe"])
    layer = model.get_submodule("model.layers.0")
    layer.spare_experts = copy.deepcopy(layer.mlp.experts)  # not called by the layer's forward
    with pytest.raises(ValueError, match=r"model\.layers\.0\.spare_experts \(Qwen3MoeExperts: gate_up_proj "
                                         r"\(4, 64, 32\), down_proj \(4, 32, 32\)\) were never called"):
        run_oneshot(model, calib_ids, [ADMMPruningModifier(sparsity=0.5, ignore=IGNORE)])


def test_linears_never_called_are_reported_dense(dense_models, calib_ids):
    """Linears the forward never calls (here: a spare copy of linearized experts) are listed in
    layer_report with sparsity 0 and the reason, and left as they are."""
    model = copy.deepcopy(dense_models["mixtral"])
    layer = model.get_submodule("model.layers.0")
    layer.spare = torch.nn.Linear(32, 32)
    spare = layer.spare.weight.detach().clone()
    mod = ADMMPruningModifier(sparsity=0.5, ignore=IGNORE)
    run_oneshot(model, calib_ids, [mod])
    entry = next(r for r in mod.layer_report if r["name"] == "model.layers.0.spare")
    assert entry["sparsity"] == 0.0 and entry["skipped"] == "not called during calibration", entry
    assert torch.equal(layer.spare.weight, spare)
    assert all("skipped" not in r for r in mod.layer_report if r["name"] != "model.layers.0.spare")
