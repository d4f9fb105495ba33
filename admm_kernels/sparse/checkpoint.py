"""Compressed checkpoints: save_sparse(model, path) / load_sparse(path).

One safetensors file (so one atomic rename publishes it):
  tensors   the model's state dict with every sparse linear stored packed (`<layer>.values`, `.meta` for
            N:M; `.crow`, `.col`, `.values` for CSR) and everything else as is; tied (shared) tensors once.
            2:4 metadata is stored as a pair code (3 groups a byte, see encode_24_meta), other N:M
            metadata as the in-memory bit fields.
  metadata  "admm_kernels.sparse": a JSON document describing the format (FORMAT_DOC below):
            {"format": "admm_kernels.sparse", "version": 1,
             "layers": {name: {"pattern": "2:4", "in_features": i, "out_features": o, "bias": bool,
                               "meta": "bits" | "pairs24"}},
             "aliases": {tied name: stored name},
             "model": {"class": "LlamaForCausalLM", "config": {...}} or null,
             "checksum": {"algorithm": "sha256", "digest": hex}}
The checksum covers every tensor's name, dtype, shape and bytes in name order: a flipped bit anywhere in
the data fails loudly on load. A truncated file fails in the safetensors parser (its header names every
tensor's byte range). Both raise ValueError naming the file.

A packed model folder (what `admm-prune prune --save-format packed` writes) holds PACKED_FILE beside the
model's config.json and tokenizer files; load_sparse(folder) reads PACKED_FILE from it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write_with, write_error
from ..backends import reference as _ref
from .formats import PackedCSR, PackedNM, parse_packed_pattern
from .linear import SparseLinear, eligible_linears, layer_pattern, set_submodule

FORMAT = "admm_kernels.sparse"
VERSION = 1
META_KEY = "admm_kernels.sparse"
PACKED_FILE = "model.packed.safetensors"  # the checkpoint's name inside a packed model folder


def checksum(tensors: dict[str, torch.Tensor], doc: dict | None = None) -> str:
    """sha256 hex digest over the format description `doc` (without its "checksum" entry, as canonical
    JSON: layer formats, aliases and the model config are covered too) and (name, dtype, shape, raw
    bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    if doc is not None:
        body = {k: v for k, v in doc.items() if k != "checksum"}
        h.update(json.dumps(body, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _packed_state(model: nn.Module, pattern: str | None, min_sparsity: float, dtype: torch.dtype | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The state dict to store (sparse linears packed, the model untouched) and the layer descriptions."""
    state = model.state_dict()
    layers: dict[str, dict] = {}
    replaced: dict[str, SparseLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            replaced[name] = module
    for name, linear in eligible_linears(model, pattern, min_sparsity):
        replaced[name] = SparseLinear.from_dense(linear, layer_pattern(linear, pattern), dtype=dtype)
    for name, layer in replaced.items():
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]]:
            del state[key]
        desc = {"pattern": layer.pattern, "in_features": layer.in_features,
                "out_features": layer.out_features, "bias": layer.bias is not None, "meta": "bits"}
        for key, t in layer.state_dict().items():
            if key == "meta" and layer.pattern == "2:4":
                code = encode_24_meta(t.cpu(), layer.in_features)
                if code is not None:
                    t, desc["meta"] = code, "pairs24"
            state[prefix + key] = t
        layers[name] = desc
    return state, layers


# --- 2:4 metadata code for checkpoints ------------------------------------------------------------------
# In memory 2:4 metadata is 2 bits a kept value (4 bits a group: what the kernels decode fastest). On disk
# a group only needs to say which of the C(4,2) = 6 position pairs it keeps: three groups fit one byte
# (6**3 = 216 <= 256), 2.67 bits a group. For fp16 that is the difference between 56.25 % of the dense
# size (2-bit fields) and 54.2 % (this code), i.e. what makes a packed 2:4 fp16 checkpoint <= 56 % of the
# dense one (tests/pipeline/test_sparse_checkpoint.py).
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def encode_24_meta(meta: torch.Tensor, cols: int) -> torch.Tensor | None:
    """(rows, cols/8) 2-bit 2:4 metadata -> (rows, ceil(cols/12)) uint8 pair code; None when a group's
    positions are not strictly ascending (not produced by pack; stored as is then)."""
    rows, groups = meta.shape[0], cols // 4
    pos = _ref._bits_unpack(meta, groups * 2, 2).view(rows, groups, 2)
    if rows and groups and not bool((pos[..., 0] < pos[..., 1]).all()):
        return None
    lut = torch.full((16,), 0, dtype=torch.int64)
    for code, (a, b) in enumerate(_PAIRS):
        lut[a * 4 + b] = code
    codes = lut[pos[..., 0] * 4 + pos[..., 1]]
    pad = (-groups) % 3
    codes = torch.nn.functional.pad(codes, (0, pad)).view(rows, -1, 3)
    return (codes[..., 0] + 6 * codes[..., 1] + 36 * codes[..., 2]).to(torch.uint8)


def decode_24_meta(code: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of encode_24_meta; ValueError for bytes >= 216 or a wrong shape."""
    groups = cols // 4
    if code.dtype != torch.uint8 or tuple(code.shape) != (rows, (groups + 2) // 3):
        raise ValueError(f"2:4 pair code must be uint8 ({rows}, {(groups + 2) // 3}), got {code.dtype} "
                         f"{tuple(code.shape)}")
    c = code.to(torch.int64)
    if c.numel() and int(c.max()) >= 216:
        raise ValueError("2:4 pair code holds a byte >= 216")
    codes = torch.stack((c % 6, (c // 6) % 6, c // 36), dim=-1).reshape(rows, -1)[:, :groups]
    pairs = torch.tensor(_PAIRS, dtype=torch.int64)[codes]  # (rows, groups, 2)
    return _ref._bits_pack(pairs.reshape(rows, groups * 2), 2)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (same storage, offset, shape, strides): safetensors refuses
    shared memory, and tied weights must come back tied."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = None
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                   t.device)
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        # A view into a larger storage (or a non-contiguous one) must be saved as its own compact copy.
        out[name] = t.detach().to("cpu").contiguous().clone() if t.numel() else t.detach().to("cpu")
    return out, aliases


def _model_info(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return {"class": type(model).__name__, "module": type(model).__module__, "config": config.to_dict()}


def save_sparse(model: nn.Module, path: str | os.PathLike, *, pattern: str | None = None,
                min_sparsity: float = 0.5, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a compressed checkpoint at `path` (a file; atomically: temp file, fsync, rename).

    SparseLinear layers are stored as they are; nn.Linear layers that sparsify() would convert (same
    `pattern`, `min_sparsity`, `dtype` arguments) are packed on the fly - the model is not modified.
    A transformers model's config is stored too, so load_sparse(path) rebuilds it without the dense
    checkpoint. Returns the path.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pattern is not None:
        parse_packed_pattern(pattern)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path must be a file name, got the directory {str(path)!r}")
    if not path.parent.exists():
        raise ValueError(f"path {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: {str(path.parent)!r} is not a directory")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # before the packing work; root passes, see below
        raise PermissionError(errno.EACCES, f"cannot write the sparse checkpoint {str(path)!r}: no write "
                              f"permission on its directory {str(path.parent)!r}")
    state, layers = _packed_state(model, pattern, min_sparsity, dtype)
    tensors, aliases = _dedupe(state)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "aliases": aliases,
        "model": _model_info(model),
    }
    doc["checksum"] = {"algorithm": "sha256", "digest": checksum(tensors, json.loads(json.dumps(doc,
                                                                                          default=str)))}
    meta = {META_KEY: json.dumps(doc, default=str)}
    try:  # fsync'ed temporary file, umask mode (safetensors' own temp file is 0600), rename, fsync folder
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except Exception as e:  # SafetensorError is not an OSError
        err = _write_error(e, path)
        if err is e:
            raise
        raise err from e
    return path


def _write_error(exc: Exception, path: Path) -> Exception:
    """A WriteError naming the destination `path` (not a temporary file) for a failed write; other errors
    (e.g. a TypeError from a tensor safetensors cannot store) are returned unchanged."""
    return write_error(exc, "the sparse checkpoint", path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, format document) of a checkpoint, verified; ValueError on a missing, truncated, corrupt
    or foreign file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    if META_KEY not in meta:
        raise ValueError(f"{str(path)!r} is not an admm_kernels sparse checkpoint (no {META_KEY!r} metadata)")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r}: corrupt format description: {e}") from e
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"{str(path)!r}: unsupported format {doc.get('format')!r} version "
            f"{doc.get('version')!r}")
    expected = doc.get("checksum", {}).get("digest")
    actual = checksum(tensors, doc)
    if expected != actual:
        raise ValueError(f"{str(path)!r} is corrupt: checksum mismatch (stored {expected}, computed "
            f"{actual})")
    return tensors, doc


def _build_model(doc: dict, path: Path) -> nn.Module:
    info = doc.get("model")
    if not info:
        raise ValueError(f"{str(path)!r} was saved from a model without a transformers config; "
                         "pass model= (a module of the same structure) to load into")
    import transformers

    cls = getattr(transformers, info["class"], None)
    if cls is None:
        raise ValueError(f"{str(path)!r}: model class {info['class']!r} not found in transformers")
    config = cls.config_class.from_dict(info["config"])
    try:  # skip the random initialisation: every weight is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        return cls(config)


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint written by save_sparse: a module tree with SparseLinear layers, bit-identical
    tensors, in eval mode. `path`: the checkpoint file, or a packed model folder holding PACKED_FILE.

    model: None rebuilds a transformers model from the stored config (AutoModel-style, by class name);
    otherwise a module of the saved structure to load into (modified in place, like load_state_dict).
    """
    path = Path(path)
    if path.is_dir():  # a packed model folder
        path = path / PACKED_FILE
        if not path.is_file():
            raise ValueError(f"folder {str(path.parent)!r} is not a packed model folder: it has no "
                             f"{PACKED_FILE}")
    tensors, doc = read_checkpoint(path)
    if model is None:
        model = _build_model(doc, path)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    for name, desc in doc["layers"].items():
        prefix = f"{name}." if name else ""
        stored = parse_packed_pattern(desc["pattern"])
        kind, n, m = stored.kind, stored.n, stored.m
        shape = (int(desc["out_features"]), int(desc["in_features"]))
        try:
            if kind == "nm":
                meta = tensors.pop(prefix + "meta")
                if desc.get("meta", "bits") == "pairs24" and (n, m) == (2, 4):
                    meta = decode_24_meta(meta, *shape)
                elif desc.get("meta", "bits") != "bits":
                    raise ValueError(f"{str(path)!r}: layer {name!r} has unknown metadata code "
                        f"{desc.get('meta')!r}")
                packed = PackedNM(tensors.pop(prefix + "values"), meta, n, m, shape)
            else:
                packed = PackedCSR(tensors.pop(prefix + "crow"), tensors.pop(prefix + "col"),
                                   tensors.pop(prefix + "values"), shape)
        except KeyError as e:
            raise ValueError(f"{str(path)!r}: layer {name!r} lacks tensor {e}") from e
        bias = tensors.pop(prefix + "bias", None)
        if desc["bias"] != (bias is not None):
            raise ValueError(f"{str(path)!r}: layer {name!r} bias presence does not match its description")
        layer = SparseLinear(packed, bias)  # validates shapes, dtypes, index ranges
        if name:
            _check_replaceable(model, name, shape, desc["bias"], path)
            set_submodule(model, name, layer)
        else:
            model = layer
    for alias, target in doc.get("aliases", {}).items():
        if alias in tensors or _is_sparse_key(alias, doc["layers"]):
            raise ValueError(f"{str(path)!r}: alias {alias!r} would overwrite a stored tensor")
        if target not in tensors:
            raise ValueError(f"{str(path)!r}: alias {alias!r} -> {target!r} names no stored tensor")
        tensors[alias] = tensors[target]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not _is_sparse_key(k, doc["layers"])]
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}")
    return model.eval()


def _check_replaceable(model: nn.Module, name: str, shape: tuple[int, int], bias: bool, path: Path) -> None:
    """The module at `name` must be a linear layer of the stored shape and bias: loading into a model of
    another structure must fail, not silently add or reshape layers."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"{str(path)!r}: the model has no module {name!r} to load a sparse layer into") from None
    if not isinstance(old, (nn.Linear, SparseLinear)):
        raise ValueError(f"{str(path)!r}: module {name!r} is a {type(old).__name__}, not a linear layer")
    has_bias = getattr(old, "bias", None) is not None
    if (old.out_features, old.in_features) != tuple(shape) or has_bias != bias:
        raise ValueError(f"{str(path)!r}: layer {name!r} is stored as {shape[0]}x{shape[1]} "
                         f"(bias={bias}) but the model's is {old.out_features}x{old.in_features} "
                         f"(bias={has_bias})")


def _is_sparse_key(key: str, layers: dict) -> bool:
    name, _, _ = key.rpartition(".")
    return name in layers
