"""Whole-model pipeline on tiny random models of every supported architecture (no download)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tiny_models import ARCHS, MAX_POS, VOCAB, Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.gram import GramAccumulator  # noqa: E402
from admm_kernels.models import find_blocks, get_weight, prunable_layers  # noqa: E402
from admm_kernels.models import pipeline as pipeline_mod  # noqa: E402
from admm_kernels.models.capture import capture_inputs  # noqa: E402

FAST = dict(iters=4, T=3)  # ADMM options: few iterations keep each model under a second


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_count(numel: int, s: float) -> int:
    return int(numel * s)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_inputs_match_the_models_own_forward(arch):
    """Chaining the captured per-block calls reproduces the model's hidden states block by block
    (sliding-window layers of Mistral / Qwen / Gemma 2 get their own masks: windows < seqlen)."""
    model = tiny_model(arch)
    ids = tiny_tokens(2, 24)
    name, blocks = find_blocks(model)
    with torch.no_grad():
        hidden, calls = capture_inputs(model, blocks, ids, torch.device("cpu"), torch.device("cpu"))
        assert len(calls) == len(blocks)
        for j in range(ids.shape[0]):
            ref = model(ids[j:j + 1], output_hidden_states=True).hidden_states
            h = hidden[j:j + 1]
            for i, block in enumerate(blocks):
                torch.testing.assert_close(h, ref[i], rtol=1e-5, atol=1e-5,
                                           msg=f"{arch} block {i} window {j}")
                h = calls[i](block, h)
    assert isinstance(blocks[0], nn.Module) and not type(blocks[0]).__name__.startswith("_Stub")


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_model_every_architecture(arch):
    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    ids = tiny_tokens(4, 32)
    report = ak.prune_model(model, ids, sparsity=0.5, **FAST)
    name, blocks = find_blocks(model)
    expected = {f"{name}.{i}.{rel}" for i, b in enumerate(blocks) for rel in prunable_layers(b, "")}
    assert {r["name"] for r in report["layers"]} == expected
    for i, block in enumerate(blocks):
        for rel, layer in prunable_layers(block, "").items():
            w = get_weight(layer)
            k = _pruned_count(w.numel(), 0.5)
            assert int((w == 0).sum()) >= k, f"{arch} {rel}: fewer zeros than pruned"
            entry = next(r for r in report["layers"] if r["name"] == f"{name}.{i}.{rel}")
            assert entry["kept"] == w.numel() - k
            assert 0.0 <= entry["error"] < 1.0
    # Embeddings, norms and the LM head are never touched.
    pruned_names = {f"{r['name']}.weight" for r in report["layers"]}
    for (n, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        if n not in pruned_names:
            assert torch.equal(p, q), f"{arch}: {n} changed"
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (4, 32, VOCAB)


def test_grams_shared_and_computed_from_pruned_predecessors(monkeypatch):
    """q/k/v (and gate/up) get one shared Gram; block 1's Gram comes from the *pruned* block 0."""
    from admm_kernels import prune as prune_module

    seen = {}
    real = prune_module.prune_layer

    def recording(weight, gram, **kw):
        if weight.shape[0] != 4:  # not the up-front option check on a 4-row dummy layer
            seen.setdefault("grams", []).append(gram)
        return real(weight, gram, **kw)

    monkeypatch.setattr(prune_module, "prune_layer", recording)
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = tiny_tokens(3, 16)
    report = ak.prune_model(model, ids, sparsity=0.5, method="sparsegpt")
    groups = [r["group"].rsplit(".", 1)[-1] for r in report["layers"][:7]]
    assert groups == ["q_proj", "q_proj", "q_proj", "o_proj", "gate_proj", "gate_proj", "down_proj"]
    grams = seen["grams"]
    assert grams[0] is grams[1] is grams[2] and grams[4] is grams[5] and grams[3] is not grams[0]

    # Reference: block 1's down_proj input through a model whose block 0 is the pruned one.
    dense.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    acc = GramAccumulator(64)
    hook = dense.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            dense(ids[j:j + 1])
    hook.remove()
    torch.testing.assert_close(grams[13], acc.gram, rtol=1e-5, atol=1e-4)
    # The pipeline writes back exactly what prune_layer returns on that Gram.
    w_dense = dense.model.layers[1].mlp.down_proj.weight.detach()
    res = real(w_dense, grams[13], sparsity=0.5, method="sparsegpt")
    assert torch.equal(res.weight, model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("wanda", "per-row"),
                                            ("sparsegpt", "4:8"), ("admm", "2:4")])
def test_every_method_and_pattern(method, pattern):
    model = tiny_model("qwen2")
    opts = FAST if method == "admm" else {}
    report = ak.prune_model(model, tiny_tokens(2, 16), sparsity=0.5, pattern=pattern, method=method, **opts)
    name, blocks = find_blocks(model)
    for block in blocks:
        for rel, layer in prunable_layers(block, "").items():
            w = get_weight(layer)
            if ":" in pattern:
                n, m = map(int, pattern.split(":"))
                nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
                assert int(nonzero.max()) <= n, f"{rel}: more than {n} of {m} kept"
            else:
                assert int((w == 0).sum(1).min()) >= w.shape[1] // 2
    assert report["method"] == method and report["pattern"] == pattern


def test_layer_selection_and_magnitude_matches_direct():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    report = ak.prune_model(model, tiny_tokens(2, 16), sparsity=0.5, method="magnitude", layers=["mlp.*"])
    assert report["layers"] and all(".mlp." in r["name"] for r in report["layers"])
    for blk, ref in zip(model.model.layers, dense.model.layers):
        assert torch.equal(blk.self_attn.q_proj.weight, ref.self_attn.q_proj.weight)
        direct = ak.prune_layer(ref.mlp.up_proj.weight, torch.eye(32), sparsity=0.5, method="magnitude")
        assert torch.equal(blk.mlp.up_proj.weight, direct.weight)


def test_only_early_blocks_selected_stops_early():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    report = ak.prune_model(model, tiny_tokens(2, 16), method="magnitude",
                            layers=lambda name, module: name.startswith("model.layers.0."))
    assert {r["block"] for r in report["layers"]} == {0}
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, dense.model.layers[2].mlp.down_proj.weight)
    report = ak.prune_model(model, tiny_tokens(2, 16), method="wanda", layers=["model.layers.1.mlp.up_proj"])
    assert [r["name"] for r in report["layers"]] == ["model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resume_gives_identical_result(tmp_path, arch):
    ids = tiny_tokens(3, 16)
    full = tiny_model(arch)
    ak.prune_model(full, ids, sparsity=0.6, **FAST)

    state = tmp_path / "state"
    first = tiny_model(arch)
    with pytest.raises(Interrupt):
        ak.prune_model(first, ids, sparsity=0.6, state_dir=state, callback=stop_after(0), **FAST)
    assert (state / "state.json").is_file() and (state / "block_0000.safetensors").is_file()
    resumed = tiny_model(arch)  # a fresh dense model, as after a crash
    report = ak.prune_model(resumed, ids, sparsity=0.6, state_dir=state, **FAST)
    assert report["resumed_from_block"] == 1
    assert len(report["layers"]) == len(ak.prune_model(tiny_model(arch), ids, method="magnitude")["layers"])
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    # Other settings on the same state folder are refused, naming what differs.
    with pytest.raises(ValueError, match="sparsity"):
        ak.prune_model(tiny_model(arch), ids, sparsity=0.5, state_dir=state, **FAST)


def test_offloaded_activations_give_the_same_result():
    ids = tiny_tokens(2, 16)
    a, b = tiny_model("gemma2"), tiny_model("gemma2")
    ak.prune_model(a, ids, method="wanda")
    ak.prune_model(b, ids, method="wanda", offload=True, device="cpu")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_unsupported_models_say_what_was_looked_for():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="looked for the largest torch.nn.ModuleList"):
        ak.prune_model(NoBlocks(), torch.zeros(1, 4, dtype=torch.long))

    class EncDec(NoBlocks):
        class config:  # noqa: N801
            is_encoder_decoder = True

    with pytest.raises(ValueError, match="encoder-decoder"):
        ak.prune_model(EncDec(), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ak.prune_model("llama", torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(calibration=torch.zeros(2, 8)), TypeError, "integer token ids"),
    (dict(calibration=torch.zeros(8, dtype=torch.long)), ValueError, r"shape \(nsamples, seqlen\)"),
    (dict(calibration=torch.zeros(1, MAX_POS + 1, dtype=torch.long)), ValueError,
     "exceeds the model's maximum"),
    (dict(calibration=torch.full((1, 8), VOCAB, dtype=torch.long)), ValueError,
     r"token ids must be in \[0, 96\)"),
    (dict(sparsity=1.5), ValueError, "sparsity must be in"),
    (dict(pattern="3:5"), ValueError,
     r"pattern '3:5' is invalid for layer model\.layers\.0\.self_attn\.q_proj"),
    (dict(pattern="2-4"), ValueError, "unknown pattern"),
    (dict(layers=["attn.nope"]), ValueError, "layers pattern 'attn.nope' matches no linear layer"),
    (dict(layers="mlp.*"), TypeError, "list of glob patterns"),
    (dict(gram_dtype=torch.float16), TypeError, "gram_dtype"),
])
def test_bad_input(kwargs, error, match):
    model = tiny_model("llama")
    args = dict(calibration=tiny_tokens(1, 8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ak.prune_model(model, **args)


def test_bad_method_or_option_fails_before_any_work(monkeypatch):
    from admm_kernels.models import capture

    def never(*a, **k):
        raise AssertionError("the calibration forward ran before the options were checked")

    monkeypatch.setattr(pipeline_mod, "capture_inputs", never)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'no_such_option' for method 'admm'"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(1, 8), no_such_option=3)
    with pytest.raises(ValueError, match="method"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(1, 8), method="obs")
    assert capture.capture_inputs is not never


def test_progress_bars_and_report(capsys):
    report = ak.prune_model(tiny_model("opt"), tiny_tokens(2, 16), method="wanda", progress=True)
    err = capsys.readouterr().err
    assert "blocks" in err and "100%" in err
    for key in ("forward", "gram", "solve", "capture", "total"):
        assert report["timings"][key] >= 0
    assert report["versions"]["torch"] == torch.__version__
    assert report["nsamples"] == 2 and report["seqlen"] == 16


@pytest.mark.model
def test_real_smollm2_first_blocks():
    """The embedded SmolLM2-135M: prune blocks 0-1 with ADMM on a little Shakespeare; the model still
    predicts Shakespeare reasonably well."""
    from admm_kernels import protocols
    from admm_kernels.eval import evaluate_perplexity
    from admm_kernels.models import load_model

    model, tok, _ = load_model(None)
    calib = protocols.calibration_windows(tok, None, nsamples=4, seqlen=128, seed=0)
    ev = protocols.evaluation_tokens(tok, None)
    before = evaluate_perplexity(model, ev, seqlen=128, max_windows=4)
    report = ak.prune_model(model, calib, sparsity=0.5,
                            layers=lambda name, m: name.startswith(("model.layers.0.", "model.layers.1.")))
    after = evaluate_perplexity(model, ev, seqlen=128, max_windows=4)
    assert len(report["layers"]) == 14 and report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) >= 0.5
    assert before < 200 and before <= after < 1.5 * before
