"""Safe file output: atomic durable writes, writability probes, temporary sibling folders that a later
run can tell apart from a live run's, the overlap test between an output and an input folder, and the
one-line errors of writes that fail for a reason of the filesystem (WriteError: no space, read-only, no
permission, ...; every write path raises it, and checks free space first where the sizes are known).

Atomic writes go to a temporary file in the target's folder, are fsync'ed, renamed with os.replace and
the folder is fsync'ed: a reader (or a machine that lost power) sees either the old file or the whole
new one, never a torn write. Files get the permissions a plain open() would give (mkstemp creates them
0600).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# ---------------------------------------------------------------------------------------------------
# write errors: one line naming the path, the reason and what to do

_ADVICE = {
    errno.ENOSPC: "free space on that filesystem or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free some of it or write somewhere else",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.EACCES: "no permission to write there: write somewhere else or change its permissions",
    errno.EPERM: "no permission to write there: write somewhere else or change its permissions",
    errno.EFBIG: "the file is too large for that filesystem: write somewhere else",
    errno.EIO: "the device reported an I/O error: check the disk, or write somewhere else",
}


def _mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class WriteError(OSError):
    """A file or folder could not be written for a reason of the filesystem (no space, read-only,
    no permission, ...). str() is one line: what, the path, the reason and what to do; `path` is the
    destination the caller meant (not a temporary name), `errno` the cause's."""

    def __init__(self, code: int | None, what: str, path: str | os.PathLike, reason: str | None = None,
                 needed: int | None = None, available: int | None = None):
        reason = reason or (os.strerror(code) if code else "write failed")
        sizes = ""
        if needed is not None:
            sizes = f" ({_mib(needed)} needed" + (f", {_mib(available)} available" if available is not None
                                                 else "") + ")"
        advice = _ADVICE.get(code, "check that location, or write somewhere else")
        message = f"cannot write {what} {str(path)!r}: {reason}{sizes}; {advice}"
        super().__init__(code, message) if code else super().__init__(message)
        self.message, self.path, self.what, self.reason = message, str(path), what, reason
        self.needed, self.available = needed, available

    def __str__(self) -> str:
        return self.message


# safetensors' Rust errors are not OSErrors: 'Error while serializing: I/O error: No space left on device
# (os error 28)'. The reason and the errno are what count; the temporary file it names means nothing.
_SAFETENSORS_IO = re.compile(r"I/O error: (?P<reason>.*?) \(os error (?P<errno>\d+)\)")


def write_error(exc: BaseException, what: str, path: str | os.PathLike) -> BaseException:
    """`exc` as a WriteError about `path` when it is a failed write (an OSError or safetensors' I/O
    error); anything else (a TypeError, an interrupt) is returned unchanged."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError):
        return WriteError(exc.errno, what, path, exc.strerror or str(exc))
    if type(exc).__name__ == "SafetensorError":
        m = _SAFETENSORS_IO.search(str(exc))
        if m:
            return WriteError(int(m["errno"]), what, path, m["reason"])
    return exc


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into a WriteError about `path` (see write_error)."""
    try:
        yield
    except Exception as exc:
        err = write_error(exc, what, path)
        if err is exc:
            raise
        raise err from exc


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the filesystem holding `path` (or its nearest existing folder)."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_free_space(needs: list[tuple[str, str | os.PathLike, int]]) -> None:
    """Raise WriteError (ENOSPC) before any work when what is going to be written does not fit.

    needs: (what, path, bytes) per output; outputs on the same filesystem are added up, and the error
    names the first of them with the total needed and the space available."""
    by_device: dict[int, list[tuple[str, str | os.PathLike, int]]] = {}
    for what, path, size in needs:
        by_device.setdefault(os.stat(nearest_existing(path)).st_dev, []).append((what, path, size))
    for group in by_device.values():
        needed = sum(size for _, _, size in group)
        available = free_bytes(group[0][1])
        if needed > available:
            what = " and ".join(w for w, _, _ in group)
            raise WriteError(errno.ENOSPC, what, group[0][1], "not enough free space", needed, available)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: setting the umask to read it races with files other threads create meanwhile.
_UMASK = _read_umask()


def file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 minus the process umask (read at import)."""
    return 0o666 & ~_UMASK


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames and unlinks inside `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Atomically create or replace `path` (its folder must exist) with what `write(tmp_path)` writes
    into a temporary file beside it: fsync the file, give it umask permissions, rename, fsync the
    folder. On any exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (the folder must exist)."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file below `folder` to the disk, then every folder in it and `folder` itself, so that
    renaming `folder` into place publishes data that is on the disk (a rename alone may reach the disk
    before the files' data do)."""
    root = Path(folder)
    entries = sorted(root.rglob("*"))
    for f in entries:
        if f.is_file() and not f.is_symlink():
            fsync_file(f)
    for d in [*(e for e in reversed(entries) if e.is_dir() and not e.is_symlink()), root]:
        fsync_dir(d)


def publish_folder(folder: str | os.PathLike) -> None:
    """Give a folder made by tempfile.mkdtemp (mode 0700) and its files the usual permissions
    (0777 / 0666 minus the umask) before it is renamed into place."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for f in Path(folder).rglob("*"):
        os.chmod(f, 0o777 & ~_UMASK if f.is_dir() else file_mode())


# ---------------------------------------------------------------------------------------------------
# writability

def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its closest existing ancestor (absolute, symlinks resolved)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.resolve()


def probe_writable(folder: str | os.PathLike) -> OSError | None:
    """Create and remove a folder inside `folder`; return the OSError that stopped it, or None.

    A real probe, not os.access: /proc, read-only mounts and root's permission bypass all make
    os.access answer yes for folders nothing can be created in."""
    try:
        probe = tempfile.mkdtemp(prefix=".write-probe-", dir=folder)
    except OSError as exc:
        return exc
    try:
        os.rmdir(probe)
    except OSError as exc:  # pragma: no cover - created but not removable: not a usable folder
        return exc
    return None


def unwritable_reason(what: str, folder: Path) -> str | None:
    """Why nothing named `what` (e.g. "--out 'x'") can be created in `folder` (the nearest existing
    folder of its path), as one line, or None when a probe could create something there."""
    if not folder.is_dir():
        return f"{what} cannot be created: {str(folder)!r} is not a folder"
    error = probe_writable(folder)
    if error is not None:
        return (f"{what} is not writable: nothing can be created in {str(folder)!r} "
                f"({error.strerror or error})")
    return None


# ---------------------------------------------------------------------------------------------------
# temporary sibling folders tagged with their creator's pid

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def pid_alive(pid: int) -> bool:
    """True unless no process `pid` exists (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def make_temp_sibling(target: Path) -> Path:
    """A new private folder `.NAME.tmp-PID-XXXX` beside `target`, in which a replacement is built.
    The pid in the name lets a later run remove it once this process is dead (see clean_stale_siblings)."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}{os.getpid()}-", dir=target.parent))


def old_sibling(target: Path) -> Path:
    """Where `target` is parked (`.NAME.old-PID`) while its replacement is renamed into place."""
    return target.with_name(f".{target.name}{_OLD_TAG}{os.getpid()}")


def clean_stale_siblings(target: Path) -> list[str]:
    """Tidy what a killed run left beside `target`; returns one line per action taken.

    `.NAME.tmp-PID-*` folders of dead processes are deleted. A `.NAME.old-PID` folder of a dead process
    is the previous output parked during a replace: it is deleted when `target` exists (the new one
    was renamed into place) and renamed back to `target` when it does not (the run died in between), so
    the previous output is never lost. Folders of live processes, and names without a pid (written by
    older versions), are left alone. Call it while holding the output's lock."""
    done: list[str] = []
    parent = target.parent
    if not parent.is_dir():
        return done
    pattern = re.compile(re.escape(f".{target.name}") + r"(\.tmp-|\.old-)(\d+)(-.*)?$")
    for entry in sorted(parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if m.group(1) == _OLD_TAG and m.group(3) is None and not target.exists():
            os.replace(entry, target)
            done.append(f"restored {target} from {entry.name} (left by process {pid}, which died "
                        "while replacing it)")
        elif m.group(1) == _TMP_TAG or m.group(3) is None:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry} (left by process {pid}, which is no longer running)")
    return done


# ---------------------------------------------------------------------------------------------------

def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` (symlinks resolved) are the same path or one lies inside the other."""
    ra, rb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return ra == rb or ra in rb.parents or rb in ra.parents
