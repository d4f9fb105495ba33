"""Block sources: where prune_model's loop gets each decoder block from and where a final block goes.

`InMemoryBlocks`: the whole model is in memory; loading and finishing a block do nothing, and the loop
stops after the last block with selected layers. `StreamedBlocks` (a StreamedModel,
admm_kernels.models.streaming): block b is read from the checkpoint just before its turn and written
out and freed as soon as it is final; every block is visited, since every block goes to the output.
Both have the same methods, so the loop never asks which one it has.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import model_device
from .streaming import StreamedModel


class InMemoryBlocks:
    """Every block is in memory already (see the module docstring)."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def home(self) -> torch.device:
        """The model's device: the default compute device."""
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def visits(self, end: int, n_blocks: int) -> range:
        """The blocks the loop goes through: those up to the last one with work (`end` exclusive)."""
        return range(end)

    def load(self, block: int) -> None:
        """Already in memory."""

    def done(self, block: int) -> None:
        """Nothing to write or free."""

    def finish(self) -> None:
        """Nothing to complete."""

    def release(self) -> None:
        """Nothing held."""

    def dense_digest(self) -> str | None:
        """None: the fingerprint digests the model in memory."""
        return None


class StreamedBlocks:
    """The blocks of a StreamedModel, loaded one at a time (see the module docstring)."""

    streamed = True

    def __init__(self, streamed: StreamedModel):
        self.streamed_model = streamed
        self.model = streamed.model
        self._loaded: int | None = None

    @property
    def home(self) -> torch.device:
        """Blocks are read into host memory."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.streamed_model.dtype

    def visits(self, end: int, n_blocks: int) -> range:
        """Every block: the ones after the last with work are written to the output too."""
        return range(n_blocks)

    def load(self, block: int) -> None:
        """Read the block's weights from the checkpoint."""
        self.streamed_model.load_block(block)
        self._loaded = block

    def done(self, block: int) -> None:
        """The block is final: write it to the output and free it."""
        self.streamed_model.block_done(block)
        self._loaded = None

    def finish(self) -> None:
        """Complete the output folder (index, config)."""
        self.streamed_model.finish_output()

    def release(self) -> None:
        """Free a block still loaded (a run that failed while the block was in memory)."""
        if self._loaded is not None:
            self.streamed_model.release_block(self._loaded)
            self._loaded = None

    def dense_digest(self) -> str:
        """model_digest of the dense model, from the checkpoint (equal to the in-memory model's)."""
        return self.streamed_model.digest()


def block_source(model: nn.Module | StreamedModel) -> InMemoryBlocks | StreamedBlocks:
    """The block source of prune_model's `model`."""
    return StreamedBlocks(model) if isinstance(model, StreamedModel) else InMemoryBlocks(model)
