"""The admm-prune command on a tiny random model saved to a temporary folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import MAX_POS, interrupt_after_first_save, save_tiny_folder  # noqa: E402

from admm_kernels import cli  # noqa: E402
from admm_kernels.cli.prune import option_argument  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_tiny_folder(tmp_path_factory.mktemp("cli"), 400, 1, 200, 2)


def _args(root, out, *extra, fast=True):
    return ["prune", str(root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32",
            "--calib", str(root / "calib.txt"), "--eval-text", str(root / "eval.txt"), "--out", str(out),
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

    real_save = interrupt_after_first_save(monkeypatch)
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


def test_packed_output_is_a_complete_folder_that_eval_and_load_sparse_read(tiny_dir, tmp_path, capsys):
    import admm_kernels as ak

    out = tmp_path / "packed"
    argv = _args(tiny_dir, out, "--quiet", "--method", "magnitude", "--save-format", "packed",
                 "--eval-windows", "4", fast=False)
    assert cli.main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {cli.PACKED_NAME, "config.json", "tokenizer.json", cli.REPORT_NAME} <= names
    assert "model.safetensors" not in names
    after = json.loads((out / cli.REPORT_NAME).read_text())["perplexity"]["after"]
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json", "--quiet"]) == 0  # seqlen, windows, text from the report
    result = json.loads(capsys.readouterr().out)
    assert (result["seqlen"], result["windows"]) == (32, 4)
    assert result["perplexity"] == pytest.approx(after, rel=1e-6)
    model = ak.load_sparse(out)  # the folder, not only the file inside it
    assert any(isinstance(m, ak.SparseLinear) for m in model.modules())
    with torch.no_grad():
        logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()
    # a packed folder cannot be pruned again: one clear line
    err = _error(capsys, ["prune", str(out), "--out", str(tmp_path / "again")])
    assert "is a packed sparse model folder" in err


def test_eval_command(tiny_dir, capsys):
    assert cli.main(["eval", str(tiny_dir / "tiny-llama"), "--eval-text", str(tiny_dir / "eval.txt"),
                     "--seqlen", "32", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["seqlen"] == 32 and result["windows"] >= 10 and 1 < result["perplexity"] < 1e4
    assert "perplexity" in captured.err and "window/s" in captured.err  # a progress bar over the windows
    assert "evaluating" in captured.err and "--eval-windows N evaluates fewer" in captured.err
    assert cli.main(["eval", str(tiny_dir / "tiny-llama"), "--eval-text", str(tiny_dir / "eval.txt"),
                     "--seqlen", "32", "--eval-windows", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 3
    assert cli.main(["eval", str(tiny_dir / "tiny-llama"), "--eval-text", str(tiny_dir / "eval.txt"),
                     "--seqlen", "32", "--max-windows", "2", "--json"]) == 0  # the deprecated name
    captured = capsys.readouterr()
    assert json.loads(captured.out)["windows"] == 2
    assert "--max-windows is deprecated, use --eval-windows" in captured.err


def test_eval_without_model_uses_the_embedded_model_with_prunes_defaults(tiny_dir, monkeypatch, capsys):
    from admm_kernels import defaults
    from admm_kernels.models import loading

    # The embedded model stands in for the real one here; its defaults (patched smaller: 256 > MAX_POS)
    # must be the ones eval uses, as prune does.
    monkeypatch.setattr(loading, "default_model_path", lambda: tiny_dir / "tiny-llama")
    monkeypatch.setattr(defaults, "EMBEDDED_SEQLEN", 16)
    monkeypatch.setattr(defaults, "EMBEDDED_EVAL_WINDOWS", 3)
    assert cli.main(["eval", "--eval-text", str(tiny_dir / "eval.txt"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["seqlen"], result["windows"]) == (16, 3)
    assert "settings from the embedded model's defaults" in captured.err


def test_eval_of_a_pruned_folder_reproduces_prunes_perplexity(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert cli.main(_args(tiny_dir, out, "--quiet", "--method", "magnitude", "--eval-windows", "5",
                          fast=False)) == 0
    after = json.loads((out / cli.REPORT_NAME).read_text())["perplexity"]["after"]
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["seqlen"], result["windows"], result["text"]) == (32, 5, str(tiny_dir / "eval.txt"))
    assert result["perplexity"] == pytest.approx(after, rel=1e-6)
    assert f"settings from {out / cli.REPORT_NAME}" in captured.err


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
    base = ["--calib", str(tiny_dir / "calib.txt"), "--eval-text", str(tiny_dir / "eval.txt"), "--out", out]

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
    for flag in ("--sparsity", "--pattern", "--method", "--nsamples", "--seqlen", "--calib", "--eval-text",
                 "--device", "--out", "--resume", "--overwrite", "--save-format"):
        assert flag in text
    assert "measurement" in text
    # `bench` is handed to admm_kernels.bench with its own options.
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--methods", "--sparsities", "--patterns", "--perplexity", "--resume"):
        assert flag in text


def test_quiet_shows_no_progress_bars(tiny_dir, tmp_path, capsys):
    """transformers' "Loading weights" and "Writing model shards" bars used to show under --quiet."""
    assert cli.main(_args(tiny_dir, tmp_path / "q", "--quiet")) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "it/s" not in err, err
    assert cli.main(["eval", str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    from transformers.utils import logging as hf_logging
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


def test_dtype_options_are_parsed_from_the_command_line(tiny_dir, tmp_path, capsys):
    from admm_kernels.bench.methods import parse_method

    for text in ("float64", "torch.float64", "double", " float64 "):
        assert option_argument(f"compute_dtype={text}") == ("compute_dtype", torch.float64)
    assert option_argument("x=torch.bfloat16") == ("x", torch.bfloat16)  # any option given a torch.NAME dtype
    assert option_argument("iters=3") == ("iters", 3)
    assert option_argument("one_shot=true") == ("one_shot", True)
    assert parse_method("admm:compute_dtype=float64").options == {"compute_dtype": torch.float64}
    with pytest.raises(SystemExit) as exc:
        cli.main(_args(tiny_dir, tmp_path / "x", "-o", "compute_dtype=float65"))
    assert exc.value.code == 2
    assert "option compute_dtype='float65': not a torch dtype" in capsys.readouterr().err
    out = tmp_path / "fp64"
    assert cli.main(_args(tiny_dir, out, "--quiet", "--no-eval", "-o", "compute_dtype=float64")) == 0
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert "--no-eval -o compute_dtype=float64" in report["command"]
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_sparsity_given_with_an_nm_pattern_warns(tiny_dir, tmp_path, capsys):
    base = ("--quiet", "--no-eval", "--method", "magnitude", "--pattern", "2:4")
    assert cli.main(_args(tiny_dir, tmp_path / "a", *base, "--sparsity", "0.7", fast=False)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["admm-prune: warning: --sparsity 0.7 is ignored with --pattern 2:4: an N:M pattern "
                        "prunes 1 - N/M = 0.5 of the weights"]
    assert cli.main(_args(tiny_dir, tmp_path / "b", *base, fast=False)) == 0  # the default: no warning
    assert "warning" not in capsys.readouterr().err


def test_prune_without_out_can_run_again(tiny_dir, tmp_path, monkeypatch, capsys):
    """`make demo` (admm-prune prune, no --out) failed the second time: the default folder existed."""
    monkeypatch.chdir(tmp_path)
    argv = _args(tiny_dir, "unused", "--no-eval", "--method", "magnitude", fast=False)
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    default = tmp_path / "out" / "tiny-llama-magnitude-unstructured50"
    assert cli.main(argv) == 0 and (default / cli.REPORT_NAME).is_file()
    first = default.stat().st_ino
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "replacing the previous output in out/tiny-llama-magnitude-unstructured50" in err
    assert default.stat().st_ino != first  # a new folder was renamed into place
    # an explicit --out is never replaced without --overwrite, nor a default folder that is not our output
    assert "is not empty; pass --overwrite" in _error(capsys, argv + ["--out", str(default)])
    (default / cli.REPORT_NAME).write_text("{}")
    assert "is not empty; pass --overwrite" in _error(capsys, argv)


def _help_entries(text: str) -> list[tuple[str, str]]:
    """(option or positional as listed, its help text) of every argument in an argparse --help output; the
    help starts on the same line (after two spaces) or on the next, more indented line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("positional arguments:", "options:")))
    entries = []
    for i, line in enumerate(lines[start:], start):
        if not line.startswith("  ") or line.startswith("   ") or not line.strip():
            continue
        entry, _, same_line = line.strip().partition("  ")
        following = lines[i + 1] if i + 1 < len(lines) else ""
        nested = following.strip() if following.startswith("    ") and not same_line else ""
        entries.append((entry, same_line.strip() or nested))
    return entries


def test_version_help_texts_and_python_m(capsys):
    import subprocess
    import sys

    import admm_kernels
    from admm_kernels import methods

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"admm-prune {admm_kernels.__version__} (torch ")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    run = subprocess.run([sys.executable, "-m", "admm_kernels", "--version"], capture_output=True, text=True,
                         cwd=root, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("admm-prune "), run.stderr

    texts = {}
    for argv in (["--help"], ["prune", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        texts[argv[0]] = " ".join(capsys.readouterr().out.split())
    assert all("issue 6" not in t for t in texts.values())
    assert "--version" in texts["--help"] and "compare pruning methods" in texts["--help"]
    for m in methods.methods().values():  # each method's "unstructured" grouping, from the registry
        assert f"{m.name}: {m.summary}; {m.grouping}" in texts["prune"]
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    for entry, help_text in _help_entries(capsys.readouterr().out):  # the deprecated alias is hidden
        assert help_text and "--max-windows" not in entry, entry
    for flag in ("--eval-windows", "--threads", "--quiet", "--device", "--dtype", "--eval-text", "--seqlen"):
        assert flag in texts["eval"]
    assert "--max-windows is a deprecated alias" in texts["eval"]


def test_bench_has_threads_and_the_shared_options(capsys):
    from admm_kernels.cli import bench as bench_cli

    args = bench_cli.build_parser().parse_args(["--threads", "1", "--eval-windows", "2", "--quiet"])
    assert (args.threads, args.eval_windows, args.quiet) == (1, 2, True)
