"""LAPACK factorisations that stay fast on a busy CPU.

torch's CPU LAPACK calls (Cholesky, its inverse, eigh) are blocked algorithms whose OpenMP threads
wait for each other at every block. With more runnable threads than free cores, each wait becomes a
scheduler round trip: measured on this 2-core machine with 2 torch threads and a load of 4.5,
``cholesky_inverse`` of a 1536² Gram took 2.5-9 s against 0.06-0.19 s with one thread, and
``eigh`` 7.1 s against 0.52 s; at load 2.3, Cholesky + inverse took 0.44-0.68 s with 2 threads and
0.16-0.24 s with one. GEMMs degrade gracefully (0.035 vs 0.042 s at the same load), so only the
factorisations are capped: `one_thread()` runs its block with one torch thread on the CPU and restores
the count afterwards. On an idle machine the cap costs little next to the iterations' GEMMs (benchmarks/
moe_batched.py --contention measures both; RESULTS.md, "Factorisations on a busy CPU").
ADMM_KERNELS_LAPACK_THREADS=all turns the cap off.
"""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def one_thread(device: torch.device | None = None):
    """Run the block with one torch thread when it computes on the CPU (no effect on CUDA tensors, with
    one thread already, or with ADMM_KERNELS_LAPACK_THREADS=all)."""
    n = torch.get_num_threads()
    if (device is not None and device.type != "cpu") or n == 1 or \
            os.environ.get("ADMM_KERNELS_LAPACK_THREADS", "").strip().lower() == "all":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
