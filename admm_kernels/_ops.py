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


def _pack_nm_fake(weight, n, m):
    rows, cols = weight.shape
    vals = weight.new_empty((rows, cols // m * n))
    meta = torch.empty((rows, _ref.nm_meta_bytes(cols, n, m)), dtype=torch.uint8, device=weight.device)
    return vals, meta


def _unpack_nm_fake(values, meta, n, m, cols):
    return values.new_empty((values.shape[0], cols))


def _sparse_nm_mm_fake(x, values, meta, n, m, cols):
    return x.new_empty((x.shape[0], values.shape[0]))


def _csr_mm_fake(x, crow, col, values, cols):
    return x.new_empty((x.shape[0], crow.shape[0] - 1))


_define("pack_nm", "(Tensor weight, int n, int m) -> (Tensor, Tensor)", _ref.pack_nm, _pack_nm_fake)
_define(
    "unpack_nm",
    "(Tensor values, Tensor meta, int n, int m, int cols) -> Tensor",
    _ref.unpack_nm,
    _unpack_nm_fake,
)
_define(
    "sparse_nm_mm",
    "(Tensor x, Tensor values, Tensor meta, int n, int m, int cols) -> Tensor",
    _ref.sparse_nm_mm,
    _sparse_nm_mm_fake,
)
_define(
    "csr_mm",
    "(Tensor x, Tensor crow, Tensor col, Tensor values, int cols) -> Tensor",
    _ref.csr_mm,
    _csr_mm_fake,
)


def op(name: str):
    """The dispatcher handle torch.ops.admm_kernels.<name>."""
    return getattr(torch.ops.admm_kernels, name)
