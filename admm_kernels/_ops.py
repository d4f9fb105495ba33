"""Every op's schema and fake (meta) function, defined once with torch.library.

Implementations: the pure-torch reference is registered as CompositeExplicitAutograd (so every op runs on
any device even with no compiled extension); the C++ extension `admm_kernels._C` adds CPU and CUDA kernels
with TORCH_LIBRARY_IMPL(admm_kernels, CPU/CUDA, m), which take precedence for their device. Triton
kernels are launched from Python (admm_kernels.backends.triton). Which backend the solver uses is decided
by admm_kernels.backends (fastest available, ADMM_KERNELS_BACKEND override).

Contracts (shapes, dtypes, tie-breaking) are documented in admm_kernels/backends/reference.py.
"""

from __future__ import annotations

import torch

from .backends import reference as _ref

NAMESPACE = "admm_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")

# name -> (schema, reference implementation, fake implementation)
_SCHEMAS: dict[str, str] = {}


def _define(name: str, schema: str, ref, fake) -> None:
    _lib.define(f"{name}{schema}")
    _lib.impl(name, ref, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    _SCHEMAS[name] = schema


# --- solver ops -------------------------------------------------------------------------------------

def _gram_update_fake(G, x):
    return None


def _mask_fake(scores, *args):
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def _dual_step_fake(W, U, M, B, rho, R):
    return None


_define("gram_update", "(Tensor(a!) G, Tensor x) -> ()", _ref.gram_update, _gram_update_fake)
_define("prune_mask", "(Tensor scores, int k, bool per_row) -> Tensor", _ref.prune_mask, _mask_fake)
_define("nm_mask", "(Tensor scores, int n, int m) -> Tensor", _ref.nm_mask, _mask_fake)
_define(
    "admm_dual_step",
    "(Tensor W, Tensor(a!) U, Tensor M, Tensor B, float rho, Tensor(b!) R) -> ()",
    _ref.admm_dual_step,
    _dual_step_fake,
)

# --- sparse inference ops (admm_kernels/sparse) -----------------------------------------------------
# Defined below by the sparse-inference module's section, same pattern: _define(name, schema, ref, fake).


def op(name: str):
    """The dispatcher handle torch.ops.admm_kernels.<name>."""
    return getattr(torch.ops.admm_kernels, name)
