"""Shared test fixtures."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def no_forced_backend(monkeypatch):
    """Tests that check backend selection must not inherit ADMM_KERNELS_BACKEND from the shell."""
    monkeypatch.delenv("ADMM_KERNELS_BACKEND", raising=False)
    return os.environ
