"""Every op's schema and fake (meta) function, defined once with torch.library.

Implementations: the pure-torch reference (admm_kernels/backends/reference.py) registers itself as
CompositeExplicitAutograd through `register_reference` when it is imported, which `import admm_kernels`
does (so every op runs on any device even with no compiled extension); the C++ extension
`admm_kernels._C` adds CPU and CUDA kernels with TORCH_LIBRARY_IMPL(admm_kernels, CPU/CUDA, m), which take
precedence for their device. Triton kernels are launched from Python (admm_kernels.backends.triton).
Which backend the solver uses is decided by admm_kernels.backends (fastest available,
ADMM_KERNELS_BACKEND override).

Contracts (shapes, dtypes, tie-breaking) are documented in admm_kernels/backends/reference.py.
"""

from __future__ import annotations

import torch

NAMESPACE = "admm_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")

# name -> schema
_SCHEMAS: dict[str, str] = {}


def _define(name: str, schema: str, fake) -> None:
    _lib.define(f"{name}{schema}")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    _SCHEMAS[name] = schema


def register_reference(name: str, fn) -> None:
    """Register `fn` as op `name`'s CompositeExplicitAutograd kernel (the reference, for every device).

    Called by the reference module rather than imported from it here: this module is the bottom of the
    kernel stack (backends are built on it), so it imports none of them."""
    _lib.impl(name, fn, "CompositeExplicitAutograd")


# The packed N:M metadata's size (the layout: admm_kernels/backends/reference.py), here because pack_nm's
# fake needs it; the reference and the sparse formats use these same functions.
def nm_meta_bits(m: int) -> int:
    """Bits of position metadata per kept value for groups of m: ceil(log2 m), at least 1."""
    return max(1, (m - 1).bit_length())


def nm_meta_bytes(cols: int, n: int, m: int) -> int:
    """Bytes of metadata per row for a (rows, cols) N:M weight."""
    return ((cols // m) * n * nm_meta_bits(m) + 7) // 8


# --- solver ops -------------------------------------------------------------------------------------

def _gram_update_fake(G, x):
    return None


def _mask_fake(scores, *args):
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def _dual_step_fake(W, U, M, B, rho, R):
    return None


_define("gram_update", "(Tensor(a!) G, Tensor x) -> ()", _gram_update_fake)
_define("prune_mask", "(Tensor scores, int k, bool per_row) -> Tensor", _mask_fake)
_define("nm_mask", "(Tensor scores, int n, int m) -> Tensor", _mask_fake)
_define(
    "admm_dual_step",
    "(Tensor W, Tensor(a!) U, Tensor M, Tensor B, float rho, Tensor(b!) R) -> ()",
    _dual_step_fake,
)

# --- sparse inference ops (admm_kernels/sparse) -----------------------------------------------------
# Defined below by the sparse-inference module's section, same pattern: _define(name, schema, fake).


def _pack_nm_fake(weight, n, m):
    rows, cols = weight.shape
    vals = weight.new_empty((rows, cols // m * n))
    meta = torch.empty((rows, nm_meta_bytes(cols, n, m)), dtype=torch.uint8, device=weight.device)
    return vals, meta


def _unpack_nm_fake(values, meta, n, m, cols):
    return values.new_empty((values.shape[0], cols))


def _sparse_nm_mm_fake(x, values, meta, n, m, cols):
    return x.new_empty((x.shape[0], values.shape[0]))


def _csr_mm_fake(x, crow, col, values, cols):
    return x.new_empty((x.shape[0], crow.shape[0] - 1))


_define("pack_nm", "(Tensor weight, int n, int m) -> (Tensor, Tensor)", _pack_nm_fake)
_define(
    "unpack_nm",
    "(Tensor values, Tensor meta, int n, int m, int cols) -> Tensor",
    _unpack_nm_fake,
)
_define(
    "sparse_nm_mm",
    "(Tensor x, Tensor values, Tensor meta, int n, int m, int cols) -> Tensor",
    _sparse_nm_mm_fake,
)
_define(
    "csr_mm",
    "(Tensor x, Tensor crow, Tensor col, Tensor values, int cols) -> Tensor",
    _csr_mm_fake,
)

