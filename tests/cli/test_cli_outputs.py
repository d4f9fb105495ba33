"""`admm-prune prune` never loses or silently mixes data: --out may not touch the input
model, is checked for writability before any work, is locked against a second run, stale temporary
folders of killed runs are tidied, and --resume refuses another model or thread count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from admm_kernels import cli  # noqa: E402
from admm_kernels.models import loading  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_dir(tiny_model_root):
    return tiny_model_root


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A private copy of the tiny model folder (tests below try to overwrite it)."""
    dst = tmp_path / "models" / "tiny-llama"
    shutil.copytree(tiny_dir / "tiny-llama", dst)
    return dst


def _args(root, model, out, *extra):
    return ["prune", str(model), "--nsamples", "4", "--seqlen", "32", "--calib", str(root / "calib.txt"),
            "--eval-text", str(root / "eval.txt"), "--out", str(out), "--method", "magnitude", "--quiet",
            *extra]


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


@pytest.fixture
def no_load(monkeypatch):
    """Make loading the model fail the test: the checks under test must come first."""
    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(loading, "load_model", never)


def _folder_digest(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- item 4: --out never replaces or nests with MODEL ------------------------------------------------

@pytest.mark.parametrize("where", ["same", "parent", "child", "symlink", "state"])
def test_out_overlapping_the_model_is_refused_even_with_overwrite(tiny_dir, model_copy, tmp_path, capsys,
                                                                  where, no_load):
    before = _folder_digest(model_copy)
    if where == "same":
        out = model_copy
    elif where == "parent":
        out = model_copy.parent
    elif where == "child":
        out = model_copy / "pruned"
    elif where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(model_copy)
    else:  # --out X writes its state into X.state: here that is the model folder itself
        renamed = model_copy.with_name("m.state")
        model_copy.rename(renamed)
        model_copy = renamed
        out = renamed.with_name("m")
    err = _error(capsys, _args(tiny_dir, model_copy, out, "--overwrite"))
    assert "the input MODEL" in err and str(model_copy) in err and str(out) in err, err
    assert _folder_digest(model_copy) == before


# --- writability before any work -----------------------------------------------------------------

def test_out_under_proc_is_refused_before_loading(tiny_dir, capsys, no_load):
    err = _error(capsys, _args(tiny_dir, tiny_dir / "tiny-llama", "/proc/admm-out/x"))
    assert "--out '/proc/admm-out/x' is not writable: nothing can be created in '/proc'" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only (chmod) folders anyway")
def test_out_in_a_read_only_folder_is_refused_before_loading(tiny_dir, tmp_path, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "is not writable" in _error(capsys, _args(tiny_dir, tiny_dir / "tiny-llama", ro / "x"))
    finally:
        ro.chmod(0o755)


def test_out_below_a_file_is_refused_before_loading(tiny_dir, tmp_path, capsys, no_load):
    (tmp_path / "file").write_text("x")
    err = _error(capsys, _args(tiny_dir, tiny_dir / "tiny-llama", tmp_path / "file" / "sub" / "out"))
    assert "is not a folder" in err


def test_device_meta_is_refused(tiny_dir, tmp_path, capsys, no_load):
    err = _error(capsys, _args(tiny_dir, tiny_dir / "tiny-llama", tmp_path / "o", "--device", "meta"))
    assert "--device 'meta' is the meta device" in err


# --- item 2: one run at a time per --out ------------------------------------------------------------

_HOLDER = r"""
import fcntl, os, sys, time
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_into_the_same_out_fails_at_once(tiny_dir, tmp_path, capsys, no_load):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "o.state" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _error(capsys, _args(tiny_dir, tiny_dir / "tiny-llama", out, "--overwrite"))
    finally:
        holder.kill()
        holder.wait()
    assert f"--out '{out}' cannot be used" in err and str(tmp_path / "o.state") in err
    assert f"in use by another run (pid {holder.pid}" in err


def test_lock_released_after_success_and_failure(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    # a failure after the lock was taken (evaluation text too short for one window)
    short = tmp_path / "short.txt"
    short.write_text("to be")
    argv = _args(tiny_dir, tiny_dir / "tiny-llama", out)
    argv[argv.index("--eval-text") + 1] = str(short)
    assert "evaluation text is too short" in _error(capsys, argv)
    assert not (tmp_path / "o.state").exists()  # nothing left behind, not even a lock file
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", out, "--no-eval")) == 0
    assert not (tmp_path / "o.state").exists() and (out / "config.json").is_file()


# --- stale temporary folders of a killed final save ---------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_of_dead_runs_are_cleaned(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    dead = _dead_pid()
    stale = tmp_path / f".o.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".o.tmp-{os.getppid()}-def456"  # our parent is alive: never touched
    live.mkdir()
    unrelated = tmp_path / f".other.tmp-{dead}-x"
    unrelated.mkdir()
    argv = _args(tiny_dir, tiny_dir / "tiny-llama", out, "--no-eval")
    argv.remove("--quiet")
    assert cli.main(argv) == 0
    assert f"removed {stale}" in capsys.readouterr().err
    assert not stale.exists() and live.is_dir() and unrelated.is_dir()


def test_parked_previous_output_of_a_dead_run_is_restored(tiny_dir, tmp_path):
    """Killed between parking the old output (.o.old-PID) and renaming the new one into place: the next
    run puts the old output back instead of deleting it (then --overwrite replaces it as usual)."""
    out = tmp_path / "o"
    parked = tmp_path / f".o.old-{_dead_pid()}"
    parked.mkdir()
    (parked / "precious.txt").write_text("previous output")
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", out, "--no-eval")) == 2  # restored: not empty
    assert (out / "precious.txt").read_text() == "previous output" and not parked.exists()


def test_temporary_save_folder_carries_the_pid(tiny_dir, tmp_path, monkeypatch):
    from admm_kernels import _io

    made = []
    real = _io.make_temp_sibling
    monkeypatch.setattr(_io, "make_temp_sibling", lambda target: made.append(real(target)) or made[-1])
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", tmp_path / "o", "--no-eval")) == 0
    assert len(made) == 1 and made[0].name.startswith(f".o.tmp-{os.getpid()}-") and not made[0].exists()


def test_output_is_on_the_disk_before_the_state_is_deleted(tiny_dir, tmp_path, monkeypatch):
    """The state folder is the run's only other copy: every output file, and the rename that publishes
    the folder, must be fsync'ed before the state is removed."""
    from admm_kernels import _io

    synced_files, synced_dirs, at_removal = [], [], {}
    real_file, real_dir = _io.fsync_file, _io.fsync_dir
    monkeypatch.setattr(_io, "fsync_file", lambda p: (synced_files.append(os.path.basename(p)), real_file(p)))
    monkeypatch.setattr(_io, "fsync_dir", lambda p: (synced_dirs.append(os.path.realpath(p)), real_dir(p)))
    real_remove = state_mod.PipelineState.remove

    def remove(self):
        at_removal.update(files=set(synced_files), dirs=set(synced_dirs))
        real_remove(self)

    monkeypatch.setattr(state_mod.PipelineState, "remove", remove)
    out = tmp_path / "o"
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", out, "--no-eval")) == 0
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", cli.REPORT_NAME} <= written
    assert written <= at_removal["files"], written - at_removal["files"]
    assert os.path.realpath(tmp_path) in at_removal["dirs"]


# --- item 1 and the thread count through the CLI ------------------------------------------------------

def _interrupt_after_first_block(monkeypatch):
    real_save = state_mod.PipelineState.save

    def crash(self, *a, **kw):
        real_save(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(state_mod.PipelineState, "save", crash)
    return real_save


def test_resume_refuses_another_model_and_thread_count(tiny_dir, model_copy, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    real_save = _interrupt_after_first_block(monkeypatch)
    assert cli.main(_args(tiny_dir, model_copy, out, "--threads", "1")) == 130
    monkeypatch.setattr(state_mod.PipelineState, "save", real_save)
    capsys.readouterr()

    err = _error(capsys, _args(tiny_dir, model_copy, out, "--threads", "2", "--resume"))
    assert "threads: saved 1, now 2" in err and "resume with 1 threads (admm-prune --threads" in err
    # the library words its advice in its own terms; the command line adds its flag
    assert err.rstrip().endswith("delete the folder to start again (admm-prune: pass --overwrite instead of "
                                 "--resume)"), err
    torch.set_num_threads(1)

    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"][0, 0] += 1.0  # a later block than the first pruned one
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    err = _error(capsys, _args(tiny_dir, model_copy, out, "--threads", "1", "--resume"))
    assert "dense_model" in err and "original dense model" in err


def test_a_damaged_state_says_how_to_start_over_with_the_flag(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = _interrupt_after_first_block(monkeypatch)
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", out)) == 130
    monkeypatch.setattr(state_mod.PipelineState, "save", real_save)
    capsys.readouterr()
    state_file = tmp_path / "run.state" / "state.json"
    state_file.write_text(state_file.read_text()[:40])
    err = _error(capsys, _args(tiny_dir, tiny_dir / "tiny-llama", out, "--resume"))
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.rstrip().endswith("(admm-prune: pass --overwrite instead of --resume)"), err
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", out, "--overwrite")) == 0


def test_corrupt_cached_perplexity_is_recomputed(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = _interrupt_after_first_block(monkeypatch)
    assert cli.main(_args(tiny_dir, tiny_dir / "tiny-llama", out)) == 130
    monkeypatch.setattr(state_mod.PipelineState, "save", real_save)
    cache = tmp_path / "run.state" / "run.json"
    cached = json.loads(cache.read_text())
    cache.write_text(cache.read_text()[:20])
    argv = _args(tiny_dir, tiny_dir / "tiny-llama", out, "--resume")
    argv.remove("--quiet")
    assert cli.main(argv) == 0
    assert "ignoring the cached perplexity" in capsys.readouterr().err
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["perplexity"]["before"] == cached["data"]["perplexity_before"]  # recomputed, same value
    assert report["threads"] == 1


# --- model files that do not match -------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_truncated_or_empty_weights_are_named(tiny_dir, model_copy, tmp_path, capsys, damage):
    f = model_copy / "model.safetensors"
    f.write_bytes(b"" if damage == "empty" else f.read_bytes()[: f.stat().st_size // 2])
    err = _error(capsys, _args(tiny_dir, model_copy, tmp_path / "o"))
    assert f"weight file '{f}'" in err and "truncated" in err and "Traceback" not in err


@pytest.mark.parametrize("change,match", [
    ({"num_hidden_layers": 5}, "weights the config needs are missing"),
    ({"num_hidden_layers": 2}, "have no place in the model the config describes"),
    ({"intermediate_size": 48}, "have other shapes than the config says"),
])
def test_config_that_does_not_match_the_weights_is_named(tiny_dir, model_copy, tmp_path, capsys, change,
                                                         match):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.update(change)
    (model_copy / "config.json").write_text(json.dumps(cfg))
    err = _error(capsys, _args(tiny_dir, model_copy, tmp_path / "o"))
    assert f"config '{model_copy / 'config.json'}' does not match the weights" in err and match in err, err
    assert not (tmp_path / "o").exists()
