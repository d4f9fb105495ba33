"""Shared test fixtures."""

import os
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spinning makes
    each forward 20-50x slower (measured 0.75 s vs 0.01 s for a 16-token tiny LLaMA). Modules use it
    with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory):
    """[cli] A folder with tiny-llama/ (a tiny LLaMA with its tokenizer), calib.txt and eval.txt
    (tiny_models.save_tiny_folder). Shared: tests must not modify it (copy tiny-llama/ first)."""
    pytest.importorskip("transformers")
    from tiny_models import save_tiny_folder

    torch.manual_seed(0)
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-model-root"), 400, 1, 200, 2)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _import_triton_for_interpreter() -> None:
    """[gpu-kernels] Without CUDA, import triton once with TRITON_INTERPRET=1, then restore the variable.

    Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and its standard library
    (tl.zeros, tl.cumsum, ...) is decorated when triton.language is first imported: if any test module
    imported triton first without the variable, tests/kernels/test_triton.py's interpreted kernels would fail
    ("Cannot call @triton.jit'd outside of the scope of a kernel"). No effect with a GPU or without triton.
    """
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_for_interpreter()


def needs_gpu(item) -> bool:
    """True for a test marked `gpu`. The marker, not `"gpu" in item.keywords`: keywords also hold the
    names of the folders above the test, so a checkout in a folder named gpu skipped every test."""
    return item.get_closest_marker("gpu") is not None


# The suite's folders, one per layer of the package (docs/DESIGN.md, "Tests"); each test is marked with
# its folder's name, so `-m cli` or `-m "not distributed"` selects by layer as `tests/cli` does by path.
LAYER_FOLDERS = ("unit", "kernels", "pipeline", "cli", "distributed")


def layer_of(item) -> str | None:
    """The folder under tests/ that holds the test (None for a test outside the layer folders)."""
    try:
        rel = item.path.resolve().relative_to(Path(__file__).resolve().parent)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in LAYER_FOLDERS else None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        layer = layer_of(item)
        if layer is not None:
            item.add_marker(getattr(pytest.mark, layer))
        if needs_gpu(item) and not cuda_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def no_forced_backend(monkeypatch):
    """Tests that check backend selection must not inherit ADMM_KERNELS_BACKEND from the shell."""
    monkeypatch.delenv("ADMM_KERNELS_BACKEND", raising=False)
    return os.environ


def correlated_inputs(n: int, in_features: int, outliers: int = 8, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, in_features) calibration inputs shaped like LLM activations: features correlated through a
    shared low-rank component, plus `outliers` features whose scale is ~20x the rest. [solver]"""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, in_features // 8)
    mix = torch.randn(rank, in_features, generator=g) / rank ** 0.5
    x = torch.randn(n, rank, generator=g) @ mix + 0.5 * torch.randn(n, in_features, generator=g)
    scale = torch.ones(in_features)
    scale[torch.randperm(in_features, generator=g)[:outliers]] = 20.0
    return (x * scale).to(dtype)


@pytest.fixture(scope="module")
def llm_like_layer():
    """(W (256, 512), G (512, 512)) fp32: a layer whose inputs are correlated_inputs(2048, 512, outliers=8),
    where the methods' errors are ordered (ADMM-Grad < SparseGPT < Wanda; ALPS < ADMM-Grad)."""
    import admm_kernels as ak

    x = correlated_inputs(2048, 512, outliers=8, seed=0)
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    return W, ak.gram(x)
