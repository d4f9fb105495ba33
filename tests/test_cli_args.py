"""Command-line arguments mean what they say: no abbreviations, a MODEL is never taken as a list value,
one flag name for the evaluation text (old spellings warn), and `eval OUT` evaluates what prune did or
says why not."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")

from admm_kernels import cli  # noqa: E402
from admm_kernels.bench import cli as bench_cli  # noqa: E402
from admm_kernels.models import loading  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def root(tiny_model_root):
    return tiny_model_root


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: the checks under test must come first."""
    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", never)


def _prune(root, out, *extra):
    return ["prune", str(root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--calib",
            str(root / "calib.txt"), "--out", str(out), "--method", "magnitude", "--quiet", *extra]


# --- no abbreviations --------------------------------------------------------------------------------

@pytest.mark.parametrize("command, flag", [("prune", "--text"), ("eval", "--eval-win"), ("prune", "--spars"),
                                           ("eval", "--text-f")])
def test_abbreviated_flags_are_refused(root, capsys, no_load, command, flag):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, str(root / "tiny-llama"), flag, "x"])
    assert exc.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_bench_and_doctor_refuse_abbreviations(capsys):
    from admm_kernels import doctor

    with pytest.raises(SystemExit):
        bench_cli.build_parser().parse_args(["--perplex"])
    assert "unrecognized arguments: --perplex" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        doctor.main(["--jso"])
    assert "unrecognized arguments: --jso" in capsys.readouterr().err


# --- a MODEL after a list option ---------------------------------------------------------------------

def test_layers_takes_one_value_and_repeats(root, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["prune", "--layers", "mlp.*", str(root / "tiny-llama")])
    assert args.model == str(root / "tiny-llama") and args.layers == ["mlp.*"]
    args = parser.parse_args(["prune", "--layers", "mlp.*,self_attn.q_proj", "--layers", "a b"])
    assert cli.split_globs(args.layers) == ["mlp.*", "self_attn.q_proj", "a", "b"]
    out = tmp_path / "o"
    argv = [*_prune(root, out, "--no-eval"), "--layers", "mlp.*", "--layers", "self_attn.o_proj"]
    assert cli.main(argv) == 0
    names = {r["name"].split(".", 3)[3] for r in json.loads((out / cli.REPORT_NAME).read_text())["layers"]}
    assert names == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"}


def test_second_layer_pattern_written_the_old_way_is_explained(capsys, no_load):
    assert cli.main(["prune", "--layers", "mlp.*", "self_attn.*"]) == 2
    err = capsys.readouterr().err
    assert "--layers takes one value, so give --layers 'mlp.*,self_attn.*' or repeat --layers" in err


def test_bench_list_option_swallowing_model_is_an_error(root, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert bench_cli.main(["--layers", "mlp.*", str(root / "tiny-llama")]) == 2
    err = capsys.readouterr().err
    assert f"--layers took the model folder '{root / 'tiny-llama'}'" in err and "give MODEL before" in err
    args = bench_cli.build_parser().parse_args(["--layers", "mlp.*", "--", str(root / "tiny-llama")])
    assert args.model == str(root / "tiny-llama") and args.layers == ["mlp.*"]


# --- one name for the evaluation text ----------------------------------------------------------------

@pytest.mark.parametrize("command, old", [("prune", "--eval"), ("eval", "--text")])
def test_eval_text_is_one_flag_and_old_spellings_warn(capsys, command, old):
    parser = cli.build_parser()
    assert parser.parse_args([command, "--eval-text", "t.txt"]).eval_path == "t.txt"
    assert capsys.readouterr().err == ""
    assert parser.parse_args([command, old, "t.txt"]).eval_path == "t.txt"
    err = capsys.readouterr().err
    assert err == f"admm-prune: warning: {old} is deprecated, use --eval-text\n"


def test_bench_eval_text(capsys):
    parser = bench_cli.build_parser()
    assert parser.parse_args(["--eval-text", "t.txt"]).eval_path == "t.txt"
    assert parser.parse_args(["--eval", "t.txt"]).eval_path == "t.txt"
    assert "--eval is deprecated, use --eval-text" in capsys.readouterr().err


def test_prune_with_the_eval_text_evaluates_that_text(root, tmp_path, capsys):
    """`prune MODEL --text FILE` used to be read as --text-field FILE and evaluate the default text."""
    out = tmp_path / "o"
    text = tmp_path / "other.txt"
    shutil.copy(root / "eval.txt", text)
    assert cli.main(_prune(root, out, "--eval-text", str(text))) == 0
    assert json.loads((out / cli.REPORT_NAME).read_text())["perplexity"]["text"].endswith("other.txt")


def test_utf16_calibration_text_is_an_error_not_garbage(root, tmp_path, capsys):
    calib = tmp_path / "calib16.txt"
    calib.write_bytes((root / "calib.txt").read_text().encode("utf-16"))
    argv = _prune(root, tmp_path / "o", "--no-eval")
    argv[argv.index("--calib") + 1] = str(calib)
    assert cli.main(argv) == 2
    assert "calib16.txt' starts with a UTF-16 LE byte-order mark" in capsys.readouterr().err
