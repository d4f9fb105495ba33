"""Zero-shot (or few-shot) accuracy with EleutherAI's lm-evaluation-harness on an in-memory model.

    import admm_kernels as ak
    result = ak.evaluate_tasks(model, tokenizer, ["piqa", "arc_easy"])       # or "piqa,arc_easy"
    result = ak.evaluate_tasks(model, tokenizer, "my_task", tasks_path="my_tasks/")  # local task YAMLs
    from admm_kernels.integrations.lm_eval import format_table; print(format_table(result))

What runs: lm-eval's `simple_evaluate` on its HF wrapper `HFLM(pretrained=model, tokenizer=tokenizer)`
over the model object as it is (dense, pruned in place, or loaded with ak.load_sparse), so nothing is
saved or reloaded. For a multiple-choice task lm-eval scores each choice by the sum of its tokens'
log-probabilities given the context (context + continuation tokenised together, then split) and counts
a hit when the gold choice has the highest score (`acc`) or the highest score per byte of the choice
(`acc_norm`); `*_stderr` is the sample standard error of the mean. Task names are those lm-eval's
TaskManager resolves (its bundled tasks, groups and tags) plus the tasks in YAML files under
`tasks_path` (its include path), so offline or private tasks run too; a bundled task downloads its
data set through `datasets` unless it is cached (set HF_DATASETS_OFFLINE=1 to forbid that).

Versions: lm-eval supports transformers 5 from 0.4.10; 0.4.13 is tested here with transformers 5.24 and
torch 2.13 (requirements.txt, the `eval` extra).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

__all__ = ["evaluate_tasks", "parse_tasks", "check_tasks", "format_table"]


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("zero-shot tasks need lm-evaluation-harness: pip install 'admm_kernels[eval]' "
                          f"(tested with lm_eval==0.4.13); import failed: {exc}") from exc
    return lm_eval, evaluator, HFLM, TaskManager


def parse_tasks(tasks: str | Sequence[str], name: str = "tasks") -> list[str]:
    """Task names from "a,b" or ["a", "b"]: stripped, in order, without duplicates; ValueError if none."""
    if isinstance(tasks, str):
        items = tasks.split(",")
    elif isinstance(tasks, Sequence) and all(isinstance(t, str) for t in tasks):
        items = [part for t in tasks for part in t.split(",")]
    else:
        raise TypeError(f"{name} must be a comma-separated str or a list of str, got {tasks!r}")
    out = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not out:
        raise ValueError(f"{name} names no task, got {tasks!r}")
    return out


# lm-eval's index of its ~15k bundled task YAMLs takes 8-15 s to build here (measured with 0.4.13 on the
# 2-core machine): built once per process, and only when a name is not among the local tasks.
_BUNDLED: list = []


def _task_manager(tasks_path: str | os.PathLike | None, bundled: bool):
    _, _, _, TaskManager = _import_lm_eval()
    if tasks_path is None:
        if not _BUNDLED:
            _BUNDLED.append(TaskManager())
        return _BUNDLED[0]
    p = Path(tasks_path).expanduser()
    if not p.is_dir():
        raise ValueError(f"tasks_path {str(tasks_path)!r} is not a folder (expected a folder of lm-eval "
                         "task YAMLs)")
    return TaskManager(include_path=str(p.resolve()), include_defaults=bundled)


def check_tasks(tasks: str | Sequence[str], tasks_path: str | os.PathLike | None = None,
                name: str = "tasks") -> list[str]:
    """The task names, checked against lm-eval's index (and `tasks_path`) before any model is loaded.

    Raises ValueError naming the unknown ones (a typo fails in seconds, not after pruning)."""
    return _resolve(tasks, tasks_path, name)[0]


def _resolve(tasks, tasks_path, name: str = "tasks"):
    """(names, TaskManager): the local tasks alone when they hold every name, else lm-eval's too."""
    names = parse_tasks(tasks, name)
    manager = None
    if tasks_path is not None:
        manager = _task_manager(tasks_path, bundled=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = _task_manager(tasks_path, bundled=True)
    unknown = [t for t in names if t not in set(manager.all_tasks)]
    if unknown:
        where = (f" or in {str(tasks_path)!r}" if tasks_path is not None
                 else " (local YAMLs: --tasks-path DIR)")
        raise ValueError(f"unknown lm-eval task(s) {', '.join(repr(t) for t in unknown)}: not in lm-eval's "
                         f"task index{where}")
    return names, manager


def _metrics(entry: dict) -> dict:
    """lm-eval's "acc,none" keys -> "acc" (the 'none' filter); other filters stay "metric,filter"."""
    out = {}
    for key, value in entry.items():
        if key in ("alias", "name", "sample_len", "sample_count") or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        if isinstance(value, float) and value != value:  # NaN stderr (a single sample): JSON has no NaN
            value = None
        out[metric if filt in ("", "none") else key] = value
    return out


@dataclass(frozen=True)
class TaskOptions:
    """How evaluate_tasks runs lm-eval. tasks_path: a folder of task YAMLs (lm-eval's include path);
    num_fewshot: examples in each prompt (0 = zero-shot, as the pruning papers report); limit: only the
    first `limit` documents of each task (a float in (0, 1): that fraction); batch_size: sequences per
    forward pass; seed: lm-eval's python/numpy/torch/few-shot seeds; log_samples: keep lm-eval's
    per-document records. Checked on construction (ValueError)."""

    tasks_path: str | os.PathLike | None = None
    num_fewshot: int = 0
    limit: int | float | None = None
    batch_size: int = 1
    seed: int = 0
    log_samples: bool = False

    def __post_init__(self) -> None:
        for arg, value, lo in (("num_fewshot", self.num_fewshot, 0), ("batch_size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{arg} must be an int >= {lo}, got {value!r}")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                                  or limit <= 0):
            raise ValueError(f"limit must be a positive number or None, got {limit!r}")

    @classmethod
    def of(cls, given: dict) -> TaskOptions:
        """From evaluate_tasks' keywords; TypeError naming an unknown one."""
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"evaluate_tasks() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**given)


def _check_model(model, tokenizer) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError("model must be a torch.nn.Module (a transformers causal LM), "
                        f"got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("tokenizer is None: lm-eval tasks need the model's tokenizer")
    if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("the tokenizer has neither an end-of-text (eos) nor a begin (bos) token; lm-eval "
                         "uses one as the prefix of empty contexts: set tokenizer.eos_token")


def _report(out: dict, names: list[str], opts: TaskOptions, seconds: float, version: str) -> dict:
    """evaluate_tasks' dict from lm-eval's simple_evaluate output `out`."""
    counts = out.get("n-samples", {})
    results = {}
    for task, entry in out["results"].items():
        results[task] = _metrics(entry)
        if task in counts:
            results[task]["samples"] = int(counts[task].get("effective", counts[task].get("original", 0)))
    report = {"results": results, "tasks": names, "num_fewshot": opts.num_fewshot, "limit": opts.limit,
              "batch_size": opts.batch_size,
              "tasks_path": str(opts.tasks_path) if opts.tasks_path is not None else None,
              "lm_eval": version, "seconds": seconds}
    if opts.log_samples:
        report["samples"] = out.get("samples", {})
    return report


@torch.no_grad()
def evaluate_tasks(model: nn.Module, tokenizer, tasks: str | Sequence[str], *,
                   device: torch.device | str | None = None, **options) -> dict:
    """Run lm-eval tasks on `model` (a transformers causal LM object, possibly with SparseLinear layers).

    tasks: "piqa,arc_easy" or a list of names (lm-eval's, or tasks defined by YAML files under
    tasks_path). device: where to run (the model is moved there and back; default where it is).
    options (TaskOptions): tasks_path=, num_fewshot= (examples in each prompt: 0 = zero-shot, as the
    pruning papers report), limit= (only the first `limit` documents of each task; a float in (0, 1):
    that fraction), batch_size= (sequences per forward pass), seed= (lm-eval's python/numpy/torch/few-shot
    seeds), log_samples= (keep lm-eval's per-document records under "samples", each choice's
    log-likelihood in "resps").

    Returns a JSON-able dict: results {task: {metric: value, ..., "samples": documents evaluated}},
    tasks (the names asked for), num_fewshot, limit, batch_size, tasks_path, lm_eval (its version),
    seconds; and samples (lm-eval's per-document records) if asked.
    """
    lm_eval, evaluator, HFLM, _ = _import_lm_eval()
    _check_model(model, tokenizer)
    opts = TaskOptions.of(options)
    names, manager = _resolve(tasks, opts.tasks_path)

    from ..eval import evaluation_mode

    t0 = time.perf_counter()
    with evaluation_mode(model, device):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size)
        seed = opts.seed
        out = evaluator.simple_evaluate(
            model=lm, tasks=names, num_fewshot=opts.num_fewshot, limit=opts.limit, task_manager=manager,
            log_samples=opts.log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    return _report(out, names, opts, time.perf_counter() - t0, getattr(lm_eval, "__version__", "unknown"))


def format_table(results: dict | list[tuple[str, dict]]) -> str:
    """A plain-text table of task metrics. `results` is evaluate_tasks' dict, or a list of
    (column label, evaluate_tasks dict) pairs such as [("before", r0), ("after", r1)]."""
    runs = [("value", results)] if isinstance(results, dict) else list(results)
    tasks = list(dict.fromkeys(t for _, r in runs for t in r["results"]))
    rows = [("task", "metric", *(label for label, _ in runs))]
    for task in tasks:
        metrics = list(dict.fromkeys(m for _, r in runs for m in r["results"].get(task, {})
                                     if not m.endswith("_stderr") and m != "samples"))
        for metric in metrics:
            cells = []
            for _, r in runs:
                entry = r["results"].get(task, {})
                v, se = entry.get(metric), entry.get(f"{metric}_stderr")
                cells.append("-" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
            rows.append((task, metric, *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
