"""The versions of the software a result came from: one function for reports, resume fingerprints and
`admm-prune doctor`.

A leaf (the root package's version, torch, and optional packages looked up by name), so the pipeline,
the bench and the doctor read the same facts from the same place.
"""

from __future__ import annotations

import importlib
import platform

import torch

from ._version import __version__


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken optional package is reported, not fatal
        return None
    return str(getattr(mod, "__version__", "unknown"))


def versions(detail: bool = False) -> dict:
    """Versions of the software that produced a result.

    detail=False (prune and bench reports, the resume fingerprint): admm_kernels, torch, python, and
    transformers when it is installed. These keys are kept as they are: the fingerprint of a saved state
    includes them, and a different set would refuse to resume every run saved before.
    detail=True (`admm-prune doctor`, a bug report): also torch's CUDA, triton and numpy; a package that
    is missing (or fails to import) is None."""
    if detail:
        return {
            "python": platform.python_version(),
            "admm_kernels": __version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "numpy": _version("numpy"),
            "transformers": _version("transformers"),
        }
    out = {"admm_kernels": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is needed for real models only
        pass
    return out
