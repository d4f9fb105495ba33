"""Sparse inference: packed N:M and CSR weight formats, SparseLinear, sparsify, compressed checkpoints.

    layer = SparseLinear.from_dense(linear)            # pattern detected ("2:4", "N:M", "unstructured")
    model = sparsify(model)                            # every eligible nn.Linear -> SparseLinear (a copy)
    save_sparse(model, "model.sparse.safetensors")     # packed values + metadata + JSON + checksum
    model = load_sparse("model.sparse.safetensors")    # rebuilt from the stored transformers config
"""

from .checkpoint import load_sparse, read_checkpoint, save_sparse
from .formats import PackedCSR, PackedNM, detect_pattern, parse_packed_pattern
from .linear import SparseLinear, sparsify

__all__ = [
    "PackedCSR",
    "PackedNM",
    "SparseLinear",
    "detect_pattern",
    "load_sparse",
    "parse_packed_pattern",
    "read_checkpoint",
    "save_sparse",
    "sparsify",
]
