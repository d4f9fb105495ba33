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

Cost: `epochs` forward + backward passes over the windows and one forward for the loss before tuning.
The targets are kept from the Gram forwards, which run the dense block on these inputs anyway (memory:
one more tensor of the activations' shape, allocated by the run's ActivationStore beside them, a file
when they are offloaded to disk), and the loss after tuning is measured in the forward that makes the
next block's inputs (admm_kernels.models.block). Float32 blocks only (Adam on half-precision weights
loses the small steps).

Distributed runs (tune_block): the windows are numbered globally in rank order and every rank draws
the same permutation per epoch, so the steps are those of one process; each rank back-propagates its
windows' share of a step's mean loss and the gradients are summed over the ranks, so every rank applies
the same Adam step to the same weights. The result equals one process's up to the order of float32 sums.
A step's windows are not balanced over the ranks (a rank may hold none of them and wait).

Early stopping (tune_patience > 0, and tune_epochs="auto"): one window in every `holdout` (held_out) is
kept out of the training; after each epoch their mean loss is measured, the weights of the best epoch
(the untuned block counts as epoch 0) are kept, and a block's tuning stops once `patience` epochs have
passed without a better held-out loss. Without it (the default), every window is trained on for all
`epochs` exactly as before early stopping existed.
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
from .distributed import LOCAL, Comm
from .experts import ExpertProjection
from .plain_params import ParamLinear

DEFAULT_LR = 1e-4  # block tuning's Adam learning rate unless a run or a "+tune" preset gives one


@dataclass(frozen=True)
class BlockTune:
    """epochs: passes over the calibration windows (0 = off; with early stopping, the most); lr: Adam's
    learning rate; batch: windows per step; patience: early stopping (0 = off: every window trained, all
    `epochs` run): stop once the held-out loss has not improved for `patience` epochs and keep the best
    weights; holdout: with early stopping, one window in every `holdout` is held out of the training;
    auto: made by tune_epochs="auto" (AUTO_EPOCHS, AUTO_PATIENCE)."""

    epochs: int = 0
    lr: float = DEFAULT_LR
    batch: int = 4
    patience: int = 0
    holdout: int = 8
    auto: bool = False

    @property
    def enabled(self) -> bool:
        return self.epochs > 0

    @property
    def early_stopping(self) -> bool:
        return self.patience > 0

    def fingerprint(self) -> dict:
        """The settings as the report and the resumable state's fingerprint hold them (the early-stopping
        keys only when it is on, so the states of runs without it stay valid)."""
        out = {"epochs": self.epochs, "lr": self.lr, "batch": self.batch}
        if self.early_stopping:
            out.update(patience=self.patience, holdout=self.holdout)
        if self.auto:
            out["auto"] = True
        return out


# Block tuning helped most at 8-12 epochs (benchmarks/RESULTS.md); each epoch is a pass over the whole
# calibration set per block, so far more is a typo that would run for days instead of failing.
MAX_TUNE_EPOCHS = 1000
# tune_epochs="auto": early-stopped tuning of at most AUTO_EPOCHS epochs in steps of AUTO_BATCH windows,
# stopped after AUTO_PATIENCE epochs without a better held-out loss (one window in DEFAULT_HOLDOUT held
# out). Chosen by the measurement in benchmarks/RESULTS.md, "Block tuning: early stopping and its cost":
# at lr 1e-4 the held-out loss of SmolLM2's first blocks still fell at 16 epochs in 3 of 4 blocks, and
# 2 windows a step gained per epoch about what 4 windows a step gained in two epochs.
AUTO_EPOCHS = 16
AUTO_PATIENCE = 2
AUTO_BATCH = 2
DEFAULT_BATCH = 4
DEFAULT_HOLDOUT = 8
# A method preset named "PRESET+tune" (preset="accurate+tune") is PRESET's options plus block tuning
# with TUNED_PRESET's settings (the run's own tune_* arguments override them). Chosen under the presets'
# protocol (benchmarks/preset_protocol.py; RESULTS.md, "The accurate path within 3x ADMM-Grad's time")
# on the tuning material only (SmolLM2, Shakespeare): one epoch after `accurate`'s solves (~1.7x
# ADMM-Grad's time) is what 3x allows. At 70 % (ADMM-Grad 110.40, `accurate` 97.07), one epoch at
# batch / lr: 2 / 1e-4 93.33, 1 / 1e-4 92.72, 1 / 3e-4 89.83, 2 / 1e-3 87.80, 1 / 1e-3 85.92, 1 / 3e-3
# 84.03; ADMM-Grad + 2 epochs (1 / 1e-4) 93.97 in the same time. Across settings (ALPS's perplexity:
# 62.42 at 50 %, 97.44 at 70 %, 162.06 at 80 %), lr 1e-3 / 3e-3 gave 61.11 / 63.00, 85.92 / 84.03,
# 113.60 / 106.68: lr 3e-3 gains more where the pruned block is far from the dense one but overshoots at
# 50 %, worse than ALPS there. The preset takes the rate that beats ALPS at every setting tried: 1e-3.
TUNED_SUFFIX = "+tune"
TUNED_PRESET = {"tune_epochs": 1, "tune_batch": 1, "tune_lr": 1e-3}
# What "PRESET+tune" changes in PRESET's own solver options, per method and preset (options given explicitly
# win; a preset belongs to its method, so another method's preset of the same name is left alone). The tuned
# path damps `accurate`'s solves with 0.1, ADMM-Grad's damping, instead of `accurate`'s 0.003: a block tuned
# afterwards starts better from solves that stay closer to the dense weights in the directions the
# calibration tokens do not pin down. Chosen on the tuning material alone (RESULTS.md, "The tuned preset's
# damping chosen across settings"): with one epoch at lr 1e-3, damping 0.003 / 0.03 / 0.1 gave perplexity
# 61.11 / 60.71 / 60.38 at 50 %, 85.92 / 85.50 / 84.26 at 70 % and 113.60 / 114.88 / 112.82 at 80 %: 0.1 is
# the best at every setting. (Without tuning, 0.1 lost to 0.003 at 70 %: RESULTS.md, "Presets out of
# sample", so `accurate` itself keeps 0.003.)
TUNED_SOLVER_OPTIONS = {"admm": {"accurate": {"percdamp": 0.1}}}


def _check_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r}", name)


def check_block_tune(epochs, lr, batch=None, patience=None, holdout=DEFAULT_HOLDOUT) -> BlockTune:
    """BlockTune from prune_model's tune_epochs / tune_lr / tune_batch / tune_patience / tune_holdout;
    ArgumentError (a ValueError) / ArgumentTypeError (a TypeError) naming the argument otherwise.

    tune_epochs="auto" means early-stopped tuning: at most AUTO_EPOCHS epochs, patience AUTO_PATIENCE
    and AUTO_BATCH windows a step unless tune_patience / tune_batch say otherwise. For an int
    tune_epochs, None means patience 0 (off) and DEFAULT_BATCH windows a step."""
    auto = epochs == "auto" if isinstance(epochs, str) else False
    if isinstance(epochs, str) and not auto:
        raise ArgumentError(f"tune_epochs must be an int or 'auto', got {epochs!r}", "tune_epochs")
    if auto:
        epochs = AUTO_EPOCHS
        patience = AUTO_PATIENCE if patience is None else patience
        batch = AUTO_BATCH if batch is None else batch
    patience = 0 if patience is None else patience
    batch = DEFAULT_BATCH if batch is None else batch
    for name, v in (("tune_epochs", epochs), ("tune_batch", batch), ("tune_patience", patience),
                    ("tune_holdout", holdout)):
        _check_int(v, name)
    if epochs < 0:
        raise ArgumentError(f"tune_epochs must be >= 0 (0 = no block tuning), got {epochs}", "tune_epochs")
    if epochs > MAX_TUNE_EPOCHS:
        raise ArgumentError(f"tune_epochs must be at most {MAX_TUNE_EPOCHS}, got {epochs}", "tune_epochs")
    if batch < 1:
        raise ArgumentError(f"tune_batch must be >= 1 window, got {batch}", "tune_batch")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ArgumentError(f"tune_lr must be a finite number > 0, got {lr!r}", "tune_lr")
    if patience < 0:
        raise ArgumentError(f"tune_patience must be >= 0 epochs (0 = no early stopping), got {patience}",
                            "tune_patience")
    if holdout < 2:
        raise ArgumentError(f"tune_holdout must be >= 2 (one window in every tune_holdout is held out), got "
                            f"{holdout}", "tune_holdout")
    return BlockTune(int(epochs), float(lr), int(batch), int(patience), int(holdout), auto)


def check_tune_windows(tune: BlockTune, windows: int) -> None:
    """Early stopping needs a window to train on and one to hold out."""
    if tune.enabled and tune.early_stopping and windows < 2:
        raise ArgumentError(f"early-stopped block tuning (tune_patience > 0 or tune_epochs='auto') holds "
                            f"calibration windows out, which needs at least 2, got {windows}",
                            "tune_patience")


def held_out(n: int, every: int) -> list[int]:
    """The held-out windows among 0..n-1 (n >= 2): max(1, n // every) of them, evenly spaced, each in
    the middle of its stretch (n=32, every=8: 4, 12, 20, 28)."""
    count = max(1, n // every)
    return [(2 * i + 1) * n // (2 * count) for i in range(count)]


def check_tunable(layers: dict[str, nn.Module], index: int) -> None:
    """The block's pruned layers must hold float32 trainable weights."""
    for rel, module in layers.items():
        w = get_weight(module)
        if w.dtype != torch.float32:
            raise ValueError(f"block tuning needs float32 weights, but block {index}'s {rel} is {w.dtype}: "
                             "load the model in float32 or leave tune_epochs at 0")


@dataclass(frozen=True)
class _Windows:
    """This rank's share of the calibration windows: global indices start .. start + count - 1 of n."""

    start: int
    count: int
    n: int

    @classmethod
    def of(cls, local: int, comm: Comm, index: int) -> _Windows:
        counts = comm.all_gather_objects(local, f"block {index}: counting the windows for block tuning")
        return cls(sum(counts[:comm.rank]), local, sum(counts))

    def local(self, windows: list[int]) -> list[int]:
        """The local indices of the global `windows` this rank holds, in the given order."""
        return [j - self.start for j in windows if self.start <= j < self.start + self.count]


def window_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One window's loss: the mean-squared error of the block's output y (L, hidden) against its target
    (same shape, any device), in float32."""
    return torch.nn.functional.mse_loss(y.float(), target.to(y.device).float())


def _loss_sum(block: nn.Module, call: BlockCall, acts: torch.Tensor, targets: torch.Tensor,
              windows: list[int], device: torch.device):
    """Sum of the per-window mean-squared errors over the local `windows` (0.0 when there are none)."""
    total = 0.0
    for j in windows:
        total = total + window_loss(call(block, acts[j:j + 1].to(device))[0], targets[j])
    return total


def window_mean(total, windows: int, comm: Comm, device: torch.device, what: str) -> float:
    """The mean window loss over every rank: `total` sums this rank's `windows` windows' losses (a
    tensor, or 0.0 when it holds none). The same float on every rank, so early-stopping decisions agree."""
    if not comm.distributed:
        return float(total / windows)
    both = torch.stack([torch.as_tensor(total, dtype=torch.float32, device=device).reshape(()),
                        torch.tensor(float(windows), device=device)])
    comm.all_reduce_sum_(both, what)
    return float(both[0] / both[1])


@torch.no_grad()
def _mean_loss(block: nn.Module, call: BlockCall, acts: torch.Tensor, targets: torch.Tensor,
               mine: _Windows, windows: list[int], device: torch.device, comm: Comm, what: str) -> float:
    """The mean per-window MSE over the global `windows`, summed over the ranks."""
    local = mine.local(windows)
    return window_mean(_loss_sum(block, call, acts, targets, local, device), len(local), comm, device, what)


def _all_reduce_grads(params: list[nn.Parameter], comm: Comm, what: str) -> None:
    """Sum every parameter's gradient over the ranks in one collective (a rank without a window in the
    step contributes zeros)."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    comm.all_reduce_sum_(flat, what)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()


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
        masks.append(((w.detach() != 0).to(w.dtype), None))
    for i, p in enumerate(params):
        if masks[i] is None:
            keep = fused[id(p)]
            masks[i] = (((p.detach() != 0) | ~keep).to(p.dtype), keep.to(p.dtype))
    return params, masks


# Adam's fused kernel where torch has one: on a 1-thread CPU one step over a 4-expert SmolLM2 MoE
# block's 11.5 M weights took 13 ms fused against 62 ms for the default per-tensor loop; with 32 steps
# an epoch over 30 blocks that is a minute of a 9-minute run. The pruned-zero masks are float tensors
# of the weights' dtype for the same reason: multiplying by a bool mask took 13 ms, by a float one 4 ms.
_FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam(params: list[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """The tuning optimiser: Adam at `lr`, fused on the devices that have the fused kernel."""
    return torch.optim.Adam(params, lr=lr, fused=True if device.type in _FUSED_ADAM_DEVICES else None)


def tune_block(block: nn.Module, index: int, layers: dict[str, nn.Module], call: BlockCall,
               acts: torch.Tensor, targets: torch.Tensor, device: torch.device, tune: BlockTune,
               comm: Comm = LOCAL, *, measure_after: bool = True) -> dict:
    """Fine-tune the kept weights of `layers` (the block's pruned linears, on `device`) so that the block
    maps acts (n, L, hidden; this rank's windows) to targets (the dense block's outputs, same shape);
    zeros stay zeros.

    Schedule (the same on any number of ranks): the windows are numbered globally in rank order; each
    epoch's order of the training windows is a permutation drawn from a generator seeded with the block
    index, cut into steps of tune.batch windows. In a step each rank sums the per-window MSE of the step's
    windows it holds, divided by the step's window count, and back-propagates; the gradients are summed
    over the ranks, so every rank holds the gradient of the mean over the step's windows, the very loss one
    process computes, and applies the same Adam step. With early stopping the held-out windows (held_out)
    are left out of the training, their mean loss is measured after every epoch, the weights of the best
    epoch (epoch 0: the untuned block) are kept, and tuning stops after tune.patience epochs without
    improvement.

    Returns {"block", "loss_before", "loss_after"} (mean MSE over every window; "loss_after" only with
    measure_after: the pipeline measures it in the forward that makes the next block's inputs, which saves
    a pass over the windows) and, with early stopping, "heldout" (the held-out loss after each epoch, from
    epoch 0), "best_epoch" and "epochs" (run)."""
    mine = _Windows.of(int(acts.shape[0]), comm, index)
    every = list(range(mine.n))
    heldout = held_out(mine.n, tune.holdout) if tune.early_stopping else []
    train = sorted(set(every) - set(heldout))
    params, masks = _tunable(layers, index)
    flags = {p: p.requires_grad for p in block.parameters()}
    report: dict = {"block": index}
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        report["loss_before"] = _mean_loss(block, call, acts, targets, mine, every, device, comm,
                                           f"block {index}: the block loss before tuning")
        stopper = _EarlyStop(params, tune.patience) if heldout else None
        if stopper is not None:
            stopper.epoch_done(_mean_loss(block, call, acts, targets, mine, heldout, device, comm,
                                          f"block {index}: the held-out loss"))
        for p in params:
            p.requires_grad_(True)
        # Entries outside the selection (experts of a fused parameter that were not pruned) get a zero
        # gradient, so Adam leaves them exactly as they are.
        grad_hooks = [p.register_hook(lambda g, keep=keep: g * keep)
                      for p, (_, keep) in zip(params, masks) if keep is not None]
        opt = adam(params, tune.lr, device)
        g = torch.Generator().manual_seed(index)
        for _ in range(tune.epochs):
            order = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
            for i in range(0, len(order), tune.batch):
                step = order[i:i + tune.batch]
                _step(block, call, acts, targets, mine.local(step), len(step), device, params, masks, opt,
                      comm, f"block {index}: summing the tuning gradients")
            if stopper is not None and stopper.epoch_done(_mean_loss(
                    block, call, acts, targets, mine, heldout, device, comm,
                    f"block {index}: the held-out loss")):
                break
        del opt
        for h in grad_hooks:
            h.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        if stopper is not None:
            report.update(stopper.restore())
        if measure_after:
            report["loss_after"] = _mean_loss(block, call, acts, targets, mine, every, device, comm,
                                              f"block {index}: the block loss after tuning")
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return report


def _step(block: nn.Module, call: BlockCall, acts: torch.Tensor, targets: torch.Tensor, local: list[int],
          count: int, device: torch.device, params: list[nn.Parameter], masks: list[tuple],
          opt: torch.optim.Optimizer, comm: Comm, what: str) -> None:
    """One Adam step on the mean loss of a step's `count` windows, of which this rank holds `local`."""
    opt.zero_grad(set_to_none=True)
    if local:
        with torch.enable_grad():
            loss = _loss_sum(block, call, acts, targets, local, device) / count
            loss.backward()
    if comm.distributed:
        _all_reduce_grads(params, comm, what)
    opt.step()
    with torch.no_grad():
        for p, (m, _) in zip(params, masks):
            p.mul_(m)


class _EarlyStop:
    """The held-out loss per epoch, a copy of the weights of the best epoch so far, and the stop rule."""

    def __init__(self, params: list[nn.Parameter], patience: int):
        self.params, self.patience = params, patience
        self.losses: list[float] = []
        self.best = 0
        self.saved: list[torch.Tensor] = []

    def epoch_done(self, loss: float) -> bool:
        """Record the held-out loss of the epoch just finished (the first call: before tuning); True when
        tuning should stop."""
        self.losses.append(loss)
        epoch = len(self.losses) - 1
        if epoch == 0 or loss < self.losses[self.best]:
            self.best = epoch
            self.saved = [p.detach().clone() for p in self.params]
        return epoch - self.best >= self.patience

    @torch.no_grad()
    def restore(self) -> dict:
        """Put the best epoch's weights back; returns the report's early-stopping entries."""
        if self.best != len(self.losses) - 1:
            for p, w in zip(self.params, self.saved):
                p.copy_(w)
        self.saved = []
        return {"heldout": self.losses, "best_epoch": self.best, "epochs": len(self.losses) - 1}
