"""The bench harness's Pareto front (error vs time per pattern), its plot, and method specs read from the
registry (alps, presets)."""

import pytest
import torch
from conftest import correlated_inputs

import admm_kernels as ak
from admm_kernels.bench import report
from admm_kernels.bench.layers import check_methods, run_row
from admm_kernels.bench.methods import aliases, parse_method, parse_methods
from admm_kernels.methods import registry


def test_pareto_front_points():
    pts = [(1.0, 0.5), (2.0, 0.3), (3.0, 0.3), (0.5, 0.9), (4.0, 0.1), (2.0, 0.6), (5.0, 0.1), (1.0, 0.5)]
    # (3, .3) is beaten by (2, .3); (2, .6) by (1, .5); (5, .1) by (4, .1); equal points both stay.
    assert report.pareto_front(pts) == [3, 0, 7, 1, 4]
    assert report.pareto_front([]) == []
    assert report.pareto_front([(1.0, None), (2.0, float("nan")), (3.0, 1.0)]) == [2]


def test_summary_marks_the_front_per_pattern_and_sparsity():
    rows = []
    for pattern, s in (("unstructured", 0.5), ("2:4", 0.5), ("unstructured", 0.7)):
        for method, sec, err in (("fast", 1.0, 0.3), ("slow-good", 5.0, 0.1), ("slow-bad", 6.0, 0.4)):
            rows.append({"method": method, "pattern": pattern, "target_sparsity": s, "error": err,
                         "seconds": sec, "achieved_sparsity": s})
    rows.append({"method": "fast", "pattern": "2:4", "target_sparsity": 0.5, "error": 0.3, "seconds": 9.0,
                 "achieved_sparsity": 0.5})  # a second layer: fast's 2:4 mean time becomes 5 s
    summary = report.summarize(rows)
    on = {(r["pattern"], r["sparsity"], r["method"]) for r in summary if r["pareto"]}
    assert on == {("unstructured", 0.5, "fast"), ("unstructured", 0.5, "slow-good"),
                  ("unstructured", 0.7, "fast"), ("unstructured", 0.7, "slow-good"),
                  ("2:4", 0.5, "slow-good")}
    assert "pareto" in report.SUMMARY_COLUMNS


def test_summary_ratios_to_admm_grad_are_per_layer_medians():
    rows = []
    for layer, (base_err, base_sec) in enumerate(((0.1, 1.0), (0.2, 2.0), (0.4, 1.0))):
        for method, f_err, f_sec in (("admm", 1.0, 1.0), ("admm-accurate", 0.8, 2.5), ("alps", 0.9, 4.0)):
            rows.append({"layer": f"l{layer}", "method": method, "pattern": "2:4", "target_sparsity": 0.5,
                         "error": base_err * f_err * (1.1 if layer == 2 and method == "alps" else 1.0),
                         "seconds": base_sec * f_sec, "achieved_sparsity": 0.5})
    rows.append({"layer": "l0", "method": "wanda", "pattern": "unstructured", "target_sparsity": 0.5,
                 "error": 0.3, "seconds": 0.1, "achieved_sparsity": 0.5})  # no ADMM-Grad in its panel
    by = {(r["method"], r["pattern"]): r for r in report.summarize(rows)}
    assert by["admm", "2:4"]["error_vs_admm"] == 1.0 and by["admm", "2:4"]["time_vs_admm"] == 1.0
    assert by["admm-accurate", "2:4"]["error_vs_admm"] == pytest.approx(0.8)
    assert by["admm-accurate", "2:4"]["time_vs_admm"] == pytest.approx(2.5)
    assert by["alps", "2:4"]["error_vs_admm"] == pytest.approx(0.9)  # the median ignores layer 2's 0.99
    assert by["wanda", "unstructured"]["error_vs_admm"] is None
    assert {"error_vs_admm", "time_vs_admm"} <= set(report.SUMMARY_COLUMNS)


def test_pareto_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    points = (("a", 0.1, 0.3), ("b", 1.0, 0.1), ("c", 2.0, 0.2))
    summary = [{"method": m, "pattern": p, "sparsity": 0.5, "mean_seconds": t, "mean_error": e}
               for p in ("unstructured", "2:4") for m, t, e in points]
    path = tmp_path / "pareto.png"
    assert report.plot_pareto(report.pareto_panels(summary), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    assert not report.plot_pareto({}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_bench_knows_every_registered_method_and_preset(monkeypatch):
    assert aliases()["alps"] == ("alps", {})
    base = registry.get("admm")
    monkeypatch.setitem(registry._REGISTRY, "admm", registry.Method(
        name="admm", run=base.run, options=base.options, summary=base.summary, grouping=base.grouping,
        presets={"short": {"iters": 3}}))
    assert aliases()["admm-short"] == ("admm", {"preset": "short"})
    specs = parse_methods(["alps", "admm:preset=short", "admm-short", "admm:preset=short,rho=0.5"])
    check_methods(specs)
    x = correlated_inputs(256, 32, outliers=2)
    W, G = torch.randn(16, 32), ak.gram(x)
    rows = [run_row(W, G, spec, "unstructured", 0.5) for spec in specs]
    assert [r["iterations"] for r in rows[1:]] == [3, 3, 3]
    assert rows[0]["error"] < ak.prune_layer(W, G, 0.5, method="wanda").error
    with pytest.raises(ValueError, match=r"--methods 'admm:preset=nope': unknown preset 'nope'"):
        check_methods([parse_method("admm:preset=nope")])
