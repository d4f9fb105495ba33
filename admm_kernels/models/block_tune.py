"""Block tuning: a short masked fine-tune of a pruned decoder block towards its dense outputs.

After the layer-wise solves of a block, the block as a whole still differs from the dense block: each
layer was fitted to its own inputs, not to what the block finally computes. Block tuning takes the dense
block's outputs on the same (pruned-model) calibration inputs as targets, taken before the block is
pruned, and runs a few epochs of Adam on the kept weights of the block's pruned layers, minimising the
mean-squared error of the block's outputs; the pruned positions are re-zeroed after every step, so the
masks (and any N:M pattern) stay exactly as the solver left them.

Measured (benchmarks/RESULTS.md, "Whole model: ADMM presets, OWL and sequential pruning"): SmolLM2-135M
at 70 % with preset="accurate", 32 × 256 calibration tokens, 8 epochs at lr 1e-4 in batches of 4
windows: perplexity 97.07 -> 88.40 through the CLI (0.801x ADMM-Grad's 110.40; each block's output
error 0.16-0.93x the untuned block's), at 4x the run's time on a 1-thread CPU. A scratch loop that kept
4 of the 32 windows aside saw their block loss fall with the training loss in every block (no
over-fitting at 8 epochs).

Cost: one extra forward of every window before the block is pruned (the targets, kept beside the
activations: same shape and place) and `epochs` forward + backward passes after it. Single process
only for now (a distributed run would need the gradients all-reduced over ranks with unequal window
counts); float32 blocks only (Adam on half-precision weights loses the small steps).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ArgumentError, ArgumentTypeError
from .capture import BlockCall
from .discovery import get_weight
from .experts import ExpertProjection
from .plain_params import ParamLinear


@dataclass(frozen=True)
class BlockTune:
    """epochs: passes over the calibration windows (0 = off); lr: Adam's learning rate; batch: windows
    per step."""

    epochs: int = 0
    lr: float = 1e-4
    batch: int = 4

    @property
    def enabled(self) -> bool:
        return self.epochs > 0

    def fingerprint(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch": self.batch}


# Block tuning helped most at 8-12 epochs (benchmarks/RESULTS.md); each epoch is a pass over the whole
# calibration set per block, so far more is a typo that would run for days instead of failing.
MAX_TUNE_EPOCHS = 1000


def check_block_tune(epochs, lr, batch) -> BlockTune:
    """BlockTune from prune_model's tune_epochs / tune_lr / tune_batch; ArgumentError (a ValueError) /
    ArgumentTypeError (a TypeError) naming the argument otherwise."""
    for name, v in (("tune_epochs", epochs), ("tune_batch", batch)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ArgumentTypeError(f"{name} must be an int, got {v!r}", name)
    if epochs < 0:
        raise ArgumentError(f"tune_epochs must be >= 0 (0 = no block tuning), got {epochs}", "tune_epochs")
    if epochs > MAX_TUNE_EPOCHS:
        raise ArgumentError(f"tune_epochs must be at most {MAX_TUNE_EPOCHS}, got {epochs}", "tune_epochs")
    if batch < 1:
        raise ArgumentError(f"tune_batch must be >= 1 window, got {batch}", "tune_batch")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ArgumentError(f"tune_lr must be a finite number > 0, got {lr!r}", "tune_lr")
    return BlockTune(int(epochs), float(lr), int(batch))


def check_tunable(layers: dict[str, nn.Module], index: int) -> None:
    """The block's pruned layers must hold float32 trainable weights."""
    for rel, module in layers.items():
        w = get_weight(module)
        if w.dtype != torch.float32:
            raise ValueError(f"block tuning needs float32 weights, but block {index}'s {rel} is {w.dtype}: "
                             "load the model in float32 or leave tune_epochs at 0")


@torch.no_grad()
def dense_targets(block: nn.Module, call: BlockCall, acts: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """The dense block's outputs on every window of acts (n, L, hidden), where acts live."""
    out = torch.empty_like(acts)
    for j in range(acts.shape[0]):
        out[j] = call(block, acts[j:j + 1].to(device))[0].to(out.device)
    return out


def _window_loss(block: nn.Module, call: BlockCall, acts: torch.Tensor, targets: torch.Tensor,
                 windows: list[int], device: torch.device) -> torch.Tensor:
    total = 0.0
    for j in windows:
        y = call(block, acts[j:j + 1].to(device))[0]
        total = total + torch.nn.functional.mse_loss(y.float(), targets[j].to(device).float())
    return total / len(windows)


def _tunable(layers: dict[str, nn.Module], index: int) -> tuple[list[nn.Parameter], list[tuple]]:
    """The parameters holding the layers' weights, each once, with (multiplier re-imposing the pruned
    zeros, gradient mask or None) in the parameter's own layout (Conv1D stores the transpose; a fused
    experts parameter holds every expert, of which only the selected projections are tuned)."""
    params: list[nn.Parameter] = []
    masks: list[tuple] = []
    fused: dict[int, torch.Tensor] = {}
    for module in layers.values():
        if isinstance(module, (ExpertProjection, ParamLinear)):  # a view into a parameter holding more
            w = module.parameter()
            if id(w) not in fused:
                fused[id(w)] = torch.zeros_like(w, dtype=torch.bool)  # its strides: the views fit
                params.append(w)
                masks.append(None)
            module.view_of(fused[id(w)]).fill_(True)
            continue
        w = module.weight
        if not isinstance(w, nn.Parameter):
            raise TypeError(f"block {index}: block tuning needs nn.Parameter weights, got {type(w).__name__}")
        params.append(w)
        masks.append((w.detach() != 0, None))
    for i, p in enumerate(params):
        if masks[i] is None:
            keep = fused[id(p)]
            masks[i] = ((p.detach() != 0) | ~keep, keep.to(p.dtype))
    return params, masks


def tune_block(block: nn.Module, index: int, layers: dict[str, nn.Module], call: BlockCall,
               acts: torch.Tensor, targets: torch.Tensor, device: torch.device, tune: BlockTune) -> dict:
    """Fine-tune the kept weights of `layers` (the block's pruned linears, on `device`) so that the block
    maps acts (n, L, hidden) to targets (the dense block's outputs); zeros stay zeros. The window order
    of each epoch is drawn from a generator seeded with the block index (reproducible). Returns
    {"block", "loss_before", "loss_after"} (mean-squared error over every window)."""
    n = acts.shape[0]
    every = list(range(n))
    params, masks = _tunable(layers, index)
    flags = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            before = float(_window_loss(block, call, acts, targets, every, device))
        for p in params:
            p.requires_grad_(True)
        # Entries outside the selection (experts of a fused parameter that were not pruned) get a zero
        # gradient, so Adam leaves them exactly as they are.
        grad_hooks = [p.register_hook(lambda g, keep=keep: g * keep)
                      for p, (_, keep) in zip(params, masks) if keep is not None]
        opt = torch.optim.Adam(params, lr=tune.lr)
        g = torch.Generator().manual_seed(index)
        with torch.enable_grad():
            for _ in range(tune.epochs):
                order = torch.randperm(n, generator=g).tolist()
                for i in range(0, n, tune.batch):
                    opt.zero_grad(set_to_none=True)
                    loss = _window_loss(block, call, acts, targets, order[i:i + tune.batch], device)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for p, (m, _) in zip(params, masks):
                            p.mul_(m)
        del opt
        for h in grad_hooks:
            h.remove()
        for p in params:
            p.grad = None
        with torch.no_grad():
            after = float(_window_loss(block, call, acts, targets, every, device))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return {"block": index, "loss_before": before, "loss_after": after}
