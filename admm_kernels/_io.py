"""Safe file output: atomic durable writes, writability probes, temporary sibling folders that a later
run can tell apart from a live run's, and the overlap test between an output and an input folder.

Atomic writes go to a temporary file in the target's folder, are fsync'ed, renamed with os.replace and
the folder is fsync'ed: a reader (or a machine that lost power) sees either the old file or the whole
new one, never a torn write. Files get the permissions a plain open() would give (mkstemp creates them
0600).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
