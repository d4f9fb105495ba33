"""Zero-computation experts (LongCat-Flash): the fused gate_up parameter holds slots for identity experts
that no expert reads; the computing experts are pruned exactly, the unused slots stay dense and are
reported as such, the router (one output per expert, identity ones included) stays dense."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import admm_kernels as ak
from admm_kernels.models.experts import UnknownExpertsLayout, experts_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.usefixtures("one_thread")


class _ZeroExperts(nn.Module):
    def __init__(self, zero):
        super().__init__()
        self.zero_expert_num = zero
        self.gate_up_proj = nn.Parameter(torch.randn(6, 10, 8))
        self.down_proj = nn.Parameter(torch.randn(4, 8, 5))


def test_zero_expert_slots_are_declared_not_guessed():
    lay = experts_layout(_ZeroExperts(2), "mlp.experts")
    assert (lay.num_experts, lay.unused_slots, lay.intermediate, lay.hidden) == (4, 2, 5, 8)
    for zero in (0, 1, 3):  # a count that does not explain the difference is still an unknown layout
        with pytest.raises(UnknownExpertsLayout, match="different numbers of experts"):
            experts_layout(_ZeroExperts(zero), "mlp.experts")


def test_longcat_prunes_its_computing_experts_and_reports_the_unused_slots():
    pytest.importorskip("transformers")
    from arch_sweep import build_tiny, tokens

    model = build_tiny("longcat_flash")
    experts = model.model.layers[0].mlp.experts
    n_real = experts.down_proj.shape[0]
    slots = experts.gate_up_proj[n_real:].detach().clone()
    router = model.model.layers[0].mlp.router.classifier.weight.detach().clone()
    report = ak.prune_model(model, tokens(2, 32), sparsity=0.5, method="magnitude")
    names = {r["name"] for r in report["layers"]}
    assert f"model.layers.0.mlp.experts.{n_real - 1}.gate_proj" in names
    assert f"model.layers.0.mlp.experts.{n_real}.gate_proj" not in names
    for e in range(n_real):
        for w in (experts.gate_up_proj[e], experts.down_proj[e]):
            assert int((w == 0).sum()) == w.numel() // 2
    assert torch.equal(experts.gate_up_proj[n_real:], slots)
    assert torch.equal(model.model.layers[0].mlp.router.classifier.weight, router)
    left = {g["name"]: g for g in report["coverage"]["left_out"]}
    unused = left["model.layers.N.mlp.experts.gate_up_proj[unused slots]"]
    assert unused["reason"] == "unused" and unused["weights"] == slots.numel() * len(unused["blocks"])
    assert left["model.layers.N.mlp.router.classifier.weight"]["reason"] == "router"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens(1, 32), use_cache=False).logits).all()
