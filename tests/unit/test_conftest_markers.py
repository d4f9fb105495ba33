"""tests/conftest.py skips `gpu`-marked tests without CUDA by their marker, not by keyword: a checkout in a
folder named gpu (keywords include the folders' names) used to skip every test."""

from __future__ import annotations

from pathlib import Path

import torch

pytest_plugins = ["pytester"]


def test_folder_named_gpu_runs_its_tests(pytester):
    sub = pytester.mkdir("gpu")
    (sub / "conftest.py").write_text((Path(__file__).resolve().parents[1] / "conftest.py").read_text())
    (sub / "test_plain.py").write_text(
        "import pytest\n\n"
        "def test_plain():\n    assert True\n\n"
        "@pytest.mark.gpu\ndef test_needs_gpu():\n    assert True\n")
    result = pytester.runpytest_subprocess(str(sub), "-p", "no:cacheprovider", "-o", "addopts=",
                                           "-o", "markers=gpu: needs a GPU")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)


def test_each_test_carries_its_folder_s_marker(request):
    """tests/conftest.py marks every test with the name of its layer folder (here tests/unit), and no
    other layer's."""
    layers = ("unit", "kernels", "pipeline", "cli", "distributed")
    assert [name for name in layers if request.node.get_closest_marker(name)] == ["unit"]
