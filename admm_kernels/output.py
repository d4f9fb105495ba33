"""The output folder of a prune run (admm_kernels.run): what it will take on the disk, its atomic
publishing (built in a temporary sibling, flushed, renamed into place, the previous output restored if the
rename fails) and a note when its weights have another dtype than the input checkpoint's.

Every message names the output as the caller words it (`name`: "out" for the Python API, "--out" for the
command line).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .sparse.checkpoint import PACKED_FILE

REPORT_NAME = "prune_report.json"
PACKED_NAME = PACKED_FILE  # save_format "packed": OUT/this beside config.json; admm_kernels.load_sparse(OUT)

_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class OutputChanged(Exception):
    """The output folder became non-empty while the run worked on it (and replacing it was not allowed)."""


def save(model, tokenizer, out: Path, fmt: str, report: dict, overwrite: bool, name: str,
         built: Path | None = None) -> None:
    """Write the model (None: already in `built`), tokenizer and report into a temporary sibling folder,
    then rename it onto `out`. built: a temporary sibling (make_temp_sibling) that already holds the
    model (a streamed run's shards). Every file is on the disk before the rename, and the rename before
    this returns: the caller then deletes the resumable state, which must not outlive its only other copy
    on a machine that loses power. A failed write is a WriteError naming `out` as `name`."""
    from ._io import fsync_dir, make_temp_sibling, old_sibling, writing

    out = out.resolve()
    with writing(name, out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = built or make_temp_sibling(out)  # .OUT.tmp-PID-*: removed by a later run if this process dies
    old = None
    try:
        _save_into(model, tokenizer, tmp, fmt, report, built is not None, out, name)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise OutputChanged(str(out))
            old = old_sibling(out)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous output back: a failed save must not lose it
                os.replace(old, out)
                old = None
            raise
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save_into(model, tokenizer, tmp: Path, fmt: str, report: dict, built: bool, out: Path,
               name: str) -> None:
    """save's writes into the temporary folder `tmp`; a failed write is a WriteError naming `out` (the
    temporary name means nothing to the user; safetensors' own errors are not OSErrors)."""
    from ._io import WriteError, writing

    try:
        with writing(name, out):
            _write_output(model, tokenizer, tmp, fmt, report, built)
    except WriteError as exc:  # e.g. save_sparse's, naming the file in the temporary folder
        raise WriteError(exc.errno, name, out, exc.reason, exc.needed, exc.available) from exc


def _write_output(model, tokenizer, tmp: Path, fmt: str, report: dict, built: bool) -> None:
    from ._io import fsync_tree, publish_folder

    if built:
        pass
    elif fmt == "packed":  # a complete folder: `admm-prune eval` and load_sparse(folder) read it
        from .sparse import save_sparse

        save_sparse(model, tmp / PACKED_NAME)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    publish_folder(tmp)
    fsync_tree(tmp)


@dataclass(frozen=True)
class SpacePlan:
    """What a run is going to write besides its own output's format: sizes in tokens and windows."""

    nsamples: int               # calibration windows
    seqlen: int                 # tokens per window
    eval_tokens: int            # evaluation tokens (0: no evaluation)
    eval_windows: int | None    # at most this many evaluation windows (None: all)


def space_needed(model, out: Path, fmt: str, state_folder: Path, offload_dir: str | None,
                 plan: SpacePlan, names: dict) -> list[tuple[str, Path, int]]:
    """(what, where, bytes) of what a prune run is going to write, known once the model is loaded: the
    output (hf: the model's bytes; a packed output's size depends on the result and is not counted), the
    state (every block's weights and two activation files, less what a resumed state already holds) and
    the activation file in offload_dir (the calibration windows; a streamed model's evaluation windows
    too). names: how the messages call "out" and "offload_dir"."""
    from .models import find_blocks
    from .models.streaming import StreamedModel

    streamed = isinstance(model, StreamedModel)
    net = model.model if streamed else model
    dtype = model.dtype if streamed else next(net.parameters()).dtype
    if streamed:
        model_bytes = model.output_bytes()
    else:
        storages = {}
        for t in net.state_dict().values():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # tied weights once
        model_bytes = sum(storages.values())
    _, blocks = find_blocks(net)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks.parameters())
    hidden = getattr(net.config, "hidden_size", None) or getattr(net.config, "n_embd", None) or 0
    acts = plan.nsamples * plan.seqlen * hidden * dtype.itemsize
    needs = []
    if fmt == "hf":
        needs.append((names["out"], out, model_bytes))
    held = sum(f.stat().st_size for f in state_folder.glob("*") if f.is_file()) if state_folder.is_dir() \
        else 0
    needs.append(("the resumable state", state_folder, max(0, block_bytes + 2 * acts - held)))
    if offload_dir is not None:
        windows = 0
        if streamed and plan.eval_tokens:
            windows = plan.eval_tokens // plan.seqlen
            windows = min(windows, plan.eval_windows or windows)
        needs.append((f"the activation file in {names['offload_dir']}", Path(offload_dir),
                      acts + windows * plan.seqlen * hidden * dtype.itemsize))
    return needs


@dataclass(frozen=True)
class DtypeNote:
    """The output's weights have another dtype than the input checkpoint's."""

    output_dtype: str     # e.g. "float32": the dtype most of the output's floating-point weights have
    source_dtype: str     # e.g. "bfloat16": the dtype most of the checkpoint's bytes have
    output_size: str      # the output's weight files, e.g. "69.5 KiB"
    source_size: str      # the checkpoint's weight files


def dtype_note(model_path: Path | None, model, out: Path, fmt: str) -> DtypeNote | None:
    """A DtypeNote when the output's weights have another dtype than the checkpoint at `model_path` (a
    bfloat16 checkpoint pruned with the CPU's default float32 is saved twice its size); None when they
    agree, `model_path` is None (the embedded model) or it has no safetensors weights."""
    from .models.streaming import SafetensorsReader, StreamedModel

    files = _weight_files(Path(model_path)) if model_path is not None else []
    stored: dict[str, int] = {}
    try:
        for f in files:
            for entry in SafetensorsReader(f).entries.values():
                if entry.get("dtype") in _SAFETENSORS_FLOATS:
                    begin, end = entry["data_offsets"]
                    kind = _SAFETENSORS_FLOATS[entry["dtype"]]
                    stored[kind] = stored.get(kind, 0) + end - begin
    except (ValueError, KeyError, TypeError):
        return None
    if not stored:
        return None
    source = max(stored, key=stored.get)
    if isinstance(model, StreamedModel):
        now = str(model.dtype).replace("torch.", "")
    else:
        numel: dict[str, int] = {}
        for p in model.parameters():
            if p.is_floating_point():
                numel[str(p.dtype)] = numel.get(str(p.dtype), 0) + p.numel()
        now = max(numel, key=numel.get).replace("torch.", "") if numel else source
    if now == source:
        return None
    written = [out / PACKED_NAME] if fmt == "packed" else _weight_files(out)
    return DtypeNote(now, source, _size(sum(f.stat().st_size for f in written if f.is_file())),
                     _size(sum(f.stat().st_size for f in files)))


def _weight_files(folder: Path) -> list[Path]:
    from .models.loading import safetensors_files

    try:
        return safetensors_files(folder)
    except ValueError:
        return []


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # not reached
