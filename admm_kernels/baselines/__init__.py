"""Baseline pruners behind prune_layer's API, written from their papers: magnitude, Wanda, SparseGPT.

Each module exposes ``prune(weight, G, pattern, sparsity, mask=None, **options) -> (pruned, mask, stats)``
with validated inputs (weight (out, in) any float dtype, G (in, in) on weight's device, a parsed Pattern);
``pruned`` has weight's dtype and device and ``mask`` is bool (out, in), True = kept.
"""
