"""`admm-prune bench --protocol / --corpus / --text-field`: the same text options as prune, read through
the same admm_kernels.protocols functions, so bench calibrates (and evaluates) on prune's windows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("transformers")
from tiny_models import save_tiny_folder, tiny_text, tiny_tokenizer  # noqa: E402

from admm_kernels import protocols  # noqa: E402
from admm_kernels._digest import tokens_digest  # noqa: E402
from admm_kernels.cli.bench import main as bench_main  # noqa: E402
from admm_kernels.eval import evaluate_perplexity  # noqa: E402

NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = save_tiny_folder(tmp_path_factory.mktemp("bench-protocols"), 600, 0, 300, 1)
    records = [{"content": tiny_text(80, seed=10 + i), "text": ""} for i in range(12)]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _bench(folder: Path, out: str, *extra: str) -> tuple[int, dict | None]:
    rc = bench_main([str(folder / "tiny-llama"), "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
                     "--methods", "wanda", "--max-layers", "2", "--out", str(folder / out), "--cache-dir",
                     str(folder / "cache"), "--quiet", *extra])
    path = folder / out / "results.json"
    return rc, json.loads(path.read_text()) if rc == 0 else None


def test_sparsegpt_protocol_calibrates_and_evaluates_as_prune(folder):
    text = ["--calib", str(folder / "calib.txt"), "--eval-text", str(folder / "eval.txt")]
    rc, res = _bench(folder, "sparsegpt", *text, "--protocol", "sparsegpt", "--perplexity",
                     "--eval-windows", "2", "--heldout-windows", "2")
    assert rc == 0
    meta = res["meta"]
    assert (meta["protocol"], meta["corpus"], meta["text_field"]) == ("sparsegpt", "wikitext2", "text")
    tok = tiny_tokenizer()
    want = protocols.calibration_windows(tok, folder / "calib.txt", nsamples=NSAMPLES, seqlen=SEQLEN,
                                         seed=0, protocol="sparsegpt")
    assert meta["calibration"]["tokens_sha256"] == tokens_digest(want)
    # the default protocol draws other windows from the same text
    default = protocols.calibration_windows(tok, folder / "calib.txt", nsamples=NSAMPLES, seqlen=SEQLEN,
                                            seed=0)
    assert tokens_digest(default) != tokens_digest(want)
    # the dense perplexity is the one of the protocol's evaluation stream (special tokens, joined records)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "tiny-llama", dtype=torch.float32)
    stream = protocols.evaluation_tokens(tok, folder / "eval.txt", protocol="sparsegpt", seqlen=SEQLEN)
    dense = next(p for p in res["perplexity"] if p["method"] == "dense")
    assert dense["perplexity"] == pytest.approx(evaluate_perplexity(model, stream, seqlen=SEQLEN,
                                                                    max_windows=2), rel=1e-6)


def test_text_field_reads_a_jsonl_field(folder, capsys):
    rc, res = _bench(folder, "field", "--calib", str(folder / "calib.jsonl"), "--text-field", "content",
                     "--heldout-windows", "0")
    assert rc == 0 and res["meta"]["text_field"] == "content" and res["meta"]["protocol"] == "default"
    want = protocols.calibration_windows(tiny_tokenizer(), folder / "calib.jsonl", nsamples=NSAMPLES,
                                         seqlen=SEQLEN, seed=0, field="content")
    assert res["meta"]["calibration"]["tokens_sha256"] == tokens_digest(want)
    # the default field "text" holds only empty strings here: too short for one window
    rc, _ = _bench(folder, "no-field", "--calib", str(folder / "calib.jsonl"), "--heldout-windows", "0")
    assert rc == 2 and "calib.jsonl' is too short" in capsys.readouterr().err


def test_corpus_needs_the_sparsegpt_protocol(folder, capsys):
    rc, _ = _bench(folder, "corpus", "--corpus", "c4")
    assert rc == 2
    assert "--corpus c4 applies to --protocol sparsegpt only" in capsys.readouterr().err
