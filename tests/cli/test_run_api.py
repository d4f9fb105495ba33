"""The Python run API (admm_kernels.run_prune / PruneRun): the same folder and report as `admm-prune
prune`, resume after an interruption, and refusals as exceptions naming the Python arguments."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import interrupt_after_first_save  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels import cli  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNE = {"sparsity": 0.5, "method": "admm", "iters": 4, "T": 3}


def _texts(root):
    return ak.TextSettings(calib=str(root / "calib.txt"), eval_text=str(root / "eval.txt"), nsamples=4,
                           seqlen=32)


def _cli_args(root, out, *extra):
    return ["prune", str(root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--calib",
            str(root / "calib.txt"), "--eval-text", str(root / "eval.txt"), "--out", str(out), "--quiet",
            "--sparsity", "0.5", "-o", "iters=4", "-o", "T=3", *extra]


def _comparable(report: dict) -> dict:
    """The report without what differs between two identical runs (times, the command that ran it)."""
    report = {k: v for k, v in report.items() if k not in ("command", "seconds_total", "timings")}
    report["layers"] = [{k: v for k, v in r.items() if k != "seconds"} for r in report["layers"]]
    return report


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_run_prune_writes_what_the_cli_writes(tiny_model_root, tmp_path, capsys):
    lines = []
    result = ak.run_prune(tiny_model_root / "tiny-llama", tmp_path / "api", texts=_texts(tiny_model_root),
                          log=lines.append, **PRUNE)
    assert cli.main(_cli_args(tiny_model_root, tmp_path / "cli")) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "api" / cli.REPORT_NAME).read_text())
    assert written == json.loads(json.dumps(result.report, default=str))
    assert result.out == tmp_path / "api" and result.published and result.dtype_note is None
    assert written["command"] == "admm_kernels.run_prune"
    by_cli = json.loads((tmp_path / "cli" / cli.REPORT_NAME).read_text())
    assert _comparable(written) == _comparable(by_cli)
    api_w, cli_w = _weights(tmp_path / "api"), _weights(tmp_path / "cli")
    assert api_w.keys() == cli_w.keys() and all(torch.equal(api_w[k], cli_w[k]) for k in api_w)
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(p.name for p in (tmp_path / "cli")
                                                                          .iterdir())
    assert any(line.startswith("perplexity before: ") for line in lines)  # progress lines go to `log`
    assert not (tmp_path / "api.state").exists()  # the state is gone once the folder is published
    # `admm-prune eval` takes a library run's folder as its own: the recorded settings reproduce "after"
    assert cli.main(["eval", str(tmp_path / "api"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(written["perplexity"]["after"])


def test_run_prune_resumes_an_interrupted_run(tiny_model_root, tmp_path, monkeypatch):
    texts = ak.TextSettings(calib=str(tiny_model_root / "calib.txt"), evaluate=False, nsamples=4, seqlen=32)
    whole = ak.run_prune(tiny_model_root / "tiny-llama", tmp_path / "whole", texts=texts, **PRUNE)
    real_save = interrupt_after_first_save(monkeypatch)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        ak.run_prune(tiny_model_root / "tiny-llama", out, texts=texts, **PRUNE)
    assert (tmp_path / "resumed.state" / "state.json").is_file() and not out.exists()
    monkeypatch.setattr(state_mod.PipelineState, "save", real_save)
    with pytest.raises(ak.RunError, match=r"holds the state of an interrupted run: pass resume=True to "
                                          r"continue it, or overwrite=True to start over"):
        ak.run_prune(tiny_model_root / "tiny-llama", out, texts=texts, **PRUNE)
    result = ak.run_prune(tiny_model_root / "tiny-llama", ak.OutputSettings(out, resume=True), texts=texts,
                          **PRUNE)
    assert result.report["resumed_from_block"] == 1
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(result.report) | {"resumed_from_block": 0} == \
        _comparable(whole.report) | {"resumed_from_block": 0}


def test_run_prune_refuses_with_the_python_argument_names(tiny_model_root, tmp_path, monkeypatch):
    from admm_kernels.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded before the checks"))
    model, texts = tiny_model_root / "tiny-llama", _texts(tiny_model_root)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(ak.RunError, match=r"^out '.*taken' is not empty; pass overwrite=True to replace it$"):
        ak.run_prune(model, out, texts=texts, **PRUNE)
    assert (out / "keep.txt").read_text() == "not ours"
    with pytest.raises(ValueError, match=r"and the input model .* choose another out$"):  # a ValueError
        ak.run_prune(model, model / "inside", texts=texts, **PRUNE)
    with pytest.raises(ak.RunError, match=r"^stream=True writes a transformers folder block by block; "
                                          r"save_format packed needs"):
        ak.run_prune(model, ak.OutputSettings(tmp_path / "p", save_format="packed"), texts=texts,
                     placement=ak.Placement(stream=True), **PRUNE)
    with pytest.raises(ak.RunError, match=r"^calib path '.*nope.txt' does not exist$"):
        ak.run_prune(model, tmp_path / "n", texts=ak.TextSettings(calib=str(tmp_path / "nope.txt")), **PRUNE)
    with pytest.raises(ak.RunError, match=r"sparsity_profile"):  # prune_model's own wording
        ak.run_prune(model, tmp_path / "n", texts=texts, sparsity_profile="nope")


def test_run_prune_takes_a_prune_config(tiny_model_root, tmp_path):
    """config=PruneConfig(...) is the same run as its fields given as keywords; keywords given beside a
    config replace its fields."""
    by_keywords = ak.run_prune(tiny_model_root / "tiny-llama", tmp_path / "kw", texts=_texts(tiny_model_root),
                               **PRUNE)
    config = ak.PruneConfig(**{**PRUNE, "sparsity": 0.7})
    by_config = ak.run_prune(tiny_model_root / "tiny-llama", tmp_path / "cfg", texts=_texts(tiny_model_root),
                             config=config, sparsity=PRUNE.get("sparsity", 0.5))
    assert _comparable(by_config.report) == _comparable(by_keywords.report)
    kw_w, cfg_w = _weights(tmp_path / "kw"), _weights(tmp_path / "cfg")
    assert kw_w.keys() == cfg_w.keys() and all(torch.equal(kw_w[k], cfg_w[k]) for k in kw_w)
