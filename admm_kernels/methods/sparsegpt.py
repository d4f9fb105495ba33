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


def _inverse_factor(G: torch.Tensor, percdamp: float, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U (in, in) the upper Cholesky factor of (G + λI)⁻¹ in dtype cd, λ = percdamp ·
    mean(diag); dead (in,) bool, the inputs with diag G == 0 (given the live diagonal's mean)."""
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
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead


class _Selector:
    """The adaptive mask selection on the partially updated weights, by the OBS score w² / U_jj² (dead
    inputs last). The backend ops are looked up once: the N:M branch selects every M columns (2752 times
    at in=11008), and both a registry look-up and a dead-input test (a device sync on CUDA) per group
    would sit on that hot path. `seconds` accumulates the selection time."""

    def __init__(self, pattern: Pattern, s: float, dead: torch.Tensor, device: torch.device, ref: bool,
                 used: dict):
        self.pattern, self.s, self.dead = pattern, s, dead
        self.any_dead = bool(dead.any())
        kind = "nm_mask" if pattern.kind == "nm" else "prune_mask"
        self.op = backends.implementation(kind, device, reference=ref, used=used)
        self.seconds = 0.0

    def _scored(self, w: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        sc = w.pow(2) / d.pow(2)
        return masks.with_dead(sc, self.dead[lo:hi]) if self.any_dead else sc

    def block(self, W1: torch.Tensor, dg: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        """Unstructured / per-row: the kept entries (out, i2 - i1) of columns [i1, i2)."""
        tm = time.perf_counter()
        sc = self._scored(W1, dg, i1, i2)
        if self.pattern.kind == "unstructured":
            out_f = W1.shape[0]
            keep = self.op(sc, int(out_f * i2 * self.s) - int(out_f * i1 * self.s), False)
        else:
            keep = self.op(sc, int(i2 * self.s) - int(i1 * self.s), True)
        self.seconds += time.perf_counter() - tm
        return keep

    def group(self, W1: torch.Tensor, dg: torch.Tensor, j: int, i1: int) -> torch.Tensor:
        """N:M: the kept entries (out, M) of the group starting at block column j (column i1 + j)."""
        tm = time.perf_counter()
        m = self.pattern.m
        sc = self._scored(W1[:, j:j + m], dg[j:j + m], i1 + j, i1 + j + m)
        keep = self.op(sc, self.pattern.n, m)
        self.seconds += time.perf_counter() - tm
        return keep


def _obs_block(W1: torch.Tensor, U1: torch.Tensor, keep: torch.Tensor, i1: int,
               select: _Selector | None) -> torch.Tensor:
    """Prune the block's columns W1 (out, b) one by one in place, each error spread over the later columns
    along U1 (b, b); returns the errors Err1 (out, b) for the lazy update of the later blocks. select:
    the N:M selection (None: `keep` is already final for these columns)."""
    Err1 = torch.zeros_like(W1)
    dg = U1.diagonal()
    for j in range(W1.shape[1]):
        if select is not None and j % select.pattern.m == 0:
            keep[:, i1 + j:i1 + j + select.pattern.m] = select.group(W1, dg, j, i1)
        w = W1[:, j].clone()
        q = w.masked_fill(~keep[:, i1 + j], 0)
        err = (w - q) / dg[j]
        W1[:, j:].addr_(err, U1[j, j:], alpha=-1)
        W1[:, j] = q
        Err1[:, j] = err
    return Err1


def run(weight: torch.Tensor, G: torch.Tensor, pattern: Pattern, sparsity: float, mask: torch.Tensor | None,
        options: dict) -> MethodResult:
    """weight (out, in) any float dtype, G (in, in). Computes in float32 (or compute_dtype=torch.float64)."""
    percdamp, blocksize, cd = options["percdamp"], options["blocksize"], options["compute_dtype"]
    used: dict[str, str] = {}
    t0 = time.perf_counter()
    out_f, in_f = weight.shape

    W = weight.to(cd).clone()
    Hinv, dead = _inverse_factor(G, percdamp, cd)
    t_factor = time.perf_counter()

    if pattern.kind == "nm":  # blocks must hold whole groups
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=W.device) if mask is None else mask
    select = None if mask is not None else _Selector(pattern, pattern.sparsity(sparsity), dead, W.device,
                                                     cd == torch.float64, used)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()
        U1 = Hinv[i1:i2, i1:i2]
        if select is not None and pattern.kind != "nm":
            keep[:, i1:i2] = select.block(W1, U1.diagonal(), i1, i2)
        Err1 = _obs_block(W1, U1, keep, i1, select if pattern.kind == "nm" else None)
        W[:, i1:i2] = W1
        if i2 < in_f:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    stats: dict = {}
    pruned = finite_cast(W.masked_fill_(~keep, 0), weight.dtype, stats=stats)
    t_end = time.perf_counter()
    t_mask = select.seconds if select is not None else 0.0
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
