"""Integration tests: run in a virtual environment of their own (tools/run_integration_tests.sh), because
llm-compressor 0.13.0 pins transformers <= 5.14.1. They reuse the main suite's tiny models."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    """Tiny models gain nothing from threads on a shared 2-core machine (see tests/conftest.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)
