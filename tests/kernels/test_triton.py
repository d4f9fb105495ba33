"""Every Triton launch function against the pure-torch reference (admm_kernels/backends/reference.py).

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET is read when a kernel is
decorated (triton.jit), i.e. when admm_kernels.backends.triton.<module> is imported, so the fixture below
sets it and (re)imports those modules; it is restored afterwards so other test modules see no change.
With a GPU the same tests run natively on CUDA tensors. Shapes are small and odd (the interpreter
emulates every program in numpy).
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numpy")

from admm_kernels.backends import reference  # noqa: E402

pytestmark = pytest.mark.triton
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
_KERNEL_MODULES = ("gram", "nm", "topk", "dual_step", "_common")


@pytest.fixture(scope="module", autouse=True)
def tk():
    """The admm_kernels.backends.triton package with kernels built for this machine (interpreted on CPU)."""
    mp = pytest.MonkeyPatch()
    if not ON_GPU:
        mp.setenv("TRITON_INTERPRET", "1")
    for name in _KERNEL_MODULES:
        full = f"admm_kernels.backends.triton.{name}"
        if full in sys.modules:
            importlib.reload(sys.modules[full])
        else:
            importlib.import_module(full)
    yield importlib.import_module("admm_kernels.backends.triton")
    mp.undo()


def _t(*shape, dtype=torch.float32, gen=torch.randn):
    return gen(*shape, dtype=torch.float32).to(dtype).to(DEVICE)


# --- gram_update ------------------------------------------------------------------------------------

def _gram_error_bound(G0: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(fp64 truth of the upper triangle, 2 x the fp32 reference's max error against it + tiny slack)."""
    truth = G0.double() + torch.triu(x.double().T @ x.double())
    ref = G0.clone()
    reference.gram_update(ref, x)
    ref_err = (torch.triu(ref).double() - torch.triu(truth)).abs().max().item()
    return truth, 2 * ref_err + 1e-6 * max(1.0, truth.abs().max().item())


@pytest.mark.parametrize("n,d,dtype", [(1, 1, torch.float32), (37, 123, torch.bfloat16),
                                       (64, 70, torch.float16), (45, 97, torch.float32)])
def test_gram_update_matches_reference(tk, n, d, dtype):
    x = _t(n, d, dtype=dtype)
    G = _t(d, d)
    G_before = G.clone()
    truth, bound = _gram_error_bound(G_before, x)
    tk.gram_update(G, x)
    err = (torch.triu(G).double() - torch.triu(truth)).abs().max().item()
    assert err <= bound, (err, bound)
    # The strict lower triangle is neither read nor written.
    assert torch.equal(torch.tril(G, -1), torch.tril(G_before, -1))


def test_gram_update_non_contiguous_and_empty(tk):
    x = _t(80, 50)[::2].T.contiguous().T  # column-major (40, 50) view
    assert not x.is_contiguous()
    G = torch.zeros(50, 50, device=DEVICE)
    truth, bound = _gram_error_bound(G.clone(), x)
    tk.gram_update(G, x)
    assert (torch.triu(G).double() - torch.triu(truth)).abs().max().item() <= bound
    G2 = torch.ones(3, 3, device=DEVICE)
    tk.gram_update(G2, torch.zeros(0, 3, device=DEVICE))
    assert torch.equal(G2, torch.ones(3, 3, device=DEVICE))


def test_gram_update_fp64_goes_to_reference(tk):
    x = _t(20, 9)
    G = torch.zeros(9, 9, dtype=torch.float64, device=DEVICE)
    tk.gram_update(G, x)
    torch.testing.assert_close(G, torch.triu(x.double().T @ x.double()))


def test_gram_update_bad_input(tk):
    with pytest.raises(ValueError, match="x has 4 columns"):
        tk.gram_update(torch.zeros(3, 3, device=DEVICE), _t(2, 4))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        tk.gram_update(torch.zeros(3, 3, device=DEVICE), torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))


# --- prune_mask ------------------------------------------------------------------------------------

def _scores_cases():
    g = torch.Generator().manual_seed(1)
    yield "abs", torch.randn(7, 123, generator=g).abs()
    yield "signed", torch.randn(6, 50, generator=g)
    ties = torch.randint(0, 3, (5, 64), generator=g).float()
    ties[1] = 0.0  # an all-zero row
    yield "ties", ties
    z = torch.randn(4, 40, generator=g)
    z[:, ::3] = 0.0
    z[:, 1::3] = -0.0  # -0.0 ties with +0.0
    yield "signed_zero", z


@pytest.mark.parametrize("per_row", [False, True])
def test_prune_mask_matches_reference(tk, per_row):
    for name, s in _scores_cases():
        s = s.to(DEVICE)
        length = s.shape[1] if per_row else s.numel()
        for k in sorted({0, 1, length // 3, length // 2, length - 1, length}):
            got = tk.prune_mask(s, k, per_row)
            assert got.dtype == torch.bool and got.shape == s.shape
            assert torch.equal(got, reference.prune_mask(s, k, per_row)), (name, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_prune_mask_dtypes(tk, dtype):
    # bf16/fp16 have many exact ties; fp64 scores that round to the same fp32 tie as in the reference.
    s = (torch.randn(5, 33) * (1 + 1e-9 * torch.randn(5, 33))).to(dtype).to(DEVICE)
    for per_row in (False, True):
        k = 60 if not per_row else 17
        assert torch.equal(tk.prune_mask(s, k, per_row), reference.prune_mask(s, k, per_row))


def test_prune_mask_non_contiguous_and_tiny(tk):
    s = torch.randint(0, 4, (40, 6)).float().to(DEVICE).T  # (6, 40), column-major
    for per_row in (False, True):
        assert torch.equal(tk.prune_mask(s, 13, per_row), reference.prune_mask(s, 13, per_row))
    one = torch.tensor([[2.5]], device=DEVICE)
    assert tk.prune_mask(one, 0, False).item() is True
    assert tk.prune_mask(one, 1, True).item() is False


def test_prune_mask_bad_k(tk):
    with pytest.raises(ValueError, match="k must be an int in"):
        tk.prune_mask(_t(3, 4), 13, False)
    with pytest.raises(ValueError, match="k must be an int in"):
        tk.prune_mask(_t(3, 4), 5, True)


# --- nm_mask ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 5), (0, 3), (5, 5)])
def test_nm_mask_matches_reference(tk, n, m):
    ties = torch.randint(0, 3, (7, 6 * m)).float().to(DEVICE)
    ties[2] = 0.0
    got = tk.nm_mask(ties, n, m)
    assert torch.equal(got, reference.nm_mask(ties, n, m))
    assert (got.view(7, 6, m).sum(-1) == n).all()  # exact N:M counts
    half = _t(9, 4 * m, dtype=torch.float16)
    assert torch.equal(tk.nm_mask(half, n, m), reference.nm_mask(half, n, m))
    transposed = _t(4 * m, 9, dtype=torch.bfloat16).T
    assert torch.equal(tk.nm_mask(transposed, n, m), reference.nm_mask(transposed, n, m))


def test_nm_mask_bad_input(tk):
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        tk.nm_mask(_t(2, 6), 2, 4)
    with pytest.raises(ValueError, match="n must be an int in"):
        tk.nm_mask(_t(2, 8), 5, 4)


# --- admm_dual_step --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,layout", [((1, 1), "contiguous"), ((7, 123), "contiguous"),
                                          ((33, 20), "transposed"), ((16, 30), "sliced")])
def test_admm_dual_step_matches_reference(tk, shape, layout):
    def make(dtype=torch.float32):
        gen = (lambda *s: (torch.rand(*s) > 0.5)) if dtype == torch.bool else torch.randn
        if layout == "transposed":
            return gen(*shape[::-1]).to(DEVICE).T
        if layout == "sliced":
            return gen(shape[0], 2 * shape[1]).to(DEVICE)[:, ::2]
        return gen(*shape).to(DEVICE)

    W, U, B, R = make(), make(), make(), make()
    M = make(torch.bool)
    W0, B0, M0 = W.clone(), B.clone(), M.clone()
    U_ref, R_ref = U.clone(), torch.empty(shape, device=DEVICE)
    reference.admm_dual_step(W, U_ref, M, B, 0.7, R_ref)
    tk.admm_dual_step(W, U, M, B, 0.7, R)
    torch.testing.assert_close(U, U_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R, R_ref, rtol=1e-6, atol=1e-6)
    # Inputs other than U and R are untouched.
    assert torch.equal(W, W0) and torch.equal(B, B0) and torch.equal(M, M0)


def test_admm_dual_step_bad_input(tk):
    W = _t(3, 4)
    with pytest.raises(ValueError, match="U has shape"):
        tk.admm_dual_step(W, _t(4, 3), torch.ones(3, 4, dtype=torch.bool, device=DEVICE), W, 1.0, W.clone())
    with pytest.raises(TypeError, match="M must be a bool"):
        tk.admm_dual_step(W, W.clone(), torch.ones(3, 4, device=DEVICE), W, 1.0, W.clone())
    with pytest.raises(TypeError, match="B must be float32"):
        tk.admm_dual_step(W, W.clone(), torch.ones(3, 4, dtype=torch.bool, device=DEVICE), W.double(), 1.0,
                          W.clone())


# --- registry --------------------------------------------------------------------------------------

def test_forced_triton_backend_is_selected(tk, monkeypatch):
    from admm_kernels import backends

    monkeypatch.setenv("ADMM_KERNELS_BACKEND", "triton")
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in backends.OPS:
        name, fn = backends.select(op, DEVICE)
        assert name == "triton" and fn is getattr(tk, op)
