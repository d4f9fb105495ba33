"""Out-of-sample error: prune_layer's error on a held-out Gram, and bench's in-sample and held-out errors
side by side, with the Pareto front drawn on the held-out one."""

import json

import pytest
import torch

import admm_kernels as ak

pytest.importorskip("transformers")
from tiny_models import save_tiny_folder, tiny_text  # noqa: E402

from admm_kernels.bench.report import front_error, mark_pareto  # noqa: E402
from admm_kernels.bench.runner import check_disjoint  # noqa: E402
from admm_kernels.cli.bench import main as bench_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(seed=0, out_f=12, in_f=24):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(4 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)
    Y = torch.randn(4 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)
    return W, X.T @ X, Y.T @ Y


def test_prune_layer_reports_the_error_on_a_held_out_gram():
    W, G, H = _layer()
    res = ak.prune_layer(W, G, 0.5, heldout_gram=H)
    assert res.stats["heldout_error"] == ak.reconstruction_error(W, res.weight, H)
    assert res.stats["heldout_error"] != pytest.approx(res.error, rel=1e-3)  # another Gram, another number
    same = ak.prune_layer(W, G, 0.5, heldout_gram=G)
    assert same.stats["heldout_error"] == pytest.approx(same.error, rel=1e-5)  # in sample again
    assert "heldout_error" not in ak.prune_layer(W, G, 0.5).stats
    with pytest.raises(ValueError, match="heldout_gram"):
        ak.prune_layer(W, G, 0.5, heldout_gram=H[:5, :5])


def test_held_out_windows_must_not_be_calibration_windows():
    calib = torch.arange(40).reshape(4, 10)
    check_disjoint(calib, calib[:2] + 100)
    with pytest.raises(ValueError, match="1 of the 2 held-out windows are calibration windows"):
        check_disjoint(calib, torch.stack([calib[2], calib[0] + 1]))


def test_pareto_front_uses_the_held_out_error():
    panel = {"pattern": "unstructured", "sparsity": 0.5, "mean_seconds": 1.0}
    rows = [{"method": "a", **panel, "mean_error": 0.1, "mean_heldout_error": 0.30},
            {"method": "b", **panel, "mean_error": 0.2, "mean_heldout_error": 0.25}]
    mark_pareto(rows)  # a wins in sample, b out of sample: the front is b
    assert [r["pareto"] for r in rows] == [False, True]
    assert front_error({"mean_error": 0.1, "mean_heldout_error": None}) == 0.1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = save_tiny_folder(tmp_path_factory.mktemp("heldout"), 600, 0, 300, 1)
    (root / "other.txt").write_text(tiny_text(600, seed=7))
    return root


def _bench(folder, out, *extra):
    return bench_main([str(folder / "tiny-llama"), "--calib", str(folder / "calib.txt"), "--nsamples", "4",
                       "--seqlen", "32", "--methods", "wanda", "admm", "--sparsities", "0.5", "--out",
                       str(folder / out), "--cache-dir", str(folder / "cache"), "--quiet", *extra])


def test_bench_reports_in_sample_and_held_out_errors(folder):
    assert _bench(folder, "held", "--heldout-text", str(folder / "other.txt"), "--heldout-windows", "3") == 0
    res = json.loads((folder / "held" / "results.json").read_text())
    assert res["heldout"]["windows"] == 3 and res["meta"]["heldout_source"].endswith("other.txt")
    assert all(r["heldout_error"] > 0 and r["heldout_error"] != r["error"] for r in res["rows"])
    for s in res["summary"]:
        assert s["mean_heldout_error"] == pytest.approx(
            sum(r["heldout_error"] for r in res["rows"] if r["method"] == s["method"]) / 21)
    assert {s["method"]: s["heldout_vs_admm"] for s in res["summary"]}["admm"] == 1.0
    header = (folder / "held" / "layers.csv").read_text().splitlines()[0]
    assert "heldout_error" in header.split(",")


def test_bench_held_out_text_defaults_to_the_evaluation_text_and_can_be_off(folder, capsys):
    assert _bench(folder, "default", "--eval-text", str(folder / "eval.txt")) == 0
    res = json.loads((folder / "default" / "results.json").read_text())
    assert res["heldout"]["windows"] == 4 and res["meta"]["heldout_source"].endswith("eval.txt")
    assert _bench(folder, "off", "--heldout-windows", "0") == 0
    res = json.loads((folder / "off" / "results.json").read_text())
    assert res["heldout"] is None and all(r["heldout_error"] is None for r in res["rows"])
    assert _bench(folder, "same", "--heldout-text", str(folder / "calib.txt")) == 2
    assert "the held-out text is the calibration text" in capsys.readouterr().err
