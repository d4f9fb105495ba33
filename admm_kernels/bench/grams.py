"""Per-layer Grams G = Σ xᵀx (in, in) of a model's linears, from real calibration text, cached on disk.

One dense pass, block by block, through the same library code as `prune_model`: `capture_inputs` catches
block 0's inputs for every window (admm_kernels.models.capture), and `block_grams`
(admm_kernels.models.layer_grams) runs each block over the windows with the pipeline's Gram hooks: one
accumulator per group of layers that receive the very same input tensor (q/k/v, gate/up), filled in the
pipeline's order, so a layer's Gram here is bit for bit the one prune_model solves with for the same
windows (as long as no earlier block was pruned). Unlike `prune_model`, nothing is pruned, so each block's
outputs from the same pass are the next block's inputs (one forward per block, not two).

Cache: a folder ``<cache>/bench/grams-<key>`` where key is the SHA-256 of the cache format, the model's
content digest (admm_kernels._digest.model_digest, the one prune's --resume compares) and config, the
calibration token ids, the selected layer names, the Gram dtype and the device type. Format 2 (this one)
keys the model by model_digest; format 1 hashed the state dict itself, so its folders are never found
again (same Grams, other key): delete them at leisure. Layout: ``block_0003.safetensors`` (the block's
group Grams, fp32/fp64 on the CPU) and ``index.json`` (layer -> group, shapes, token count, timings). The
folder is built under a temporary name and renamed into place, so a crash never leaves a half-written
cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._digest import model_digest, tokens_digest
from .._io import writing

if TYPE_CHECKING:
    from ..models.layer_grams import BlockGrams, GramSettings

FORMAT = 2
INDEX = "index.json"


@dataclass(frozen=True)
class LayerRef:
    """A selected linear: full name (e.g. "model.layers.3.mlp.down_proj"), block index, name inside the
    block, and the module."""

    name: str
    block: int
    rel: str
    module: nn.Module


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class, config and content digest (admm_kernels._digest.model_digest: every
    parameter and buffer's name, dtype, shape and bytes; ~0.4 s for SmolLM2-135M's 540 MB in fp32 on
    this CPU, small next to the forward passes it guards)."""
    cfg = getattr(model, "config", None)
    config = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else None
    parts = {"class": type(model).__name__, "config": config, "digest": model_digest(model)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def select_layers(model: nn.Module, layers: list[str] | None = None,
                  max_layers: int | None = None) -> list[LayerRef]:
    """The linears inside the model's decoder blocks matching the glob patterns `layers` (names inside a
    block, e.g. "mlp.*", or full names; None = all), in model order, the first `max_layers` of them."""
    from ..models.discovery import find_blocks, select_all

    if max_layers is not None and (isinstance(max_layers, bool) or not isinstance(max_layers, int)
                                   or max_layers < 1):
        raise ValueError(f"max_layers must be a positive int or None, got {max_layers!r}")
    blocks_name, blocks = find_blocks(model)
    chosen = select_all(blocks, blocks_name, layers)
    refs = [LayerRef(f"{blocks_name}.{b}.{rel}", b, rel, m)
            for b, sel in enumerate(chosen) for rel, m in sel.items()]
    return refs[:max_layers] if max_layers is not None else refs


def cache_key(fingerprint: str, ids: torch.Tensor, refs: list[LayerRef], gram_dtype: torch.dtype,
              device: torch.device) -> str:
    parts = {"format": FORMAT, "model": fingerprint, "tokens": tokens_digest(ids),
             "layers": [r.name for r in refs], "gram_dtype": str(gram_dtype), "device": device.type}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class GramStore:
    """A finished Gram cache folder. `layers`: the index rows (name, block, rel, shape, group, file);
    `gram(name)` loads the (in, in) Gram of a layer (the block's file is read once and kept while the
    following calls ask for the same block)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX).read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"Gram cache {str(self.folder)!r} has format {self.index.get('format')!r}, "
                             f"expected {FORMAT}; delete it")
        self.layers: list[dict] = self.index["layers"]
        self._by_name = {r["name"]: r for r in self.layers}
        self._file: str | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    @property
    def key(self) -> str:
        return self.index["key"]

    def gram(self, name: str) -> torch.Tensor:
        if name not in self._by_name:
            raise KeyError(f"layer {name!r} is not in the Gram cache {str(self.folder)!r}")
        row = self._by_name[name]
        if row["file"] != self._file:
            self._tensors = load_file(self.folder / row["file"])
            self._file = row["file"]
        return self._tensors[row["group"]]


class _Bar:
    """A tqdm bar over block x window steps (nothing when progress is off)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="grams", unit="window", file=sys.stderr, leave=False)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _store_block(result: BlockGrams, layers: dict[str, nn.Module], b: int, blocks_name: str,
                 folder: Path) -> tuple[list[dict], float]:
    """Write block b's group Grams to folder/block_000b.safetensors; return (index rows of its layers, the
    Gram kernels' FLOPs). Layers the block's forward never called get no row (no data: not benchmarked)."""
    from ..models.discovery import get_weight

    file = f"block_{b:04d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    flops = 0.0
    for rel, module in layers.items():
        leader = result.plan.group_of.get(rel)
        if leader is None:
            continue
        full_leader = f"{blocks_name}.{b}.{leader}"
        if full_leader not in tensors:
            acc = result.grams[leader]
            tensors[full_leader] = acc.gram.to("cpu")
            # The Gram kernels compute one triangle: in*(in+1)/2 multiply-adds per token.
            flops += float(acc.count) * acc.in_features * (acc.in_features + 1)
        shape = [int(v) for v in get_weight(module).shape]  # (out, in): Conv1D, experts too
        rows.append({"name": f"{blocks_name}.{b}.{rel}", "block": b, "rel": rel, "shape": shape,
                     "group": full_leader, "file": file})
    if tensors:
        save_file(tensors, folder / file)
    return rows, flops


@torch.no_grad()
def _compute(model: nn.Module, ids: torch.Tensor, refs: list[LayerRef], settings: GramSettings,
             folder: Path, progress: bool) -> dict:
    """Run the dense blocks over the windows (block_grams, as prune_model's block loop), write one
    safetensors file of group Grams per block into `folder`; return the index (without the key)."""
    from ..models.capture import capture_inputs
    from ..models.discovery import find_blocks
    from ..models.layer_grams import block_grams

    blocks_name, blocks = find_blocks(model)
    by_block: dict[int, dict[str, nn.Module]] = {}
    for r in refs:
        by_block.setdefault(r.block, {})[r.rel] = r.module
    last = max(by_block)
    n = ids.shape[0]
    t0 = time.perf_counter()
    acts, calls = capture_inputs(model, blocks, ids, settings.device, settings.device)
    seconds = {"capture": time.perf_counter() - t0, "forward": 0.0, "gram": 0.0}
    flops = 0.0
    rows: list[dict] = []
    bar = _Bar((last + 1) * n, progress)
    try:
        for b in range(last + 1):
            layers = by_block.get(b, {})
            home = next(blocks[b].parameters()).device
            try:
                blocks[b].to(settings.device)
                result = block_grams(blocks[b], calls[b], acts, layers, settings, next_inputs=b < last,
                                     on_window=bar.step)
            finally:
                blocks[b].to(home)
            seconds["forward"] += result.forward_seconds
            seconds["gram"] += result.gram_seconds
            block_rows, block_flops = _store_block(result, layers, b, blocks_name, folder)
            rows += block_rows
            flops += block_flops
            del result
    finally:
        bar.close()
    missing = sorted({r.name for r in refs} - {row["name"] for row in rows})
    return {"format": FORMAT, "blocks_name": blocks_name, "nsamples": int(n), "seqlen": int(ids.shape[1]),
            "tokens": int(ids.numel()), "gram_dtype": str(settings.dtype), "device": str(settings.device),
            "layers": rows, "not_called": missing, "seconds": seconds, "gram_flops": flops}


def load_or_compute(model: nn.Module, ids: torch.Tensor, refs: list[LayerRef], cache_root: str | os.PathLike,
                    device: torch.device | str = "cpu", gram_dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> tuple[GramStore, bool]:
    """(store, hit): the Grams of `refs` under calibration ids (N, L) int64, from the cache when a run
    with the same weights, tokens, layers and options made them before (hit=True), else computed now."""
    if not refs:
        raise ValueError("no layers selected: nothing to compute Grams for")
    if gram_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype}")
    device = torch.device(device)
    key = cache_key(model_fingerprint(model), ids, refs, gram_dtype, device)
    root = Path(cache_root)
    target = root / f"grams-{key[:24]}"
    if (target / INDEX).is_file():
        store = GramStore(target)
        if store.key == key:
            return store, True
    with writing("the Gram cache", target):  # a full disk is one line naming the cache, not a traceback
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    from ..models.layer_grams import GramSettings

    try:
        with writing("the Gram cache", target):
            index = _compute(model, ids, refs, GramSettings(device, gram_dtype), tmp, progress)
            index["key"] = key
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        if (target / INDEX).is_file():  # another process finished the same Grams first: use theirs
            shutil.rmtree(tmp)
        else:
            if target.exists():  # a stale folder without an index
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GramStore(target), False
