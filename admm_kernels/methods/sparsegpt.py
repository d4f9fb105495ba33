"""SparseGPT (Frantar & Alistarh 2023): blocked Optimal Brain Surgeon with the Cholesky factor of H^-1.

H = G + λI with λ = percdamp * mean(diag G) [percdamp 0.01]; U = the upper Cholesky factor of H^-1 (its
rows are the OBS update directions in the order the columns are processed). Columns are visited left to
right in blocks of `blocksize` [128]; pruning column j sets the pruned entries to 0 and spreads the error
(w_j - q_j) / U_jj over the later columns of the block along U_j; after each block the accumulated
errors update all later columns with one GEMM (the "lazy batch" of the paper).

Mask selection, as in the paper, is adaptive and made on the partially updated weights with the OBS
score w^2 / U_jj^2:
- unstructured: at the start of each block, the smallest scores of the whole block (all rows) are pruned;
  the block's count is int(out*i2*s) - int(out*i1*s) for columns [i1, i2), so the layer total is exactly
  int(out*in*s);
- per-row: the same within each row of the block (int(i2*s) - int(i1*s) per row, int(in*s) in total);
- N:M: when the first column of each group of M is reached, the N best of the group are kept.
A given mask (update-only) skips the selection and runs the OBS updates on exactly that mask.
Dead inputs (diag G == 0) get the live diagonal's mean as their (decoupled) diagonal, not the paper's 1,
so that the damping does not depend on the Gram's scale.
"""

from __future__ import annotations

import time

import torch

from .. import backends, masks
from .._checks import check_float, check_int
from ..patterns import Pattern
from .lapack import one_thread
from .ranges import finite_cast
from .registry import Method, MethodResult, Option, check_compute_dtype

OPTIONS = (
    Option("percdamp", 0.01, lambda v: check_float(v, "percdamp"), "damping λ = percdamp · mean(diag G)"),
    Option("blocksize", 128, lambda v: check_int(v, "blocksize", 1), "columns per lazy-update block"),
    Option("compute_dtype", torch.float32, check_compute_dtype, "torch.float32 or torch.float64"),
)


def run(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float, mask: torch.Tensor | None,
        options: dict) -> MethodResult:
    """weight (out, in) any float dtype, G (in, in). Computes in float32 (or compute_dtype=torch.float64)."""
    percdamp, blocksize, cd = options["percdamp"], options["blocksize"], options["compute_dtype"]
    ref = cd == torch.float64
    used: dict[str, str] = {}
    t0 = time.perf_counter()
    out_f, in_f = weight.shape
    s = pattern.sparsity(sparsity)

    W = weight.to(cd).clone()
    H = G.to(cd).clone()
    dead = H.diagonal() <= 0
    if bool(dead.any()):
        # Dead inputs: a diagonal block, so no error flows into or out of them. The paper's code puts 1 there,
        # which enters mean(diag H) below and so makes the damping depend on the Gram's overall scale; the
        # mean of the live diagonal keeps the result scale-free (and leaves Grams without dead inputs as
        # they were).
        live = H.diagonal()[~dead]
        H.diagonal()[dead] = float(live.mean()) if live.numel() else 1.0
    H.diagonal().add_(percdamp * float(H.diagonal().mean()))
    with one_thread(H.device):
        L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"gram + damping is not positive definite (Cholesky failed at column {int(info)}); "
                         f"increase percdamp (got {percdamp})")
    with one_thread(L.device):
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    del H, L
    t_factor = time.perf_counter()

    if pattern.kind == "nm":  # blocks must hold whole groups
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=W.device) if mask is None else mask
    t_mask = 0.0
    # Looked up once: the N:M branch selects every M columns (2752 times at in=11008), and both a registry
    # look-up and a dead-input test (a device sync on CUDA) per group would sit on that hot path.
    select_pm = select_nm = None
    if mask is None and pattern.kind != "nm":
        select_pm = backends.implementation("prune_mask", W.device, reference=ref, used=used)
    if mask is None and pattern.kind == "nm":
        select_nm = backends.implementation("nm_mask", W.device, reference=ref, used=used)
    any_dead = bool(dead.any())

    def scored(w: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        sc = w.pow(2) / d.pow(2)
        return masks.with_dead(sc, dead[lo:hi]) if any_dead else sc
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = Hinv[i1:i2, i1:i2]
        dg = U1.diagonal()
        if mask is None and pattern.kind != "nm":
            tm = time.perf_counter()
            sc = scored(W1, dg, i1, i2)
            if pattern.kind == "unstructured":
                k = int(out_f * i2 * s) - int(out_f * i1 * s)
                keep[:, i1:i2] = select_pm(sc, k, False)
            else:
                k = int(i2 * s) - int(i1 * s)
                keep[:, i1:i2] = select_pm(sc, k, True)
            t_mask += time.perf_counter() - tm
        for j in range(i2 - i1):
            if mask is None and pattern.kind == "nm" and j % pattern.m == 0:
                tm = time.perf_counter()
                g = slice(j, j + pattern.m)
                sc = scored(W1[:, g], dg[g], i1 + j, i1 + j + pattern.m)
                keep[:, i1 + j:i1 + j + pattern.m] = select_nm(sc, pattern.n, pattern.m)
                t_mask += time.perf_counter() - tm
            w = W1[:, j].clone()
            q = w.masked_fill(~keep[:, i1 + j], 0)
            err = (w - q) / dg[j]
            W1[:, j:].addr_(err, U1[j, j:], alpha=-1)
            W1[:, j] = q
            Err1[:, j] = err
        W[:, i1:i2] = W1
        if i2 < in_f:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    stats: dict = {}
    pruned = finite_cast(W.masked_fill_(~keep, 0), weight.dtype, stats=stats)
    t_end = time.perf_counter()
    seconds = {"factor": t_factor - t0, "mask": t_mask, "iterations": t_end - t_factor - t_mask}
    stats.update({"percdamp": percdamp, "blocksize": blocksize, "dead_inputs": int(dead.sum()),
                  "seconds": seconds, "backends": used})
    return MethodResult(pruned, keep, stats)


METHOD = Method(
    name="sparsegpt", run=run, options=OPTIONS,
    summary="SparseGPT (Frantar & Alistarh 2023): OBS column by column with lazy block updates",
    grouping="unstructured = per block of columns [i1, i2) over all rows, int(out*i2*s) - int(out*i1*s) "
             "pruned in each (layer total exactly int(out*in*s))",
)
