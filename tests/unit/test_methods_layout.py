"""The method registry and the ADMM steps that presets recombine (admm_kernels.methods)."""

import pytest
import torch
from conftest import correlated_inputs

import admm_kernels as ak
from admm_kernels import backends, masks, methods
from admm_kernels.methods import admm, registry
from admm_kernels.methods.refit import masked_cg
from admm_kernels.methods.scaling import scale
from admm_kernels.methods.wupdate import WUpdate
from admm_kernels.patterns import parse_pattern


def layer(out=24, inn=48, seed=0):
    x = correlated_inputs(256, inn, outliers=4, seed=seed)
    return torch.randn(out, inn, generator=torch.Generator().manual_seed(seed + 1)), ak.gram(x)


def test_one_list_of_methods(capsys):
    from admm_kernels.bench.methods import aliases
    from admm_kernels.cli import main
    from admm_kernels.cli.prune import methods_epilog

    names = methods.names()
    assert names[:4] == ("admm", "sparsegpt", "wanda", "magnitude")
    assert all(aliases()[n] == (n, {}) for n in names)
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert f"--method {{{','.join(names)}}}" in capsys.readouterr().out  # the choices, in registry order
    epilog = " ".join(methods_epilog().split())
    for m in methods.methods().values():
        assert m.grouping.startswith("unstructured") and m.summary
        assert f"{m.name}: {m.summary}; {m.grouping}" in epilog


def test_unknown_preset_and_bad_preset_type():
    W, G = layer()
    with pytest.raises(ValueError, match=r"unknown preset 'nope' for method 'admm'; available: "):
        ak.prune_layer(W, G, preset="nope")
    with pytest.raises(ValueError, match=r"unknown preset 'fast' for method 'wanda'"):
        ak.prune_layer(W, G, method="wanda", preset="fast")
    with pytest.raises(TypeError, match=r"preset must be a str or None, got 3"):
        ak.prune_layer(W, G, preset=3)


@pytest.fixture
def admm_with_preset(monkeypatch):
    """ADMM registered with one extra preset, as a later change registers "accurate" / "fast"."""
    base = registry.get("admm")
    patched = registry.Method(name=base.name, run=base.run, options=base.options, summary=base.summary,
                              grouping=base.grouping, presets={"short": {"iters": 4, "rho": 0.5}})
    monkeypatch.setitem(registry._REGISTRY, "admm", patched)
    return patched


def test_preset_then_explicit_options_and_recorded(admm_with_preset):
    W, G = layer()
    res = ak.prune_layer(W, G, 0.5, preset="short", rho=2.0)
    assert res.stats["preset"] == "short" and res.stats["iterations"] == 4
    opts = res.stats["options"]
    assert opts["iters"] == 4 and opts["rho"] == 2.0 and opts["T"] == 15
    assert opts["compute_dtype"] == "float32"
    same = ak.prune_layer(W, G, 0.5, iters=4, rho=2.0)
    assert torch.equal(res.weight, same.weight) and same.stats["preset"] is None
    with pytest.raises(ValueError, match=r"iters must be >= 0, got -2"):
        ak.prune_layer(W, G, preset="short", iters=-2)


def test_registry_rejects_duplicates_and_presets_with_unknown_options():
    base = registry.get("magnitude")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(base)
    bad = registry.Method(name="zz-test", run=base.run, options=(), summary="s", grouping="unstructured = x",
                          presets={"p": {"iters": 3}})
    with pytest.raises(ValueError, match=r"preset 'p' of method 'zz-test' sets unknown option"):
        registry.register(bad)
    assert "zz-test" not in methods.names()


@pytest.mark.parametrize("rho", [0.1, 1.0, 3.0])
def test_wupdate_eigh_equals_cholesky(rho):
    W, G = layer()
    p = scale(W, G, torch.float64)
    p.form_scaled_gram()
    p.damp(0.05)
    chol = WUpdate(p.G_hat.clone(), 1.0, "cholesky")
    eig = WUpdate(p.G_hat.clone(), 1.0, "eigh")
    chol.set_rho(rho)
    eig.set_rho(rho)
    expect = torch.linalg.inv(p.G_hat + rho * torch.eye(p.n_live, dtype=torch.float64))
    torch.testing.assert_close(chol.inverse, expect, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(eig.inverse, expect, rtol=1e-9, atol=1e-10)
    assert torch.equal(chol.gram(), p.G_hat)  # the Gram comes back exactly after re-factoring
    assert chol.factorizations == (1 if rho == 1.0 else 2)


def test_iterate_rho_schedule_and_stop_rule():
    """The loop's callbacks: a ρ schedule that returns the current ρ changes nothing; a stopping rule ends
    the loop; a growing ρ moves the iterate towards the projection (smaller primal residual)."""
    W, G = layer()
    pat = parse_pattern("unstructured", W.shape[1])
    M = masks.select(W.abs(), pat, 0.5)

    def run(rho_schedule=None, stop=None):
        p = scale(W, G, torch.float64)
        p.form_scaled_gram()
        p.damp(0.1 * float(p.G_hat.diagonal().mean()))
        solver = WUpdate(p.take_gram(), 1.0, "eigh")
        state = admm.AdmmState.start(p, 1.0, M)
        step = backends.implementation("admm_dual_step", W.device, reference=True)
        admm.iterate(p, solver, state, 12, step, rho_schedule=rho_schedule, stop=stop)
        return state

    plain = run()
    same = run(rho_schedule=lambda t, s: s.rho)
    assert torch.equal(plain.W, same.W) and torch.equal(plain.U, same.U)
    stopped = run(stop=lambda t, s: t == 2)
    assert stopped.iterations == 3 and plain.iterations == 12
    grown = run(rho_schedule=lambda t, s: s.rho * 1.5)
    assert grown.rho == pytest.approx(1.5 ** 12)

    def residual(s):
        return float((s.W - s.W * s.M).norm())
    assert residual(grown) < residual(plain)


def test_masked_cg_jacobi_preconditioning():
    """On a badly scaled SPD matrix the Jacobi-preconditioned CG reaches the same masked optimum in fewer
    iterations than plain CG."""
    g = torch.Generator().manual_seed(0)
    n, cols = 60, 5
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    s = torch.logspace(-2, 2, n, dtype=torch.float64)
    A = (X.T @ X) * s[:, None] * s[None, :] + 1e-3 * torch.eye(n, dtype=torch.float64)
    B = torch.randn(n, cols, generator=g, dtype=torch.float64)
    M = torch.rand(n, cols, generator=g) > 0.3
    x0 = torch.zeros(n, cols, dtype=torch.float64)
    plain, it_plain, _ = masked_cg(A, B, M, x0, 5000, 1e-10)
    pre, it_pre, res = masked_cg(A, B, M, x0, 5000, 1e-10, precondition=A.diagonal())
    assert res <= 1e-10 and it_pre < it_plain
    for j in range(cols):
        S = M[:, j]
        exact = torch.linalg.solve(A[S][:, S], B[S, j])
        torch.testing.assert_close(pre[S, j], exact, rtol=1e-6, atol=1e-8)
        assert bool((pre[~S, j] == 0).all())


@pytest.mark.parametrize("method", ["admm", "sparsegpt", "alps"])
def test_compute_dtype_by_name(method):
    """-o compute_dtype=float64 on the command line arrives as text."""
    W, G = layer()
    by_name = ak.prune_layer(W, G, 0.5, method=method, compute_dtype="float64")
    by_dtype = ak.prune_layer(W, G, 0.5, method=method, compute_dtype=torch.float64)
    assert torch.equal(by_name.weight, by_dtype.weight)
    assert by_name.stats["options"]["compute_dtype"] == "float64"
    with pytest.raises(TypeError, match=r"compute_dtype must be torch.float32 or torch.float64 \(or 'fl"):
        ak.prune_layer(W, G, method=method, compute_dtype="float16")
