"""Faults of the machine rather than of the input: a full, read-only or forbidden disk on every write
path (the output in both formats, the resumable state, streamed blocks, offloaded activations, bench
outputs and reports) is one line naming the path, the error and what to do, checked up front where the
sizes are known, and `--resume` continues afterwards; SIGINT and SIGTERM end every command with one
message and the conventional exit status.

Full disks are real where a small tmpfs can be mounted (root), and injected (ENOSPC / EROFS raised by
the write function) everywhere else."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest
import torch

pytest.importorskip("transformers")

from admm_kernels import cli  # noqa: E402
from admm_kernels._io import WriteError, check_free_space, write_error  # noqa: E402
from admm_kernels.models import activations, streaming  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ENOSPC_SAFETENSORS = ("Error while serializing: I/O error: No space left on device (os error 28) at path "
                      '"/somewhere/.tmpXyZ"')


@pytest.fixture
def small_disk(tmp_path):
    """make(size) -> a folder on a tmpfs of `size` (e.g. "64k"); skips where mounting is not allowed."""
    mounted = []

    def make(size: str):
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        try:
            run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        if run.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _args(root, out, *extra, model=None):
    return ["prune", str(model or root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--calib",
            str(root / "calib.txt"), "--eval-text", str(root / "eval.txt"), "--out", str(out), "--method",
            "magnitude", "--quiet", *extra]


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("admm-prune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _layers(out) -> list:
    report = json.loads((out / "prune_report.json").read_text())
    return [(r["name"], r["error"], r["kept"]) for r in report["layers"]]


@pytest.fixture(scope="module")
def reference(tiny_model_root, tmp_path_factory):
    """The layers of an uninterrupted run, in memory and streamed (what every resumed run must equal)."""
    out = tmp_path_factory.mktemp("reference")
    assert cli.main(_args(tiny_model_root, out / "mem")) == 0
    assert cli.main(_args(tiny_model_root, out / "stream", "--stream")) == 0
    return {"mem": _layers(out / "mem"), "stream": _layers(out / "stream")}


# ---------------------------------------------------------------------------------------------------
# the message

@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device; free space"),
                                         (errno.EROFS, "Read-only file system; the filesystem is read-only"),
                                         (errno.EACCES, "Permission denied; no permission to write there")])
def test_a_write_error_names_the_path_the_error_and_what_to_do(code, words):
    err = write_error(OSError(code, __import__("os").strerror(code)), "the state file", "/x/state.json")
    assert isinstance(err, WriteError) and isinstance(err, OSError) and err.errno == code
    assert str(err).startswith("cannot write the state file '/x/state.json': ") and words in str(err)


def test_safetensors_io_errors_become_write_errors_naming_the_destination():
    from safetensors import SafetensorError

    err = write_error(SafetensorError(ENOSPC_SAFETENSORS), "--out", "/o")
    assert isinstance(err, WriteError) and err.errno == errno.ENOSPC
    assert str(err) == ("cannot write --out '/o': No space left on device; free space on that filesystem or "
                        "write somewhere else")
    other = SafetensorError("some other problem")
    assert write_error(other, "--out", "/o") is other
    assert write_error(TypeError("x"), "--out", "/o").__class__ is TypeError


def test_free_space_check_adds_up_outputs_on_one_filesystem(tmp_path, monkeypatch):
    import admm_kernels._io as io_mod

    monkeypatch.setattr(io_mod, "free_bytes", lambda path: 3 << 20)  # other jobs share the real disk
    check_free_space([("a", tmp_path, 1 << 20), ("b", tmp_path / "not-yet" / "x", 2 << 20)])
    with pytest.raises(WriteError, match=r"^cannot write a and b '.*': not enough free space "
                                         r"\(3\.0 MiB needed, 2\.0 MiB available\); free space") as exc:
        monkeypatch.setattr(io_mod, "free_bytes", lambda path: 2 << 20)
        check_free_space([("a", tmp_path, 1 << 20), ("b", tmp_path / "not-yet", 2 << 20)])
    assert exc.value.errno == errno.ENOSPC and exc.value.needed == 3 << 20


# ---------------------------------------------------------------------------------------------------
# prune: the output, the state, streamed blocks

def test_a_model_too_large_for_the_disk_fails_before_any_work(tiny_model_root, small_disk, capsys,
                                                             monkeypatch):
    import admm_kernels.models as models_mod

    disk = small_disk("64k")  # the tiny model takes ~110 KiB in float32

    def never(*a, **k):
        raise AssertionError("pruning started although the output cannot fit")
    monkeypatch.setattr(models_mod, "prune_model", never)
    err = _one_line_error(capsys, _args(tiny_model_root, disk / "out"))
    assert f"cannot write --out and the resumable state '{disk / 'out'}': not enough free space (" in err
    assert "KiB needed, " in err and "KiB available); free space on that filesystem" in err
    assert not (disk / "out").exists()


def test_a_full_disk_when_saving_the_output_keeps_the_state_and_resume_saves_it(tiny_model_root, tmp_path,
                                                                                capsys, monkeypatch,
                                                                                reference):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(ENOSPC_SAFETENSORS)
    monkeypatch.setattr(mu, "safe_save_file", full)
    out = tmp_path / "out"
    err = _one_line_error(capsys, _args(tiny_model_root, out))
    assert err == (f"admm-prune: error: cannot write --out '{out}': No space left on device; free space on "
                   "that filesystem or write somewhere else; then rerun with --resume to save the pruned "
                   "model without pruning again")
    assert not out.exists() and (tmp_path / "out.state" / "state.json").is_file()
    monkeypatch.undo()
    assert cli.main(_args(tiny_model_root, out, "--resume")) == 0
    assert _layers(out) == reference["mem"]
    assert json.loads((out / "prune_report.json").read_text())["resumed_from_block"] == 3


def test_a_full_disk_when_saving_the_packed_output_is_one_line(tiny_model_root, tmp_path, capsys,
                                                               monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(ENOSPC_SAFETENSORS)
    monkeypatch.setattr(safetensors.torch, "save_file", full)  # save_sparse imports it when called
    out = tmp_path / "out"
    err = _one_line_error(capsys, _args(tiny_model_root, out, "--save-format", "packed"))
    assert f"cannot write --out '{out}': No space left on device" in err
    assert "rerun with --resume" in err


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_a_full_disk_while_saving_the_state_is_one_line_and_resume_continues(tiny_model_root, tmp_path,
                                                                             capsys, monkeypatch, reference,
                                                                             stream):
    real = state_mod.save_file
    calls = []

    def full_on_the_second_block(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # block 0's weights and activations went through; block 1's weights do not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(state_mod, "save_file", full_on_the_second_block)
    out = tmp_path / "out"
    extra = ["--stream"] if stream else []
    err = _one_line_error(capsys, _args(tiny_model_root, out, *extra))
    state = tmp_path / "out.state"
    block_file = state / "block_0001.safetensors"
    assert err == (f"admm-prune: error: cannot write the resumable state file '{block_file}': No space "
                   "left on device; free space on that filesystem or write somewhere else; then "
                   "rerun with --resume to continue from the last finished block")
    assert not out.exists() and not any(p.name.startswith(".block_0001") for p in state.iterdir())
    monkeypatch.undo()
    assert cli.main(_args(tiny_model_root, out, "--resume", *extra)) == 0
    assert _layers(out) == reference["stream" if stream else "mem"]
    assert json.loads((out / "prune_report.json").read_text())["resumed_from_block"] == 1


def test_a_read_only_state_folder_is_one_line(tiny_model_root, tmp_path, capsys, monkeypatch):
    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(state_mod, "atomic_write_bytes", read_only)
    err = _one_line_error(capsys, _args(tiny_model_root, tmp_path / "out"))
    assert f"cannot write the resumable state file '{tmp_path / 'out.state'}/" in err
    assert "Read-only file system; the filesystem is read-only: write somewhere else" in err


def test_a_full_disk_while_writing_a_streamed_block_is_one_line_and_resume_continues(tiny_model_root,
                                                                                    tmp_path, capsys,
                                                                                    monkeypatch, reference):
    writes = []

    def failing_open(path, mode="r", *a, **k):
        if "w" in mode:
            writes.append(path)
            if len(writes) == 3:  # the non-block tensors and block 0 went through; block 1 does not
                raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *a, **k)
    monkeypatch.setattr(streaming, "open", failing_open, raising=False)
    out = tmp_path / "out"
    err = _one_line_error(capsys, _args(tiny_model_root, out, "--stream"))
    assert "cannot write the safetensors file '" in err and "model-00003-of-00004.safetensors'" in err
    assert "No space left on device" in err and err.endswith("rerun with --resume to continue from the last "
                                                             "finished block")
    assert not out.exists() and not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    monkeypatch.undo()
    assert cli.main(_args(tiny_model_root, out, "--resume", "--stream")) == 0
    assert _layers(out) == reference["stream"]


def test_a_streamed_output_that_cannot_fit_is_refused_when_the_model_is_opened(tiny_model_root, small_disk):
    disk = small_disk("64k")
    with pytest.raises(WriteError, match=r"cannot write the streamed output '.*': not enough free space "
                                         r"\(\d+\.\d KiB needed, 64\.0 KiB available\)") as exc:
        streaming.StreamedModel(tiny_model_root / "tiny-llama", output=disk)
    assert exc.value.needed > exc.value.available


# ---------------------------------------------------------------------------------------------------
# offloaded activations

def test_the_activation_file_reserves_its_space_so_a_full_disk_is_an_error_not_sigbus(small_disk):
    disk = small_disk("1m")
    store = activations.ActivationStore("disk", torch.device("cpu"), disk)
    # Without the reservation this returned a mapping of a sparse 4 MiB file, and writing its pages
    # would kill the process with SIGBUS.
    with pytest.raises(WriteError, match=r"cannot write the activation file in offload_dir '.*': No space "
                                         r"left on device \(4\.0 MiB needed, 1\.0 MiB available\)"):
        store.empty((1024, 1024), torch.float32)
    assert list(disk.iterdir()) == []
    t = store.empty((64, 1024), torch.float32)  # 256 KiB fits: reserved, then mapped
    t.fill_(1.0)
    assert float(t.sum()) == 64 * 1024


def test_a_failed_reservation_of_the_activation_file_is_one_line_in_the_cli(tiny_model_root, tmp_path,
                                                                            capsys, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(activations.os, "posix_fallocate", full)
    err = _one_line_error(capsys, _args(tiny_model_root, tmp_path / "out", "--offload-dir", str(tmp_path)))
    assert f"cannot write the activation file in offload_dir '{tmp_path}': No space left on device (" in err
    assert "16.0 KiB needed" in err  # 4 windows x 32 tokens x 32 hidden x 4 bytes
    assert not any(p.name.startswith("admm-acts-") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# eval and bench outputs

def test_eval_report_on_a_read_only_disk_is_one_line(tiny_model_root, tmp_path, capsys, monkeypatch):
    import admm_kernels._io as io_mod

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(io_mod, "atomic_write_bytes", read_only)
    report = tmp_path / "r.json"
    argv = ["eval", str(tiny_model_root / "tiny-llama"), "--eval-text", str(tiny_model_root / "eval.txt"),
            "--seqlen", "32", "--eval-windows", "2", "--quiet", "--report", str(report)]
    err = _one_line_error(capsys, argv)
    assert err == (f"admm-prune: error: cannot write --report '{report}': Read-only file system; the "
                   "filesystem is read-only: write somewhere else (the result is printed above)")


def test_bench_outputs_on_a_full_disk_are_one_line(tiny_model_root, tmp_path, capsys, monkeypatch):
    from admm_kernels.bench import report
    from admm_kernels.cli.bench import main as bench_main

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report, "write_file", full)
    out = tmp_path / "bench"
    argv = [str(tiny_model_root / "tiny-llama"), "--calib", str(tiny_model_root / "calib.txt"), "--nsamples",
            "2", "--seqlen", "16", "--methods", "magnitude", "--sparsities", "0.5", "--patterns",
            "unstructured", "--max-layers", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--quiet"]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"admm-prune bench: error: cannot write the bench output '{out / 'layers.csv'}': No space "
                   "left on device; free space on that filesystem or write somewhere else"), err
    monkeypatch.undo()
    assert bench_main([*argv, "--resume"]) == 0
    assert (out / "results.json").is_file()
    # and the tool that copies a bench output into RESULTS.md
    from admm_kernels.bench import results_md

    monkeypatch.setattr(report, "write_file", full)
    md = tmp_path / "RESULTS.md"
    assert results_md.main(["--results", str(md), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("results_md: error: cannot write the bench output '") and "\n" not in err, err
    assert err.endswith("No space left on device; free space on that filesystem or write somewhere else")


def test_bench_gram_cache_on_a_full_disk_is_one_line(tiny_model_root, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from admm_kernels.bench import grams
    from admm_kernels.cli.bench import main as bench_main

    def full(*a, **k):
        raise SafetensorError(ENOSPC_SAFETENSORS)
    monkeypatch.setattr(grams, "save_file", full)
    argv = [str(tiny_model_root / "tiny-llama"), "--calib", str(tiny_model_root / "calib.txt"), "--nsamples",
            "2", "--seqlen", "16", "--methods", "magnitude", "--sparsities", "0.5", "--patterns",
            "unstructured", "--max-layers", "2", "--out", str(tmp_path / "bench"), "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip()
    cache = tmp_path / "cache"
    assert err.startswith(f"admm-prune bench: error: cannot write the Gram cache '{cache}/grams-")
    assert err.endswith("No space left on device; free space on that filesystem or write somewhere else")


# ---------------------------------------------------------------------------------------------------
# signals: real SIGINT / SIGTERM sent to a CLI subprocess paused at a known point

_PAUSED_CLI = r"""
import sys, time

def pause(*a, **k):
    print("READY", flush=True)
    # short sleeps in a loop: a signal that lands between the print and a single long sleep's system
    # call would only be acted on when that sleep ends (the loop's jump back runs the handler)
    for _ in range(1200):
        time.sleep(0.1)

kind = sys.argv[1]
if kind == "prune":  # paused right after block 0's state was saved
    from admm_kernels.models import state
    real_save = state.PipelineState.save

    def save(self, *a, **k):
        result = real_save(self, *a, **k)
        pause()
        return result
    state.PipelineState.save = save
elif kind == "eval":
    import admm_kernels.eval
    admm_kernels.eval.evaluate_perplexity = pause
elif kind == "bench":  # paused right after the first row was journalled
    from admm_kernels.bench import journal
    real_add = journal.Journal.add

    def add(self, row):
        real_add(self, row)
        pause()
    journal.Journal.add = add
elif kind == "doctor":
    from admm_kernels import doctor
    doctor.run_checks = pause
from admm_kernels.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_until_signalled(kind: str, argv: list[str], signum: int) -> tuple[int, str]:
    """Start the CLI with `argv`, wait until it reaches its pause, send `signum`; (exit status, stderr)."""
    import os
    import signal
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_CLI, kind, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            # Python turns SIGINT into KeyboardInterrupt only when it is not ignored at
                            # start (a shell's background job ignores it)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        while line and line.strip() != "READY":
            line = proc.stdout.readline()
        assert line.strip() == "READY", proc.communicate(timeout=60)[1]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _signal_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_prune_stopped_by_a_signal_says_so_and_resume_continues(tiny_model_root, tmp_path, sig, reference):
    import signal

    out = tmp_path / "out"
    argv = [*_args(tiny_model_root, out), "--threads", "1"]
    rc, err = _run_until_signalled("prune", argv, getattr(signal, sig))
    verb = "interrupted" if sig == "SIGINT" else "terminated"
    assert rc == (130 if sig == "SIGINT" else 143), err
    assert _signal_lines(err) == [f"admm-prune: {verb} ({sig}); rerun with --resume to continue from the "
                                  "last finished block"], err
    assert (tmp_path / "out.state" / "state.json").is_file() and not out.exists()
    assert not (tmp_path / "out.state" / ".lock").exists()  # unwound: the lock was released in order
    assert cli.main([*argv, "--resume"]) == 0
    assert json.loads((out / "prune_report.json").read_text())["resumed_from_block"] == 1
    assert _layers(out) == reference["mem"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_eval_stopped_by_a_signal_says_so_without_resume(tiny_model_root, sig):
    import signal

    argv = ["eval", str(tiny_model_root / "tiny-llama"), "--eval-text", str(tiny_model_root / "eval.txt"),
            "--seqlen", "32", "--quiet", "--threads", "1"]
    rc, err = _run_until_signalled("eval", argv, getattr(signal, sig))
    verb = "interrupted" if sig == "SIGINT" else "terminated"
    assert rc == (130 if sig == "SIGINT" else 143), err
    assert _signal_lines(err) == [f"admm-prune: {verb} ({sig})"], err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_bench_stopped_by_a_signal_says_so_and_resume_keeps_the_rows(tiny_model_root, tmp_path, sig):
    import signal

    from admm_kernels.cli.bench import main as bench_main

    argv = [str(tiny_model_root / "tiny-llama"), "--calib", str(tiny_model_root / "calib.txt"), "--nsamples",
            "2", "--seqlen", "16", "--methods", "magnitude", "--sparsities", "0.5", "--patterns",
            "unstructured", "--max-layers", "2", "--out", str(tmp_path / "bench"), "--cache-dir",
            str(tmp_path / "cache"), "--quiet", "--threads", "1"]
    rc, err = _run_until_signalled("bench", ["bench", *argv], getattr(signal, sig))
    verb = "interrupted" if sig == "SIGINT" else "terminated"
    assert rc == (130 if sig == "SIGINT" else 143), err
    assert _signal_lines(err) == [f"admm-prune bench: {verb} ({sig}); rerun with --resume to keep the "
                                  "finished rows"], err
    assert bench_main([*argv, "--resume"]) == 0
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert result["run"]["reused"] == 1


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_doctor_stopped_by_a_signal_says_so(sig):
    import signal

    rc, err = _run_until_signalled("doctor", ["doctor"], getattr(signal, sig))
    verb = "interrupted" if sig == "SIGINT" else "terminated"
    assert rc == (130 if sig == "SIGINT" else 143), err
    assert _signal_lines(err) == [f"admm-prune doctor: {verb} ({sig})"], err


def test_a_full_disk_when_locking_or_preparing_the_output_is_one_line(tiny_model_root, tmp_path, capsys,
                                                                      monkeypatch):
    import admm_kernels._io as io_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(state_mod.os, "pwrite", full)
        err = _one_line_error(capsys, _args(tiny_model_root, tmp_path / "a"))
        state = tmp_path / "a.state"
        assert err.endswith(f"cannot be used: state folder '{state}' is not writable: No space left on "
                            "device")
    with monkeypatch.context() as m:  # the folder a streamed run writes its blocks into
        m.setattr(io_mod, "make_temp_sibling", full)
        err = _one_line_error(capsys, _args(tiny_model_root, tmp_path / "b", "--stream"))
        assert err == (f"admm-prune: error: cannot write --out '{tmp_path / 'b'}': No space left on device; "
                       "free space on that filesystem or write somewhere else")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unwritable_offload_dir_is_refused_before_the_model_is_loaded(tiny_model_root, tmp_path, capsys,
                                                                         monkeypatch):
    from admm_kernels.models import loading

    def never(*a, **k):
        raise AssertionError("the model was loaded before --offload-dir was checked")
    monkeypatch.setattr(loading, "load_model", never)
    # /proc refuses new files even for root (a chmod'ed folder does not stop root)
    err = _one_line_error(capsys, _args(tiny_model_root, tmp_path / "out", "--offload-dir", "/proc"))
    assert err.startswith("admm-prune: error: cannot write --offload-dir '/proc': ") and "; " in err, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_streamed_output_size_checked_up_front_is_what_is_written(tiny_model_root, tmp_path, dtype):
    from tiny_models import tiny_tokens

    import admm_kernels as ak

    out = tmp_path / "out"
    out.mkdir()
    model = streaming.StreamedModel(tiny_model_root / "tiny-llama", dtype=dtype, output=out)
    expected = model.output_bytes()
    ak.prune_model(model, tiny_tokens(2, 16), sparsity=0.5, method="magnitude")
    index = json.loads((out / streaming.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == expected


def test_the_python_api_checks_the_states_space_before_any_block(small_disk):
    """prune_model(state_dir=...) on a disk too small for the state raises WriteError before a block is
    pruned (the model is untouched), naming the state folder and the bytes needed."""
    import copy

    from tiny_models import tiny_model, tiny_tokens

    import admm_kernels as ak
    from admm_kernels._io import WriteError

    disk = small_disk("64k")
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    with pytest.raises(WriteError, match=r"cannot write the resumable state .*not enough free space") as info:
        ak.prune_model(model, tiny_tokens(4, 32), method="magnitude", state_dir=disk / "state")
    assert info.value.needed > info.value.available
    for (n, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        assert torch.equal(p, q), n
