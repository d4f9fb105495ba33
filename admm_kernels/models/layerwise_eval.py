"""Perplexity computed block by block, for models that never sit in memory whole (StreamedModel).

The evaluation windows' inputs of block 0 are captured once (the model's own stem), pushed through each
block as it becomes available (advance), and finally through the model's own norm and head
(capture.head_runner), giving the same per-window losses as a full forward. Two drivers:
streamed_perplexity reads each dense block from the checkpoint and frees it (the perplexity before
pruning); the CLI registers LayerwisePerplexity.advance in StreamedModel.on_block_final, so each pruned
block is evaluated while the pipeline has it loaded (the perplexity after pruning, without reading the
model again). Windows are split over the ranks of a distributed run; the per-window losses are summed
in window order (admm_kernels.perplexity.perplexity_from).
"""

from __future__ import annotations

import torch
from torch import nn

from ..perplexity import perplexity_from, window_nll
from .activations import ActivationStore, resolve_offload
from .capture import capture_inputs, head_runner
from .discovery import find_blocks
from .distributed import Comm, shard


class LayerwisePerplexity:
    """windows: (n, seqlen) int64 token ids; this rank evaluates its share (distributed.shard)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, device: torch.device, comm: Comm,
                 store: ActivationStore):
        self.model, self.windows, self.device, self.comm = model, windows, device, comm
        _, self.blocks = find_blocks(model)
        self.mine = shard(windows.shape[0], comm.size, comm.rank)
        self.hidden, self.calls = capture_inputs(model, self.blocks, windows, device, store.device,
                                                 windows=self.mine, empty=store.empty)
        self.next_block = 0

    @torch.no_grad()
    def advance(self, b: int, block: nn.Module) -> None:
        """Run this rank's windows through block b (its weights loaded; moved to the device and back)."""
        if b != self.next_block:
            raise RuntimeError(f"layer-wise evaluation expected block {self.next_block}, got block {b}")
        if self.hidden is not None:
            home = next(block.parameters()).device
            try:
                block.to(self.device)
                for row in range(self.hidden.shape[0]):
                    out = self.calls[b](block, self.hidden[row:row + 1].to(self.device))
                    self.hidden[row] = out[0].to(self.hidden.device)
            finally:
                block.to(home)
        self.next_block += 1

    @torch.no_grad()
    def result(self) -> float:
        """The perplexity, once every block was passed (on every rank: the losses are all-reduced)."""
        if self.next_block != len(self.blocks):
            raise RuntimeError(f"layer-wise evaluation has passed {self.next_block} of {len(self.blocks)} "
                               "blocks")
        nll = torch.zeros(self.windows.shape[0], dtype=torch.float64)
        if self.hidden is not None:
            # the last block the model's forward calls returns the final hidden states (a block it skips
            # for text input, such as Mllama's cross-attention layers, would never return them)
            last = max(i for i, c in enumerate(self.calls) if not c.skipped)
            with head_runner(self.model, self.blocks, self.device, self.calls[-1].output_form, last) as run:
                for row, i in enumerate(self.mine):
                    x = self.windows[i:i + 1]
                    nll[i] = window_nll(run(x, self.hidden[row:row + 1]), x.to(self.device))
        self.hidden = None
        self.comm.all_reduce_sum_(nll, "perplexity: summing the windows' losses")
        return perplexity_from(nll, self.windows.shape[1])


def streamed_perplexity(streamed, windows: torch.Tensor, device: torch.device, comm: Comm, offload=False,
                        offload_dir=None, progress: bool = False) -> float:
    """Perplexity of a StreamedModel's dense checkpoint: each block is read, evaluated and freed."""
    store = ActivationStore(resolve_offload(offload), device, offload_dir)
    evaluator = LayerwisePerplexity(streamed.model, windows, device, comm, store)
    it = range(len(streamed.blocks))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="perplexity (streamed)", unit="block", leave=False)
    for b in it:
        streamed.load_block(b)
        try:
            evaluator.advance(b, streamed.blocks[b])
        finally:
            streamed.release_block(b)
    return evaluator.result()
