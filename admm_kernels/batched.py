"""`prune_experts`: prune E layers of one shape (the experts of a MoE projection) with batched solves
(by default on a GPU only: on the CPU they measured no faster than one expert at a time).

For ADMM-Grad with options whose control flow is the same for every expert (admm_kernels.methods.
admm_batched.batchable: the seed recipe and preset "fast"), the experts are solved together: one
batched factorisation and one batched GEMM per iteration; the result of each expert is that of
`prune_layer` on it (masks identical, weights equal within fp32 rounding). Every other case (other
methods, the "accurate" preset, update-only masks, experts with dead inputs or weights/Grams outside
the fp32-safe range that prune_layer rescales) runs `prune_layer` one expert at a time. Wanda and
magnitude have no solve to batch: they always loop (each expert costs one top-k).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from . import methods as registry
from ._checks import check_gram, check_sparsity, check_weight
from .methods import ranges
from .methods.admm_batched import batchable, run_batched
from .methods.error import relative_error
from .patterns import parse_pattern
from .prune import PruneResult, prune_layer, result_summary

# Experts solved per batch: bounds the batched (E, in, in) inverse and factor (3 · E · in² floats at
# the peak; 16 experts of in = 2048: 768 MiB).
BATCH = 16


def _as_list(x, name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"{name} must be a (experts, rows, cols) tensor or a list of 2-D tensors, got "
                             f"shape {tuple(x.shape)}")
        return list(x.unbind(0))
    if not isinstance(x, Sequence) or not x:
        raise TypeError(f"{name} must be a 3-D tensor or a non-empty list of 2-D tensors")
    return list(x)


@torch.no_grad()
def prune_experts(weights, grams, sparsity: float = 0.5, pattern: str = "unstructured",
                  method: str = "admm", preset: str | None = None, batch: int = BATCH,
                  batched: bool | None = None, **options) -> list[PruneResult]:
    """prune_layer on each (weights[e], grams[e]) pair, batched where possible (module docstring).

    weights: (E, out, in) or a list of E (out, in) tensors of one shape, dtype and device; grams: (E, in,
    in) or a list of E (in, in); other arguments as prune_layer. batched: None = batch on a GPU and solve
    one expert at a time on the CPU, where batching measured 0.90-0.98x the one-at-a-time time
    (benchmarks/moe_batched.py, RESULTS.md "Batched expert solves": each expert's solve already runs at
    the CPU's matmul rate, and nothing of it is shared between experts); True / False force it. Returns E
    PruneResults, in order; batched ones carry stats["batched"] = the batch size and their share of the
    batch's seconds."""
    ws, gs = _as_list(weights, "weights"), _as_list(grams, "grams")
    if len(ws) != len(gs):
        raise ValueError(f"got {len(ws)} weights and {len(gs)} grams")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    meth = registry.get(method)
    opts = meth.resolve(preset, options)
    checked = [check_weight(w, f"weights[{e}]") for e, w in enumerate(ws)]
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched must be None, True or False, got {batched!r}")
    shapes = {(tuple(w.shape), w.dtype, w.device) for w in checked}
    if len(shapes) != 1:
        raise ValueError(f"weights must share one shape, dtype and device, got {sorted(map(str, shapes))}")

    def alone(e: int) -> PruneResult:
        return prune_layer(ws[e], gs[e], sparsity, pattern, method, preset=preset, **options)

    if batched is None:
        batched = checked[0].device.type != "cpu"
    if not batched or meth.name != "admm" or not batchable(opts):
        return [alone(e) for e in range(len(ws))]
    s = check_sparsity(sparsity)
    in_f = checked[0].shape[1]
    pat = parse_pattern(pattern, in_f)
    device = checked[0].device
    results: dict[int, PruneResult] = {}
    together = []
    for e, (w, g) in enumerate(zip(checked, gs)):
        g = check_gram(g, in_f, f"grams[{e}]").to(device)
        diag = g.diagonal()
        if bool((diag <= 0).any()) or ranges.normalise_weight(w)[1] or ranges.normalise_gram(g)[1]:
            results[e] = alone(e)  # dead inputs or a rescaled problem: prune_layer's own path
        else:
            together.append((e, g))
    for start in range(0, len(together), batch):
        chunk = together[start:start + batch]
        t0 = time.perf_counter()
        W = torch.stack([checked[e] for e, _ in chunk]).float()
        G = torch.stack([g for _, g in chunk]).float()
        outs = run_batched(W, G, pat, s, opts, checked[0].dtype)
        del W, G
        share = (time.perf_counter() - t0) / len(chunk)
        for (e, g), res in zip(chunk, outs):
            if bool(res.mask.all()):  # nothing pruned: the weight itself, as prune_layer returns it
                res.weight = checked[e].clone()
            error = relative_error(checked[e], res.weight, g, res.denominator)
            stats = res.stats
            stats["seconds"]["total"] = share
            stats.update(result_summary(meth, preset, opts, pat, checked[e], res.weight, res.mask,
                                        pat.sparsity(s), False, None))
            results[e] = PruneResult(res.weight, res.mask, error, stats)
    return [results[e] for e in range(len(ws))]


__all__ = ["prune_experts"]
