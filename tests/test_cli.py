"""The admm-prune command on a tiny random model saved to a temporary folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import MAX_POS, save_tiny_folder  # noqa: E402

from admm_kernels import cli  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_tiny_folder(tmp_path_factory.mktemp("cli"), 400, 1, 200, 2)


def _args(root, out, *extra, fast=True):
    return ["prune", str(root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32",
            "--calib", str(root / "calib.txt"), "--eval", str(root / "eval.txt"), "--out", str(out),
            *(["-o", "iters=4", "-o", "T=3"] if fast else []), *extra]


def test_prune_saves_a_loadable_sparse_model_with_report(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert cli.main(_args(tiny_dir, out, "--sparsity", "0.6")) == 0
    printed = capsys.readouterr()
    assert "model.layers.2.mlp.down_proj" in printed.out  # the per-layer table
    assert "perplexity" in printed.out and "blocks" in printed.err  # summary and progress bars
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.gate_proj.weight
    assert int((w == 0).sum()) >= int(w.numel() * 0.6)
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len(report["layers"]) == 21 and all(r["error"] >= 0 for r in report["layers"])
    assert report["perplexity"]["before"] > 1 and report["perplexity"]["after"] > 1
    assert report["seed"] == 0 and report["calibration"]["nsamples"] == 4
    assert {"torch", "transformers", "admm_kernels"} <= set(report["versions"])
    assert not (tmp_path / "pruned.state").exists()  # state removed after success
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkdtemp's 0600


def test_interrupted_run_resumes_to_the_identical_model(tiny_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    assert cli.main(_args(tiny_dir, ref, "--quiet", "--no-eval")) == 0

    real_save = state_mod.PipelineState.save
    calls = []

    def crash_after_first_block(self, *a, **kw):
        result = real_save(self, *a, **kw)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(state_mod.PipelineState, "save", crash_after_first_block)
    out = tmp_path / "run"
    assert cli.main(_args(tiny_dir, out, "--quiet", "--no-eval")) == 130
    assert (tmp_path / "run.state" / "state.json").is_file() and not out.exists()
    monkeypatch.setattr(state_mod.PipelineState, "save", real_save)
    with pytest.raises(AssertionError):  # forgetting --resume must not silently discard the state
        assert cli.main(_args(tiny_dir, out, "--quiet", "--no-eval")) == 0
    assert "holds the state of an interrupted run: pass --resume" in capsys.readouterr().err
    assert cli.main(_args(tiny_dir, out, "--quiet", "--no-eval", "--resume")) == 0
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / cli.REPORT_NAME).read_text())["resumed_from_block"] == 1


def test_packed_save_format(tiny_dir, tmp_path, capsys):
    out = tmp_path / "packed"
    argv = _args(tiny_dir, out, "--quiet", "--no-eval", "--method", "magnitude", "--save-format", "packed",
                 fast=False)
    try:
        from admm_kernels.sparse import load_sparse, save_sparse  # noqa: F401
    except ImportError:
        assert cli.main(argv) == 2
        assert "--save-format packed needs admm_kernels.sparse.save_sparse" in capsys.readouterr().err
        return
    assert cli.main(argv) == 0
    assert (out / cli.REPORT_NAME).is_file()
    model = load_sparse(out / cli.PACKED_NAME)
    with torch.no_grad():
        logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()


def test_eval_command(tiny_dir, capsys):
    assert cli.main(["eval", str(tiny_dir / "tiny-llama"), "--text", str(tiny_dir / "eval.txt"),
                     "--seqlen", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seqlen"] == 32 and result["windows"] >= 10 and 1 < result["perplexity"] < 1e4


def test_overwrite_replaces_an_existing_output(tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert cli.main(_args(tiny_dir, out, "--quiet", "--no-eval", "--method", "magnitude", "--overwrite",
                          fast=False)) == 0
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_fail_early_with_clear_messages(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir / "tiny-llama")
    out = str(tmp_path / "o")
    base = ["--calib", str(tiny_dir / "calib.txt"), "--eval", str(tiny_dir / "eval.txt"), "--out", out]

    err = _error(capsys, ["prune", "/nonexistent/model", *base])
    assert "MODEL path '/nonexistent/model' does not exist" in err
    (tmp_path / "notamodel").mkdir()
    assert "is not a transformers model folder: no config.json" in _error(
        capsys, ["prune", str(tmp_path / "notamodel"), *base])
    err = _error(capsys, ["prune", model, "--nsamples", "1000", "--seqlen", "32", *base])
    assert "is too short: found" in err and "need nsamples x seqlen = 1000 x 32 = 32000 tokens" in err
    err = _error(capsys, ["prune", model, "--seqlen", str(MAX_POS + 1), *base])
    assert f"--seqlen {MAX_POS + 1} exceeds the model's maximum sequence length of {MAX_POS}" in err
    err = _error(capsys, ["prune", model, "--pattern", "3:5", "--nsamples", "2", "--seqlen", "16", *base])
    assert "pattern '3:5' is invalid for layer model.layers.0.self_attn.q_proj" in err
    assert "unknown option(s) 'iters' for method 'magnitude'" in _error(
        capsys, ["prune", model, "--method", "magnitude", "-o", "iters=3", *base])
    assert "unknown --pattern '2-4'" in _error(capsys, ["prune", model, "--pattern", "2-4", *base])
    assert "--calib path '/no/text.txt' does not exist" in _error(
        capsys, ["prune", model, *base[:0], "--calib", "/no/text.txt", "--out", out])
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", model, "--sparsity", "1.5", *base])
    assert exc.value.code == 2 and "--sparsity must be in [0, 1), got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", model, "--nsamples", "0", *base])
    assert "--nsamples must be a positive integer" in capsys.readouterr().err

    os.makedirs(out)
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert f"--out '{out}' is not empty; pass --overwrite" in _error(capsys, ["prune", model, *base])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _error(capsys, ["prune", model, *base[:-1], str(blocker / "sub")])
    assert "--out" in err and "not a folder" in err
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert "is not writable" in _error(capsys, ["prune", model, *base[:-1], str(ro / "x")])
    assert "--device 'cuda:0': CUDA is not available" in _error(capsys, ["prune", model, *base[:-2],
                                                                          "--device", "cuda:0"]) \
        or torch.cuda.is_available()


def test_help_of_prune_and_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--sparsity", "--pattern", "--method", "--nsamples", "--seqlen", "--calib", "--eval",
                 "--device", "--out", "--resume", "--overwrite", "--save-format"):
        assert flag in text
    assert "measurement" in text
    # `bench` is handed to admm_kernels.bench (issue 6) with its own options.
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--methods", "--sparsities", "--patterns", "--perplexity", "--resume"):
        assert flag in text
