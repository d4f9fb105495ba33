"""pytest-benchmark micro-benchmarks of the layer solver's phases (measured, never asserted).

    pytest benchmarks/test_bench_solver.py --benchmark-enable            # size 1024 (out = in = 1024)
    ADMM_BENCH_SIZE=256 pytest benchmarks/test_bench_solver.py          # a quick check (runs each once)

The size comes from ADMM_BENCH_SIZE so a check on a small size stays fast; the backend is the registry's
choice (ADMM_KERNELS_BACKEND=reference times the pure-torch reference for comparison).
"""

from __future__ import annotations

import os

import pytest
import torch

import admm_kernels as ak
from admm_kernels import backends, masks
from admm_kernels.patterns import parse_pattern

N = int(os.environ.get("ADMM_BENCH_SIZE", "1024"))
TOKENS = 2048


def _inputs(n: int, inn: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few outlier features (like LLM activations), fp32 (n, inn)."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, inn // 8)
    x = torch.randn(n, rank, generator=g) @ (torch.randn(rank, inn, generator=g) / rank ** 0.5)
    x += 0.5 * torch.randn(n, inn, generator=g)
    x[:, torch.randperm(inn, generator=g)[:8]] *= 20
    return x


@pytest.fixture(scope="module")
def layer():
    x = _inputs(TOKENS, N)
    W = torch.randn(N, N, generator=torch.Generator().manual_seed(1))
    return W, ak.gram(x), x


def test_gram_update(benchmark, layer):
    _, _, x = layer
    acc = ak.GramAccumulator(N)
    benchmark.extra_info["backend"] = backends.select("gram_update", "cpu")[0]
    benchmark.extra_info["gflop"] = TOKENS * N * N / 1e9  # one triangle: half of 2 n in^2
    benchmark(acc.add, x)


def test_cholesky_and_inverse(benchmark, layer):
    _, G, _ = layer
    d = G.diagonal().sqrt() + 1e-8
    A = G / d[:, None] / d[None, :] + 1.1 * torch.eye(N)
    benchmark(lambda: torch.cholesky_inverse(torch.linalg.cholesky(A)))


@pytest.mark.parametrize("pattern", ["unstructured", "per-row", "2:4"])
def test_mask_projection(benchmark, layer, pattern):
    W, G, _ = layer
    scores = (W.abs() * G.diagonal().sqrt()).contiguous()
    p = parse_pattern(pattern, N)
    used: dict[str, str] = {}
    benchmark(masks.select, scores, p, 0.5, used=used)
    benchmark.extra_info["backends"] = used


def test_admm_iteration(benchmark, layer):
    """One iteration without mask update: the fused dual step and the GEMM A^-1 R ((in, in) x (in, out))."""
    W, G, _ = layer
    V = W.T.contiguous()
    U = torch.zeros_like(V)
    B = torch.randn_like(V)
    R = torch.empty_like(V)
    M = (torch.rand_like(V) > 0.5).contiguous()
    Ainv = torch.eye(N) * 0.5
    name, step = backends.select("admm_dual_step", "cpu")

    def iteration():
        step(V, U, M, B, 1.0, R)
        torch.mm(Ainv, R, out=V)

    benchmark.extra_info["backend"] = name
    benchmark.extra_info["gflop"] = 2 * N * N * N / 1e9
    benchmark(iteration)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_layer_admm(benchmark, layer, pattern):
    W, G, _ = layer
    res = benchmark.pedantic(ak.prune_layer, args=(W, G, 0.5, pattern), rounds=1, iterations=1)
    benchmark.extra_info.update({"error": res.error, "seconds": res.stats["seconds"],
                                 "backends": res.stats["backends"]})
