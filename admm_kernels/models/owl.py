"""OWL: outlier-weighted layer-wise sparsity (Yin et al., ICML 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity"), written from the paper and
the facts of its released code.

1. Dense pre-pass: the calibration windows run through the *dense* blocks, one block on the device at
   a time (as the pipeline moves them), and a forward pre-hook adds Σ_tokens x_j² of every selected
   linear's input feature j. That is diag G, all OWL needs: a (in,) sum instead of an (in, in) Gram.
2. Outlier ratio of block b: the Wanda scores A_ij = |W_ij|·||x_j|| of all the block's selected linears,
   taken together; an outlier is a score > M × the mean of those scores (the mean over the block's
   concatenated scores, as the released code computes it); the ratio is the outliers' fraction.
3. Allocation: the ratios are mapped linearly onto [0, 2λ] (min -> 0, max -> 2λ), centred on their
   parameter-weighted mean, and subtracted from the target: s_b = s - (u_b - ū). Blocks with more
   outliers are pruned less; max_b s_b - min_b s_b = 2λ; the weighted mean is the target, so the model's
   overall sparsity is the target up to each layer's integer rounding. When every ratio is equal the
   profile is uniform (the released code would divide by zero there).

The pre-pass costs one dense forward of the calibration data (+ the stem), about half of the
pipeline's own forward time (which runs every block twice): SmolLM2-135M, 32 × 256 windows, 1 thread on
the shared 2-core machine: 21 s, against 48 s of forward passes in a 77 s Wanda run (36 s vs 71 s in a
186 s ADMM-Grad run when the machine was busier).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ArgumentError
from .activations import ActivationStore
from .capture import capture_inputs
from .discovery import get_weight
from .experts import layer_input_hooks
from .sparsity_profile import BlockSparsity, ProfileRequest, weighted_mean


class SquareSumHooks:
    """Forward pre-hooks adding Σ_tokens x² per input feature of each layer into float64 (in,) sums.
    Only layers that the block's forward calls get an entry."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.hooks = layer_input_hooks(layers, self._on_input)  # experts: their routed tokens

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        sq = x.detach().reshape(-1, x.shape[-1]).float().square().sum(0, dtype=torch.float64)
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq

    def remove(self) -> None:
        self.hooks.remove()


@torch.no_grad()
def input_square_sums(model: nn.Module, blocks: nn.ModuleList, selected: Sequence[dict[str, nn.Module]],
                      ids: torch.Tensor, device: torch.device, act_device: torch.device,
                      progress: bool = False, empty: Callable | None = None) -> list[dict[str, torch.Tensor]]:
    """Per block, {layer name: Σ x_j² over every calibration token, float64 (in,) on the CPU} of the
    selected layers, from a pass of ids (N, L) through the dense blocks 0 .. last block with a
    selected layer. The model must be in eval mode; its weights are not touched and every block goes
    back to its own device. empty(shape, dtype): allocates the (N, L, hidden) activations (default: on
    act_device; the pipeline passes its ActivationStore's, so offload="disk" holds here too)."""
    end = max((i for i, sel in enumerate(selected) if sel), default=-1) + 1
    if end == 0:
        return [{} for _ in selected]
    acts, calls = capture_inputs(model, blocks, ids, device, act_device, empty=empty)
    out: list[dict[str, torch.Tensor]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=end, desc="owl: dense pass", unit="block", file=sys.stderr)
    try:
        for b in range(end):
            block = blocks[b]
            home = next(block.parameters()).device
            hooks = SquareSumHooks(selected[b])
            try:
                block.to(device)
                for j in range(acts.shape[0]):
                    y = calls[b](block, acts[j:j + 1].to(device))
                    if b + 1 < end:
                        acts[j] = y[0].to(acts.device)
            finally:
                hooks.remove()
                block.to(home)
            out.append({n: s.cpu() for n, s in hooks.sums.items()})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out + [{} for _ in range(len(selected) - end)]


def outlier_ratio(layers: dict[str, nn.Module], square_sums: dict[str, torch.Tensor],
                  m: float) -> float | None:
    """The fraction of the block's Wanda scores |W_ij|·sqrt(Σx_j²) above m × their mean, over all the
    layers in square_sums taken together (None when there is none). Scores are formed one layer at a
    time in float32 (from float64 norms), the mean is accumulated in float64."""
    names = [n for n in layers if n in square_sums]
    if not names:
        return None

    def scores(name: str) -> torch.Tensor:
        w = get_weight(layers[name]).detach()
        norm = square_sums[name].sqrt().to(w.device, torch.float32)
        return w.float().abs() * norm

    total, count = 0.0, 0
    for n in names:
        a = scores(n)
        total += float(a.sum(dtype=torch.float64))
        count += a.numel()
    threshold = m * total / count
    above = sum(int((scores(n) > threshold).sum()) for n in names)
    return above / count


def allocate(ratios: Sequence[float | None], weights: Sequence[int], target: float, lam: float
             ) -> tuple[float, ...]:
    """OWL's per-block sparsities from the outlier ratios (None = a block with nothing to prune, which
    gets the target and no weight). Raises ArgumentError (a ValueError) naming owl_lambda when a sparsity
    leaves [0, 1)."""
    live = [r for r, w in zip(ratios, weights) if r is not None and w]
    lo, hi = (min(live), max(live)) if live else (0.0, 0.0)
    if hi == lo:
        return tuple(target for _ in ratios)
    u = [((r - lo) / (hi - lo)) * 2 * lam if r is not None and w else 0.0 for r, w in zip(ratios, weights)]
    mean_u = weighted_mean(u, weights)
    values = tuple(target - (ub - mean_u) if r is not None and w else target
                   for ub, r, w in zip(u, ratios, weights))
    bad = [(b, v) for b, v in enumerate(values) if not 0.0 <= v < 1.0]
    if bad:
        listed = ", ".join(f"block {b}: {v:.4f}" for b, v in bad)
        raise ArgumentError(f"owl_lambda={lam!r} is too large for sparsity {target!r}: OWL gives "
                            f"sparsities outside [0, 1) ({listed}); lower owl_lambda (the spread is twice "
                            "owl_lambda)", "owl_lambda")
    return values


def owl_profile(model: nn.Module, blocks: nn.ModuleList, selected: Sequence[dict[str, nn.Module]],
                ids: torch.Tensor, request: ProfileRequest, device: torch.device, acts: ActivationStore,
                progress: bool = False) -> BlockSparsity:
    """OWL's BlockSparsity for this model and calibration (see the module docstring): the dense
    pre-pass (its (N, L, hidden) activations allocated by acts.empty, see input_square_sums), the
    outlier ratio of each block, the allocation around request.target with spread 2·request.owl_lambda."""
    sums = input_square_sums(model, blocks, selected, ids, device, acts.device, progress, empty=acts.empty)
    m, lam = request.owl_m, request.owl_lambda
    ratios = [outlier_ratio(sel, s, m) for sel, s in zip(selected, sums)]
    weights = [sum(get_weight(mod).numel() for n, mod in sel.items() if n in s)
               for sel, s in zip(selected, sums)]
    values = allocate(ratios, weights, request.target, lam)
    return BlockSparsity("owl", values, request.target, {"owl_m": m, "owl_lambda": lam,
                                                         "outlier_ratios": ratios})


def resolve_profile(request: ProfileRequest, model: nn.Module, blocks: nn.ModuleList,
                    selected: Sequence[dict[str, nn.Module]], ids: torch.Tensor, device: torch.device,
                    acts: ActivationStore, progress: bool = False) -> BlockSparsity:
    """The run's BlockSparsity for `request`. "owl" runs its dense pre-pass here (the model must be in
    eval mode; weights untouched, blocks back on their devices; its activations live where `acts`, the
    pipeline's ActivationStore, puts them); selected[b]: the layers pruned in block b (their sizes weight
    the averages)."""
    if request.name == "owl":
        return owl_profile(model, blocks, selected, ids, request, device, acts, progress)
    if request.name == "list":
        weights = [sum(get_weight(m).numel() for m in sel.values()) for sel in selected]
        return BlockSparsity("list", request.values, weighted_mean(request.values, weights))
    return BlockSparsity("uniform", request.planned(), request.target)
