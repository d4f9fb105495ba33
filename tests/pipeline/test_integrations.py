"""The integrations package imports no tool by itself, and a missing tool names the extra to install."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def test_importing_the_package_imports_neither_tool():
    code = ("import sys, admm_kernels, admm_kernels.integrations; "
            "print(any(m in sys.modules for m in ('lm_eval', 'llmcompressor')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is not None,
                    reason="llm-compressor is installed (its tests: tools/run_integration_tests.sh)")
def test_llmcompressor_modifier_without_llmcompressor_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'admm_kernels\[llmcompressor\]'.*0\.13\.0"):
        import admm_kernels.integrations.llmcompressor  # noqa: F401
