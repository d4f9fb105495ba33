"""Factorisations run with one torch thread on the CPU (they collapse under contention with more), and
the thread count is restored afterwards, also on an exception."""

import pytest
import torch

import admm_kernels as ak
from admm_kernels.methods.lapack import one_thread


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _spy(monkeypatch, name, seen):
    real = getattr(torch.linalg, name) if hasattr(torch.linalg, name) else getattr(torch, name)
    owner = torch.linalg if hasattr(torch.linalg, name) else torch

    def spy(*args, **kwargs):
        seen.append((name, torch.get_num_threads()))
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, spy)


@pytest.mark.parametrize("method,kwargs", [("admm", {}), ("admm", {"preset": "accurate"}), ("sparsegpt", {}),
                                           ("alps", {"max_iters": 6})])
def test_factorisations_use_one_thread_and_restore_the_count(two_threads, monkeypatch, method, kwargs):
    seen = []
    for name in ("cholesky_ex", "cholesky_inverse", "eigh"):
        _spy(monkeypatch, name, seen)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(96, 32, generator=g)
    ak.prune_layer(W, X.T @ X, 0.5, method=method, **kwargs)
    assert seen and all(threads == 1 for _, threads in seen), seen
    assert torch.get_num_threads() == 2


def test_one_thread_restores_on_error_and_can_be_turned_off(two_threads, monkeypatch):
    with pytest.raises(RuntimeError):
        with one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("ADMM_KERNELS_LAPACK_THREADS", "all")
    with one_thread():
        assert torch.get_num_threads() == 2
