"""Resumable pipeline state: after each finished block, everything needed to continue bit-identically,
verified before it is trusted, written durably, and owned by one run at a time.

Layout of a state folder:
    .lock                    the exclusive lock (fcntl) of the run using the folder; holds its pid
    state.json               the commit point: format, settings fingerprint, next block, every file's
                             SHA-256, size and tensor shapes, the report so far, and its own checksum
    block_0003.safetensors   the pruned weights of block 3 ((out, in) per selected layer), one per block
    acts_0004.safetensors    the inputs of block 4 (N, L, hidden): the latest only
    run.json (etc.)          extras of a caller (write_extra / read_extra), self-checksummed

Three guarantees, all in this module so that one owner (rank 0 of a distributed run) can hold them:

* Verification (`PipelineState.load`): state.json must parse, carry FORMAT_VERSION and a matching
  checksum; its fingerprint must equal the new run's (content digest of the dense model, calibration
  token ids, every setting that changes the result); every referenced file must exist with the recorded
  size and SHA-256, and hold exactly the tensors (names, shapes, dtypes) the pipeline expects. Anything
  else raises StateError naming the file and how to start again. Nothing of the model is touched before
  the whole state is verified. What a verified state says is a `ResumePoint` (typed, frozen): the next
  block, the report so far and the saved activations' layout; the files are read through it.
* Durability (`PipelineState.save`): every file is written to a temporary name, fsync'ed, renamed and
  the folder fsync'ed; state.json is replaced last, so a crash at any moment leaves either the previous
  or the new consistent state. Cost, measured 2026-12-02 on the 2-core machine with a SmolLM2-sized
  block (14 MB of weights) and 32 x 256 activations (19 MB): 0.06-0.27 s a block (plain save_file
  0.05-0.09 s; the read-back SHA-256 is most of the rest), against ~9 s of work a block.
* Exclusion (`PipelineState.lock`): an fcntl lock on FOLDER/.lock, taken without waiting; a second run
  fails at once naming the folder and the holder's pid. The kernel drops the lock when its process dies,
  so a lock file left by a killed run never blocks; the pid inside is only for the message. The lock is
  re-entrant within one thread (the CLI locks the folder, then prune_model locks it again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._digest import tensor_digest
from .._io import (
    atomic_write_bytes,
    atomic_write_with,
    fsync_dir,
    publish_folder,  # noqa: F401  (re-exported: callers import it from here)
    writing,
)

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
# 1: settings fingerprint with the first pruned weight only, no file checksums (admm_kernels < 0.2).
# 2: content digest of the whole model, SHA-256 / sizes / tensor shapes of every file, checksummed
#    state.json, exclusive lock.
FORMAT_VERSION = 2
# How to get past a state that cannot be resumed, in the library's terms. Every message that gives it
# ends with it (StateError.start_over), so a caller with its own way to start over (a command-line
# flag) can append that.
RECOVER = "delete the folder to start again"

_HASH_CHUNK = 16 << 20  # bytes read at a time when hashing a file


class StateError(ValueError):
    """A state folder that cannot be used: the message names the file and how to recover.

    start_over: True when the saved state itself cannot be resumed (corrupt, of another format, or of a
    run with other settings) and starting again without it is the way on; the message then ends with
    RECOVER. False for folders that cannot be locked or written."""

    def __init__(self, message: str, start_over: bool = False):
        super().__init__(message)
        self.start_over = start_over

    def __reduce__(self):
        return type(self), (str(self), self.start_over)


class StateInUseError(StateError):
    """The state folder is locked by another run (or another thread of this process)."""


@dataclass(frozen=True)
class MismatchWording:
    """How a settings mismatch words its advice. The defaults speak of the library's own means; a caller
    with other names for them (the command line's flags) passes its own to
    StateMismatchError.message. ranks: a format string with {ranks}, the saved world size (> 1)."""

    threads: str = "torch.set_num_threads"
    ranks: str = "a torch.distributed process group of {ranks} ranks"
    one_rank: str = "one process, without torch.distributed"
    recover: str = RECOVER


class StateMismatchError(StateError):
    """The state folder belongs to a run with other settings.

    folder: the state folder; mismatch: {fingerprint key: (saved value, this run's value)} of every
    setting that differs (a key missing on one side has None there)."""

    def __init__(self, folder: str | os.PathLike, mismatch: Mapping[str, tuple]):
        self.folder = Path(folder)
        self.mismatch = dict(mismatch)
        super().__init__(self.message(), start_over=True)

    def __reduce__(self):
        return type(self), (self.folder, self.mismatch)

    def message(self, wording: MismatchWording = MismatchWording()) -> str:
        """The message, its advice worded by `wording` (str(self) uses the defaults)."""
        detail = "; ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in self.mismatch.items())
        hints = []
        if "dense_model" in self.mismatch:
            hints.append("resuming needs the original dense model, freshly loaded")
        if "threads" in self.mismatch:
            hints.append(f"results depend on the torch thread count: resume with "
                         f"{self.mismatch['threads'][0]} threads ({wording.threads})")
        if "world_size" in self.mismatch:
            ranks = self.mismatch["world_size"][0] or 1
            how = wording.ranks.format(ranks=ranks) if ranks > 1 else wording.one_rank
            hints.append("a distributed run's Gram sums depend on the number of ranks: resume with "
                         f"{ranks} rank(s) ({how})")
        hint = "".join(f"; {h}" for h in hints)
        return (f"state_dir {str(self.folder)!r} belongs to a run with other settings ({detail}){hint}; use "
                f"another state folder or {wording.recover}")


# ---------------------------------------------------------------------------------------------------
# digests

def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def json_checksum(obj: dict) -> str:
    """SHA-256 of the canonical JSON of `obj` without its "checksum" key."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(**parts) -> dict:
    """A JSON-able description of a run's settings; tensors are replaced by their SHA-256."""
    def norm(v):
        if isinstance(v, torch.Tensor):
            return "sha256:" + tensor_digest(v)
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


def atomic_write_json(path: Path, obj) -> None:
    with writing("the resumable state file", path):  # a full disk: one line, the previous state kept
        atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------------
# the lock

_held: dict[Path, FolderLock] = {}
_held_guard = threading.Lock()


class FolderLock:
    """An exclusive fcntl lock on `folder` (through folder/.lock); use as a context manager or call
    release(). Obtained from lock_folder()."""

    def __init__(self, folder: Path, key: Path, fd: int, created: bool):
        self.folder, self._key, self._fd, self._created = folder, key, fd, created
        self._owner = threading.get_ident()
        self._count = 1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Undo one acquisition; the last one removes the lock file (while still holding the lock, so
        nobody can take a lock on the name that is about to vanish), unlocks, and removes the folder if
        this lock created it and nothing else was written into it."""
        with _held_guard:
            if self._fd is None:
                return
            self._count -= 1
            if self._count:
                return
            _held.pop(self._key, None)
            try:
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # closing the last descriptor drops the flock
                self._fd = None
            if self._created:
                try:
                    self.folder.rmdir()
                except OSError:
                    pass  # not empty (state was written) or already removed


def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def lock_folder(folder: str | os.PathLike, what: str = "state folder") -> FolderLock:
    """Create `folder` if needed and lock it exclusively, without waiting.

    Raises StateInUseError (naming the folder and the holder's pid) when another process or another
    thread holds it, StateError when the folder cannot be created or written. Taking the lock is also a
    real write into the folder, so an unwritable place fails here, before any work."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{what} {str(folder)!r} cannot be created: {exc.strerror or exc}") from None
    key = folder.resolve()
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            if held._owner != threading.get_ident():
                raise StateInUseError(f"{what} {str(folder)!r} is in use by another thread of this process "
                                      f"(pid {os.getpid()})")
            held._count += 1
            return held
        path = folder / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StateError(f"{what} {str(folder)!r} is not writable: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = _holder_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StateInUseError(
                        f"{what} {str(folder)!r} is in use by another run (pid {pid}, lock file {path}); "
                        "wait for it to finish or use another folder") from None
                raise StateError(f"{what} {str(folder)!r} cannot be locked: {exc.strerror or exc}") from None
            # The previous holder may have unlinked the file between our open and our flock: then we
            # hold a lock on a name nobody else sees. Retry until the locked file is the one at `path`.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:  # the pid is only for other runs' messages, but a full disk must not be a traceback here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            path.unlink(missing_ok=True)  # still holding the lock: nobody else uses this name yet
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise StateError(f"{what} {str(folder)!r} is not writable: {exc.strerror or exc}") from None
        lock = FolderLock(folder, key, fd, created)
        _held[key] = lock
        return lock


def _check_locked(folder: Path, action: str) -> None:
    held = _held.get(folder.resolve())
    if held is None or held._owner != threading.get_ident():
        raise RuntimeError(f"{action} of {str(folder)!r} needs the folder's lock (PipelineState.lock())")


# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateLayout:
    """What a run expects to find in a state folder.

    blocks[b]: {layer name inside block b: ((out, in), dtype name such as "torch.float32")} for the
    selected layers of every block that has work; windows: (nsamples, seqlen), the leading dims of the
    saved activations (N, L, hidden)."""

    blocks: tuple[dict[str, tuple[tuple[int, ...], str]], ...]
    windows: tuple[int, int]

    @property
    def end(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class ResumePoint:
    """A verified state: where a run continues and what it continues with (PipelineState.load returns
    it, PipelineState.save the new one). Plain data, so rank 0 can send it to the other ranks.

    fingerprint: the run's settings (see admm_kernels.models.pipeline.run_fingerprint); next_block: the
    first block not finished; block_files[b]: the file of finished block b's pruned weights; acts_file:
    the file of next_block's inputs ("" after the last block with work); files: {file name: {"sha256",
    "bytes", "tensors": {name: {"shape", "dtype"}}}}; report: the report so far ({"layers": [...],
    "block_tune": [...] with block tuning})."""

    fingerprint: dict
    next_block: int
    block_files: tuple[str, ...]
    acts_file: str
    files: dict = field(repr=False)
    report: dict = field(repr=False)

    @property
    def layers(self) -> list[dict]:
        """The report entries of every layer of the finished blocks, in order."""
        return list(self.report["layers"])

    @property
    def block_tune(self) -> list[dict]:
        """The block tuning reports of the finished blocks (empty without block tuning)."""
        return list(self.report.get("block_tune", []))

    @property
    def activations(self) -> tuple[tuple[int, ...], str] | None:
        """(shape (N, L, hidden), dtype name such as "torch.float32") of the saved inputs of next_block,
        or None when there are none."""
        if not self.acts_file:
            return None
        rec = self.files[self.acts_file]["tensors"]["hidden"]
        return tuple(rec["shape"]), rec["dtype"]

    def record(self) -> dict:
        """The JSON object state.json holds (without its format and checksum)."""
        return {"fingerprint": self.fingerprint, "next_block": self.next_block,
                "block_files": list(self.block_files), "acts_file": self.acts_file, "files": self.files,
                "report": self.report}

    @classmethod
    def from_record(cls, obj: Mapping) -> ResumePoint:
        """The inverse of record() (for an object whose structure was checked)."""
        return cls(obj["fingerprint"], obj["next_block"], tuple(obj["block_files"]), obj["acts_file"],
                   obj["files"], obj["report"])


def _tensor_record(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())}


def block_file_name(block: int) -> str:
    return f"block_{block:04d}.safetensors"


def acts_file_name(block: int) -> str:
    return f"acts_{block:04d}.safetensors"


class PipelineState:
    """Reads, verifies and writes the state folder of one pruning run (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    # -- ownership ----------------------------------------------------------------------------------

    def lock(self) -> FolderLock:
        """Take the folder's exclusive lock (see lock_folder); release it with `with` or .release().

        Temporary files of interrupted writes (.NAME.XXXX.tmp, see admm_kernels._io) are removed: only
        the lock's holder writes here, so any such file belongs to a run that is gone."""
        lock = lock_folder(self.folder)
        for p in self.folder.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
        return lock

    def has_state(self) -> bool:
        """True when the folder holds anything besides a lock file (a run's state or its extras)."""
        return self.folder.is_dir() and any(p.name != LOCK_FILE for p in self.folder.iterdir())

    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def clear(self) -> None:
        """Delete everything in the folder except the lock (which this thread must hold)."""
        _check_locked(self.folder, "clearing")
        for p in self.folder.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        fsync_dir(self.folder)

    def remove(self) -> None:
        """Delete the folder with everything in it (lock file included; the lock itself stays held until
        released, so no other run can slip in meanwhile)."""
        _check_locked(self.folder, "removing")
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------------

    def _error(self, name: str, problem: str) -> StateError:
        return StateError(f"state file {str(self.folder / name)!r} {problem}; the state folder cannot be "
                          f"resumed: {RECOVER}", start_over=True)

    def _read_json(self, name: str) -> dict:
        path = self.folder / name
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._error(name, f"is not valid JSON (truncated or corrupt: {exc})") from None
        except OSError as exc:
            raise self._error(name, f"cannot be read ({exc.strerror or exc})") from None
        if not isinstance(obj, dict):
            raise self._error(name, f"holds a JSON {type(obj).__name__}, not an object")
        if obj.get("format") != FORMAT_VERSION:
            raise self._error(name, f"has state format {obj.get('format')!r} (an older admm_kernels wrote "
                                    f"it), this version reads format {FORMAT_VERSION}")
        if obj.get("checksum") != json_checksum(obj):
            raise self._error(name, "does not match its checksum (it was edited or is corrupt)")
        return obj

    def load(self, expected_fingerprint: dict, layout: StateLayout) -> ResumePoint | None:
        """The verified saved state, or None when there is none (no state.json).

        Raises StateMismatchError when the saved run had other settings (naming the differing keys),
        StateError when state.json or any file it references is missing, truncated, modified, or holds
        other tensors than `layout` says. Every file's SHA-256 is checked here, before the caller
        touches the model."""
        if not self.exists():
            return None
        state = self._read_json(STATE_FILE)
        self._check_structure(state, layout)
        point = ResumePoint.from_record(state)
        saved = point.fingerprint
        diff = sorted(k for k in set(saved) | set(expected_fingerprint)
                      if saved.get(k) != expected_fingerprint.get(k))
        if diff:
            raise StateMismatchError(self.folder, {k: (saved.get(k), expected_fingerprint.get(k))
                                                   for k in diff})
        for b, name in enumerate(point.block_files):
            self._verify_file(point, name, {k: (tuple(s), d) for k, (s, d) in layout.blocks[b].items()})
        if point.acts_file:
            self._verify_file(point, point.acts_file, None, layout.windows)
        return point

    def _check_structure(self, state: dict, layout: StateLayout) -> None:
        def bad(problem: str) -> StateError:
            return self._error(STATE_FILE, problem)

        for key, kind in (("fingerprint", dict), ("next_block", int), ("block_files", list),
                          ("acts_file", str), ("files", dict), ("report", dict)):
            if not isinstance(state.get(key), kind) or (kind is int and isinstance(state[key], bool)):
                raise bad(f"has no valid {key!r} entry")
        nb = state["next_block"]
        if not 1 <= nb <= layout.end:
            raise bad(f"says the next block is {nb}, but this run has blocks 0-{layout.end - 1} to prune")
        if state["block_files"] != [block_file_name(b) for b in range(nb)]:
            raise bad(f"lists block files {state['block_files']!r}, expected one per finished block "
                      f"0-{nb - 1}")
        want_acts = acts_file_name(nb) if nb < layout.end else ""
        if state["acts_file"] != want_acts:
            raise bad(f"names activations file {state['acts_file']!r}, expected {want_acts!r}")
        for name in [*state["block_files"], *([want_acts] if want_acts else [])]:
            rec = state["files"].get(name)
            if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
                    and isinstance(rec.get("bytes"), int) and isinstance(rec.get("tensors"), dict)):
                raise bad(f"has no checksum record for {name}")

    def _verify_file(self, point: ResumePoint, name: str, expect: dict | None,
                     windows: tuple[int, int] | None = None) -> None:
        rec = point.files[name]
        path = self.folder / name
        if not path.is_file():
            raise self._error(name, "is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise self._error(name, f"has {size} bytes, the state recorded {rec['bytes']} (truncated or "
                                    "replaced)")
        if file_sha256(path) != rec["sha256"]:
            raise self._error(name, "does not match its recorded SHA-256 (the file was modified or is "
                                    "corrupt)")
        tensors = {k: (tuple(v["shape"]), v["dtype"]) for k, v in rec["tensors"].items()}
        if expect is not None and tensors != expect:
            missing = sorted(set(expect) - set(tensors))
            extra = sorted(set(tensors) - set(expect))
            other = sorted(k for k in set(expect) & set(tensors) if expect[k] != tensors[k])
            raise self._error(name, f"holds other layers than this run prunes (missing {missing}, unexpected "
                                    f"{extra}, other shape or dtype {other})")
        if windows is not None:
            shape = tensors.get("hidden", ((), ""))[0]
            if set(tensors) != {"hidden"} or len(shape) != 3 or tuple(shape[:2]) != tuple(windows):
                raise self._error(name, f"holds activations of shape {list(shape)}, expected "
                                        f"({windows[0]}, {windows[1]}, hidden) for the calibration windows")

    def _load_tensors(self, point: ResumePoint, name: str) -> dict[str, torch.Tensor]:
        try:
            tensors = load_file(self.folder / name)
        except (SafetensorError, OSError) as exc:
            raise self._error(name, f"cannot be read as safetensors ({exc})") from None
        if _tensor_record(tensors) != point.files[name]["tensors"]:
            raise self._error(name, "changed since it was verified")
        return tensors

    def block_weights(self, point: ResumePoint, block: int) -> dict[str, torch.Tensor]:
        """{layer name inside the block: pruned (out, in) weight} of a finished block (CPU tensors)."""
        return self._load_tensors(point, point.block_files[block])

    def activations(self, point: ResumePoint) -> torch.Tensor | None:
        """The saved (N, L, hidden) inputs of block point.next_block, or None after the last block."""
        if not point.acts_file:
            return None
        return self._load_tensors(point, point.acts_file)["hidden"]

    # -- writing -----------------------------------------------------------------------------------

    def _save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> dict:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        rec: dict = {}

        def write(tmp: Path) -> None:
            save_file(cpu, tmp)
            # Hash what is on the disk (read back from the page cache: ~1 GB/s), not what we meant to write.
            rec.update(sha256=file_sha256(tmp), bytes=tmp.stat().st_size)

        with writing("the resumable state file", self.folder / name):
            atomic_write_with(self.folder / name, write)
        rec["tensors"] = _tensor_record(cpu)
        return rec

    def save(self, fp: dict, next_block: int, block_weights: dict[str, torch.Tensor],
             acts: torch.Tensor | None, report: dict, previous: ResumePoint | None) -> ResumePoint:
        """Record that block next_block-1 is finished: its pruned weights, the inputs of next_block
        (None after the last block) and the report so far. Returns the new resume point (what load
        would return now). The folder must be locked by this thread."""
        _check_locked(self.folder, "saving the state")
        done = next_block - 1
        files = dict(previous.files) if previous else {}
        block_files = (list(previous.block_files) if previous else [])[:done]
        block_file = block_file_name(done)
        files[block_file] = self._save_tensors(block_file, block_weights)
        block_files.append(block_file)
        acts_file = ""
        if acts is not None:
            acts_file = acts_file_name(next_block)
            files[acts_file] = self._save_tensors(acts_file, {"hidden": acts})
        files = {k: v for k, v in files.items() if k in block_files or k == acts_file}
        # Through JSON, so that the point returned equals the one load() reads back (lists, not tuples).
        point = ResumePoint.from_record(json.loads(json.dumps(ResumePoint(
            fp, next_block, tuple(block_files), acts_file, files, report).record())))
        state = {"format": FORMAT_VERSION, **point.record()}
        state["checksum"] = json_checksum(state)
        atomic_write_json(self.folder / STATE_FILE, state)
        # Only now is the previous activation file unreferenced.
        if previous and previous.acts_file and previous.acts_file != acts_file:
            (self.folder / previous.acts_file).unlink(missing_ok=True)
            fsync_dir(self.folder)
        return point

    # -- extras of callers (e.g. the CLI's cached perplexity) ------------------------------------------

    def write_extra(self, name: str, data: dict) -> None:
        """Store a caller's JSON object as `name` (e.g. "run.json"), checksummed like state.json."""
        if name in (STATE_FILE, LOCK_FILE) or not name.endswith(".json") or "/" in name:
            raise ValueError(f"extra state file name must be a plain NAME.json other than {STATE_FILE}, "
                             f"got {name!r}")
        _check_locked(self.folder, "writing to the state")
        obj = {"format": FORMAT_VERSION, "data": data}
        obj["checksum"] = json_checksum(obj)
        atomic_write_json(self.folder / name, obj)

    def read_extra(self, name: str) -> dict | None:
        """The object stored by write_extra(name), or None when there is none. Raises StateError
        (naming the file) when it is corrupt, edited or of another format."""
        if not (self.folder / name).is_file():
            return None
        data = self._read_json(name).get("data")
        if not isinstance(data, dict):
            raise self._error(name, "has no data object")
        return data
