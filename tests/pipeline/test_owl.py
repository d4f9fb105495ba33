"""Non-uniform sparsity across blocks: OWL (admm_kernels.models.owl), per-block lists, and their
integration with the pipeline, the resume state and the CLI (tiny random models, no download)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.models import find_blocks, get_weight, owl, prunable_layers  # noqa: E402
from admm_kernels.models import pipeline as pipeline_mod  # noqa: E402
from admm_kernels.models.sparsity_profile import OWL_LAMBDA, OWL_M, parse_profile_text  # noqa: E402

FAST = dict(iters=4, T=3)

pytestmark = pytest.mark.usefixtures("one_thread")


def _outlier_model(block: int = 1, seed: int = 0):
    """A tiny LLaMA (3 blocks) whose block `block` receives planted outlier features: the first three
    channels of both of its RMSNorm weights x30, so q/k/v and gate/up see a few huge input features."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        layer = model.model.layers[block]
        layer.input_layernorm.weight[:3] *= 30
        layer.post_attention_layernorm.weight[:3] *= 30
    return model


def _dense_square_sums(model, ids) -> list[dict[str, torch.Tensor]]:
    """Σ x_j² of every linear's input inside the blocks, from the model's own full forward (no
    pipeline machinery): the reference for the OWL pre-pass."""
    name, blocks = find_blocks(model)
    sums = [{} for _ in blocks]
    handles = []
    for b, block in enumerate(blocks):
        for rel, mod in prunable_layers(block, f"{name}.{b}").items():
            def hook(m, args, b=b, rel=rel):
                sq = args[0].double().square().reshape(-1, args[0].shape[-1]).sum(0)
                sums[b][rel] = sums[b].get(rel, 0) + sq
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(input_ids=ids[j:j + 1], use_cache=False)
    for h in handles:
        h.remove()
    return sums


def _reference_ratio(layers, sums, m):
    """Outlier fraction by the definition, in float64: all of the block's scores concatenated."""
    scores = torch.cat([(get_weight(mod).double().abs() * sums[rel].sqrt()).flatten()
                        for rel, mod in layers.items()])
    return float((scores > m * scores.mean()).double().mean())


# --- the allocation -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_allocation_averages_to_the_target_within_the_spread_and_is_monotone(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    ratios = [rng.uniform(0.0, 0.05) for _ in range(n)]
    weights = [rng.choice([100, 100, 250, 1000]) for _ in range(n)]
    target, lam = rng.uniform(0.3, 0.8), rng.uniform(0.01, 0.1)
    s = owl.allocate(ratios, weights, target, lam)
    mean = sum(v * w for v, w in zip(s, weights)) / sum(weights)
    assert mean == pytest.approx(target, abs=1e-12)              # parameter-weighted average = target
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)  # spread exactly 2λ
    assert all(abs(v - target) < 2 * lam for v in s)
    order = sorted(range(n), key=lambda b: ratios[b])
    assert [s[b] for b in order] == sorted(s, reverse=True)      # more outliers -> lower sparsity
    # the unweighted case is the released code's mean over blocks
    s_eq = owl.allocate(ratios, [7] * n, target, lam)
    assert sum(s_eq) / n == pytest.approx(target, abs=1e-12)


def test_allocation_edge_cases():
    assert owl.allocate([0.01, 0.01, 0.01], [5, 5, 5], 0.7, 0.08) == (0.7, 0.7, 0.7)  # no spread to make
    s = owl.allocate([0.01, None, 0.03], [10, 0, 10], 0.6, 0.05)  # block 1: nothing selected
    assert s[1] == 0.6 and s[0] == pytest.approx(0.65) and s[2] == pytest.approx(0.55)
    assert owl.allocate([0.0, 0.02], [1, 1], 0.5, 0.0) == (0.5, 0.5)
    with pytest.raises(ValueError, match=r"owl_lambda=0\.3 is too large for sparsity 0\.1.*block 0"):
        owl.allocate([0.02, 0.01, 0.0], [1, 1, 1], 0.1, 0.3)
    with pytest.raises(ValueError, match=r"owl_lambda=0\.2 is too large for sparsity 0\.9.*block 1"):
        owl.allocate([0.02, 0.0], [1, 1], 0.9, 0.2)


def test_published_defaults():
    assert (OWL_M, OWL_LAMBDA) == (5.0, 0.08)


# --- the dense pre-pass and the outlier ratios ------------------------------------------------------

def test_square_sums_are_the_dense_models_input_norms_and_touch_nothing():
    model, ids = _outlier_model(), tiny_tokens(3, 16)
    before = copy.deepcopy(model.state_dict())
    name, blocks = find_blocks(model)
    selected = [prunable_layers(b, f"{name}.{i}") for i, b in enumerate(blocks)]
    got = owl.input_square_sums(model, blocks, selected, ids, torch.device("cpu"), torch.device("cpu"))
    want = _dense_square_sums(model, ids)
    assert [set(g) for g in got] == [set(w) for w in want]
    for g, w in zip(got, want):
        for rel in w:
            assert g[rel].dtype == torch.float64 and g[rel].shape == w[rel].shape
            torch.testing.assert_close(g[rel], w[rel], rtol=1e-5, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for b, layers in enumerate(selected):
        one_weight = 1 / sum(get_weight(m).numel() for m in layers.values())
        assert owl.outlier_ratio(layers, got[b], 5.0) == pytest.approx(
            _reference_ratio(layers, want[b], 5.0), abs=2 * one_weight)
    assert owl.outlier_ratio(selected[0], {}, 5.0) is None


def test_planted_outliers_get_lower_sparsity_and_the_overall_sparsity_is_exact():
    model, ids = _outlier_model(block=1), tiny_tokens(4, 16)
    reference = _dense_square_sums(copy.deepcopy(model), ids)
    report = ak.prune_model(model, ids, sparsity=0.7, method="magnitude", sparsity_profile="owl")
    prof = report["sparsity_profile"]
    ratios, s = prof["outlier_ratios"], prof["block_sparsity"]
    assert prof["name"] == "owl" and (prof["owl_m"], prof["owl_lambda"]) == (5.0, 0.08)
    assert ratios[1] > 2 * max(ratios[0], ratios[2])  # the planted block has the most outliers
    assert s[1] == min(s) and max(s) - min(s) == pytest.approx(0.16)
    assert sorted(range(3), key=lambda b: ratios[b]) == sorted(range(3), key=lambda b: -s[b])
    # ratios come from the dense model (the pre-pass runs before any block is pruned)
    name, blocks = find_blocks(tiny_model("llama"))
    for b in range(3):
        layers = prunable_layers(_outlier_model(block=1).model.layers[b], f"{name}.{b}")
        assert ratios[b] == pytest.approx(_reference_ratio(layers, reference[b], 5.0), abs=2e-4)
    # every layer is pruned to its block's sparsity, exactly to the integer count...
    for r in report["layers"]:
        assert r["numel"] - r["kept"] == int(r["numel"] * s[r["block"]]), r["name"]
    # ...so the model's overall sparsity is the target up to one weight per layer (the integer rounding)
    total = sum(r["numel"] for r in report["layers"])
    pruned = sum(r["numel"] - r["kept"] for r in report["layers"])
    assert sum(r["numel"] * s[r["block"]] for r in report["layers"]) == pytest.approx(0.7 * total, rel=1e-12)
    assert 0 <= 0.7 * total - pruned < len(report["layers"])
    assert report["sparsity"] == 0.7


def test_owl_with_admm_per_row_and_a_layer_selection():
    model, ids = _outlier_model(block=2), tiny_tokens(3, 16)
    report = ak.prune_model(model, ids, sparsity=0.6, pattern="per-row", sparsity_profile="owl",
                            owl_lambda=0.05, owl_m=3, layers=["mlp.*"], **FAST)
    prof = report["sparsity_profile"]
    s = prof["block_sparsity"]
    assert (prof["owl_m"], prof["owl_lambda"]) == (3.0, 0.05) and s[2] == min(s)
    assert {r["name"].split(".", 3)[3] for r in report["layers"]} == {"mlp.gate_proj", "mlp.up_proj",
                                                                      "mlp.down_proj"}
    for r in report["layers"]:
        out_f, in_f = r["shape"]
        assert r["numel"] - r["kept"] == out_f * int(in_f * s[r["block"]]), r["name"]
    assert sum(s) / 3 == pytest.approx(0.6, abs=1e-12)  # equal blocks: weighted = plain mean


def test_owl_pre_pass_keeps_its_activations_where_offload_says(tmp_path, monkeypatch):
    """offload="disk" is for calibration sets larger than host memory: the OWL pre-pass's (N, L, hidden)
    activations go to a file in offload_dir too (the pre-pass used to allocate them in host memory),
    and the profile is the same as in memory."""
    from admm_kernels.models import activations

    made = []
    real = activations.tempfile.mkstemp
    monkeypatch.setattr(activations.tempfile, "mkstemp",
                        lambda *a, **k: made.append(k.get("dir")) or real(*a, **k))
    ids = tiny_tokens(3, 16)
    kw = dict(sparsity=0.6, sparsity_profile="owl", method="magnitude")
    on_disk = ak.prune_model(_outlier_model(), ids, offload="disk", offload_dir=tmp_path, **kw)
    assert made == [tmp_path, tmp_path]  # the pre-pass's file, then the pipeline's
    in_memory = ak.prune_model(_outlier_model(), ids, **kw)
    assert on_disk["sparsity_profile"] == in_memory["sparsity_profile"]


def test_owl_lambda_zero_is_exactly_uniform():
    ids = tiny_tokens(2, 16)
    a, b = _outlier_model(), _outlier_model()
    ak.prune_model(a, ids, sparsity=0.6, **FAST)
    report = ak.prune_model(b, ids, sparsity=0.6, sparsity_profile="owl", owl_lambda=0.0, **FAST)
    assert report["sparsity_profile"]["block_sparsity"] == [0.6] * 3
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# --- per-block lists ----------------------------------------------------------------------------------

def test_per_block_list_is_used_block_by_block():
    ids = tiny_tokens(2, 16)
    report = ak.prune_model(tiny_model("gpt2"), ids, sparsity=[0.5, 0.6, 0.8], method="magnitude")
    assert report["sparsity_profile"]["name"] == "list"
    assert report["sparsity_profile"]["block_sparsity"] == [0.5, 0.6, 0.8]
    assert report["sparsity"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    for r in report["layers"]:
        assert r["numel"] - r["kept"] == int(r["numel"] * [0.5, 0.6, 0.8][r["block"]])
    # a constant list is the uniform run, bit for bit
    a, b = tiny_model("llama"), tiny_model("llama")
    ak.prune_model(a, ids, sparsity=0.6, **FAST)
    ak.prune_model(b, ids, sparsity=(0.6, 0.6, 0.6), **FAST)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_per_block_list_mean_is_weighted_by_the_selected_weights():
    report = ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), sparsity=[0.5, 0.7, 0.0],
                            method="magnitude", layers=["model.layers.0.*", "model.layers.1.mlp.*"])
    n0 = sum(r["numel"] for r in report["layers"] if r["block"] == 0)
    n1 = sum(r["numel"] for r in report["layers"] if r["block"] == 1)
    assert n0 != n1 and report["sparsity"] == pytest.approx((0.5 * n0 + 0.7 * n1) / (n0 + n1))


# --- bad values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sparsity_profile="owll"), ValueError, r"unknown sparsity_profile 'owll'"),
    (dict(sparsity_profile=None), TypeError, "sparsity_profile must be a str"),
    (dict(sparsity=[0.5, 0.5]), ValueError, "sparsity has 2 per-block values but the model has 3"),
    (dict(sparsity=[0.5, 1.0, 0.5]), ValueError, r"sparsity\[1\] must be in \[0, 1\), got 1\.0"),
    (dict(sparsity=[0.5, "x", 0.5]), TypeError, r"sparsity\[1\] must be a float"),
    (dict(sparsity="0.5"), TypeError, "sparsity must be a float or a sequence"),
    (dict(sparsity=[0.5] * 3, sparsity_profile="owl"), ValueError, "pass sparsity as one float"),
    (dict(sparsity=[0.5] * 3, pattern="2:4"), ValueError, "per-block sparsity list cannot apply to an N:M"),
    (dict(sparsity_profile="owl", pattern="2:4"), ValueError, "sparsity_profile='owl' applies to"),
    (dict(sparsity_profile="owl", owl_lambda=0.5), ValueError, r"owl_lambda=0\.5 is too large"),
    (dict(sparsity_profile="owl", owl_lambda=-0.1), ValueError, "owl_lambda must be a finite number >= 0"),
    (dict(sparsity_profile="owl", owl_lambda=float("nan")), ValueError, "owl_lambda"),
    (dict(sparsity_profile="owl", owl_m=0), ValueError, "owl_m must be a finite number > 0"),
    (dict(sparsity_profile="owl", owl_m="5"), TypeError, "owl_m must be a float"),
    (dict(owl_m=5.0), ValueError, r"owl_m=5\.0 is an option of sparsity_profile='owl'"),
    (dict(owl_lambda=0.1), ValueError, r"owl_lambda=0\.1 is an option of sparsity_profile='owl'"),
])
def test_bad_profile_arguments_fail_before_any_work(monkeypatch, kwargs, error, match):
    def never(*a, **k):
        raise AssertionError("a calibration pass ran before the arguments were checked")

    monkeypatch.setattr(pipeline_mod, "capture_inputs", never)
    monkeypatch.setattr(owl, "capture_inputs", never)
    with pytest.raises(error, match=match):
        ak.prune_model(tiny_model("llama"), tiny_tokens(1, 8), **kwargs)
    with pytest.raises(error, match=match):  # the CLI's early check says the same
        pipeline_mod.check_prunable(tiny_model("llama"), kwargs.pop("sparsity", 0.5),
                                    kwargs.pop("pattern", "unstructured"), **kwargs)


def test_lambda_too_large_for_the_measured_ratios_leaves_the_model_as_found():
    model, ids = _outlier_model(), tiny_tokens(2, 16)
    model.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"owl_lambda=0\.3 is too large for sparsity 0\.1: .*outside"):
        ak.prune_model(model, ids, sparsity=0.1, sparsity_profile="owl", owl_lambda=0.3, **FAST)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- resume -------------------------------------------------------------------------------------------

def test_resume_repeats_the_profile_and_refuses_another(tmp_path):
    ids = tiny_tokens(3, 16)
    owl_args = dict(sparsity=0.7, sparsity_profile="owl", **FAST)
    full = _outlier_model()
    ak.prune_model(full, ids, **owl_args)
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        ak.prune_model(_outlier_model(), ids, state_dir=state, callback=stop_after(0), **owl_args)
    for other, what in ((dict(sparsity=0.7, **FAST), "sparsity_profile"),
                        (dict(owl_args, owl_lambda=0.05), "sparsity_profile"),
                        (dict(owl_args, owl_m=4.0), "sparsity_profile"),
                        (dict(FAST, sparsity=[0.7, 0.7, 0.7]), "sparsity_profile")):
        with pytest.raises(ValueError, match=what):
            ak.prune_model(_outlier_model(), ids, state_dir=state, **other)
    resumed = _outlier_model()
    report = ak.prune_model(resumed, ids, state_dir=state, **owl_args)
    assert report["resumed_from_block"] == 1
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


# --- CLI ----------------------------------------------------------------------------------------------

def _cli_args(root, out, *extra):
    return ["prune", str(root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--calib",
            str(root / "calib.txt"), "--no-eval", "--quiet", "--method", "magnitude", "--out", str(out),
            *extra]


def test_cli_sparsity_profiles(tiny_model_root, tmp_path, capsys):
    from admm_kernels import cli

    owl_out = tmp_path / "owl"
    assert cli.main(_cli_args(tiny_model_root, owl_out, "--sparsity", "0.7", "--sparsity-profile", "owl",
                              "--owl-lambda", "0.05")) == 0
    assert "sparsity profile owl (M=5, lambda=0.05): block sparsity" in capsys.readouterr().out
    report = json.loads((owl_out / cli.REPORT_NAME).read_text())
    prof = report["sparsity_profile"]
    assert prof["name"] == "owl" and max(prof["block_sparsity"]) - min(prof["block_sparsity"]) == \
        pytest.approx(0.1)
    # the report (or a JSON list, or comma-separated values) gives the same profile back
    for spec in (str(owl_out / cli.REPORT_NAME), ",".join(repr(v) for v in prof["block_sparsity"])):
        out = tmp_path / f"again{len(spec)}"
        assert cli.main(_cli_args(tiny_model_root, out, "--sparsity-profile", spec)) == 0
        again = json.loads((out / cli.REPORT_NAME).read_text())["sparsity_profile"]
        assert again["name"] == "list" and again["block_sparsity"] == prof["block_sparsity"]
    listed = tmp_path / "profile.json"
    listed.write_text(json.dumps([0.5, 0.6, 0.7]))
    assert cli.main(_cli_args(tiny_model_root, tmp_path / "list", "--sparsity-profile", str(listed))) == 0
    assert json.loads((tmp_path / "list" / cli.REPORT_NAME).read_text())["sparsity"] == pytest.approx(0.6)


@pytest.mark.parametrize("extra,message", [
    (["--sparsity-profile", "owll"], "--sparsity-profile 'owll' is neither uniform nor owl"),
    (["--sparsity-profile", "0.5,x"], "comma-separated per-block values must all be numbers"),
    (["--sparsity-profile", "0.5,0.6"], "--sparsity-profile has 2 per-block values but the model has 3"),
    (["--sparsity-profile", "0.5,1.2,0.6"], r"--sparsity-profile[1] must be in [0, 1)"),
    (["--sparsity-profile", "0.5,0.6,0.7", "--sparsity", "0.5"], "give one of them"),
    (["--owl-m", "4"], "--owl-m=4.0 is an option of --sparsity-profile='owl'"),
    (["--sparsity-profile", "owl", "--owl-lambda", "0.5"], "--owl-lambda=0.5 is too large"),
    (["--sparsity-profile", "owl", "--owl-lambda", "x"], "--owl-lambda must be a number"),
    (["--sparsity-profile", "owl", "--pattern", "2:4"], "--sparsity-profile='owl' applies to unstructured"),
    (["--sparsity", "0.05", "--sparsity-profile", "owl", "--owl-lambda", "0.2"],
     "--owl-lambda=0.2 is too large for sparsity 0.05"),
])
def test_cli_bad_profiles_name_the_flag(tiny_model_root, tmp_path, capsys, extra, message):
    from admm_kernels import cli

    try:
        code = cli.main(_cli_args(tiny_model_root, tmp_path / "o", *extra))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err


def test_parse_profile_text(tmp_path):
    assert parse_profile_text(" OWL ") == "owl" and parse_profile_text("uniform") == "uniform"
    assert parse_profile_text("0.5, 0.75") == [0.5, 0.75] and parse_profile_text("0.4") == [0.4]
    bad = tmp_path / "bad.json"
    for text in ('{"block_sparsity": []}', '[0.5, true]', '{"a": 1}', "not json"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.json"):
            parse_profile_text(str(bad))


@pytest.mark.gpu
def test_owl_on_cuda_matches_the_cpu_profile():
    """The pre-pass moves one block at a time to the device (and back), as the pipeline does: the
    outlier ratios on CUDA equal the CPU's up to a few borderline scores, the allocation follows."""
    ids = tiny_tokens(3, 16)
    cpu = ak.prune_model(_outlier_model(), ids, sparsity=0.7, method="magnitude", sparsity_profile="owl")
    model = _outlier_model()
    gpu = ak.prune_model(model, ids, sparsity=0.7, method="magnitude", sparsity_profile="owl", device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # every block went back
    n = sum(r["numel"] for r in cpu["layers"]) / 3
    for a, b in zip(cpu["sparsity_profile"]["outlier_ratios"], gpu["sparsity_profile"]["outlier_ratios"]):
        assert a == pytest.approx(b, abs=3 / n)
    s_cpu, s_gpu = cpu["sparsity_profile"]["block_sparsity"], gpu["sparsity_profile"]["block_sparsity"]
    assert s_gpu[1] == min(s_gpu) and s_gpu == pytest.approx(s_cpu, abs=0.02)


def test_input_hooks_name_a_layer_called_without_a_tensor_and_clean_up():
    from torch import nn

    from admm_kernels.models.capture import input_hooks

    lin = nn.Linear(4, 4)
    seen = []
    handles = input_hooks({"proj": lin}, lambda name, x: seen.append((name, tuple(x.shape))))
    lin(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="layer proj was called without a tensor input"):
        lin(input=torch.zeros(2, 4))
    assert seen == [("proj", (2, 4))]
    for h in handles:
        h.remove()

    class Refuses(nn.Linear):
        def register_forward_pre_hook(self, hook, **kw):
            raise RuntimeError("no hooks here")

    first = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="no hooks here"):
        input_hooks({"a": first, "b": Refuses(4, 4)}, lambda name, x: seen.append(name))
    first(torch.zeros(1, 4))
    assert not first._forward_pre_hooks and seen == [("proj", (2, 4))]  # the first hook was removed
