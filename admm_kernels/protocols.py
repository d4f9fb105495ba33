"""Evaluation and calibration protocols: exactly which tokens a perplexity (and a calibration set) uses.

A perplexity is only comparable with a paper's when the text, its joining, the tokenisation, the window
length and the windows are the same. `admm-prune prune|eval --protocol NAME` chooses one of:

"default" (admm_kernels' own; what `ak.evaluate_perplexity` gets from `admm_kernels.data`)
    evaluation: the source's text (file; folder of .txt/.md files in sorted order; JSON lines / JSON
    records' `--text-field`, also gzip'd; a `datasets` folder's column, empty records dropped) joined by
    "\\n\\n", tokenised once WITHOUT special tokens; non-overlapping windows of seqlen tokens (a partial
    last window dropped), each one forward pass predicting seqlen-1 tokens; perplexity = exp(mean NLL
    over all predicted tokens) (--eval-windows / --max-windows: only the first windows).
    calibration: the same stream cut into seqlen-token slots after a random offset, nsamples distinct
    slots drawn at random (torch generator seeded with --seed): windows never overlap.

"sparsegpt" (SparseGPT, Frantar & Alistarh 2023; Wanda, Sun et al. 2023; and the seed paper, Boža 2024,
    all from SparseGPT's datautils.py)
    evaluation, corpus "wikitext2": the test split's records joined by "\\n\\n" (empty records kept, as
    the `wikitext-2-raw-v1` data set holds them: one record per line of wiki.test.raw, the line with its
    "\\n", or "" for a blank line; a plain text file is split into records that way), tokenised once
    WITH the tokenizer's special tokens (a LLaMA tokenizer prepends one BOS to the whole stream), then
    every non-overlapping window of seqlen tokens, exp(mean NLL) as above. The papers compute
    exp(Σ_w seqlen·mean_w / (windows·seqlen)) = exp(mean over windows of each window's mean NLL over
    its seqlen-1 predictions): the same number, since every window predicts seqlen-1 tokens.
    evaluation, corpus "c4": the first 1100 documents of the validation file
    (en/c4-validation.00000-of-00008.json.gz in the papers) joined by " " (a space), tokenised once with
    special tokens, truncated to the first 256·seqlen tokens: 256 windows (fewer if the text is shorter).
    calibration: nsamples windows drawn with Python's `random.Random(seed)` exactly as the papers' get_c4
    draws them: repeat { a document index randint(0, n_docs-1); tokenise that document alone, with special
    tokens } until it has more than seqlen tokens; a start randint(0, tokens-seqlen-1); the window is
    tokens[start:start+seqlen]. (SparseGPT accepts a document of exactly seqlen tokens and then fails
    on the empty start range; Wanda and the seed skip it: so do we.) Given the same documents, tokenizer
    and seed this reproduces the papers' calibration windows (C4 train shard en/c4-train.00000-of-01024).
    A plain text file is WikiText-style instead: its records joined by " " (a space), tokenised once,
    and nsamples starts randint(0, tokens-seqlen-1), as get_wikitext2 draws them (windows may overlap).
    seqlen: the papers use 2048 (SparseGPT; Wanda and the seed use the model's max_position_embeddings:
    2048 for LLaMA-1 and OPT, 4096 for LLaMA-2): pass --seqlen to match the paper you compare with.

Sources are local only: a text file, a folder of text files (one document each), a JSON lines / JSON
file (optionally .gz) of records, or a Hugging Face `datasets` folder saved with save_to_disk (a
DatasetDict: the "test" split for wikitext2, "validation" for c4, "train" for calibration, or its only
split). Nothing is downloaded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from . import data

PROTOCOLS = ("default", "sparsegpt")
CORPORA = ("wikitext2", "c4")
C4_EVAL_DOCUMENTS = 1100  # SparseGPT's get_c4: valdata[:1100]
C4_EVAL_WINDOWS = 256  # ... valenc[:, :256 * seqlen]
_EVAL_SPLIT = {"wikitext2": "test", "c4": "validation"}


def check_protocol(protocol: str, corpus: str = "wikitext2") -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")


# --- reading records ---------------------------------------------------------------------------------

def _wikitext_lines(text: str) -> list[str]:
    """Records as the `wikitext` data set builds them from a raw file: each line with its "\\n", a
    whitespace-only line as ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def read_records(source: str | os.PathLike | list | None, *, field: str = "text", split: str = "test",
                 default: str = "evaluation", name: str = "text") -> tuple[list[str], bool]:
    """(records, documents): the source's records, each as stored (empty ones too), and whether they are
    documents (records of a data set / JSON file / separate files) rather than lines of one text file.

    source None: the Shakespeare plays of split `default` ("calibration" or "evaluation"), one
    document per play.
    """
    if source is None:
        return [data._read_file(f) for f in data.shakespeare_files(default)], True
    if isinstance(source, (list, tuple)):
        return [data._read_file(Path(f)) for f in source], True
    p = Path(source).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{name} path {str(source)!r} does not exist")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return data.dataset_records(p, field, split), True
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in data._TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{name} folder {str(source)!r} has no text files "
                             f"({', '.join(data._TEXT_SUFFIXES)})")
        return [data._read_file(f) for f in files], True
    if data.is_json_records(p):
        return data.json_records(p, field), True
    return _wikitext_lines(data._read_file(p)), False


# --- tokens --------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids (n,) int64 WITH the tokenizer's special tokens, as the papers' `tokenizer(text)`."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn text into tokens (the model folder has none)")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def sparsegpt_evaluation_tokens(tokenizer, source: str | os.PathLike | None = None, *,
                                corpus: str = "wikitext2", seqlen: int = data.DEFAULT_SEQLEN,
                                field: str = "text") -> torch.Tensor:
    """The papers' evaluation stream (n,) int64 for `corpus` (see the module docstring)."""
    check_protocol("sparsegpt", corpus)
    records, _ = read_records(source, field=field, split=_EVAL_SPLIT[corpus], default="evaluation",
                              name="eval")
    if corpus == "wikitext2":
        return _encode(tokenizer, "\n\n".join(records))
    return _encode(tokenizer, " ".join(records[:C4_EVAL_DOCUMENTS]))[:C4_EVAL_WINDOWS * seqlen]


def sparsegpt_calibration_windows(tokenizer, source: str | os.PathLike | None = None, *,
                                  nsamples: int = data.DEFAULT_NSAMPLES, seqlen: int = data.DEFAULT_SEQLEN,
                                  seed: int = 0, field: str = "text") -> torch.Tensor:
    """The papers' calibration windows (nsamples, seqlen) int64 (see the module docstring)."""
    for arg, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    records, documents = read_records(source, field=field, split="train", default="calibration",
                                      name="calib")
    what = ("the default calibration text (Shakespeare)" if source is None
            else f"calibration text {str(source)!r}")
    rng = random.Random(seed)
    if not documents:
        ids = _encode(tokenizer, " ".join(records))
        if ids.numel() <= seqlen:
            raise ValueError(f"{what} is too short: {ids.numel()} tokens, need more than seqlen = {seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s:s + seqlen] for s in starts])
    short: set[int] = set()  # documents of at most seqlen tokens, tokenised once
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(records) - 1)
            if i in short:
                continue  # the same draw as the papers' loop; only the tokenisation is skipped
            ids = _encode(tokenizer, records[i])
            if ids.numel() > seqlen:
                break
            short.add(i)
            if len(short) == len(records):
                raise ValueError(f"{what}: no document has more than seqlen = {seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


# --- what the CLI calls --------------------------------------------------------------------------------

def evaluation_tokens(tokenizer, source, *, protocol: str = "default", corpus: str = "wikitext2",
                      seqlen: int = data.DEFAULT_SEQLEN, field: str = "text") -> torch.Tensor:
    """The evaluation token stream (n,) of `protocol` for `source` (None: held-out Shakespeare)."""
    check_protocol(protocol, corpus)
    if protocol == "sparsegpt":
        return sparsegpt_evaluation_tokens(tokenizer, source, corpus=corpus, seqlen=seqlen, field=field)
    text = data.read_text(data.shakespeare_files("evaluation") if source is None else source, field, "eval")
    return data.tokenize(text, tokenizer)


def calibration_windows(tokenizer, source, *, nsamples: int, seqlen: int, seed: int = 0,
                        protocol: str = "default", field: str = "text") -> torch.Tensor:
    """Calibration windows (nsamples, seqlen) of `protocol` from `source` (None: Shakespeare plays)."""
    check_protocol(protocol)
    if protocol == "sparsegpt":
        return sparsegpt_calibration_windows(tokenizer, source, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                             field=field)
    what = ("the default calibration text (Shakespeare)" if source is None
            else f"calibration text {str(source)!r}")
    text = data.read_text(data.shakespeare_files("calibration") if source is None else source, field,
                          "calib")
    return data.sample_windows(data.tokenize(text, tokenizer), nsamples, seqlen, seed, source=what)


def describe(protocol: str, corpus: str = "wikitext2") -> str:
    """One line for reports: what the perplexity was computed on."""
    if protocol == "default":
        return "admm_kernels default: text joined by blank lines, no special tokens, non-overlapping windows"
    if corpus == "c4":
        return (f"sparsegpt/c4: first {C4_EVAL_DOCUMENTS} documents joined by ' ', special tokens, first "
                f"{C4_EVAL_WINDOWS} x seqlen tokens, non-overlapping windows")
    return "sparsegpt/wikitext2: records joined by '\\n\\n', special tokens, all non-overlapping windows"
