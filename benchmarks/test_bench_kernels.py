"""pytest-benchmark micro-benchmarks of the solver kernels, each next to its plain-torch reference.

Run: pytest benchmarks/test_bench_kernels.py --benchmark-enable [--benchmark-group-by=group]
Sizes from the environment (defaults are the realistic ones; check with small ones):
    ADMM_BENCH_LAYER=4096x11008   the (rows, cols) of the mask and step kernels
    ADMM_BENCH_GRAM=4096x4096     x's (n, in) for gram_update
Backends: every available one except triton (the GPU scripts time that); the reference is timed too.
`python benchmarks/roofline.py --kernels` prints the same kernels as ratios and roofline fractions.
"""

from __future__ import annotations

import os

import pytest
import torch

from admm_kernels import backends


def _shape(var: str, default: str) -> tuple[int, int]:
    text = os.environ.get(var, default)
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{var} must look like 4096x11008, got {text!r}") from None
    if r < 1 or c < 4:
        raise ValueError(f"{var} must be at least 1x4, got {text!r}")
    return r, c


ROWS, COLS = _shape("ADMM_BENCH_LAYER", "4096x11008")
GRAM_N, GRAM_IN = _shape("ADMM_BENCH_GRAM", "4096x4096")
NAMES = [b for b in backends.available() if b not in ("triton", "cuda")]


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    W, U, B = (torch.randn(ROWS, COLS, generator=g) for _ in range(3))
    M = torch.rand(ROWS, COLS, generator=g) < 0.5
    return {"W": W, "U": U, "B": B, "M": M, "scores": W.abs(), "R": torch.empty_like(W)}


@pytest.mark.parametrize("name", NAMES + ["addmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gram_update(benchmark, name, dtype):
    benchmark.group = f"gram_update {GRAM_N}x{GRAM_IN} {dtype}"
    x = torch.randn(GRAM_N, GRAM_IN).to(dtype)
    G = torch.zeros(GRAM_IN, GRAM_IN)
    if name == "addmm":  # the full product: what the triangle kernels are measured against
        benchmark(lambda: G.addmm_(x.T.float(), x.float()))
    else:
        fn = backends.get(name).gram_update
        benchmark(fn, G, x)


@pytest.mark.parametrize("name", NAMES + ["kthvalue"])
def test_prune_mask_per_layer(benchmark, layer, name):
    benchmark.group = f"prune_mask per-layer {ROWS}x{COLS}"
    s = layer["scores"]
    k = s.numel() // 2
    if name == "kthvalue":  # the threshold alone (no exact-k tie rule): the speed target's baseline
        benchmark(torch.kthvalue, s.view(-1), k)
    else:
        mask = benchmark(backends.get(name).prune_mask, s, k, False)
        assert int((~mask).sum()) == k


@pytest.mark.parametrize("name", NAMES + ["kthvalue"])
def test_prune_mask_per_row(benchmark, layer, name):
    benchmark.group = f"prune_mask per-row {ROWS}x{COLS}"
    s = layer["scores"]
    k = COLS // 2
    if name == "kthvalue":
        benchmark(torch.kthvalue, s, k, 1)
    else:
        benchmark(backends.get(name).prune_mask, s, k, True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
def test_nm_mask(benchmark, layer, name, nm):
    n, m = nm
    cols = COLS - COLS % m
    s = layer["scores"][:, :cols].contiguous()
    benchmark.group = f"nm_mask {n}:{m} {ROWS}x{cols}"
    benchmark(backends.get(name).nm_mask, s, n, m)


@pytest.mark.parametrize("name", NAMES + ["copy"])
def test_admm_dual_step(benchmark, layer, name):
    benchmark.group = f"admm_dual_step {ROWS}x{COLS}"
    W, U, M, B, R = (layer[k] for k in "WUMBR")
    if name == "copy":  # the bandwidth yardstick: one fp32 copy of the layer
        benchmark(R.copy_, W)
    else:
        fn = backends.get(name).admm_dual_step
        benchmark(fn, W, U.clone(), M, B, 1.0, R)
