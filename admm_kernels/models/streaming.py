"""Models larger than memory: the decoder blocks stay in the checkpoint until their turn.

`StreamedModel(path)` builds the model on the meta device (accelerate's init_empty_weights with real
buffers, so rotary tables and other computed buffers exist), loads the non-block weights (embeddings,
final norm, head) once, and reads block b's tensors from the safetensors shards only in load_block(b);
release_block(b) puts them back on the meta device. prune_model(streamed_model, ...) calls load_block
just before a block's turn and block_done(b) as soon as it is pruned, which writes the block to the
output shards (when an output folder is given), runs the registered on_block_final callbacks (a
streamed perplexity evaluation) and frees it. Host memory: the non-block weights + about two blocks
(the block, plus the one tensor in flight while it is read or written) + the activations, whatever the
number of blocks.

Reading and writing: our own safetensors reader and writer (the format: an 8-byte little-endian header
length, a JSON header of {name: dtype, shape, data_offsets}, then the bytes), because both must hold
nothing beyond the tensors of one block: the reader preads each tensor into memory it owns (safetensors'
safe_open maps the whole file, and its pages stay in the process's resident set while any tensor read
from it lives), the writer writes each tensor's bytes straight from the tensor (safetensors' save_file
first copies every tensor into one bytes object). The files are ordinary safetensors files
(safetensors.safe_open and transformers read them).

The dense model's fingerprint (digest) is computed from the checkpoint's tensors as they are loaded
(cast to the model's dtype), in the module order admm_kernels._digest.model_digest uses: it equals
model_digest of the same checkpoint loaded in memory with load_model(path, dtype) (tested), so resumable
state written by a streamed run and by an in-memory run are interchangeable.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .._io import check_free_space, writing
from .discovery import find_blocks

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
_PER_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _checkpoint_aliases(model_type: str | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """From transformers' checkpoint conversion mapping of `model_type`: the renamings of key parts
    (Mixtral's ".block_sparse_moe." -> ".mlp.") and the per-expert projection names of older
    checkpoints (Mixtral's w1 / w3 / w2 = gate / up / down). Empty where transformers has none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # an older transformers without the mapping: names are taken as they are
        return [], {}
    renames, names = [], {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    for conv in mapping:
        sources = list(getattr(conv, "source_patterns", []) or [])
        targets = list(getattr(conv, "target_patterns", []) or [])
        if type(conv).__name__ == "WeightRenaming" and len(sources) == len(targets):
            renames += list(zip(sources, targets))
        elif len(targets) == 1 and targets[0].endswith((".gate_up_proj", ".down_proj", ".up_proj")):
            kinds = {".gate_up_proj": ("gate_proj", "up_proj"), ".down_proj": ("down_proj",),
                     ".up_proj": ("up_proj",)}[targets[0][targets[0].rindex("."):]]
            leaves = [src.rsplit(".", 2)[-2] for src in sources if src.endswith(".weight")]
            if len(leaves) == len(kinds):
                names.update(zip(leaves, kinds))
    return renames, names


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Hand the free pages inside the C heap back to the system (glibc's malloc_trim; a no-op elsewhere).

    Why: glibc raises its mmap threshold to the size of the largest chunk freed so far (up to 32 MiB),
    so after the first block is released every weight tensor of a block comes from the heap, and the
    small allocations made between blocks keep the freed space fragmented: a streamed run's resident
    memory then grew by about half a block per block although the live tensors stayed at one block
    (peak RSS of `prune --stream --no-eval --method wanda`, LLaMA with 12.6 MiB blocks, 3 runs each:
    4 blocks 602-611 MiB, 16 blocks 681-706 MiB; with the trim 591-600 and 604-630 MiB). It costs a
    few milliseconds a block (5-22 ms with 49 MiB blocks)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class SafetensorsReader:
    """Tensors of one safetensors file, read on demand with pread (no memory map)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                (length,) = struct.unpack("<Q", head)
                header = json.loads(fh.read(length))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"weight file {str(self.path)!r} is empty, truncated or not a safetensors file: "
                             f"{exc}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, key: str) -> torch.dtype:
        code = self.entries[key]["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"tensor {key} of {str(self.path)!r} has dtype {code}, which this reader "
                             "does not support")
        return _DTYPES[code]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in memory of its own (CPU)."""
        e = self.entries[key]
        begin, end = e["data_offsets"]
        dtype, shape = self.dtype(key), self.shape(key)
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            view = memoryview(out.numpy())
            got = 0
            while got < len(view):
                n = os.preadv(fh.fileno(), [view[got:]], self.data_start + begin + got)
                if n <= 0:
                    raise ValueError(f"weight file {str(self.path)!r} is truncated (tensor {key})")
                got += n
        return out.view(dtype).reshape(shape) if out.numel() else torch.empty(shape, dtype=dtype)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (CPU or not; any layout) as a safetensors file, one tensor at a time (no copy of
    the whole set). Returns the bytes of tensor data written."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store here")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with writing("the safetensors file", path), open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return offset


class ShardWriter:
    """Writes a transformers-style sharded safetensors folder: one shard per call of write(), then the
    index (model.safetensors.index.json) in finish()."""

    def __init__(self, folder: str | os.PathLike, n_shards: int):
        self.folder = Path(folder)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard_name(i)
        self.total_size += write_safetensors(self.folder / name, tensors)
        self.weight_map.update({k: name for k in tensors})

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        with writing("the streamed output's index", self.folder / INDEX_FILE):
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class StreamedModel:
    """A transformers causal LM whose decoder blocks are loaded from the checkpoint only when needed
    (see the module docstring).

    path: a transformers folder with safetensors weights (one file or shards). dtype: the dtype the
    model computes in (as load_model's; "auto" = the config's, else the checkpoint's). output: a folder
    (existing, empty) that receives the model as pruned, block by block: shards, index, config.

    Attributes: model (the nn.Module: its blocks on the meta device except while loaded), blocks_name,
    blocks, on_block_final (callables (b, block) run by block_done before a block is freed)."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                 output: str | os.PathLike | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .loading import check_model_path, parse_dtype, safetensors_files

        self.path = check_model_path(path)
        files = safetensors_files(self.path)
        if not files:
            raise ValueError(f"model path {str(self.path)!r} has no safetensors weights (only "
                             "pytorch_model.bin): streaming reads safetensors shards; convert it with "
                             "save_pretrained first")
        self._readers = {}
        self._source: dict[str, tuple[Path, str]] = {}  # checkpoint key -> (file, key)
        for f in files:
            reader = SafetensorsReader(f)
            self._readers[f] = reader
            for k in reader.keys():
                self._source[k] = (f, k)
        config = AutoConfig.from_pretrained(self.path)
        if isinstance(dtype, str):
            dtype = self._auto_dtype(config) if dtype == "auto" else parse_dtype(dtype)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model = model.eval()
        self.dtype = dtype
        self.blocks_name, self.blocks = find_blocks(self.model)
        self._key_of = self._match_names()          # model name -> checkpoint key
        self._block_names = self._names_per_block()  # b -> {name inside the block: model name}
        self.on_block_final: list[Callable[[int, nn.Module], None]] = []
        self._digest: str | None = None
        self._load_rest()
        self.writer = None
        if output is not None:
            out = Path(output)
            if not out.is_dir() or any(out.iterdir()):
                raise ValueError(f"output {str(out)!r} must be an existing empty folder")
            # The whole model is written block by block: a disk that cannot hold it fails now, not
            # after hours of pruning.
            check_free_space([("the streamed output", out, self.output_bytes())])
            self.writer = ShardWriter(out, len(self.blocks) + 1)
            rest = self.model.state_dict()
            self.writer.write(0, {n: rest[n] for n in self._rest_names})
        self._written: set[int] = set()

    # -- names -------------------------------------------------------------------------------------

    def _auto_dtype(self, config) -> torch.dtype:
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, torch.dtype):
            return d
        if isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype):
            return getattr(torch, d)
        for f, k in self._source.values():
            t = self._readers[f].dtype(k)
            if t.is_floating_point:
                return t
        return torch.float32

    def _match_names(self) -> dict[str, str | tuple]:
        """model name -> checkpoint key, or for a fused experts parameter stored per expert (as
        save_pretrained writes Mixtral / Qwen-MoE experts: ...experts.<e>.<projection>.weight), the
        tuple of (expert, projection, key) it is assembled from."""
        names = set(self.model.state_dict())
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        key_of: dict[str, str | tuple] = {}
        unexpected = []
        parts: dict[str, list] = {}
        renames, aliases = _checkpoint_aliases(getattr(self.model.config, "model_type", None))
        for k in self._source:
            rk = k
            for src, dst in renames:
                rk = re.sub(src, dst, rk)
            if rk in names:
                key_of[rk] = k
            elif prefix and f"{prefix}.{rk}" in names:
                key_of[f"{prefix}.{rk}"] = k
            elif (fused := self._fused_home(rk, names, prefix, aliases)) is not None:
                name, e, proj = fused
                parts.setdefault(name, []).append((e, proj, k))
            else:
                unexpected.append(k)
        key_of.update({name: tuple(sorted(p)) for name, p in parts.items()})
        if unexpected:
            some = ", ".join(sorted(unexpected)[:4])
            raise ValueError(f"the weights in {str(self.path)!r} have {len(unexpected)} tensors with no "
                             f"place in the model its config describes ({some}); "
                             "check num_hidden_layers and the layer sizes")
        return key_of

    @staticmethod
    def _fused_home(key: str, names: set[str], prefix: str,
                    aliases: dict[str, str]) -> tuple[str, int, str] | None:
        """(fused parameter name, expert, projection) of a per-expert checkpoint key (renamed), or None."""
        m = _PER_EXPERT_KEY.match(key)
        if m is None or m.group(3) not in aliases:
            return None
        head, e, proj = m.group(1), int(m.group(2)), aliases[m.group(3)]
        for lead in ("", f"{prefix}." if prefix else None):
            if lead is None:
                continue
            for fused in (("down_proj",) if proj == "down_proj" else ("gate_up_proj", "up_proj")):
                if f"{lead}{head}.{fused}" in names:
                    return f"{lead}{head}.{fused}", e, proj
        return None

    def _names_per_block(self) -> list[dict[str, str]]:
        per_block: list[dict[str, str]] = [{} for _ in self.blocks]
        lead = f"{self.blocks_name}."
        for b, block in enumerate(self.blocks):
            for local in block.state_dict():
                name = f"{lead}{b}.{local}"
                if name not in self._key_of:
                    raise ValueError(f"the weights in {str(self.path)!r} have no tensor {name}, which the "
                                     "config's model needs (check num_hidden_layers and the layer sizes)")
                per_block[b][local] = name
        return per_block

    @property
    def _rest_names(self) -> list[str]:
        lead = f"{self.blocks_name}."
        return [n for n in self._key_of if not n.startswith(lead)]

    def _layout_of(self, name: str):
        from .experts import experts_layout

        module = self.model.get_submodule(name.rpartition(".")[0])
        return experts_layout(module, name.rpartition(".")[0])

    def _read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = self._key_of[name]
        if isinstance(key, tuple):  # a fused experts parameter assembled from per-expert tensors
            from .experts import projection_view

            layout = self._layout_of(name)
            out = torch.empty(like.shape, dtype=like.dtype)
            for e, proj, k in key:
                f, kk = self._source[k]
                view = projection_view(out, layout, e, proj)
                part = self._readers[f].read(kk)
                if tuple(part.shape) != tuple(view.shape):
                    raise ValueError(f"weight {k} in {str(f)!r} has shape {list(part.shape)}, the config's "
                                     f"model needs {list(view.shape)}")
                view.copy_(part)
            return out
        f, k = self._source[key]
        reader = self._readers[f]
        if reader.shape(k) != tuple(like.shape):
            raise ValueError(f"weight {name} in {str(f)!r} has shape {list(reader.shape(k))}, the config's "
                             f"model needs {list(like.shape)}")
        return reader.read(k).to(like.dtype)

    def _load_rest(self) -> None:
        current = self.model.state_dict()
        tensors = {n: self._read(n, current[n]) for n in self._rest_names}
        self.model.load_state_dict(tensors, strict=False, assign=True)
        self.model.tie_weights()  # an output embedding tied to the input one shares its tensor again
        lead = f"{self.blocks_name}."
        missing = [n for n, p in self.model.named_parameters()
                   if p.device.type == "meta" and not n.startswith(lead)]
        if missing:
            raise ValueError(f"{len(missing)} weights the config needs are missing from the weight files of "
                             f"{str(self.path)!r} ({', '.join(missing[:4])})")

    # -- blocks ------------------------------------------------------------------------------------

    def is_loaded(self, b: int) -> bool:
        return all(p.device.type != "meta" for p in self.blocks[b].parameters())

    def load_block(self, b: int) -> None:
        """Read block b's weights from the checkpoint into the model (CPU, the model's dtype)."""
        block = self.blocks[b]
        current = block.state_dict()
        block.load_state_dict({local: self._read(name, current[local])
                               for local, name in self._block_names[b].items()}, strict=True, assign=True)

    def release_block(self, b: int) -> None:
        """Put block b's weights back on the meta device and give their memory back to the system."""
        block = self.blocks[b]
        current = block.state_dict()
        block.load_state_dict({local: torch.empty_like(current[local], device="meta")
                               for local in self._block_names[b]}, strict=True, assign=True)
        del current
        return_freed_memory()

    def block_done(self, b: int) -> None:
        """Block b is final (pruned, or nothing to prune): write it to the output, run on_block_final,
        free it."""
        block = self.blocks[b]
        if self.writer is not None:
            current = block.state_dict()
            self.writer.write(b + 1, self._checkpoint_tensors(
                {name: current[local] for local, name in self._block_names[b].items()}))
            self._written.add(b)
        for fn in self.on_block_final:
            fn(b, block)
        self.release_block(b)

    def _checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The block's tensors under the checkpoint's own keys: a fused experts parameter read from
        per-expert tensors is written per expert again (what transformers saves and reloads)."""
        from .experts import projection_view

        out = {}
        for name, t in tensors.items():
            key = self._key_of[name]
            if not isinstance(key, tuple):
                out[name] = t
                continue
            layout = self._layout_of(name)
            for e, proj, k in key:
                out[k] = projection_view(t, layout, e, proj).contiguous()
        return out

    def finish_output(self) -> None:
        """Complete the output folder (index, config, generation config) once every block was written."""
        if self.writer is None:
            return
        missing = [b for b in range(len(self.blocks)) if b not in self._written]
        if missing:
            raise RuntimeError(f"streamed output is incomplete: blocks {missing} were never written")
        self.writer.finish()
        with writing("the streamed output's config", self.writer.folder):
            self.model.config.save_pretrained(self.writer.folder)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(self.writer.folder)

    def output_bytes(self) -> int:
        """Bytes of tensor data the output will hold: every checkpoint tensor, floats in the model's dtype."""
        size = self.dtype.itemsize
        total = 0
        keys = [k for key in self._key_of.values()  # a fused experts parameter: its per-expert tensors
                for k in ([part[2] for part in key] if isinstance(key, tuple) else [key])]
        for f, k in (self._source[key] for key in keys):
            reader = self._readers[f]
            dtype = reader.dtype(k)
            total += math.prod(reader.shape(k)) * (size if dtype.is_floating_point else dtype.itemsize)
        return total

    # -- fingerprint ------------------------------------------------------------------------------

    def digest(self) -> str:
        """model_digest of the dense model, from the checkpoint's tensors (read once, then cached)."""
        if self._digest is None:
            from .._digest import model_digest

            block_names = {name for names in self._block_names for name in names.values()}

            def source(name: str, like: torch.Tensor):
                return self._read(name, like) if name in block_names else None
            self._digest = model_digest(self.model, source=source)
        return self._digest
