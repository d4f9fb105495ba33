"""Where the hidden states of the calibration (and evaluation) windows live between blocks.

    "device"  on the compute device (the default: no transfers)
    "cpu"     in host memory (prune_model offload=True / "cpu", CLI --offload): the device holds one window
    "disk"    in a file (offload="disk", CLI --offload-dir DIR): an (N, L, hidden) tensor mapped from a file
              in `folder` (default: the system's temporary folder), for calibration sets larger than host
              memory. The file is unlinked as soon as it is mapped, so nothing is left behind, whatever
              happens to the process; its pages are file-backed, so the kernel writes them out and drops
              them under memory pressure instead of the process running out of memory. Its disk space is
              reserved when it is created (posix_fallocate): a disk too small for it is an error naming
              the folder and the bytes needed, never a SIGBUS when a page is written back later.

All three hand out ordinary tensors, so the pipeline indexes them the same way (acts[j] = ...).
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path

import torch

from .._io import WriteError, check_free_space, free_bytes, write_error

PLACES = ("device", "cpu", "disk")


def resolve_offload(offload) -> str:
    """prune_model's `offload` argument -> one of PLACES (False/None: device, True: cpu)."""
    if offload is None or offload is False:
        return "device"
    if offload is True:
        return "cpu"
    if isinstance(offload, str) and offload in PLACES:
        return offload
    raise ValueError(f"offload must be False, True, 'cpu' or 'disk' (or 'device'), got {offload!r}")


def _reserve(fd: int, nbytes: int, folder: Path) -> None:
    """Allocate `nbytes` of disk blocks to the open file `fd` (posix_fallocate), or raise WriteError
    with the bytes needed and available. Where the filesystem cannot preallocate, the file is only
    sized, after checking that the free space covers it."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            available = free_bytes(folder)
            raise WriteError(exc.errno, "the activation file in offload_dir", folder, exc.strerror,
                             needed=nbytes, available=available) from None
    except AttributeError:  # pragma: no cover - no posix_fallocate on this platform
        pass
    check_free_space([("the activation file in offload_dir", folder, nbytes)])
    os.ftruncate(fd, nbytes)


class ActivationStore:
    """Allocates activation tensors in one place (see the module docstring)."""

    def __init__(self, where: str, device: torch.device, folder: str | os.PathLike | None = None):
        if where not in PLACES:
            raise ValueError(f"activation place must be one of {PLACES}, got {where!r}")
        if folder is not None and where != "disk":
            raise ValueError(f"offload_dir is only used with offload='disk', got offload={where!r}")
        self.where = where
        self.device = device if where == "device" else torch.device("cpu")
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        if where == "disk" and not self.folder.is_dir():
            raise ValueError(f"offload_dir {str(self.folder)!r} is not an existing folder")
        self.bytes_on_disk = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in this store's place."""
        if self.where != "disk":
            return torch.empty(shape, dtype=dtype, device=self.device)
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        what = "the activation file in offload_dir"
        try:
            fd, name = tempfile.mkstemp(prefix=f"admm-acts-{os.getpid()}-", suffix=".bin", dir=self.folder)
        except OSError as exc:
            raise write_error(exc, what, self.folder) from exc
        try:
            # Claim every block now. A sparse file (ftruncate alone) gets its blocks only as pages are
            # written back, and a shared mapping that cannot get them kills the process with SIGBUS,
            # with no message and no state saved.
            _reserve(fd, max(nbytes, 1), self.folder)
            t = torch.from_file(name, shared=True, size=max(numel, 1), dtype=dtype)
        except WriteError:
            raise
        except (OSError, RuntimeError) as exc:
            err = write_error(exc, what, self.folder)
            raise (err if err is not exc else OSError(
                f"cannot create {what} {str(self.folder)!r} ({nbytes / 2**20:.0f} MiB): {exc}")) from exc
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping keeps the space until the tensor is freed
        self.bytes_on_disk += nbytes
        return t[:numel].view(shape)
