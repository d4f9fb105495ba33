"""admm_kernels: fast and optimal layer-wise weight update (ADMM) for pruning large language models.

Public API: the stable names below (README.md shows them in use). Submodules are imported lazily so
`import admm_kernels` stays cheap and never needs transformers, triton or the compiled extension.
"""

from __future__ import annotations

import importlib

from . import _ops  # noqa: F401  (defines the torch.library ops)
from ._version import __version__
from .backends import reference as _reference  # noqa: F401  (registers every op's pure-torch kernel)

# Imported eagerly: the submodule `admm_kernels.gram` shares its name with the function `gram`, and
# importing the submodule anywhere would otherwise bind the package attribute to the module.
from .gram import GramAccumulator, gram  # noqa: F401  (public API)

_LAZY = {
    "prune_layer": "prune",
    "PruneResult": "prune",
    "reconstruction_error": "prune",
    "prune_experts": "batched",
    "prune_model": "models",
    "PruneConfig": "models",
    "evaluate_perplexity": "eval",
    "evaluate_tasks": "integrations.lm_eval",  # lm-evaluation-harness (the `eval` extra)
    "run_prune": "run",  # a whole run: load, prune, evaluate, publish a folder (what `admm-prune prune` does)
    "PruneRun": "run",
    "RunResult": "run",
    "RunError": "run",
    "OutputSettings": "run",
    "TextSettings": "run",
    "TaskSettings": "run",
    "Placement": "run",
    "sparsify": "sparse",
    "SparseLinear": "sparse",
    "save_sparse": "sparse",
    "load_sparse": "sparse",
}

__all__ = sorted([*_LAZY, "gram", "GramAccumulator"]) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'admm_kernels' has no attribute {name!r}")


def __dir__():
    return __all__
