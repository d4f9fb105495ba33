"""Mixture-of-experts and hybrid models: every expert pruned on its own tokens with exact sparsity,
routers intact, the report's coverage honest, and models of other layouts refused with a clear error."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import admm_kernels as ak

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import CLASSIC_ARCHS, MOE_ARCHS, Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from admm_kernels.models.discovery import find_blocks, get_weight, prunable_layers  # noqa: E402
from admm_kernels.models.experts import (  # noqa: E402
    ExpertInputs,
    ExpertProjection,
    UnknownExpertsLayout,
    experts_layout,
    find_experts,
)


def _experts_of(model):
    _, blocks = find_blocks(model)
    return [(i, rel, m) for i, b in enumerate(blocks) for rel, m in find_experts(b).items()]


def _router_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.rsplit(".", 2)[-2] in ("gate", "router", "shared_expert_gate")}


@pytest.mark.parametrize("arch", MOE_ARCHS + CLASSIC_ARCHS)
def test_block_inputs_match_the_models_own_forward(arch):
    """Chaining the captured per-block calls reproduces the model's hidden states block by block, for
    layer lists of several classes and blocks whose output the model indexes or unpacks."""
    from admm_kernels.models.capture import capture_inputs

    model = tiny_model(arch)
    ids = tiny_tokens(1, 24)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        hidden, calls = capture_inputs(model, blocks, ids, torch.device("cpu"), torch.device("cpu"))
        ref = model(ids, output_hidden_states=True).hidden_states
        h = hidden[:1]
        for i, block in enumerate(blocks):
            torch.testing.assert_close(h, ref[i], rtol=1e-5, atol=1e-5, msg=f"{arch} block {i}")
            h = calls[i](block, h)


@pytest.mark.parametrize("arch", MOE_ARCHS + CLASSIC_ARCHS)
def test_every_expert_and_linear_pruned_exactly_routers_intact(arch):
    model = tiny_model(arch)
    routers = _router_params(model)
    report = ak.prune_model(model, tiny_tokens(4, 32), sparsity=0.5, method="wanda")
    blocks_name, blocks = find_blocks(model)
    layers = {f"{blocks_name}.{i}.{rel}": m for i, b in enumerate(blocks)
              for rel, m in prunable_layers(b, f"{blocks_name}.{i}").items()}
    zeros = 0
    for r in report["layers"]:
        w = get_weight(layers[r["name"]])
        if r["error"] is None:  # Mamba's dt_proj: its weight is used directly, never called
            assert r["skipped"] and r["kept"] == r["numel"]
            continue
        n_zero = int((w == 0).sum())
        assert n_zero == r["numel"] - r["kept"] == int(w.numel() * 0.5), r["name"]
        zeros += n_zero
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, routers[n]), f"router {n} was changed"
    experts = _experts_of(model)
    assert bool(experts) == (arch in MOE_ARCHS and arch != "lfm2")
    names = {r["name"] for r in report["layers"]}
    for i, rel, m in experts:  # every expert's every projection is a pruned layer
        lay = experts_layout(m)
        for e in range(lay.num_experts):
            for p in lay.projections:
                assert f"{blocks_name}.{i}.{rel}.{e}.{p}" in names
    cov = report["coverage"]
    assert cov["share"] >= 0.95
    assert cov["sparsity_of_all_matrices"] == pytest.approx(zeros / cov["matrix_weights"])
    intended = ("router", "norm", "ssm", "conv", "bias", "not called")
    assert all(g["reason"] in intended for g in cov["left_out"])


def test_report_counts_experts_in_achieved_sparsity():
    """A Mixtral pruned to 50 % reports 0.5 because its experts (most of its weights) really are."""
    model = tiny_model("mixtral")
    report = ak.prune_model(model, tiny_tokens(4, 32), sparsity=0.5, method="magnitude")
    experts = model.model.layers[0].mlp.experts
    assert float((experts.gate_up_proj == 0).float().mean()) == pytest.approx(0.5)
    assert float((experts.down_proj == 0).float().mean()) == pytest.approx(0.5)
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert report["coverage"]["share"] > 0.99


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "llama4", "qwen2_moe", "jamba"])
def test_saved_folder_reloads_with_the_same_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    ak.prune_model(model, tiny_tokens(4, 32), sparsity=0.5, method="wanda")
    ids = tiny_tokens(1, 24, seed=5)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = again(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


class _LinearSpy(torch.overrides.TorchFunctionMode):
    """Records the input of every F.linear / matmul whose weight lives in one of `params`' storage, per
    parameter and expert (the eager experts forward multiplies by views param[e])."""

    def __init__(self, experts: int, *params):
        super().__init__()
        self.params, self.inputs, self.experts = params, {}, experts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) \
                and len(args) >= 2:
            x, w = args[0], args[1]
            for i, param in enumerate(self.params):
                if isinstance(w, torch.Tensor) and w.untyped_storage().data_ptr() == \
                        param.untyped_storage().data_ptr():
                    e = w.storage_offset() // (param.numel() // self.experts)
                    self.inputs.setdefault((i, e), []).append(x.detach().reshape(-1, x.shape[-1]).clone())
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "dbrx"])
def test_expert_inputs_are_what_the_module_feeds_each_expert(arch):
    """gate/up inputs are the routed tokens' hidden states and down's act(gate)*up of them: the very
    rows the module's own forward multiplies with each expert's weights (Grams compared, row order
    differs)."""
    if arch == "dbrx":  # DBRX's flat w1/v1/w2 layout; its config needs the sweep's shrink
        from arch_sweep import build_tiny

        model = build_tiny("dbrx")
        experts = model.transformer.blocks[1].ffn.experts
    else:
        model = tiny_model(arch)
        experts = model.model.layers[1].mlp.experts
    lay = experts_layout(experts)
    params = {p: experts.get_parameter(lay.param_name(p)) for p in lay.projections}
    seen: dict[str, list] = {}
    hook = ExpertInputs(experts, "mlp.experts", lay, lambda n, x: seen.setdefault(n, []).append(x.clone()))
    try:
        with torch.no_grad():
            model(tiny_tokens(1, 24))
    finally:
        hook.remove()
    unique = list({id(p): p for p in params.values()}.values())
    spy = _LinearSpy(lay.num_experts, *unique)  # a second forward: the hook's own products stay out
    model.config._experts_implementation = "eager"  # the per-expert loop the spy can follow
    with spy, torch.no_grad():
        model(tiny_tokens(1, 24))
    for e in range(lay.num_experts):
        for proj in lay.projections:
            i = next(j for j, p in enumerate(unique) if p is params[proj])
            ours = torch.cat(seen[f"mlp.experts.{e}.{proj}"])
            theirs = torch.cat(spy.inputs.get((i, e), [torch.zeros(0, ours.shape[1])]))
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours.T @ ours, theirs.T @ theirs, rtol=1e-5, atol=1e-5)
        assert hook.tokens[e] == ours.shape[0]
    cfg = model.config
    top_k = cfg.ffn_config.moe_top_k if arch == "dbrx" else cfg.num_experts_per_tok
    assert sum(hook.tokens) == 24 * top_k


def test_moe_calibration_all_sends_every_token_to_every_expert():
    model = tiny_model("qwen3_moe")
    routed = ak.prune_model(copy.deepcopy(model), tiny_tokens(2, 32), sparsity=0.5, method="wanda")
    every = ak.prune_model(model, tiny_tokens(2, 32), sparsity=0.5, method="wanda", moe_calibration="all")
    experts = [r for r in every["layers"] if ".experts." in r["name"]]
    assert experts and all(r["tokens"] == 64 for r in experts)
    assert sum(r["tokens"] for r in routed["layers"] if r["name"].endswith("experts.0.gate_proj")) < 2 * 64
    with pytest.raises(ValueError, match="moe_calibration"):
        ak.prune_model(tiny_model("qwen3_moe"), tiny_tokens(2, 32), moe_calibration="dense")


def test_experts_with_few_tokens_use_the_pooled_gram():
    """An expert that saw fewer than MIN_EXPERT_TOKENS tokens is solved on its module's pooled Gram:
    finite, exact sparsity, listed with its token count, never an exception."""
    from admm_kernels.models.experts import MIN_EXPERT_TOKENS

    model = tiny_model("mixtral")
    report = ak.prune_model(model, tiny_tokens(1, 8), sparsity=0.5, method="admm", iters=4)
    experts = [r for r in report["layers"] if ".experts." in r["name"]]
    starved = [r for r in experts if r["tokens"] < MIN_EXPERT_TOKENS]
    assert starved and all(r["fallback"] == "pooled" for r in starved)
    assert all("fallback" not in r for r in experts if r["tokens"] >= MIN_EXPERT_TOKENS)
    for r in experts:
        assert r["kept"] == r["numel"] // 2 and r["error"] == r["error"]  # not NaN
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_layer_globs_name_experts():
    model = tiny_model("qwen3_moe")
    report = ak.prune_model(model, tiny_tokens(2, 32), method="magnitude", layers=["mlp.experts.down_proj"])
    names = [r["name"] for r in report["layers"]]
    assert len(names) == 2 * 4 and all(n.endswith("down_proj") and ".experts." in n for n in names)
    report = ak.prune_model(tiny_model("qwen3_moe"), tiny_tokens(2, 32), method="magnitude",
                            layers=["mlp.experts.1.*"])
    assert sorted({r["name"].split(".experts.")[1] for r in report["layers"]}) == [
        "1.down_proj", "1.gate_proj", "1.up_proj"]
    # Routers are pruned only when a pattern names them.
    report = ak.prune_model(tiny_model("qwen3_moe"), tiny_tokens(2, 32), method="magnitude",
                            layers=["self_attn.q_proj"])
    assert report["coverage"]["share"] < 0.2  # a selection prunes less on purpose: reported, not refused


def test_qwen2_moe_shared_expert_pruned_and_its_gate_kept():
    model = tiny_model("qwen2_moe")
    gate = model.model.layers[0].mlp.shared_expert_gate.weight.detach().clone()
    report = ak.prune_model(model, tiny_tokens(2, 32), method="magnitude")
    names = {r["name"] for r in report["layers"]}
    assert "model.layers.0.mlp.shared_expert.down_proj" in names
    assert not any("shared_expert_gate" in n for n in names)
    assert torch.equal(model.model.layers[0].mlp.shared_expert_gate.weight, gate)


class _OddExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 10, 7))
        self.down_proj = nn.Parameter(torch.randn(4, 3, 3))


def test_unknown_experts_layout_is_an_error_naming_the_module():
    with pytest.raises(UnknownExpertsLayout, match=r"mlp\.experts .*gate_up_proj \(4, 10, 7\)"):
        experts_layout(_OddExperts(), "mlp.experts")
    model = tiny_model("llama")
    model.model.layers[0].mlp.experts = _OddExperts()
    with pytest.raises(ValueError, match="unknown experts layout in mlp.experts"):
        ak.prune_model(model, tiny_tokens(2, 16), method="magnitude")


def test_weights_the_default_selection_cannot_prune_are_refused():
    """A block matrix used directly (not a linear) and larger than 5 % of the blocks' weights: the run
    stops before any work naming it, instead of reporting a sparsity it would not reach."""
    model = tiny_model("llama")
    for block in model.model.layers:
        block.mlp.extra = nn.Parameter(torch.randn(64, 64))
    dense = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"model\.layers\.N\.mlp\.extra .*not a linear layer"):
        ak.prune_model(model, tiny_tokens(2, 16), method="magnitude")
    for (n, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="cover only"):
        ak.models.pipeline.check_prunable(model, 0.5, "unstructured", "magnitude")
    report = ak.prune_model(model, tiny_tokens(2, 16), method="magnitude", layers=["self_attn.*", "mlp.*"])
    assert any(g["name"] == "model.layers.N.mlp.extra" for g in report["coverage"]["left_out"])


def test_sequential_moe_stages_all_gate_up_then_all_down():
    model = tiny_model("mixtral")
    report = ak.prune_model(model, tiny_tokens(2, 32), method="wanda", sequential=True)
    stage = {r["name"]: r["stage"] for r in report["layers"] if r["block"] == 0}
    gate_up = {stage[f"model.layers.0.mlp.experts.{e}.{p}"] for e in range(4)
               for p in ("gate_proj", "up_proj")}
    down = {stage[f"model.layers.0.mlp.experts.{e}.down_proj"] for e in range(4)}
    assert len(gate_up) == 1 and len(down) == 1 and min(down) > max(gate_up) > stage[
        "model.layers.0.self_attn.o_proj"]
    # down's Gram sees the pruned gate/up: the result differs from the one-pass run
    other = tiny_model("mixtral")
    ak.prune_model(other, tiny_tokens(2, 32), method="wanda")
    assert not torch.equal(model.model.layers[0].mlp.experts.down_proj,
                           other.model.layers[0].mlp.experts.down_proj)


def test_resume_moe_gives_identical_result(tmp_path):
    ids = tiny_tokens(3, 16)
    full = tiny_model("qwen3_moe")
    ak.prune_model(full, ids, sparsity=0.6, method="admm", iters=4)
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        ak.prune_model(tiny_model("qwen3_moe"), ids, sparsity=0.6, method="admm", iters=4, state_dir=state,
                       callback=stop_after(0))
    resumed = tiny_model("qwen3_moe")
    report = ak.prune_model(resumed, ids, sparsity=0.6, method="admm", iters=4, state_dir=state)
    assert report["resumed_from_block"] == 1
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="moe_calibration"):
        ak.prune_model(tiny_model("qwen3_moe"), ids, sparsity=0.6, method="admm", iters=4, state_dir=state,
                       moe_calibration="all")


def test_expert_projection_is_a_view_not_a_copy():
    model = tiny_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    layers = prunable_layers(model.model.layers[0], "model.layers.0")
    gate = layers["mlp.experts.2.gate_proj"]
    assert isinstance(gate, ExpertProjection)
    w = get_weight(gate)
    assert w.untyped_storage().data_ptr() == experts.gate_up_proj.untyped_storage().data_ptr()
    torch.testing.assert_close(w, experts.gate_up_proj[2, :, 0::2].t())  # interleaved, transposed
    torch.testing.assert_close(get_weight(layers["mlp.experts.2.up_proj"]),
                               experts.gate_up_proj[2, :, 1::2].t())
    torch.testing.assert_close(get_weight(layers["mlp.experts.2.down_proj"]), experts.down_proj[2].t())


def test_upcycled_mixtral_computes_the_dense_function():
    from admm_kernels.models.upcycle import upcycle_to_mixtral

    dense = tiny_model("llama")
    moe = upcycle_to_mixtral(dense, num_experts=4, top_k=2, seed=1)
    ids = tiny_tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="top_k"):
        upcycle_to_mixtral(dense, num_experts=2, top_k=3)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen3-MoE and a tiny Mixtral (whose checkpoint keys are the legacy per-expert w1/w2/w3 of
    block_sparse_moe) saved with a tokenizer, beside calibration and evaluation text."""
    from tiny_models import tiny_text, tiny_tokenizer

    root = tmp_path_factory.mktemp("moe")
    for arch in ("qwen3_moe", "mixtral"):
        tiny_model(arch).save_pretrained(root / arch)
        tiny_tokenizer().save_pretrained(root / arch)
    (root / "calib.txt").write_text(tiny_text(400, seed=1))
    (root / "eval.txt").write_text(tiny_text(200, seed=2))
    return root


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_streamed_moe_equals_in_memory(moe_dir, tmp_path, arch):
    """Experts saved per expert are assembled into the fused parameters block by block, pruned, and
    written back per expert: transformers loads the streamed output with the in-memory run's logits."""
    from transformers import AutoModelForCausalLM

    from admm_kernels.models import StreamedModel

    ids = tiny_tokens(4, 32)
    memory = AutoModelForCausalLM.from_pretrained(moe_dir / arch, dtype=torch.float32).eval()
    want = ak.prune_model(memory, ids, sparsity=0.5, method="wanda")
    out = tmp_path / "out"
    out.mkdir()
    got = ak.prune_model(StreamedModel(moe_dir / arch, output=out), ids, sparsity=0.5, method="wanda")
    assert [r["kept"] for r in got["layers"]] == [r["kept"] for r in want["layers"]]
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = tiny_tokens(1, 20, seed=3)
    with torch.no_grad():
        assert torch.equal(back(x).logits, memory(x).logits)


def test_cli_prunes_moe_groups_experts_and_reports_coverage(moe_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from admm_kernels import cli

    out = tmp_path / "pruned"
    base = ["--nsamples", "4", "--seqlen", "32", "--calib", str(moe_dir / "calib.txt"), "--eval-text",
            str(moe_dir / "eval.txt"), "--eval-windows", "2", "--method", "wanda"]
    assert cli.main(["prune", str(moe_dir / "qwen3_moe"), *base, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.experts.*.down_proj (4 experts" in printed
    assert "model.layers.1.mlp.experts.2.down_proj" not in printed  # one row per projection
    assert "coverage: 99." in printed and "router" in printed
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert report["coverage"]["share"] > 0.99
    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.layers[0].mlp.experts.gate_up_proj == 0).float().mean()) == pytest.approx(0.5)
    # packed: the experts stay dense in the packed file's dense part (documented); eval gives the same
    packed = tmp_path / "packed"
    assert cli.main(["prune", str(moe_dir / "qwen3_moe"), *base, "--out", str(packed), "--quiet",
                     "--save-format", "packed"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(packed), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(
        report["perplexity"]["after"], rel=1e-5)
    assert cli.main(["prune", str(moe_dir / "qwen3_moe"), *base, "--out", str(tmp_path / "all"), "--quiet",
                     "--moe-calibration", "all"]) == 0
    report = json.loads((tmp_path / "all" / cli.REPORT_NAME).read_text())
    assert {r["tokens"] for r in report["layers"] if "tokens" in r} == {4 * 32}


def test_owl_profile_counts_the_experts():
    """OWL's outlier ratios include the experts' Wanda scores (their routed tokens' input norms), and each
    expert is pruned to its block's sparsity exactly."""
    from admm_kernels.models.owl import SquareSumHooks

    model = tiny_model("qwen3_moe")
    block = model.model.layers[0]
    layers = prunable_layers(block, "model.layers.0")
    hooks = SquareSumHooks(layers)
    try:
        with torch.no_grad():
            model(tiny_tokens(1, 32))
    finally:
        hooks.remove()
    assert "mlp.experts.3.down_proj" in hooks.sums and "mlp.experts.0.gate_proj" in hooks.sums
    report = ak.prune_model(model, tiny_tokens(4, 32), sparsity=0.6, method="wanda", sparsity_profile="owl")
    values = report["sparsity_profile"]["block_sparsity"]
    assert len(set(values)) == 2
    for r in report["layers"]:
        assert r["numel"] - r["kept"] == int(r["numel"] * values[r["block"]]), r["name"]


def test_block_tuning_tunes_selected_experts_only():
    model = tiny_model("qwen3_moe")
    dense = copy.deepcopy(model)
    report = ak.prune_model(model, tiny_tokens(4, 32), sparsity=0.5, method="wanda", tune_epochs=3,
                            tune_lr=1e-3, layers=["mlp.experts.1.*", "self_attn.*"])
    assert all(b["loss_after"] < b["loss_before"] for b in report["block_tune"]["blocks"])
    for i in range(2):
        got, want = model.model.layers[i].mlp.experts, dense.model.layers[i].mlp.experts
        for e in (0, 2, 3):  # not selected: bit-identical
            assert torch.equal(got.gate_up_proj[e], want.gate_up_proj[e])
            assert torch.equal(got.down_proj[e], want.down_proj[e])
        assert not torch.equal(got.down_proj[1], want.down_proj[1])
        assert int((got.down_proj[1] == 0).sum()) == got.down_proj[1].numel() // 2  # masks kept


@pytest.mark.parametrize("arch", ["bloom", "bamba", "qwen3_moe"])
def test_streamed_perplexity_equals_in_memory(tmp_path, arch):
    """Block-by-block evaluation (the head run on the last block's output in the form the model
    expects) gives the in-memory model's perplexity."""
    from admm_kernels.models import StreamedModel

    model = tiny_model(arch)
    model.save_pretrained(tmp_path / arch)
    ids = tiny_tokens(1, 96, seed=4)[0]
    want = ak.evaluate_perplexity(model, ids, seqlen=32)
    got = ak.evaluate_perplexity(StreamedModel(tmp_path / arch), ids, seqlen=32)
    assert got == pytest.approx(want, rel=1e-5)


def test_bench_on_moe_groups_experts_by_projection(moe_dir, tmp_path, capsys):
    import csv

    from admm_kernels import cli

    out = tmp_path / "bench"
    assert cli.main(["bench", str(moe_dir / "qwen3_moe"), "--methods", "wanda", "admm", "--sparsities", "0.5",
                     "--patterns", "unstructured", "--calib", str(moe_dir / "calib.txt"), "--nsamples", "4",
                     "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.*.mlp.experts.*.down_proj" in printed
    rows = list(csv.DictReader((out / "projections.csv").open()))
    experts = [r for r in rows if r["projection"] == "model.layers.*.mlp.experts.*.gate_proj"]
    assert {r["method"] for r in experts} == {"wanda", "admm"}
    assert all(int(r["layers"]) == 2 * 4 for r in experts)
    assert all(float(r["achieved_sparsity"]) == pytest.approx(0.5) for r in rows)


class _SeparateGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(2, 8, 6))
        self.up_proj = nn.Parameter(torch.randn(2, 8, 6))
        self.down_proj = nn.Parameter(torch.randn(2, 6, 8))


def test_experts_with_extra_3d_parameters_are_refused_not_guessed():
    with pytest.raises(UnknownExpertsLayout, match="3-D parameters gate_proj beside up_proj and down_proj"):
        experts_layout(_SeparateGate(), "mlp.shared_experts")


@pytest.mark.parametrize("arch", ["mllama", "bloom", "llama"])
def test_head_runner_gives_the_models_logits_when_its_last_block_is_skipped(arch):
    """Block-by-block evaluation runs the head on the output of the last block the forward calls: Mllama's
    last layer is a cross-attention layer that text-only input skips."""
    from arch_sweep import build_tiny

    from admm_kernels.models.capture import capture_inputs, head_runner

    model = build_tiny(arch) if arch == "mllama" else tiny_model(arch)
    ids = tiny_tokens(1, 24) % 90
    _, blocks = find_blocks(model)
    with torch.no_grad():
        hidden, calls = capture_inputs(model, blocks, ids, torch.device("cpu"), torch.device("cpu"))
        assert (arch == "mllama") == calls[-1].skipped
        h = hidden[:1]
        for block, call in zip(blocks, calls):
            h = call(block, h)
        last = max(i for i, c in enumerate(calls) if not c.skipped)
        with head_runner(model, blocks, torch.device("cpu"), calls[-1].output_form, last) as run:
            got = run(ids, h)
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)
