"""The Grams of one dense decoder block's selected layers over calibration windows, filled the way
`prune_model`'s block loop fills them (admm_kernels.models.block.prune_block, without sequential
pruning): a discovery forward of window 0 groups the layers by shared input (GramHooks.plan), one stage
holds every group, window 0's recorded inputs are added first and windows 1..n-1 follow in order, each
through `BlockCall` exactly as the pipeline calls the block. Same windows, same order of additions,
same kernels: the same Grams, bit for bit (tests/cli/test_bench_harness.py checks it against prune_model).

What this adds for a caller that prunes nothing (`admm-prune bench`): with next_inputs=True each window's
output from the same pass overwrites its row of `acts`, so the block's outputs (the next block's inputs)
cost no second forward. prune_model cannot do that: its next inputs come from the pruned block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..gram import GramAccumulator
from .capture import BlockCall
from .grams import BlockPlan, GramHooks, StopBlock, sync


@dataclass(frozen=True)
class GramSettings:
    """How the Grams are accumulated: on `device`, in `dtype` (torch.float32 or torch.float64), and how a
    MoE block's experts are calibrated (prune_model's moe_calibration: "routed" or "all")."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    moe_calibration: str = "routed"


@dataclass
class BlockGrams:
    """One block's result. plan: the groups (layer -> leader; layers the forward never called are absent
    from plan.group_of); grams: leader -> its accumulator (gram (in, in) in the Gram dtype on the device,
    count = rows added); gram_seconds: time spent adding to the Grams; forward_seconds: the rest of the
    passes."""

    plan: BlockPlan
    grams: dict[str, GramAccumulator]
    gram_seconds: float
    forward_seconds: float


def _window(block: nn.Module, call: BlockCall, acts: torch.Tensor, j: int,
            device: torch.device) -> torch.Tensor | None:
    """Window j through the block; its output (1, L, hidden), or None when a hook ended the pass early."""
    try:
        return call(block, acts[j:j + 1].to(device))
    except StopBlock:
        return None


@torch.no_grad()
def block_grams(block: nn.Module, call: BlockCall, acts: torch.Tensor, layers: dict[str, nn.Module],
                settings: GramSettings, *, next_inputs: bool = False,
                on_window: Callable[[], None] | None = None) -> BlockGrams:
    """Accumulate the Grams G = Σ xᵀx of `layers` (name inside the block -> module) over every window.

    block: on settings.device already. acts: (n, L, hidden), the block's inputs (window j = acts[j]), in
    the model's activation dtype. next_inputs: overwrite acts[j] with the block's output for window j
    (the block is dense, so this is the next block's input); otherwise a pass may stop once every layer
    has seen its input. on_window(): called after each window (progress bars)."""
    n = acts.shape[0]
    hooks = GramHooks(layers, settings.device, settings.dtype, settings.moe_calibration)
    t = time.perf_counter()
    try:
        out = _window(block, call, acts, 0, settings.device)  # discovery: groups and call order
        plan = hooks.plan()
        # Before acts[0] is overwritten: a layer's recorded input may be a view of it.
        hooks.begin_stage(plan.leaders, use_discovery_inputs=True, stop_early=not next_inputs)
        if next_inputs:
            acts[0] = out[0].to(acts.device)
        if on_window is not None:
            on_window()
        for j in range(1, n):
            hooks.new_window()
            out = _window(block, call, acts, j, settings.device)
            if next_inputs:
                acts[j] = out[0].to(acts.device)
            if on_window is not None:
                on_window()
        sync(settings.device)
        grams = hooks.end_stage()
    finally:
        hooks.remove()
    spent = time.perf_counter() - t
    return BlockGrams(plan=plan, grams=grams, gram_seconds=hooks.seconds,
                      forward_seconds=spent - hooks.seconds)
