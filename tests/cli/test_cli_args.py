"""Command-line arguments mean what they say: no abbreviations, a MODEL is never taken as a list value,
one flag name for the evaluation text (old spellings warn), and `eval OUT` evaluates what prune did or
says why not."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from admm_kernels import cli  # noqa: E402
from admm_kernels.cli import bench as bench_cli  # noqa: E402
from admm_kernels.cli.prune import split_globs  # noqa: E402
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

@pytest.mark.parametrize("command, flag", [("prune", "--text"), ("eval", "--eval"), ("eval", "--eval-win"),
                                           ("prune", "--spars"),
                                           ("eval", "--text-f")])
def test_abbreviated_flags_are_refused(root, capsys, no_load, command, flag):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, str(root / "tiny-llama"), flag, "x"])
    assert exc.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_bench_and_doctor_refuse_abbreviations(capsys):
    from admm_kernels.cli import doctor

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
    assert split_globs(args.layers) == ["mlp.*", "self_attn.q_proj", "a", "b"]
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
    assert json.loads((out / cli.REPORT_NAME).read_text())["perplexity"]["text"] == os.path.abspath(text)


# --- eval reproduces prune or says why not -----------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(tiny_model_root, tmp_path_factory):
    """A pruned folder whose prune run was given relative --calib / --eval-text paths."""
    work = tmp_path_factory.mktemp("relative")
    shutil.copy(tiny_model_root / "eval.txt", work / "held_out.txt")
    shutil.copy(tiny_model_root / "calib.txt", work / "calib.txt")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        torch.set_num_threads(1)
        assert cli.main(["prune", str(tiny_model_root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32",
                         "--calib", "calib.txt", "--eval-text", "held_out.txt", "--eval-windows", "4",
                         "--out", "out", "--method", "magnitude", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return work


def _copy(pruned, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(pruned / "out", dst)
    return dst


def _eval_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert cli.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_report_records_absolute_paths_and_digests(pruned):
    report = json.loads((pruned / "out" / cli.REPORT_NAME).read_text())
    text = pruned / "held_out.txt"
    assert report["perplexity"]["text"] == str(text)
    assert report["perplexity"]["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert report["calibration"]["source"] == str(pruned / "calib.txt")
    calib = (pruned / "calib.txt").read_bytes()
    assert report["calibration"]["source_sha256"] == hashlib.sha256(calib).hexdigest()


def test_eval_from_another_folder_uses_the_recorded_text(pruned, tmp_path, monkeypatch, capsys):
    """A relative --eval path made `eval OUT` run elsewhere evaluate Shakespeare instead, exit 0."""
    after = json.loads((pruned / "out" / cli.REPORT_NAME).read_text())["perplexity"]["after"]
    monkeypatch.chdir(tmp_path)
    result = _eval_json(capsys, ["eval", str(pruned / "out"), "--quiet"])
    assert result["text"] == str(pruned / "held_out.txt") and result["windows"] == 4
    assert result["perplexity"] == pytest.approx(after, rel=1e-6)


def test_eval_refuses_a_missing_or_changed_recorded_text(pruned, tmp_path, capsys):
    out = _copy(pruned, tmp_path)
    report = json.loads((out / cli.REPORT_NAME).read_text())
    changed = tmp_path / "changed.txt"
    changed.write_text((pruned / "held_out.txt").read_text() + " one more line\n")
    report["perplexity"]["text"] = str(changed)
    (out / cli.REPORT_NAME).write_text(json.dumps(report))
    assert cli.main(["eval", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the evaluation text '{changed}' recorded in" in err and "has changed since the prune run" in err
    assert f"give --eval-text {changed} to evaluate on it as it is now" in err
    changed.unlink()
    assert cli.main(["eval", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the evaluation text '{changed}' recorded in" in err and "is not found here" in err
    assert "give --eval-text PATH to evaluate on another text on purpose" in err
    text = str(pruned / "held_out.txt")
    assert _eval_json(capsys, ["eval", str(out), "--quiet", "--eval-text", text])["text"] == text
    default = _eval_json(capsys, ["eval", str(out), "--quiet", "--eval-text", cli.EVAL_TEXT_DEFAULT])
    assert default["text"] == cli.EVAL_TEXT_DEFAULT


def test_damaged_report_is_an_error_unless_every_setting_is_given(pruned, tmp_path, capsys):
    """A truncated prune_report.json was ignored without a word."""
    out = _copy(pruned, tmp_path)
    report = out / cli.REPORT_NAME
    report.write_bytes(report.read_bytes()[:200])
    assert cli.main(["eval", str(out), "--quiet", "--seqlen", "32"]) == 2
    err = capsys.readouterr().err
    assert f"'{report}' is damaged" in err and "give --seqlen, --eval-windows, --eval-text" in err
    result = _eval_json(capsys, ["eval", str(out), "--quiet", "--seqlen", "32", "--eval-windows", "4",
                                 "--protocol", "default", "--eval-text", str(pruned / "held_out.txt")])
    assert (result["seqlen"], result["windows"]) == (32, 4)


@pytest.mark.parametrize("field, value, flag", [
    ("seqlen", "32", "--seqlen"), ("windows", 0, "--eval-windows"), ("protocol", "papers", "--protocol"),
    ("text", 7, "--eval-text")])
def test_bad_report_field_is_named(pruned, tmp_path, capsys, field, value, flag):
    """A bad field gave an error about a flag the user never passed (--seqlen must be an int ...)."""
    out = _copy(pruned, tmp_path)
    report = json.loads((out / cli.REPORT_NAME).read_text())
    report["perplexity"][field] = value
    (out / cli.REPORT_NAME).write_text(json.dumps(report))
    assert cli.main(["eval", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"field perplexity.{field} is {value!r}, not" in err and f"or give {flag} to choose" in err


def test_unwritable_report_is_refused_before_loading(pruned, tmp_path, capsys, no_load):
    missing = tmp_path / "no" / "r.json"
    assert cli.main(["eval", str(pruned / "out"), "--report", str(missing)]) == 2
    assert f"its folder '{missing.parent}' does not exist" in capsys.readouterr().err
    assert cli.main(["eval", str(pruned / "out"), "--report", str(tmp_path)]) == 2
    assert "is a folder; name a file" in capsys.readouterr().err
    assert cli.main(["eval", str(pruned / "out"), "--report", "/proc/r.json"]) == 2
    assert "--report '/proc/r.json' is not writable" in capsys.readouterr().err


def test_result_is_printed_before_the_report_is_written(pruned, tmp_path, capsys, monkeypatch):
    from admm_kernels import _io

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io, "atomic_write_bytes", full)
    assert cli.main(["eval", str(pruned / "out"), "--quiet", "--report", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("perplexity ") and "the result is printed above" in captured.err


def test_other_dtype_gives_the_same_perplexity_for_hf_and_packed(root, tmp_path, capsys):
    """A packed folder loaded in bfloat16 converted the rotary inv_freq too (transformers keeps it in
    float32), so its perplexity differed from the transformers folder's."""
    for fmt in ("hf", "packed"):
        assert cli.main(_prune(root, tmp_path / fmt, "--no-eval", "--save-format", fmt)) == 0
    for dtype in ("bfloat16", "float16"):
        ppl = [_eval_json(capsys, ["eval", str(tmp_path / fmt), "--eval-text", str(root / "eval.txt"),
                                   "--seqlen", "32", "--dtype", dtype, "--quiet"])["perplexity"]
               for fmt in ("hf", "packed")]
        assert ppl[0] == ppl[1], dtype
    model, _, _ = loading.load_model(tmp_path / "packed", dtype="bfloat16", packed=True)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.values.dtype == torch.bfloat16


def test_utf16_or_binary_text_is_an_error_before_loading(root, tmp_path, capsys, no_load, monkeypatch):
    calib = tmp_path / "calib16.txt"
    calib.write_bytes((root / "calib.txt").read_text().encode("utf-16"))
    argv = _prune(root, tmp_path / "o", "--no-eval")
    argv[argv.index("--calib") + 1] = str(calib)
    assert cli.main(argv) == 2
    assert "--calib: '" in (err := capsys.readouterr().err) and "calib16.txt' starts with a UTF-16 LE" in err
    binary = tmp_path / "texts"
    binary.mkdir()
    (binary / "a.txt").write_text("fine\n")
    (binary / "b.txt").write_bytes(bytes(range(1, 256)) * 8)
    assert cli.main(["eval", str(root / "tiny-llama"), "--eval-text", str(binary)]) == 2
    assert "--eval-text: '" in (err := capsys.readouterr().err) and "b.txt' does not look like text" in err
    monkeypatch.setattr("admm_kernels.models.loading.load_model", lambda *a, **k: pytest.fail("loaded"))
    assert bench_cli.main([str(root / "tiny-llama"), "--perplexity", "--eval-text", str(calib)]) == 2
    assert "--eval-text: '" in (err := capsys.readouterr().err) and "calib16.txt' starts with a UTF-16" in err


# --- say what changed --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_model(tiny_model_root, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_root / "tiny-llama", dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_root / "tiny-llama").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra", [[], ["--stream"], ["--save-format", "packed"]])
def test_output_in_another_dtype_than_the_checkpoint_says_so(root, bf16_model, tmp_path, capsys, extra):
    """A bf16 checkpoint pruned with the default dtype was saved as float32, twice its size, silently."""
    argv = _prune(root, tmp_path / "o", "--no-eval", *extra)
    argv[1] = str(bf16_model)
    assert cli.main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert len(notes) == 1
    assert notes[0].startswith("admm-prune: note: the output's weights are float32 while MODEL's checkpoint "
                               "stores bfloat16: ")
    assert notes[0].endswith("give --dtype bfloat16 to keep bfloat16")
    assert "KiB of weight files instead of" in notes[0]


def test_output_in_the_checkpoints_dtype_says_nothing(root, bf16_model, tmp_path, capsys):
    argv = _prune(root, tmp_path / "o", "--no-eval", "--dtype", "bfloat16")
    argv[1] = str(bf16_model)
    assert cli.main(argv) == 0
    assert "note" not in capsys.readouterr().err
    assert cli.main(_prune(root, tmp_path / "fp32", "--no-eval")) == 0  # float32 in, float32 out
    assert "note" not in capsys.readouterr().err


def test_bench_out_is_checked_before_loading(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("admm_kernels.models.loading.load_model", lambda *a, **k: pytest.fail("loaded"))
    assert bench_cli.main([str(root / "tiny-llama"), "--out", "/proc/bench-out"]) == 2
    assert "--out '/proc/bench-out' is not writable" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert bench_cli.main([str(root / "tiny-llama"), "--out", str(blocker / "sub")]) == 2
    assert f"'{blocker}' is not a folder" in capsys.readouterr().err


def test_default_texts_can_be_named(root, tmp_path, capsys, monkeypatch):
    """The names reports give the default texts are accepted back by prune, eval and bench."""
    def stop(*a, **k):
        raise ValueError("stopped at loading")

    monkeypatch.setattr(loading, "load_model", stop)
    named = ["--calib", cli.CALIB_TEXT_DEFAULT, "--eval-text", cli.EVAL_TEXT_DEFAULT]
    model = str(root / "tiny-llama")
    assert bench_cli.main([model, "--perplexity", *named, "--out", str(tmp_path / "b")]) == 2
    assert cli.main(["prune", str(root / "tiny-llama"), *named, "--out", str(tmp_path / "p")]) == 2
    assert cli.main(["eval", str(root / "tiny-llama"), named[2], named[3]]) == 2
    err = capsys.readouterr().err
    assert err.count("stopped at loading") == 3 and "does not exist" not in err
