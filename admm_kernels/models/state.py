"""Resumable pipeline state: after each finished block, everything needed to continue bit-identically.

Layout of the state folder:
    state.json               the commit point: settings fingerprint, next block, report so far
    block_0003.safetensors   the pruned weights of block 3 ((out, in) per selected layer), one per block
    acts_0004.safetensors    the inputs of block 4 (N, L, hidden): the latest only
Every file is written to a temporary name and renamed, and state.json is replaced last, so a crash at
any moment leaves either the previous or the new consistent state.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write_bytes

STATE_FILE = "state.json"
FORMAT_VERSION = 1


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_folder(folder: Path) -> None:
    """Give a folder made by tempfile.mkdtemp (mode 0700) and its files the usual permissions
    (0777 / 0666 minus the umask) before it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in Path(folder).rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def fingerprint(**parts) -> dict:
    """A JSON-able description of the run's settings; tensors are replaced by their SHA-256."""
    def norm(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            return "sha256:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
        if isinstance(v, torch.dtype):
            return str(v)
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, str) and len(v) > 200:  # e.g. a model config: keep error messages short
            return "sha256:" + hashlib.sha256(v.encode()).hexdigest()
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return repr(v)
    return {k: norm(v) for k, v in sorted(parts.items())}


class PipelineState:
    """Reads and writes the state folder of one pruning run."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def load(self, expected_fingerprint: dict) -> dict | None:
        """The saved state, or None when there is none. Raises ValueError when the saved run had other
        settings (names the differing keys) or files are missing."""
        if not self.exists():
            return None
        state = json.loads((self.folder / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"state_dir {str(self.folder)!r} has state format {state.get('format')!r}, "
                             f"expected {FORMAT_VERSION}")
        saved = state["fingerprint"]
        diff = sorted(k for k in set(saved) | set(expected_fingerprint)
                      if saved.get(k) != expected_fingerprint.get(k))
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {expected_fingerprint.get(k)!r}"
                               for k in diff)
            hint = ("; resuming needs the original dense model, freshly loaded"
                    if "dense_weights" in diff else "")
            raise ValueError(f"state_dir {str(self.folder)!r} belongs to a run with other settings "
                             f"({detail}){hint}; use another state folder or delete it")
        for name in [state["acts_file"], *state["block_files"]]:
            if name and not (self.folder / name).is_file():
                raise ValueError(f"state_dir {str(self.folder)!r} is incomplete: {name} is missing")
        return state

    def block_weights(self, state: dict, block: int) -> dict[str, torch.Tensor]:
        return load_file(self.folder / state["block_files"][block])

    def activations(self, state: dict) -> torch.Tensor | None:
        if not state["acts_file"]:
            return None
        return load_file(self.folder / state["acts_file"])["hidden"]

    def save(self, fp: dict, next_block: int, block_weights: dict[str, torch.Tensor],
             acts: torch.Tensor | None, report: dict, previous: dict | None) -> dict:
        """Record that block next_block-1 is finished: its pruned weights, the inputs of next_block
        (None after the last block) and the report so far. Returns the new state dict."""
        self.folder.mkdir(parents=True, exist_ok=True)
        done = next_block - 1
        block_file = f"block_{done:04d}.safetensors"
        _atomic_save_tensors(self.folder / block_file, block_weights)
        acts_file = ""
        if acts is not None:
            acts_file = f"acts_{next_block:04d}.safetensors"
            _atomic_save_tensors(self.folder / acts_file, {"hidden": acts})
        files = list(previous["block_files"]) if previous else []
        files = files[:done] + [block_file]
        state = {"format": FORMAT_VERSION, "fingerprint": fp, "next_block": next_block,
                 "block_files": files, "acts_file": acts_file, "report": report}
        atomic_write_json(self.folder / STATE_FILE, state)
        # Only now is the previous activation file unreferenced.
        if previous and previous.get("acts_file") and previous["acts_file"] != acts_file:
            (self.folder / previous["acts_file"]).unlink(missing_ok=True)
        return state
