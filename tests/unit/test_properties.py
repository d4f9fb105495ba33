"""Property-based tests of prune_layer (hypothesis): random shapes, patterns, dtypes, sparsities, scales,
dead inputs, rank-deficient Grams and given masks, for every registered method.

Invariants: the pattern's exact counts (or the given mask, returned unchanged), zeros outside the mask,
dtype / shape / device kept, inputs unmodified, finite output, error finite and >= 0, stats consistent.
Bounded (small shapes, max_examples, no deadline) so the file runs in seconds on the 2-core machine.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels import masks, methods  # noqa: E402
from admm_kernels.patterns import parse_pattern  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROPERTY = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def layers(draw):
    """(weight, gram, pattern, sparsity, mask or None, (method, preset))."""
    method = draw(st.sampled_from([(m, None) for m in methods.names()]
                                  + [(m.name, p) for m in methods.methods().values() for p in m.presets]))
    kind = draw(st.sampled_from(["unstructured", "per-row", "nm"]))
    out_f = draw(st.integers(1, 10))
    if kind == "nm":
        m = draw(st.sampled_from([2, 3, 4, 8]))
        n = draw(st.integers(1, m - 1))
        in_f = m * draw(st.integers(1, 4))
        pattern = f"{n}:{m}"
    else:
        in_f = draw(st.integers(1, 20))
        pattern = kind
    sparsity = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99]) | st.floats(0.0, 0.999))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w_scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    W = (torch.randn(out_f, in_f, generator=g) * w_scale).to(dtype)
    n_tokens = draw(st.integers(1, 3 * in_f + 2))  # fewer tokens than inputs: a singular Gram
    x = torch.randn(n_tokens, in_f, generator=g)
    n_dead = draw(st.integers(0, in_f))
    if n_dead:
        x[:, torch.randperm(in_f, generator=g)[:n_dead]] = 0
    G = ak.gram(x) * draw(st.sampled_from([1e-12, 1.0, 1e6]))
    mask = None
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the cases: update-only
        mask = torch.rand(out_f, in_f, generator=g) > draw(st.floats(0.0, 1.0))
    return W, G, pattern, sparsity, mask, method


@PROPERTY
@given(layers())
def test_prune_layer_invariants(case):
    W, G, pattern, sparsity, mask, method = case
    W0, G0 = W.clone(), G.clone()
    M0 = None if mask is None else mask.clone()
    method, preset = method
    # a mask is pruned on as it is: an explicit sparsity / pattern it does not satisfy is an error
    given = {"sparsity": sparsity, "pattern": pattern} if mask is None else {}
    res = ak.prune_layer(W, G, **given, method=method, mask=mask, preset=preset)

    assert torch.equal(W, W0) and torch.equal(G, G0)  # inputs unmodified
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape and res.weight.device == W.device
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    assert bool(torch.isfinite(res.weight).all())
    assert bool((res.weight[~res.mask] == 0).all())  # zeros outside the mask
    assert isinstance(res.error, float) and math.isfinite(res.error) and res.error >= 0.0
    if mask is not None:
        assert torch.equal(mask, M0) and torch.equal(res.mask, M0) and res.mask is not mask
    else:
        p = parse_pattern(pattern, W.shape[1])
        masks.count_check(res.mask, p, p.sparsity(sparsity))  # exact counts
    st_ = res.stats
    assert st_["method"] == method and st_["preset"] == preset
    assert st_["sparsity"] == pytest.approx(1 - float(res.mask.sum()) / W.numel())
    assert set(st_["options"]) == set(methods.get(method).option_names)


@PROPERTY
@given(layers())
def test_reconstruction_error_agrees_with_prune_layer(case):
    W, G, pattern, sparsity, mask, (method, preset) = case
    # a mask is pruned on as it is: an explicit sparsity / pattern it does not satisfy is an error
    given = {"sparsity": sparsity, "pattern": pattern} if mask is None else {}
    res = ak.prune_layer(W, G, **given, method=method, mask=mask, preset=preset)
    assert ak.reconstruction_error(W, res.weight, G) == pytest.approx(res.error, rel=1e-9, abs=1e-300)
    assert ak.reconstruction_error(W, W, G) == 0.0
