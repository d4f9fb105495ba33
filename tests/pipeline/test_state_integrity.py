"""Resumable state that cannot silently give a wrong result: the fingerprint covers every
weight, the calibration and the thread count; state files are checksummed; the folder is locked; the
model is left intact on any exception; non-compute devices are refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tiny_models import Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.eval import evaluate_perplexity  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402
from admm_kernels.models.state import StateError, StateInUseError  # noqa: E402

FAST = dict(iters=4, T=3)
pytestmark = pytest.mark.usefixtures("one_thread")


def _interrupted(tmp_path, arch="llama", after=0, ids=None):
    """A state folder of a run interrupted after block `after`; returns (folder, ids)."""
    ids = tiny_tokens(3, 16) if ids is None else ids
    folder = tmp_path / "state"
    with pytest.raises(Interrupt):
        ak.prune_model(tiny_model(arch), ids, sparsity=0.6, state_dir=folder, callback=stop_after(after),
                       **FAST)
    return folder, ids


def _resume(folder, ids, model=None):
    return ak.prune_model(tiny_model("llama") if model is None else model, ids, sparsity=0.6,
                          state_dir=folder, **FAST)


# --- item 1: the fingerprint covers the whole model, the data and every setting ----------------------

def test_resume_refuses_a_model_that_differs_in_a_later_block(tmp_path):
    folder, ids = _interrupted(tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0  # block 2: not yet pruned, not the first
    with pytest.raises(StateError, match="dense_model.*original dense model, freshly loaded"):
        _resume(folder, ids, other)


def test_resume_refuses_a_model_that_differs_in_a_norm_or_buffer(tmp_path):
    folder, ids = _interrupted(tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.norm.weight[3] = 2.0  # not a prunable layer, still changes the result
    with pytest.raises(StateError, match="dense_model"):
        _resume(folder, ids, other)
    other = tiny_model("llama")
    other.model.rotary_emb.inv_freq.mul_(1.5)  # a non-persistent buffer
    with pytest.raises(StateError, match="dense_model"):
        _resume(folder, ids, other)


def test_resume_refuses_other_calibration_and_thread_count(tmp_path):
    folder, ids = _interrupted(tmp_path)
    other_ids = ids.clone()
    other_ids[2, 5] = (other_ids[2, 5] + 1) % 96
    with pytest.raises(StateError, match="calibration"):
        _resume(folder, other_ids)
    torch.set_num_threads(2)  # the one_thread fixture restores the count afterwards
    with pytest.raises(StateError, match=r"threads: saved 1, now 2.*resume with 1 threads") as exc:
        _resume(folder, ids)
    torch.set_num_threads(1)
    # The settings that differ, as data: a caller words its own advice from them.
    assert isinstance(exc.value, state_mod.StateMismatchError) and exc.value.start_over
    assert exc.value.mismatch == {"threads": (1, 2)}
    assert "(torch.set_num_threads)" in str(exc.value) and "--" not in str(exc.value)
    wording = state_mod.MismatchWording(threads="THREADS", recover="START OVER")
    assert exc.value.message(wording).endswith("resume with 1 threads (THREADS); use another state folder "
                                               "or START OVER")
    assert _resume(folder, ids)["resumed_from_block"] == 1


def test_resume_refuses_a_preset_that_now_means_other_options(tmp_path, monkeypatch):
    """A preset (or an option's default) is code: a resume under code that gives the same preset name
    other options would prune the remaining blocks another way than the saved ones."""
    from admm_kernels.methods import admm

    ids = tiny_tokens(3, 16)
    folder = tmp_path / "state"

    def run(**kw):
        return ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, state_dir=folder, preset="fast", **kw)

    with pytest.raises(Interrupt):
        run(callback=stop_after(0))
    monkeypatch.setitem(admm.PRESETS, "fast", {**admm.PRESETS["fast"], "iters": 6})
    with pytest.raises(StateError, match="method_options: saved .*'iters': 8.*now .*'iters': 6"):
        run()
    monkeypatch.undo()
    assert run()["resumed_from_block"] == 1


def test_report_records_the_thread_count():
    report = ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), method="magnitude")
    assert report["threads"] == torch.get_num_threads() == 1


# --- item 3: state files are verified -------------------------------------------------------------

def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _clear_message(exc_info, name):
    """The message names the file and ends with how to start again, in the library's terms; start_over
    tells a caller with its own way to start again (the CLI's --overwrite) to add it."""
    msg = str(exc_info.value)
    assert name in msg and msg.endswith(f"cannot be resumed: {state_mod.RECOVER}"), msg
    assert "delete the folder" in msg and exc_info.value.start_over, msg


@pytest.mark.parametrize("name", ["block_0000.safetensors", "acts_0001.safetensors"])
def test_flipped_byte_in_a_state_file_is_refused(tmp_path, name):
    folder, ids = _interrupted(tmp_path)
    _flip_last_byte(folder / name)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateError, match="SHA-256") as exc:
        _resume(folder, ids, model)
    _clear_message(exc, name)
    # Verified before anything was restored: the dense model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_edited_state_json_is_refused(tmp_path):
    folder, ids = _interrupted(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    state["report"]["layers"][0]["error"] = 0.0
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(StateError, match="checksum") as exc:
        _resume(folder, ids)
    _clear_message(exc, "state.json")


def _rewrite_consistently(folder, name, tensors):
    """Replace a state file and fix its record and state.json's checksum, as a careless tool would:
    only the tensor layout check can catch this."""
    from safetensors.torch import save_file

    save_file(tensors, folder / name)
    state = json.loads((folder / "state.json").read_text())
    state["files"][name] = {"sha256": state_mod.file_sha256(folder / name),
                            "bytes": (folder / name).stat().st_size,
                            "tensors": state_mod._tensor_record(tensors)}
    state["checksum"] = state_mod.json_checksum(state)
    (folder / "state.json").write_text(json.dumps(state))


def test_activations_with_fewer_windows_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, ids = _interrupted(tmp_path)
    acts = load_file(folder / "acts_0001.safetensors")["hidden"]
    save_file({"hidden": acts[:2].contiguous()}, folder / "acts_0001.safetensors")
    with pytest.raises(StateError, match="acts_0001.safetensors") as exc:
        _resume(folder, ids)
    _clear_message(exc, "acts_0001.safetensors")
    _rewrite_consistently(folder, "acts_0001.safetensors", {"hidden": acts[:2].contiguous()})
    with pytest.raises(StateError, match=r"shape \[2, 16, 32\], expected \(3, 16, hidden\)"):
        _resume(folder, ids)


def test_a_layer_missing_from_a_block_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, ids = _interrupted(tmp_path)
    weights = load_file(folder / "block_0000.safetensors")
    del weights["mlp.up_proj"]
    save_file(weights, folder / "block_0000.safetensors")
    with pytest.raises(StateError) as exc:
        _resume(folder, ids)
    _clear_message(exc, "block_0000.safetensors")
    _rewrite_consistently(folder, "block_0000.safetensors", weights)
    with pytest.raises(StateError, match=r"missing \['mlp.up_proj'\]"):
        _resume(folder, ids)


@pytest.mark.parametrize("name", ["block_0000.safetensors", "acts_0001.safetensors", "state.json"])
def test_truncated_state_files_are_refused(tmp_path, name):
    folder, ids = _interrupted(tmp_path)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StateError) as exc:
        _resume(folder, ids)
    _clear_message(exc, name)


def test_missing_block_file_and_old_format_are_refused(tmp_path):
    folder, ids = _interrupted(tmp_path, after=1)
    (folder / "block_0001.safetensors").unlink()
    with pytest.raises(StateError, match="is missing") as exc:
        _resume(folder, ids)
    _clear_message(exc, "block_0001.safetensors")
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({"format": 1, "fingerprint": state["fingerprint"]}))
    with pytest.raises(StateError, match="state format 1") as exc:
        _resume(folder, ids)
    _clear_message(exc, "state.json")


def test_state_records_checksums_and_shapes_of_every_file(tmp_path):
    folder, ids = _interrupted(tmp_path, after=1)
    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == state_mod.FORMAT_VERSION == 2
    assert sorted(state["files"]) == ["acts_0002.safetensors", "block_0000.safetensors",
                                      "block_0001.safetensors"]
    for name, rec in state["files"].items():
        assert rec["sha256"] == state_mod.file_sha256(folder / name)
        assert rec["bytes"] == (folder / name).stat().st_size
    assert state["files"]["acts_0002.safetensors"]["tensors"] == {
        "hidden": {"shape": [3, 16, 32], "dtype": "torch.float32"}}
    assert state["files"]["block_0001.safetensors"]["tensors"]["mlp.down_proj"]["shape"] == [32, 64]
    assert not (folder / "acts_0001.safetensors").exists()  # superseded activations are deleted


def test_state_files_are_fsynced(tmp_path, monkeypatch):
    from admm_kernels import _io

    synced_files, synced_dirs = [], []
    real_file, real_dir = _io.fsync_file, _io.fsync_dir
    monkeypatch.setattr(_io, "fsync_file", lambda p: (synced_files.append(os.path.basename(p)), real_file(p)))
    monkeypatch.setattr(_io, "fsync_dir", lambda p: (synced_dirs.append(str(p)), real_dir(p)))
    monkeypatch.setattr(state_mod, "fsync_dir", _io.fsync_dir)
    folder, _ = _interrupted(tmp_path)
    # Written under temporary names (.block_0000.safetensors.XXXX.tmp), fsync'ed before the rename.
    for name in ("block_0000.safetensors", "acts_0001.safetensors", "state.json"):
        assert any(f.startswith(f".{name}.") for f in synced_files), (name, synced_files)
    assert str(folder) in synced_dirs


# --- item 2: the exclusive lock ---------------------------------------------------------------------

_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, monkeypatch):
    from admm_kernels.models import pipeline

    folder = tmp_path / "state"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"

        def never(*a, **k):
            raise AssertionError("work started although the state folder is locked")

        monkeypatch.setattr(pipeline, "capture_inputs", never)
        with pytest.raises(StateInUseError, match=rf"'{folder}' is in use by another run \(pid {holder.pid}"):
            ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), state_dir=folder, **FAST)
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead: its lock vanished with it, though its lock file (with its pid) is still there.
    assert (folder / ".lock").read_text().strip() == str(holder.pid)
    monkeypatch.undo()
    ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), state_dir=folder, method="magnitude")


def test_lock_is_released_on_exceptions_and_exclusive_between_threads(tmp_path):
    folder, ids = _interrupted(tmp_path)
    assert not (folder / ".lock").exists()  # released (and its file removed) although the run raised
    errors = []
    with state_mod.PipelineState(folder).lock():
        with state_mod.PipelineState(folder).lock():  # re-entrant in the holding thread
            pass
        assert (folder / ".lock").read_text().strip() == str(os.getpid())

        def other_thread():
            try:
                _resume(folder, ids)
            except StateInUseError as exc:
                errors.append(str(exc))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert errors and "another thread of this process" in errors[0]
    assert _resume(folder, ids)["resumed_from_block"] == 1


def test_temporary_files_of_a_killed_write_are_removed_on_resume(tmp_path):
    folder, ids = _interrupted(tmp_path)
    torn = folder / ".block_0001.safetensors.k3j2h1.tmp"
    torn.write_bytes(b"half a block")
    assert _resume(folder, ids)["resumed_from_block"] == 1
    assert not torn.exists()


def test_lock_of_an_unwritable_state_folder_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot be created"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), state_dir=blocker / "state", **FAST)
    with pytest.raises(StateError, match="cannot be created|not writable"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), state_dir="/proc/admm-state", **FAST)


# --- item 5: non-compute devices and exceptions leave the model intact --------------------------------

def _intact(model, reference, training):
    assert model.training == training
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in model.model.layers)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.device == q.device and p.device.type != "meta", n


def test_meta_device_is_refused_up_front(capsys):
    model, ref = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(ValueError, match="'meta' is the meta device, which holds no data"):
        ak.prune_model(model, tiny_tokens(2, 16), device="meta", **FAST)
    _intact(model, ref, training=False)
    with pytest.raises(ValueError, match="meta device"):
        evaluate_perplexity(model, tiny_tokens(1, 64)[0], seqlen=16, device="meta")
    _intact(model, ref, training=False)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="not a valid device"):
        ak.prune_model(model, tiny_tokens(2, 16), device="nodevice", **FAST)
    model.to("meta")
    with pytest.raises(ValueError, match="parameters on the meta device"):
        ak.prune_model(model, tiny_tokens(2, 16), **FAST)


def test_an_exception_mid_block_leaves_the_model_in_place(monkeypatch):
    """prune_layer raises on the 3rd layer of block 1: every block that went to the device came back,
    no hook is left, the train/eval mode is the caller's."""
    from admm_kernels import prune as prune_module

    real, calls, moves = prune_module.prune_layer, [], []

    def failing(weight, gram, **kw):
        if weight.shape[0] != 4:  # not the up-front option check on a 4-row dummy layer
            calls.append(1)
            if len(calls) == 7 + 3:
                raise RuntimeError("injected failure")
        return real(weight, gram, **kw)

    model, ref = tiny_model("llama"), tiny_model("llama")
    blocks = list(model.model.layers)
    real_to = nn.Module.to

    def spy(self, *args, **kwargs):
        if any(self is b for b in blocks):
            moves.append((blocks.index(self), str(args[0] if args else kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(prune_module, "prune_layer", failing)
    monkeypatch.setattr(nn.Module, "to", spy)
    model.train()
    with pytest.raises(RuntimeError, match="injected failure"):
        ak.prune_model(model, tiny_tokens(2, 16), device="cpu", **FAST)
    _intact(model, ref, training=True)
    assert [m for m in moves if m[0] == 1] == [(1, "cpu"), (1, "cpu")]  # to the device and back


def test_an_exception_in_evaluate_perplexity_restores_mode(monkeypatch):
    model = tiny_model("llama")
    model.train()

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(model.model.layers[1], "forward", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        evaluate_perplexity(model, tiny_tokens(1, 64)[0], seqlen=16)
    assert model.training


@pytest.mark.gpu
def test_an_exception_on_cuda_brings_every_block_back(monkeypatch):
    from admm_kernels import prune as prune_module

    real, calls = prune_module.prune_layer, []

    def failing(weight, gram, **kw):
        if weight.shape[0] != 4:
            calls.append(1)
            if len(calls) == 10:
                raise RuntimeError("injected failure")
        return real(weight, gram, **kw)

    monkeypatch.setattr(prune_module, "prune_layer", failing)
    model, ref = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(RuntimeError, match="injected failure"):
        ak.prune_model(model, tiny_tokens(2, 16), device="cuda", **FAST)
    _intact(model, ref, training=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    monkeypatch.undo()
    report = ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), device="cuda", **FAST)
    assert report["device"].startswith("cuda") and report["achieved_sparsity"] == pytest.approx(0.5)
