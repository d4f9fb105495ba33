"""Every backend's solver ops against the pure-torch reference, opcheck on every op, and the registry.

Backends: every name in admm_kernels.backends.available() except "triton" (tests/kernels/test_triton.py runs
those through the interpreter). Masks must equal the reference exactly; values follow the tolerance
rule: error against an fp64 reference <= 2x the fp32 reference's error (+ a tiny absolute slack).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from admm_kernels import backends
from admm_kernels.backends import _extension
from admm_kernels.backends import reference as ref

BACKENDS = [b for b in backends.available() if b != "triton"]
HAS_C = _extension.load() is not None
SHAPES = [(1, 1), (7, 123), (769, 1000)]
SCORE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _impl(backend: str, op: str):
    fn = getattr(backends.get(backend), op, None)
    if fn is None:
        pytest.skip(f"backend {backend} has no {op}")
    return fn


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend in ("cuda", "triton") else "cpu")


def _views(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as contiguous, transposed-storage and strided views (all of t's shape)."""
    r, c = t.shape
    transposed = t.T.contiguous().T  # column-major storage
    wide = torch.empty(r, 2 * c, dtype=t.dtype, device=t.device)
    wide[:, ::2] = t  # every other column: stride (2c, 2)
    return {"contiguous": t, "transposed": transposed, "strided": wide[:, ::2]}


# --- gram_update --------------------------------------------------------------------------------------

def _gram_errors(backend, x, G0):
    """(kernel error, fp32-reference error) against the fp64 truth; also checks the lower triangle."""
    truth = G0.double() + torch.triu(x.double().T @ x.double())
    G_ref = G0.clone()
    ref.gram_update(G_ref, x.cpu())
    G = G0.clone().to(_device(backend))
    _impl(backend, "gram_update")(G, x.to(_device(backend)))
    G = G.cpu()
    lower = torch.tril(torch.ones_like(G0, dtype=torch.bool), diagonal=-1)
    assert torch.equal(G[lower], G0[lower]), "the strict lower triangle must not be written"
    return (G.double() - truth).abs().max().item(), (G_ref.double() - truth).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [(300, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gram_update_matches_reference(backend, shape, dtype):
    n, d = shape
    x = torch.randn(n, d).to(dtype)
    G0 = torch.randn(d, d)  # a non-zero start: the update must add, and leave the lower half alone
    err, err_ref = _gram_errors(backend, x, G0)
    assert err <= 2 * err_ref + 1e-5, (err, err_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_gram_update_non_contiguous_x(backend, layout):
    if layout == "expanded":  # one row repeated through a zero stride
        x = torch.randn(1, 70).expand(129, 70)
    else:
        x = _views(torch.randn(129, 70))[layout]
    assert not x.is_contiguous()
    err, err_ref = _gram_errors(backend, x, torch.zeros(70, 70))
    assert err <= 2 * err_ref + 1e-5, (err, err_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_update_fp64_accumulator(backend):
    x = torch.randn(200, 300) * 1e3
    G0 = torch.randn(300, 300, dtype=torch.float64)
    truth = G0 + torch.triu(x.double().T @ x.double())
    G = G0.clone().to(_device(backend))
    _impl(backend, "gram_update")(G, x.to(_device(backend)))
    assert G.dtype == torch.float64
    # fp64 accumulation: relative error at fp64 level, far below anything fp32 could reach.
    assert (G.cpu() - truth).abs().max().item() <= 1e-9 * truth.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_update_non_contiguous_G_and_accumulates(backend):
    dev = _device(backend)
    x1, x2 = torch.randn(50, 40), torch.randn(30, 40)
    G = torch.zeros(40, 40, device=dev).T  # a transposed (column-major) accumulator
    fn = _impl(backend, "gram_update")
    fn(G, x1.to(dev))
    fn(G, x2.to(dev))
    x = torch.cat([x1, x2])
    expect = torch.triu(x.T @ x)
    torch.testing.assert_close(G.cpu(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_update_empty_rows(backend):
    G = torch.ones(5, 5, device=_device(backend))
    _impl(backend, "gram_update")(G, torch.empty(0, 5, device=_device(backend)))
    assert torch.equal(G.cpu(), torch.ones(5, 5))


# --- prune_mask -----------------------------------------------------------------------------------------

def _scores(kind: str, shape, dtype):
    r, c = shape
    if kind == "random":
        s = torch.randn(r, c)
    elif kind == "ties":  # few distinct values: the tie rule decides most of the mask
        s = torch.randint(-2, 3, (r, c)).float() * 0.5
    elif kind == "signed_zeros":  # -0.0 and +0.0 are equal scores
        s = torch.where(torch.rand(r, c) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        s[torch.rand(r, c) < 0.2] = 1.0
    elif kind == "zero_rows":  # all-zero rows (dead outputs) among random ones, plus +-inf
        s = torch.randn(r, c).abs()
        s[::3] = 0.0
        s.view(-1)[:: max(1, s.numel() // 5)] = float("inf")
    else:
        raise AssertionError(kind)
    return s.to(dtype)


def _k_values(limit: int) -> list[int]:
    return sorted({0, 1, limit // 3, limit // 2, limit - 1, limit} & set(range(limit + 1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zeros", "zero_rows"])
@pytest.mark.parametrize("per_row", [False, True])
def test_prune_mask_matches_reference(backend, shape, kind, per_row):
    fn = _impl(backend, "prune_mask")
    s = _scores(kind, shape, torch.float32)
    limit = shape[1] if per_row else s.numel()
    for k in _k_values(limit):
        got = fn(s.to(_device(backend)), k, per_row)
        assert got.dtype == torch.bool and got.shape == s.shape
        assert torch.equal(got.cpu(), ref.prune_mask(s, k, per_row)), (k, per_row)
        pruned = (~got).sum(dim=1) if per_row else (~got).sum()
        assert torch.all(pruned == k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("per_row", [False, True])
def test_prune_mask_dtypes_and_layouts(backend, dtype, layout, per_row):
    s = _views(_scores("ties", (37, 91), dtype))[layout]
    before = s.clone()
    k = 40 if per_row else 1500
    got = _impl(backend, "prune_mask")(s.to(_device(backend)), k, per_row)
    assert torch.equal(got.cpu(), ref.prune_mask(s, k, per_row))
    assert torch.equal(s, before), "scores must not be modified"


def test_prune_mask_large_layer_radix_paths():
    """Above one radix chunk (65536) and across many chunks: ties spread over chunk boundaries."""
    s = torch.randint(0, 7, (300, 1111)).float()
    # Values differing from 1.0 only in their low mantissa bits share 1.0's first-pass radix bin, so the
    # second (low 16 bits) pass has real work to do.
    s.view(-1)[:200_000:1000] = 1.0 + torch.arange(200) * 2.0**-20
    for backend in BACKENDS:
        for k in (0, 1, 47_000, 150_000, 333_299, 333_300):
            got = _impl(backend, "prune_mask")(s.to(_device(backend)), k, False)
            assert torch.equal(got.cpu(), ref.prune_mask(s, k, False)), (backend, k)


# --- nm_mask ----------------------------------------------------------------------------------------------

NM = [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (5, 16), (3, 7), (10, 32), (0, 4), (4, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nm", NM, ids=[f"{n}:{m}" for n, m in NM])
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zeros", "zero_rows"])
def test_nm_mask_matches_reference(backend, nm, kind):
    n, m = nm
    fn = _impl(backend, "nm_mask")
    for rows, groups in [(1, 1), (7, 13), (65, 40)]:
        s = _scores(kind, (rows, groups * m), torch.float32)
        got = fn(s.to(_device(backend)), n, m)
        assert got.dtype == torch.bool and got.shape == s.shape
        assert torch.equal(got.cpu(), ref.nm_mask(s, n, m)), (rows, groups)
        assert torch.all(got.cpu().view(rows, groups, m).sum(-1) == n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_nm_mask_dtypes_and_layouts(backend, dtype, layout):
    s = _views(_scores("ties", (33, 48), dtype))[layout]
    for n, m in [(2, 4), (3, 8), (2, 3)]:
        got = _impl(backend, "nm_mask")(s.to(_device(backend)), n, m)
        assert torch.equal(got.cpu(), ref.nm_mask(s, n, m)), (n, m)


# --- admm_dual_step ---------------------------------------------------------------------------------------

def _dual_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, U, B = (torch.randn(shape, generator=g) for _ in range(3))
    M = torch.rand(shape, generator=g) < 0.5
    return W, U, M, B


def _dual_truth(W, U, M, B, rho):
    Wd, Ud, Bd = W.double(), U.double(), B.double()
    Z = (Wd + Ud) * M
    U_new = Ud + Wd - Z
    return U_new, Bd + rho * (Z - U_new)


def _check_dual(backend, W, U, M, B, rho):
    dev = _device(backend)
    U_truth, R_truth = _dual_truth(W, U, M, B, rho)
    U_ref, R_ref = U.clone(), torch.empty_like(B)
    ref.admm_dual_step(W, U_ref, M, B, rho, R_ref)
    ins = [t.clone() for t in (W, M, B)]
    U_k, R_k = U.clone().to(dev), torch.full_like(B, float("nan")).to(dev)
    _impl(backend, "admm_dual_step")(W.to(dev), U_k, M.to(dev), B.to(dev), rho, R_k)
    for t, before in zip((W, M, B), ins):
        assert torch.equal(t, before), "inputs must not be modified"
    for got, truth, r32 in ((U_k.cpu(), U_truth, U_ref), (R_k.cpu(), R_truth, R_ref)):
        err = (got.double() - truth).abs().max().item()
        err_ref = (r32.double() - truth).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [(3, 200_003)])
@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_admm_dual_step_matches_reference(backend, shape, rho):
    _check_dual(backend, *_dual_inputs(shape), rho)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_admm_dual_step_non_contiguous(backend, layout):
    W, U, M, B = (_views(t)[layout] for t in _dual_inputs((45, 67), seed=1))
    assert not W.is_contiguous()
    _check_dual(backend, W, U, M, B, 0.7)
    # Non-contiguous outputs too: U and R written through their strides.
    dev = _device(backend)
    W, U, M, B = _dual_inputs((45, 67), seed=2)
    U_out, R_out = _views(U.clone())[layout].to(dev), _views(torch.zeros_like(B))[layout].to(dev)
    U_ref, R_ref = U.clone(), torch.empty_like(B)
    ref.admm_dual_step(W, U_ref, M, B, 0.7, R_ref)
    _impl(backend, "admm_dual_step")(W.to(dev), U_out, M.to(dev), B.to(dev), 0.7, R_out)
    torch.testing.assert_close(U_out.cpu(), U_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R_out.cpu(), R_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_admm_dual_step_all_masked_and_all_kept(backend):
    for keep in (True, False):
        W, U, _, B = _dual_inputs((9, 31), seed=3)
        M = torch.full(W.shape, keep)
        _check_dual(backend, W, U, M, B, 1.0)


# --- C++ input validation (the Python layer validates too; these are the kernels' own checks) ------------

OPS = torch.ops.admm_kernels
needs_c = pytest.mark.skipif(not HAS_C, reason=f"admm_kernels._C not built: {_extension.reason()}")


@needs_c
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: OPS.prune_mask(torch.randn(3, 4), 13, False), "k must be in"),
        (lambda: OPS.prune_mask(torch.randn(3, 4), -1, True), "k must be in"),
        (lambda: OPS.prune_mask(torch.randn(12), 1, False), "scores must be 2-D"),
        (lambda: OPS.prune_mask(torch.ones(3, 4, dtype=torch.int32), 1, False),
         "floating-point"),
        (lambda: OPS.nm_mask(torch.randn(3, 10), 2, 4), "not a multiple of m=4"),
        (lambda: OPS.nm_mask(torch.randn(3, 8), 5, 4), "n must be in"),
        (lambda: OPS.nm_mask(torch.randn(3, 8), 1, 0), "m must be >= 1"),
        (lambda: OPS.gram_update(torch.zeros(4, 5), torch.randn(2, 4)), "G must be square"),
        (lambda: OPS.gram_update(torch.zeros(4, 4), torch.randn(2, 5)), "x has 5 columns"),
        (lambda: OPS.gram_update(torch.zeros(4, 4, dtype=torch.float16), torch.randn(2, 4)),
         "G must be float32 or float64"),
        (lambda: OPS.admm_dual_step(*(torch.zeros(2, 3) for _ in range(4)), 1.0, torch.zeros(2, 3)),
         "M must be bool"),
        (lambda: OPS.admm_dual_step(
            torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3), 1.0,
            torch.zeros(2, 3)),
         "U has shape"),
        (lambda: OPS.admm_dual_step(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3), 1.0,
            torch.zeros(1, 3).expand(2, 3)),
         "R has internally overlapping"),
    ],
)
def test_cpu_kernels_reject_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# --- opcheck --------------------------------------------------------------------------------------------

def _opcheck_samples():
    G = torch.zeros(6, 6)
    x = torch.randn(5, 6)
    s = torch.randn(4, 8)
    W, U, M, B = _dual_inputs((4, 8))
    return [
        ("gram_update", (G, x)),
        ("gram_update", (G.double(), x.bfloat16())),
        ("prune_mask", (s, 9, False)),
        ("prune_mask", (s, 3, True)),
        ("nm_mask", (s, 2, 4)),
        ("admm_dual_step", (W, U, M, B, 1.0, torch.empty_like(W))),
    ]


@needs_c
@pytest.mark.parametrize("name, args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_with_cpp_kernels(name, args):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"admm_kernels::{name}", "CPU")
    torch.library.opcheck(getattr(torch.ops.admm_kernels, name).default, args)


_NO_C_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["admm_kernels._C"] = None  # makes `import admm_kernels._C` fail: the package's no-_C mode
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_ops
    from admm_kernels.backends import _extension
    assert _extension.load() is None
    assert test_ops.BACKENDS == ["reference"], test_ops.BACKENDS
    for name, args in test_ops._opcheck_samples():
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"admm_kernels::{name}", "CPU")
        torch.library.opcheck(getattr(torch.ops.admm_kernels, name).default, args)
    print("ok")
    """
)


def test_opcheck_without_cpp_kernels():
    """The reference (CompositeExplicitAutograd) registrations pass opcheck in a process with no _C."""
    env = {k: v for k, v in os.environ.items() if k != "ADMM_KERNELS_BACKEND"}
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _NO_C_SCRIPT, here], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --- registry ---------------------------------------------------------------------------------------------

@needs_c
@pytest.mark.parametrize("op", backends.OPS)
def test_selection_picks_cpu_when_built(no_forced_backend, op):
    name, fn = backends.select(op, "cpu")
    assert name == "cpu"
    assert fn is getattr(backends.get("cpu"), op)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    for op in backends.OPS:
        assert backends.select(op, "cpu") == ("reference", getattr(ref, op))


@needs_c
def test_forced_cpu(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "CPU")  # case-insensitive
    assert backends.select("admm_dual_step", "cpu")[0] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_forced_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="ADMM_KERNELS_BACKEND='cuda'.*not available"):
        backends.select("prune_mask", "cpu")


@needs_c
def test_forced_backend_on_wrong_device_raises(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="cannot run on device meta"):
        backends.select("prune_mask", "meta")


def test_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.get("bogus")
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.select("gram_update", "cpu")


def test_unknown_op_raises(no_forced_backend):
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        backends.select("nope", "cpu")


def test_reference_is_always_available():
    assert "reference" in backends.available()
    assert ("cpu" in backends.available()) == HAS_C
