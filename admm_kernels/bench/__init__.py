"""What `admm-prune bench` runs (its options: admm_kernels/cli/bench.py): compare pruning methods on a
model's real layers (and optionally end to end).

Modules, one job each:
    grams.py      per-layer Grams from real calibration text (one dense pass, cached on disk by content hash)
    methods.py    method specs ("admm-grad", "sparsegpt", "admm:iters=5", ...) -> prune_layer arguments
    layers.py     methods x sparsities x patterns on those layers: error, seconds, sparsity, gap to optimum
    machine.py    the machine's measured fp32 matmul GFLOP/s and copy GB/s (roofline denominators)
    journal.py    the resumable row journal of a run
    report.py     tables, CSV + JSON (versions, seed, machine, commit), PNG plots
    results_md.py regenerates benchmarks/RESULTS.md sections from output folders
"""

from __future__ import annotations
