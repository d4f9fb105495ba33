"""Checkpointers: what the block loop of prune_model saves after each block and where a run starts.

Two kinds, with the same methods, so the loop never asks which one it has:

* `NoCheckpoint`: nothing is saved and every run starts at block 0 (no state_dir, and every rank but 0
  of a distributed run: rank 0 alone owns the state).
* `StateCheckpoint`: a verified resumable state folder (admm_kernels.models.state.PipelineState),
  locked for the run. `resume` verifies the folder against the run's fingerprint and returns the typed
  `ResumePoint` (or None for a fresh folder); `save` records a finished block and keeps the new point;
  `block_weights` / `activations` read the finished blocks and the next block's inputs through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .._io import check_free_space
from .state import PipelineState, ResumePoint, StateLayout


class NoCheckpoint:
    """Saves nothing; every run starts at block 0."""

    saving = False

    def lock(self, stack: contextlib.ExitStack) -> None:
        """Nothing to lock."""

    def resume(self, fingerprint: Callable[[], dict], layout: StateLayout) -> ResumePoint | None:
        """None: there is nothing to continue (the fingerprint, costly, is never computed)."""
        return None

    def check_space(self, nbytes: int) -> None:
        """Nothing is written."""

    def save(self, next_block: int, weights: dict[str, torch.Tensor], acts: torch.Tensor | None,
             report: dict) -> None:
        """Nothing is written."""

    def block_weights(self, block: int) -> dict[str, torch.Tensor]:
        raise RuntimeError("NoCheckpoint holds no finished block")

    def activations(self) -> torch.Tensor | None:
        raise RuntimeError("NoCheckpoint holds no activations")


class StateCheckpoint:
    """The resumable state in `store`'s folder (see the module docstring). Not thread-safe: one run."""

    saving = True

    def __init__(self, store: PipelineState):
        self.store = store
        self.fingerprint: dict | None = None
        self.point: ResumePoint | None = None

    def lock(self, stack: contextlib.ExitStack) -> None:
        """Take the folder's lock until `stack` closes (StateInUseError at once when another run has it)."""
        stack.enter_context(self.store.lock())

    def resume(self, fingerprint: Callable[[], dict], layout: StateLayout) -> ResumePoint | None:
        """The verified resume point of the folder, or None when it holds no state yet. fingerprint():
        the run's settings (computed here, once); layout: the tensors the run expects to find. Raises
        StateError (StateMismatchError for other settings) before anything of the model is touched."""
        self.fingerprint = fingerprint()
        self.point = self.store.load(self.fingerprint, layout)
        return self.point

    def check_space(self, nbytes: int) -> None:
        """WriteError (ENOSPC) now when the folder's disk cannot take `nbytes` more."""
        check_free_space([("the resumable state", self.store.folder, nbytes)])

    def save(self, next_block: int, weights: dict[str, torch.Tensor], acts: torch.Tensor | None,
             report: dict) -> None:
        """Record that block next_block - 1 is finished: its pruned weights {layer name inside the block:
        (out, in)}, the (N, L, hidden) inputs of next_block (None after the last block) and the report so
        far."""
        self.point = self.store.save(self.fingerprint, next_block, weights, acts, report, self.point)

    def block_weights(self, block: int) -> dict[str, torch.Tensor]:
        """{layer name inside the block: pruned (out, in) weight} of a finished block (CPU tensors)."""
        return self.store.block_weights(self.point, block)

    def activations(self) -> torch.Tensor | None:
        """The saved (N, L, hidden) inputs of the resume point's next block (None after the last)."""
        return self.store.activations(self.point)


def checkpointer(state_dir, is_main: bool) -> NoCheckpoint | StateCheckpoint:
    """The run's checkpointer: the state folder `state_dir` on rank 0 (is_main), else none."""
    if state_dir is None or not is_main:
        return NoCheckpoint()
    return StateCheckpoint(PipelineState(state_dir))
