"""`admm-prune bench` end to end on a tiny random LLaMA saved as a model folder (no download).

One module-scoped run (4 methods x {unstructured 50 %, 2:4} x 21 layers + perplexity) is shared by the
tests that check its outputs; the others rerun it (resume, fresh cache, other seed) or regenerate
RESULTS.md from it. Torch runs single-threaded here: on the shared 2-core machine, 2 OpenMP threads
make a 64x32 matmul take ~25 ms instead of ~20 µs.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("transformers")
from tiny_models import save_tiny_folder  # noqa: E402

from admm_kernels.bench import report, results_md  # noqa: E402
from admm_kernels.bench.layers import exact_optimum, gap_to_optimum  # noqa: E402
from admm_kernels.bench.methods import parse_methods  # noqa: E402
from admm_kernels.cli.bench import main as bench_main  # noqa: E402

METHODS = ["magnitude", "wanda", "sparsegpt", "admm-grad"]
N_LAYERS = 21  # 3 blocks x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("bench"), 600, 0, 300, 1)


def _args(folder: Path, out: str, cache: str, *extra: str) -> list[str]:
    return [str(folder / "tiny-llama"), "--calib", str(folder / "calib.txt"), "--nsamples", "8",
            "--seqlen", "32", "--methods", *METHODS, "--sparsities", "0.5", "--patterns", "unstructured",
            "2:4", "--out", str(folder / out), "--cache-dir", str(folder / cache), "--quiet", *extra]


def _load(folder: Path, out: str) -> dict:
    return json.loads((folder / out / "results.json").read_text())


@pytest.fixture(scope="module")
def first(folder):
    rc = bench_main(_args(folder, "out1", "cache1", "--perplexity", "--eval-text", str(folder / "eval.txt"),
                          "--eval-windows", "2"))
    assert rc == 0
    return _load(folder, "out1")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_outputs_schema_and_finite_numbers(folder, first, capsys):
    out = folder / "out1"
    for f in ("results.json", "layers.csv", "summary.csv", "perplexity.csv", "errors.png", "times.png",
              "pareto.png", "rows.jsonl"):
        assert (out / f).is_file(), f
    for png in ("errors.png", "times.png", "pareto.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert first["schema"] == report.SCHEMA
    meta = first["meta"]
    for key in ("versions", "seed", "machine", "git", "date", "settings", "calibration", "command"):
        assert key in meta, key
    assert meta["seed"] == 0 and "torch" in meta["versions"] and "cpu" in meta["machine"]
    assert meta["calibration"]["nsamples"] == 8 and meta["calibration"]["seqlen"] == 32
    assert _finite(first["machine"]["matmul_gflops"]) and first["machine"]["matmul_gflops"] > 0
    assert _finite(first["machine"]["copy_gbps"]) and first["machine"]["copy_gbps"] > 0
    assert first["grams"]["cache"] == "computed" and first["grams"]["layers"] == N_LAYERS
    assert first["grams"]["groups"] == 12  # q/k/v and gate/up share their input: 4 groups per block

    rows = first["rows"]
    assert len(rows) == N_LAYERS * len(METHODS) * 2
    assert first["run"]["computed"] == len(rows)
    for r in rows:
        assert set(report.ROW_COLUMNS) <= set(r)
        assert _finite(r["error"]) and 0 <= r["error"] < 1, r
        assert _finite(r["seconds"]) and r["seconds"] >= 0
        out_f, in_f = (int(v) for v in r["shape"].split("x"))
        assert r["achieved_sparsity"] == pytest.approx(int(out_f * in_f * 0.5) / (out_f * in_f), abs=1e-12)
        if r["method"] == "admm-grad":
            assert _finite(r["gap"]) and r["gap"] >= 0 and _finite(r["optimum_error"])
            # Pythagoras on the mask: error = optimum + gap
            assert r["error"] == pytest.approx(r["optimum_error"] + r["gap"], rel=1e-4)
            assert _finite(r["gflops"]) and _finite(r["frac_matmul"]) and _finite(r["frac_copy"])
        else:
            assert r["gap"] is None
    with open(out / "layers.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert list(csv_rows[0]) == list(report.ROW_COLUMNS) and len(csv_rows) == len(rows)
    summary = first["summary"]
    assert len(summary) == len(METHODS) * 2 and all(s["layers"] == N_LAYERS for s in summary)
    ppl = first["perplexity"]
    assert [p["method"] for p in ppl] == ["dense"] + METHODS * 2
    assert all(_finite(p["perplexity"]) and p["perplexity"] > 1 for p in ppl)
    assert all(p["achieved_sparsity"] == pytest.approx(0.5) for p in ppl[1:])


def test_methods_ordered_as_expected(first):
    """On every layer, at 50 % and 2:4: ADMM-Grad <= SparseGPT <= Wanda. Not flaky: tiny_model scales the
    random weights by 4, which makes the layers' inputs correlated enough for the weight update to matter;
    the smallest measured per-layer margins are SparseGPT/ADMM 1.6x (2:4: 1.15x) and Wanda/SparseGPT
    1.07x (2:4: 2.3x), and the run is deterministic (fixed seeds, one thread)."""
    by = {}
    for r in first["rows"]:
        by.setdefault((r["layer"], r["pattern"]), {})[r["method"]] = r["error"]
    assert len(by) == N_LAYERS * 2
    for (layer, pattern), e in by.items():
        assert e["admm-grad"] <= e["sparsegpt"] <= e["wanda"], (layer, pattern, e)
    mean = {(s["method"], s["pattern"]): s["mean_error"] for s in first["summary"]}
    for pat in ("unstructured", "2:4"):
        assert mean[("admm-grad", pat)] <= mean[("sparsegpt", pat)] <= mean[("wanda", pat)]


def test_resume_reuses_rows_and_gram_cache(folder, first):
    rc = bench_main(_args(folder, "out1", "cache1", "--perplexity", "--eval-text", str(folder / "eval.txt"),
                          "--eval-windows", "2", "--resume"))
    assert rc == 0
    again = _load(folder, "out1")
    assert again["grams"]["cache"] == "hit" and again["grams"]["key"] == first["grams"]["key"]
    assert again["run"]["computed"] == 0 and again["run"]["perplexity_computed"] == 0
    assert [r["error"] for r in again["rows"]] == [r["error"] for r in first["rows"]]


def test_resume_refuses_rows_of_another_thread_count(folder, first, capsys):
    """--threads changes every timing and the BLAS sums: rows of a 1-thread run are not reused by 2."""
    try:
        rc = bench_main(_args(folder, "out1", "cache1", "--perplexity", "--eval-text",
                              str(folder / "eval.txt"),
                              "--eval-windows", "2", "--resume", "--threads", "2"))
    finally:
        torch.set_num_threads(1)
    assert rc == 2
    assert "threads: saved 1, now 2" in capsys.readouterr().err


def test_same_seed_identical_masks_other_seed_differs(folder, first):
    # A fresh Gram cache and output folder: everything recomputed from scratch.
    assert bench_main(_args(folder, "out2", "cache2")) == 0
    second = _load(folder, "out2")
    assert second["grams"]["cache"] == "computed" and second["grams"]["key"] == first["grams"]["key"]
    masks1 = {r["key"]: r["mask_sha256"] for r in first["rows"]}
    masks2 = {r["key"]: r["mask_sha256"] for r in second["rows"]}
    assert masks1 == masks2
    assert bench_main(_args(folder, "out3", "cache2", "--seed", "1", "--max-layers", "2")) == 0
    third = _load(folder, "out3")
    assert third["meta"]["calibration"]["tokens_sha256"] != first["meta"]["calibration"]["tokens_sha256"]
    m1 = {(r["layer"], r["method"], r["pattern"]): r["mask_sha256"] for r in first["rows"]
          if r["method"] != "magnitude"}  # magnitude is data-free: same mask for any seed
    m3 = {(r["layer"], r["method"], r["pattern"]): r["mask_sha256"] for r in third["rows"]
          if r["method"] != "magnitude"}
    assert len(m3) == 2 * 3 * 2 and all(m3[k] != m1[k] for k in m3)


def test_results_md_regenerated_keeping_hand_written_text(folder, first):
    md = folder / "docs" / "RESULTS.md"
    md.parent.mkdir()
    md.write_text("# Results\n\nHand-written intro.\n\n<!-- bench:begin tiny -->\nstale\n"
                  "<!-- bench:end tiny -->\n\n## Notes\n\nKeep me.\n")
    assert results_md.main(["--results", str(md), "--name", "tiny", str(folder / "out1")]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n\nHand-written intro.\n\n<!-- bench:begin tiny -->\n")
    assert text.endswith("<!-- bench:end tiny -->\n\n## Notes\n\nKeep me.\n")
    assert "stale" not in text and "| admm-grad | unstructured |" in text and "Perplexity" in text
    assert first["meta"]["git"]["commit"] is None or first["meta"]["git"]["commit"][:10] in text
    assert (md.parent / "figures" / "tiny-errors.png").is_file()
    assert "](figures/tiny-errors.png)" in text
    # idempotent, and a second folder is appended as its own section
    assert results_md.main(["--results", str(md), "--name", "tiny", str(folder / "out1")]) == 0
    assert md.read_text() == text
    assert results_md.main(["--results", str(md), str(folder / "out2")]) == 0
    new = md.read_text()
    assert new.startswith(text) and "<!-- bench:begin out2 -->" in new and new.count("bench:end") == 2


@pytest.mark.parametrize("extra, message", [
    (["--methods", "fancy"], "unknown method 'fancy'"),
    (["--methods", "admm:bogus=1"], "unknown option(s) 'bogus'"),
    (["--patterns", "3:7"], "M=7 does not divide in_features=32"),
    (["--sparsities", "1.5"], "--sparsities must be numbers in [0, 1), got '1.5'"),
])
def test_bad_input_is_one_line_exit_2(folder, capsys, extra, message):
    args = _args(folder, "bad", "cache1") + extra
    assert bench_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("admm-prune bench: error:")


def test_non_empty_out_needs_resume_or_overwrite(folder, first, capsys):
    from admm_kernels.cli import main as admm_prune  # through the admm-prune entry point

    assert admm_prune(["bench", *_args(folder, "out1", "cache1")]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_exact_optimum_matches_a_direct_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                             dtype=torch.float64)
    G = x.T @ x
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    M = torch.rand(5, 12, generator=g) > 0.4
    M[0] = False  # an empty row
    opt = exact_optimum(W, G, M)
    for i in range(5):
        S = torch.nonzero(M[i]).squeeze(1)
        want = torch.zeros(12, dtype=torch.float64)
        if S.numel():
            want[S] = torch.linalg.solve(G[S][:, S], (G @ W[i])[S])
        assert torch.allclose(opt[i], want, atol=1e-9)
    res = gap_to_optimum(W, W.masked_fill(~M, 0), G, M)
    assert res["gap"] >= 0 and res["optimum_error"] <= 1


def test_method_specs():
    specs = parse_methods(["admm-oneshot", "admm:iters=5,rho=0.5", "wanda"])
    assert [(s.method, s.options) for s in specs] == [
        ("admm", {"one_shot": True}), ("admm", {"iters": 5, "rho": 0.5}), ("wanda", {})]
    assert [s.label for s in parse_methods("magnitude,sparsegpt")] == ["magnitude", "sparsegpt"]
    with pytest.raises(ValueError, match="given twice"):
        parse_methods(["wanda", "wanda"])


def test_journal_drops_a_torn_line_and_rejects_other_settings(tmp_path):
    from admm_kernels.bench.journal import Journal

    j = Journal(tmp_path, {"grams": "abc", "seed": 0}, resume=False)
    j.add({"key": "k1", "error": 0.25})
    j.add({"key": "k2", "error": 0.5})
    with open(j.path, "a") as fh:
        fh.write('{"key": "k3", "err')  # an append cut short by a crash
    again = Journal(tmp_path, {"grams": "abc", "seed": 0}, resume=True)
    assert sorted(again.rows) == ["k1", "k2"] and again.get("k2")["error"] == 0.5
    again.add({"key": "k4", "error": 0.75})
    assert sorted(Journal(tmp_path, {"grams": "abc", "seed": 0}, resume=True).rows) == ["k1", "k2", "k4"]
    with pytest.raises(ValueError, match=r"other settings \(seed: saved 0, now 1\)"):
        Journal(tmp_path, {"grams": "abc", "seed": 1}, resume=True)
    assert Journal(tmp_path, {"grams": "abc", "seed": 1}, resume=False).rows == {}
