"""The pipeline's view of torch.distributed (docs/DESIGN.md, "Distributed and streamed runs"): who this
process is, the few collectives the pipeline needs, and what happens when a peer dies or hangs.

Launch with torchrun (`torchrun --nproc-per-node N -m admm_kernels prune ...`), which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_environment` then creates the process
group. Backend: gloo for the CPU; for CUDA "cpu:gloo,cuda:nccl" (NCCL for device tensors, gloo for the
few CPU tensors and objects). `backend="gloo"` forces gloo everywhere (CUDA tensors are then staged
through host memory); `backend="nccl"` on a CPU device is refused.

Faults: every collective runs under the process group's timeout (`timeout_s`). A peer
that died makes gloo fail at once ("Connection reset by peer"); a peer that hangs makes it fail after the
timeout. Either way `Comm` raises DistributedError naming this rank, the step and the timeout, so every
surviving rank stops within the timeout with one clear line instead of a C++ stack trace. For NCCL,
TORCH_NCCL_BLOCKING_WAIT=1 is set (unless the user set it) so a timed-out collective raises in Python
instead of the watchdog aborting the process.

Single-process runs use LOCAL (world size 1): every collective is a no-op, so the pipeline has one code
path.

Result against one process: the same up to the order of the Gram sums (each rank sums its windows, then the
all-reduce adds the ranks' partial Grams). Tested on tiny models (tests/distributed/test_distributed.py, 2
and 3 ranks): every layer's relative error equal to 1e-5 relative, weights to 1e-4 (relative Frobenius
norm), masks equal except for at most 0.1 % of the entries, perplexity equal to 1e-4 relative. Through the
30 blocks of SmolLM2 the differences compound like any change of summation order (0.18 % in perplexity, less
than 1 vs 2 threads: benchmarks/RESULTS.md). Evaluation sums per-window losses in window order, so a model's
perplexity is the same float on any number of ranks.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence

import torch

from ..errors import ArgumentError

WORLD_ENV = "WORLD_SIZE"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; covers rank 0's state saves and digests
BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the ranks disagree.

    peer_failed: True when the run stopped because another rank died, hung or failed (the work done so
    far is in the state folder, if any: a caller that can resume says so); False for setups that never
    started (no process group, ranks that disagree)."""

    def __init__(self, message: str, peer_failed: bool = False):
        super().__init__(message)
        self.peer_failed = peer_failed

    def __reduce__(self):
        return type(self), (str(self), self.peer_failed)


class Comm:
    """Rank, world size and the pipeline's collectives. LOCAL is the one-process instance; `Comm.world()`
    wraps the default process group of torch.distributed.

    Every collective takes `what`, a few words naming the step for the error message."""

    def __init__(self, rank: int = 0, world: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
                 gloo_only: bool = False):
        self.rank = rank
        self.size = world
        self.timeout_s = timeout_s
        self.gloo_only = gloo_only   # stage device tensors through the CPU (gloo on CUDA tensors)
        self.seconds = 0.0           # time spent inside collectives (waiting included)

    @classmethod
    def world(cls, timeout_s: float | None = None) -> Comm:
        """The Comm of the initialised default process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("torch.distributed has no initialised process group")
        backend = str(dist.get_backend()).lower()
        return cls(dist.get_rank(), dist.get_world_size(),
                   DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s, gloo_only="nccl" not in backend)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # -- error handling ------------------------------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> DistributedError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DistributedError(
            f"{self.describe()}: {what} failed: another rank died or did not answer within the "
            f"{self.timeout_s:g} s timeout (timeout_s), so every rank stops ({first[:300]})",
            peer_failed=True)

    def _run(self, what: str, fn):
        import torch.distributed as dist

        t = time.perf_counter()
        try:
            return fn(dist)
        except DistributedError:
            raise
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            raise self._fail(what, exc) from exc
        finally:
            self.seconds += time.perf_counter() - t

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        # gloo takes CUDA tensors for some collectives only: send a host copy instead.
        return t.cpu() if self.gloo_only and t.device.type != "cpu" else t

    # -- collectives -----------------------------------------------------------------------------------

    def all_reduce_sum_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `t` over all ranks in place (in t's dtype); returns t."""
        if self.distributed:
            buf = self._staged(t)
            self._run(what, lambda dist: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """Overwrite `t` on every rank with src's `t` (same shape and dtype everywhere); returns t."""
        if self.distributed:
            buf = self._staged(t)
            if t.dtype == torch.bool:  # not every backend reduces/broadcasts bool
                buf = buf.view(torch.uint8)
            self._run(what, lambda dist: dist.broadcast(buf, src=src))
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf.view(t.dtype) if t.dtype == torch.bool else buf)
        return t

    def all_gather_objects(self, obj, what: str) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        self._run(what, lambda dist: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj, src: int, what: str):
        """src's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        self._run(what, lambda dist: dist.broadcast_object_list(box, src=src))
        return box[0]

    def barrier(self, what: str) -> None:
        if self.distributed:
            self._run(what, lambda dist: dist.barrier())

    def gather_rows(self, local: torch.Tensor, counts: Sequence[int], out: torch.Tensor | None,
                    what: str) -> torch.Tensor | None:
        """Rank 0 receives every rank's `local` rows (rank r holds counts[r] rows, in rank order) into
        `out` (sum(counts), ...) and returns it; other ranks send theirs and return None. Rows move in
        chunks of at most 64 MiB so a large activation tensor is never copied whole."""
        if not self.distributed:
            if out is not None and out.data_ptr() != local.data_ptr():
                out.copy_(local)
            return out if out is not None else local
        starts = [sum(counts[:r]) for r in range(self.size)]
        if self.rank == 0:
            out[: counts[0]].copy_(local)
            for r in range(1, self.size):
                self._recv_rows(out[starts[r]: starts[r] + counts[r]], r, what)
            return out
        self._send_rows(local, 0, what)
        return None

    def scatter_rows(self, full: torch.Tensor | None, counts: Sequence[int], local: torch.Tensor,
                     what: str) -> torch.Tensor:
        """The reverse of gather_rows: rank 0's `full` rows go to every rank's `local` (counts[r] rows)."""
        if not self.distributed:
            if local.data_ptr() != full.data_ptr():
                local.copy_(full)
            return local
        starts = [sum(counts[:r]) for r in range(self.size)]
        if self.rank == 0:
            local.copy_(full[: counts[0]])
            for r in range(1, self.size):
                self._send_rows(full[starts[r]: starts[r] + counts[r]], r, what)
        else:
            self._recv_rows(local, 0, what)
        return local

    def _chunks(self, rows: torch.Tensor):
        per_row = max(1, rows[0].numel() * rows.element_size()) if rows.shape[0] else 1
        step = max(1, (64 << 20) // per_row)
        for i in range(0, rows.shape[0], step):
            yield rows[i:i + step]

    def _send_rows(self, rows: torch.Tensor, dst: int, what: str) -> None:
        for chunk in self._chunks(rows):
            buf = self._staged(chunk.contiguous())
            self._run(what, lambda dist, b=buf: dist.send(b, dst=dst))

    def _recv_rows(self, rows: torch.Tensor, src: int, what: str) -> None:
        for chunk in self._chunks(rows):
            buf = torch.empty(chunk.shape, dtype=chunk.dtype,
                              device="cpu" if self.gloo_only else chunk.device)
            self._run(what, lambda dist, b=buf: dist.recv(b, src=src))
            chunk.copy_(buf)

    # -- agreement on a rank-0 decision ------------------------------------------------------------------

    def decided_by_main(self, decide, what: str):
        """Run `decide()` on rank 0 and return its result on every rank. When it raises on rank 0, rank 0
        re-raises it and the other ranks raise DistributedError quoting it (so nobody waits for the
        timeout)."""
        if not self.distributed:
            return decide()
        result, error = None, None
        if self.rank == 0:
            try:
                result = decide()
            except Exception as exc:  # re-raised below, after the others heard of it
                error = exc
        message = self.broadcast_object(
            (result, None) if error is None else (None, f"{type(error).__name__}: {error}"), 0, what)
        if error is not None:
            raise error
        if message[1] is not None:
            raise DistributedError(f"{self.describe()}: stopping because rank 0 failed ({what}): "
                                   f"{message[1]}", peer_failed=True)
        return message[0]


LOCAL = Comm()


def shard(n: int, world: int, rank: int) -> range:
    """The contiguous share of items 0..n-1 that `rank` handles: sizes differ by at most one, lower ranks
    take the remainder (n=5, world=3: [0,1], [2,3], [4])."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_counts(n: int, world: int) -> list[int]:
    return [len(shard(n, world, r)) for r in range(world)]


def assign_by_cost(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job so the ranks' summed costs are balanced: longest job first, each to the
    least-loaded rank (ties: the lower rank, then the earlier job), so every rank computes the same
    assignment. LPT's makespan is within 4/3 of the optimum."""
    loads = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[j] = r
        loads[r] += costs[j]
    return owner


def resolve_comm(distributed: bool | Comm | None, timeout_s: float | None = None) -> Comm:
    """The Comm for prune_model / evaluate_perplexity's `distributed` argument: None = the default process
    group when one is initialised with more than one rank, else LOCAL; False = LOCAL; True = the process
    group (DistributedError when there is none); a Comm is used as given."""
    if isinstance(distributed, Comm):
        return distributed
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, a bool or a Comm, got {type(distributed).__name__}")
    if distributed is False:
        return LOCAL
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if distributed is True and not initialised:
        raise ValueError("distributed=True needs an initialised torch.distributed process group (run under "
                         "torchrun and call admm_kernels.models.distributed.init_from_environment, or "
                         "torch.distributed.init_process_group)")
    if not initialised:
        return LOCAL
    comm = Comm.world(timeout_s)
    return comm if comm.distributed or distributed else LOCAL


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    text = os.environ.get(WORLD_ENV, "").strip()
    try:
        return max(1, int(text)) if text else 1
    except ValueError:
        raise ValueError(f"environment variable {WORLD_ENV}={text!r} is not an integer") from None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0)


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank under torchrun: "cuda" means cuda:LOCAL_RANK; an explicit index is refused
    when several ranks would share it (ArgumentError naming `device`); the CPU stays the CPU."""
    if device.type != "cuda":
        return device
    lr = local_rank()
    if device.index is not None and launched_world_size() > 1:
        raise ArgumentError(f"device {str(device)!r} names one GPU, but every rank of a distributed run uses "
                            "its own: give device 'cuda' (rank r uses cuda:LOCAL_RANK)", "device")
    if lr >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {lr} has no GPU: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s); start at most that many ranks per node (torchrun --nproc-per-node)")
    return torch.device("cuda", lr)


def backend_for(device: torch.device, backend: str = "auto") -> str:
    """The process-group backend string for a compute device (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "gloo":
        return "gloo"
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    if backend == "nccl":
        raise ValueError(f"distributed backend 'nccl' needs CUDA devices, but the device is {device}; use "
                         "gloo (the default for the CPU)")
    return "gloo"


def init_from_environment(device: torch.device, backend: str = "auto",
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """Create the default process group from torchrun's environment (if WORLD_SIZE > 1 and none exists)
    and return its Comm; LOCAL when not launched with several ranks. `device` must already be the rank's
    device (rank_device)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"distributed timeout must be a positive number of seconds, got {timeout_s!r}")
    if launched_world_size() <= 1:
        return LOCAL
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("this build of torch has no torch.distributed")
    if not dist.is_initialized():
        name = backend_for(device, backend)
        if "nccl" in name:
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=name, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {os.environ.get('RANK', '?')}: could not join the process group "
                                   f"({name}, timeout {timeout_s:g} s): {str(exc).splitlines()[0]}") from exc
    return Comm.world(timeout_s)


def shutdown() -> None:
    """Destroy the default process group if one exists (end of a CLI run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

