"""Block tuning (prune_model tune_epochs > 0, CLI --tune-epochs): after a block's layer-wise solves, a
masked fine-tune of its kept weights towards the dense block's outputs on the same inputs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import ARCHS, Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.models import find_blocks, get_weight, prunable_layers  # noqa: E402
from admm_kernels.models.block_tune import (  # noqa: E402
    AUTO_BATCH,
    AUTO_EPOCHS,
    AUTO_PATIENCE,
    BlockTune,
    check_block_tune,
    held_out,
    tune_block,
)
from admm_kernels.models.capture import capture_inputs  # noqa: E402
from admm_kernels.models.state import StateError  # noqa: E402

FAST = dict(iters=4, T=3)
TUNE = dict(tune_epochs=3, tune_lr=1e-3, tune_batch=2)
pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(model) -> dict[str, torch.Tensor]:
    _, blocks = find_blocks(model)
    return {f"{b}.{n}": get_weight(m).detach().clone() for b, blk in enumerate(blocks)
            for n, m in prunable_layers(blk, f"b{b}.").items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_tuning_lowers_every_blocks_output_error_and_keeps_the_masks_exact(arch):
    ids = tiny_tokens(4, 16)
    model = tiny_model(arch)
    report = ak.prune_model(model, ids, sparsity=0.6, **FAST, **TUNE)
    tuned = report["block_tune"]
    assert tuned["epochs"] == 3 and tuned["lr"] == 1e-3 and tuned["batch"] == 2
    assert [r["block"] for r in tuned["blocks"]] == list(range(report["blocks"]))
    for r in tuned["blocks"]:
        assert r["loss_after"] < r["loss_before"]
    assert report["timings"]["tune"] > 0
    for rec in report["layers"]:  # every layer still pruned exactly: kept = numel - int(numel * 0.6)
        assert rec["kept"] == rec["numel"] - int(rec["numel"] * 0.6)
    w = _weights(model)
    assert sum(int((t != 0).sum()) for t in w.values()) <= sum(r["kept"] for r in report["layers"])


def test_tune_block_moves_kept_weights_only_and_is_reproducible():
    """Directly on one block: zeros stay zeros, the block's loss to its dense outputs falls, the same
    call gives the same weights, and requires_grad flags come back as they were."""
    block, call, acts, targets, layers = _magnitude_pruned_block(4)
    zeros = {n: m.weight == 0 for n, m in layers.items()}
    start = copy.deepcopy(block.state_dict())
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    runs = []
    for _ in range(2):
        block.load_state_dict(start)
        rep = tune_block(block, 0, layers, call, acts, targets, torch.device("cpu"), BlockTune(4, 1e-3, 3))
        assert rep["loss_after"] < rep["loss_before"]
        runs.append({n: m.weight.detach().clone() for n, m in layers.items()})
    for n, m in layers.items():
        assert bool((runs[0][n][zeros[n]] == 0).all())
        assert torch.equal(runs[0][n], runs[1][n])
        assert not torch.equal(runs[0][n], start[f"{n}.weight"])  # kept weights did move
        assert m.weight.grad is None
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags


def test_nm_patterns_survive_tuning():
    ids = tiny_tokens(4, 16)
    model = tiny_model("llama")
    ak.prune_model(model, ids, pattern="2:4", **FAST, **TUNE)
    for name, w in _weights(model).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name


def test_tune_epochs_zero_is_the_untuned_run_bit_for_bit():
    ids = tiny_tokens(3, 16)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = ak.prune_model(a, ids, sparsity=0.5, **FAST)
    rb = ak.prune_model(b, ids, sparsity=0.5, tune_epochs=0, **FAST)
    assert "block_tune" not in ra and "block_tune" not in rb
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tuning_changes_the_result_and_lowers_the_final_output_error():
    """The tuned model's last hidden states are closer to the dense model's than the untuned one's."""
    ids = tiny_tokens(4, 16)
    dense = tiny_model("llama")
    plain, tuned = copy.deepcopy(dense), copy.deepcopy(dense)
    ak.prune_model(plain, ids, sparsity=0.7, **FAST)
    ak.prune_model(tuned, ids, sparsity=0.7, **FAST, tune_epochs=5, tune_lr=1e-3, tune_batch=2)

    def hidden(m):
        with torch.no_grad():
            return m(ids, output_hidden_states=True).hidden_states[-1]

    ref = hidden(dense)
    assert float((hidden(tuned) - ref).pow(2).mean()) < float((hidden(plain) - ref).pow(2).mean())


@pytest.mark.parametrize("tune", [TUNE, dict(TUNE, tune_epochs=4, tune_patience=1, tune_holdout=3)],
                         ids=["fixed", "early-stopped"])
def test_resume_of_a_tuned_run_is_bit_identical_and_the_settings_are_fingerprinted(tmp_path, tune):
    ids, folder = tiny_tokens(3, 16), tmp_path / "s"
    full = tiny_model("llama")
    ref = ak.prune_model(full, ids, sparsity=0.6, **FAST, **tune)
    with pytest.raises(Interrupt):
        ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, state_dir=folder, callback=stop_after(0),
                       **FAST, **tune)
    with pytest.raises(StateError, match="block_tune"):
        ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, state_dir=folder, **FAST,
                       **{**tune, "tune_lr": 2e-3})
    resumed_model = tiny_model("llama")
    resumed = ak.prune_model(resumed_model, ids, sparsity=0.6, state_dir=folder, **FAST, **tune)
    assert resumed["resumed_from_block"] == 1
    assert resumed["block_tune"]["blocks"] == ref["block_tune"]["blocks"]
    wr, wf = _weights(resumed_model), _weights(full)
    assert all(torch.equal(wr[k], wf[k]) for k in wf)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tune_epochs=-1), ValueError, "tune_epochs must be >= 0"),
    (dict(tune_epochs=1.5), TypeError, "tune_epochs must be an int"),
    (dict(tune_epochs=True), TypeError, "tune_epochs must be an int"),
    (dict(tune_epochs=1, tune_batch=0), ValueError, "tune_batch must be >= 1"),
    (dict(tune_epochs=1, tune_lr=0.0), ValueError, "tune_lr must be a finite number > 0"),
    (dict(tune_epochs=1, tune_lr=float("nan")), ValueError, "tune_lr must be a finite number > 0"),
])
def test_bad_tuning_arguments_fail_before_any_work(kwargs, error, match):
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(error, match=match):
        ak.prune_model(model, tiny_tokens(2, 16), **kwargs)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_half_precision_blocks_are_refused_naming_the_layer():
    model = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"block tuning needs float32 weights, but block 0's .* is "
                                         r"torch.bfloat16"):
        ak.prune_model(model, tiny_tokens(2, 16), method="magnitude", tune_epochs=1)


def test_cli_tune_flags(tiny_model_root, tmp_path, capsys):
    import json

    from admm_kernels import cli

    out = tmp_path / "t"
    args = ["prune", str(tiny_model_root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--calib",
            str(tiny_model_root / "calib.txt"), "--no-eval", "--quiet", "--method", "magnitude", "--out",
            str(out)]
    assert cli.main([*args, "--tune-epochs", "2", "--tune-lr", "0.001", "--tune-batch", "2"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["block_tune"]["epochs"] == 2 and len(report["block_tune"]["blocks"]) == report["blocks"]
    capsys.readouterr()
    assert cli.main([*args, "--overwrite", "--tune-epochs", "-2"]) != 0
    assert "--tune-epochs must be >= 0" in capsys.readouterr().err
    # auto: early-stopped, 2 windows a step; the early-stopping flags reach prune_model
    assert cli.main([*args, "--overwrite", "--tune-epochs", "auto", "--tune-lr", "0.001"]) == 0
    tuned = json.loads((out / "prune_report.json").read_text())["block_tune"]
    assert tuned["auto"] and tuned["batch"] == AUTO_BATCH and tuned["patience"] == AUTO_PATIENCE
    assert cli.main([*args, "--overwrite", "--tune-epochs", "3", "--tune-patience", "1", "--tune-holdout",
                     "2"]) == 0
    tuned = json.loads((out / "prune_report.json").read_text())["block_tune"]
    assert tuned["patience"] == 1 and not tuned.get("auto")
    assert all(len(r["heldout"]) >= 2 for r in tuned["blocks"])
    capsys.readouterr()
    assert cli.main([*args, "--overwrite", "--tune-epochs", "3", "--tune-patience", "1", "--tune-holdout",
                     "1"]) == 2
    assert "--tune-holdout must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--overwrite", "--tune-epochs", "many"])
    assert "--tune-epochs must be a whole number or 'auto', got 'many'" in capsys.readouterr().err


def test_streamed_tuning_equals_in_memory(tmp_path):
    from admm_kernels.models.loading import load_model
    from admm_kernels.models.streaming import StreamedModel

    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    memory, _, _ = load_model(dense, with_tokenizer=False)
    ids = tiny_tokens(4, 16)
    expected = ak.prune_model(memory, ids, sparsity=0.6, **FAST, **TUNE)
    out = tmp_path / "out"
    out.mkdir()
    report = ak.prune_model(StreamedModel(dense, output=out), ids, sparsity=0.6, **FAST, **TUNE)
    assert report["block_tune"]["blocks"] == expected["block_tune"]["blocks"]
    written, _, _ = load_model(out, with_tokenizer=False)
    ww, wm = _weights(written), _weights(memory)
    assert all(torch.equal(ww[k], wm[k]) for k in wm)


def _reference_tune(block, layers, call, acts, targets, epochs, lr, batch, seed):
    """Block tuning as it ran before early stopping and distributed runs existed, written out plainly:
    the bit-for-bit reference for tune_epochs=N without early stopping on one process."""
    params = [m.weight for m in layers.values()]
    keep = [p.detach() != 0 for p in params]
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, fused=True)  # the CPU's fused Adam, as tune_block's
    g = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g).tolist()
            for i in range(0, n, batch):
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for j in order[i:i + batch]:
                    y = call(block, acts[j:j + 1])[0]
                    total = total + torch.nn.functional.mse_loss(y.float(), targets[j].float())
                (total / len(order[i:i + batch])).backward()
                opt.step()
                with torch.no_grad():
                    for p, m in zip(params, keep):
                        p.mul_(m)
    for p in block.parameters():
        p.requires_grad_(True)


@torch.no_grad()
def dense_targets(block, call, acts):
    """The reference targets: the dense block run on each window of acts (n, L, hidden) on its own."""
    return torch.cat([call(block, acts[j:j + 1])[0][None] for j in range(acts.shape[0])])


def _magnitude_pruned_block(seed_windows: int = 5):
    """The first block of a tiny LLaMA, its inputs (`seed_windows` windows of 16 tokens), dense targets
    and its linears pruned by magnitude to 50 % (no update)."""
    model = tiny_model("llama")
    ids = tiny_tokens(seed_windows, 16)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        acts, calls = capture_inputs(model, blocks, ids, torch.device("cpu"), torch.device("cpu"))
    block, call = blocks[0], calls[0]
    targets = dense_targets(block, call, acts)
    layers = prunable_layers(block, "b0.")
    with torch.no_grad():
        for m in layers.values():
            w = m.weight
            w.mul_(w.abs() >= w.abs().flatten().kthvalue(w.numel() // 2).values)
    return block, call, acts, targets, layers


def test_fixed_epochs_without_early_stopping_are_the_original_loop_bit_for_bit():
    block, call, acts, targets, layers = _magnitude_pruned_block()
    start = copy.deepcopy(block.state_dict())
    rep = tune_block(block, 0, layers, call, acts, targets, torch.device("cpu"), BlockTune(3, 1e-3, 2))
    assert set(rep) == {"block", "loss_before", "loss_after"}
    ours = {n: m.weight.detach().clone() for n, m in layers.items()}
    block.load_state_dict(start)
    _reference_tune(block, layers, call, acts, targets, 3, 1e-3, 2, seed=0)
    for n, m in layers.items():
        assert torch.equal(ours[n], m.weight.detach()), n


def test_early_stopping_keeps_the_best_epochs_weights():
    """With patience = epochs nothing stops early, so the held-out loss of every epoch is reported; the
    weights kept are those of the best epoch, which a run of exactly that many epochs reproduces (same
    window order, same Adam steps)."""
    block, call, acts, targets, layers = _magnitude_pruned_block()
    start = copy.deepcopy(block.state_dict())
    rep = tune_block(block, 0, layers, call, acts, targets, torch.device("cpu"),
                     BlockTune(10, 5e-3, 1, patience=10, holdout=3))  # lr high enough to over-fit
    held = rep["heldout"]
    assert len(held) == 11 and rep["epochs"] == 10
    assert rep["best_epoch"] == min(range(11), key=lambda e: (held[e], e))
    assert 0 < rep["best_epoch"] < 10, held  # the test needs a best epoch before the last
    kept = {n: m.weight.detach().clone() for n, m in layers.items()}
    block.load_state_dict(start)
    again = tune_block(block, 0, layers, call, acts, targets, torch.device("cpu"),
                       BlockTune(rep["best_epoch"], 5e-3, 1, patience=10, holdout=3))
    assert again["heldout"] == held[:rep["best_epoch"] + 1]
    for n, m in layers.items():
        assert torch.equal(kept[n], m.weight.detach()), n
    assert again["loss_after"] == rep["loss_after"]
    # patience 1 stops after the first epoch that does not improve, keeping the best one so far
    block.load_state_dict(start)
    short = tune_block(block, 0, layers, call, acts, targets, torch.device("cpu"),
                       BlockTune(10, 5e-3, 1, patience=1, holdout=3))
    worse = next(e for e in range(1, 11) if held[e] >= min(held[:e]))
    assert short["epochs"] == worse and short["heldout"] == held[:worse + 1]


def test_held_out_windows_are_spread_and_never_all():
    assert held_out(32, 8) == [4, 12, 20, 28]
    assert held_out(4, 8) == [2]
    assert held_out(2, 8) == [1]
    assert held_out(5, 2) == [1, 3]
    for n in range(2, 40):
        for every in (2, 3, 8):
            h = held_out(n, every)
            assert len(set(h)) == len(h) == max(1, n // every) and all(0 <= j < n for j in h)


def test_auto_and_the_fingerprint_of_runs_without_early_stopping():
    assert BlockTune(3, 1e-3, 2).fingerprint() == {"epochs": 3, "lr": 1e-3, "batch": 2}  # older states
    auto = check_block_tune("auto", 1e-4, 4)
    assert (auto.epochs, auto.patience, auto.holdout, auto.auto) == (AUTO_EPOCHS, AUTO_PATIENCE, 8, True)
    assert auto.fingerprint() == {"epochs": AUTO_EPOCHS, "lr": 1e-4, "batch": 4, "patience": AUTO_PATIENCE,
                                  "holdout": 8, "auto": True}
    assert check_block_tune("auto", 1e-4, 4, patience=5).patience == 5
    assert check_block_tune(4, 1e-4, 4).patience == 0
    assert check_block_tune("auto", 1e-4).batch == AUTO_BATCH and check_block_tune(4, 1e-4).batch == 4


def test_auto_runs_early_stopped_and_reports_it():
    ids = tiny_tokens(8, 16)
    report = ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, **FAST, tune_epochs="auto", tune_lr=1e-3)
    tuned = report["block_tune"]
    assert tuned["auto"] and tuned["epochs"] == AUTO_EPOCHS and tuned["patience"] == AUTO_PATIENCE
    assert tuned["batch"] == AUTO_BATCH
    for r in tuned["blocks"]:
        assert 1 <= r["epochs"] <= AUTO_EPOCHS and len(r["heldout"]) == r["epochs"] + 1
        assert r["heldout"][r["best_epoch"]] == min(r["heldout"])
        assert r["loss_after"] <= r["loss_before"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tune_epochs="many"), ValueError, "tune_epochs must be an int or 'auto'"),
    (dict(tune_epochs=2, tune_patience=-1), ValueError, "tune_patience must be >= 0"),
    (dict(tune_epochs=2, tune_patience=1.0), TypeError, "tune_patience must be an int"),
    (dict(tune_epochs=2, tune_patience=1, tune_holdout=1), ValueError, "tune_holdout must be >= 2"),
])
def test_bad_early_stopping_arguments_fail_before_any_work(kwargs, error, match):
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(error, match=match):
        ak.prune_model(model, tiny_tokens(2, 16), **kwargs)
    assert all(torch.equal(before[k], w) for k, w in _weights(model).items())


def test_early_stopping_on_one_window_is_refused_before_any_work():
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(ValueError, match="at least 2"):
        ak.prune_model(model, tiny_tokens(1, 16), method="magnitude", tune_epochs="auto")
    assert all(torch.equal(before[k], w) for k, w in _weights(model).items())


def test_disk_offloaded_tuning_keeps_its_targets_on_disk_and_equals_in_memory(tmp_path, monkeypatch):
    from admm_kernels.models.activations import ActivationStore

    ids = tiny_tokens(4, 16)
    memory = tiny_model("llama")
    expected = ak.prune_model(memory, ids, sparsity=0.6, **FAST, **TUNE)
    real = ActivationStore.empty
    on_disk = []

    def recording(self, shape, dtype):
        t = real(self, shape, dtype)
        on_disk.append((self.where, tuple(shape)))
        return t

    monkeypatch.setattr(ActivationStore, "empty", recording)
    disk = tiny_model("llama")
    report = ak.prune_model(disk, ids, sparsity=0.6, **FAST, **TUNE, offload="disk", offload_dir=tmp_path)
    full = (4, 16, disk.config.hidden_size)
    # the activations once, then every block's dense targets: files, none a copy in memory
    assert on_disk == [("disk", full)] * (1 + report["blocks"])
    assert report["block_tune"]["blocks"] == expected["block_tune"]["blocks"]
    wd, wm = _weights(disk), _weights(memory)
    assert all(torch.equal(wd[k], wm[k]) for k in wm)


@pytest.mark.parametrize("arch, settings", [("llama", {}), ("llama", {"sequential": True}),
                                            ("gpt2", {}), ("mixtral", {}),
                                            ("qwen3_moe", {"moe_calibration": "all"})])
def test_targets_are_the_dense_blocks_outputs_and_loss_after_is_measured(arch, settings, monkeypatch):
    """The targets come from the Gram forwards (no pass of their own) and the loss after tuning from the
    forward that makes the next block's inputs: both must equal what a separate pass computes: the dense
    block (a copy taken before the run) on the block's inputs, and the tuned block on them."""
    import admm_kernels.models.block as block_module

    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    _, dense_blocks = find_blocks(dense)
    seen = []

    def spy(block, index, layers, call, acts, targets, *args, **kwargs):
        want = dense_targets(dense_blocks[index], call, acts)
        assert torch.equal(targets, want), (index, float((targets - want).abs().max()))
        rep = tune_block(block, index, layers, call, acts, targets, *args, **kwargs)
        with torch.no_grad():
            mine = sum(float(torch.nn.functional.mse_loss(call(block, acts[j:j + 1])[0], targets[j]))
                       for j in range(acts.shape[0])) / acts.shape[0]
        seen.append((index, acts.clone(), mine))
        return rep

    monkeypatch.setattr(block_module, "tune_block", spy)
    report = ak.prune_model(model, tiny_tokens(3, 16), sparsity=0.6, **FAST, **TUNE, **settings)
    assert [i for i, _, _ in seen] == list(range(report["blocks"]))
    for (index, _, mine), rep in zip(seen, report["block_tune"]["blocks"]):
        assert rep["loss_after"] == pytest.approx(mine, rel=1e-5), index


def test_tuned_preset_is_the_preset_plus_block_tuning_and_explicit_settings_win():
    from admm_kernels.errors import ArgumentError
    from admm_kernels.models.block_tune import TUNED_PRESET, TUNED_SOLVER_OPTIONS

    config = ak.PruneConfig(sparsity=0.7, preset="accurate+tune")
    assert config.options["preset"] == "accurate"
    # the tuned path's damping replaces the preset's (0.003); an explicit option wins; "fast" has none
    assert config.options["percdamp"] == TUNED_SOLVER_OPTIONS["admm"]["accurate"]["percdamp"] == 0.1
    assert "percdamp" not in ak.PruneConfig(method="alps", preset="accurate+tune").options  # admm's preset
    assert ak.PruneConfig(preset="accurate+tune", percdamp=0.02).options["percdamp"] == 0.02
    assert "percdamp" not in ak.PruneConfig(preset="fast+tune").options
    assert "percdamp" not in ak.PruneConfig(preset="accurate").options
    assert (config.tune_epochs, config.tune_batch, config.tune_lr) == (
        TUNED_PRESET["tune_epochs"], TUNED_PRESET["tune_batch"], TUNED_PRESET["tune_lr"])
    assert ak.PruneConfig(**config.keywords()) == config  # the expansion round-trips
    mine = ak.PruneConfig(preset="fast+tune", tune_epochs=3, tune_lr=5e-4)  # neither is the preset's
    assert TUNED_PRESET["tune_epochs"] != 3 and TUNED_PRESET["tune_lr"] != 5e-4
    assert (mine.options["preset"], mine.tune_epochs, mine.tune_lr) == ("fast", 3, 5e-4)
    assert mine.tune_batch == TUNED_PRESET["tune_batch"]
    assert ak.PruneConfig(preset="accurate+tune", tune_epochs=0).tune_epochs == 0  # off on request
    plain = ak.PruneConfig(preset="accurate")
    assert (plain.tune_epochs, plain.tune_lr, plain.tune_batch) == (0, 1e-4, None)
    with pytest.raises(ArgumentError, match=r"preset '\+tune': name the method's preset") as err:
        ak.PruneConfig(preset="+tune")
    assert err.value.argument == "preset"
    with pytest.raises(ValueError, match="unknown preset 'sharp' for method 'admm'"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), preset="sharp+tune")
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown preset 'accurate\\+tune'"):  # one layer has no block
        ak.prune_layer(w, w.T @ w, sparsity=0.5, preset="accurate+tune")


def test_tuned_preset_prunes_like_its_preset_and_tunes_every_block():
    """Block 0's masks are the preset's (tuning never moves a mask; later blocks see tuned inputs), and
    every block is tuned with the preset's settings."""
    from admm_kernels.models.block_tune import TUNED_PRESET

    ids = tiny_tokens(4, 16)
    tuned_model, plain_model = tiny_model("llama"), tiny_model("llama")
    report = ak.prune_model(tuned_model, ids, sparsity=0.6, preset="fast+tune")
    ak.prune_model(plain_model, ids, sparsity=0.6, preset="fast")
    bt = report["block_tune"]
    assert (bt["epochs"], bt["batch"], bt["lr"]) == (TUNED_PRESET["tune_epochs"], TUNED_PRESET["tune_batch"],
                                                     TUNED_PRESET["tune_lr"])
    assert len(bt["blocks"]) == report["blocks"]
    tuned, plain = _weights(tuned_model), _weights(plain_model)
    for name in (n for n in tuned if n.startswith("0.")):
        assert torch.equal(tuned[name] == 0, plain[name] == 0), name
        assert not torch.equal(tuned[name], plain[name]), name


def test_accurate_tuned_preset_solves_with_its_damping():
    """accurate+tune's block 0 is solved with damping 0.1 (TUNED_SOLVER_OPTIONS): its masks are those of
    preset "accurate" at percdamp 0.1, and the report records the damping the solves used."""
    from admm_kernels.models.block_tune import TUNED_SOLVER_OPTIONS

    damping = TUNED_SOLVER_OPTIONS["admm"]["accurate"]["percdamp"]
    ids = tiny_tokens(4, 16)
    tuned_model, plain_model = tiny_model("llama"), tiny_model("llama")
    report = ak.prune_model(tuned_model, ids, sparsity=0.6, preset="accurate+tune")
    ak.prune_model(plain_model, ids, sparsity=0.6, preset="accurate", percdamp=damping)
    tuned, plain = _weights(tuned_model), _weights(plain_model)
    for name in (n for n in tuned if n.startswith("0.")):
        assert torch.equal(tuned[name] == 0, plain[name] == 0), name
    assert report["options"]["percdamp"] == damping


def test_cli_tuned_preset(tiny_model_root, tmp_path):
    import json

    from admm_kernels import cli
    from admm_kernels.models.block_tune import TUNED_PRESET

    out = tmp_path / "t"
    args = ["prune", str(tiny_model_root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--calib",
            str(tiny_model_root / "calib.txt"), "--no-eval", "--quiet", "--preset", "fast+tune", "--out",
            str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["block_tune"]["epochs"] == TUNED_PRESET["tune_epochs"]
    assert cli.main([*args, "--overwrite", "--tune-epochs", "0"]) == 0  # the flag overrides the preset
    assert "block_tune" not in json.loads((out / "prune_report.json").read_text())
