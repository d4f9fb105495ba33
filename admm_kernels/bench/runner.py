"""The benchmark run behind `admm-prune bench`, callable from Python with an in-memory model.

    result = run_bench(model, calib_ids, out, BenchSettings(methods=parse_methods("wanda admm-grad")))

Order of work: validate everything (layers, patterns, method options) -> measure the machine -> Grams
(cache) -> layer rows (journal: finished rows are reused with --resume) -> optional end-to-end
perplexity (prune_model + evaluate_perplexity per method x pattern x sparsity, dense weights restored
after each) -> outputs (report.write_outputs). Every row is computed after torch.manual_seed(seed), so
a row's result does not depend on which rows ran before it (resume, filters).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._digest import tokens_digest
from . import grams as grams_mod
from . import layers as layers_mod
from . import machine, report
from .journal import Journal
from .methods import DEFAULT_METHODS, MethodSpec, parse_method


def _default_methods() -> list[MethodSpec]:
    return [parse_method(m) for m in DEFAULT_METHODS]


@dataclass
class BenchSettings:
    """What to run. sparsities apply to unstructured / per-row patterns (N:M fixes its own); layers:
    glob patterns (None = every linear in the blocks), max_layers: the first N of them; gap: which rows
    get the exact-optimum gap ("admm": ADMM variants, "all", "none"); eval_windows: perplexity windows."""

    methods: list[MethodSpec] = field(default_factory=_default_methods)
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])
    layers: list[str] | None = None
    max_layers: int | None = None
    seed: int = 0
    device: str = "cpu"
    gap: str = "admm"
    perplexity: bool = False
    eval_windows: int | None = None
    gram_dtype: torch.dtype = torch.float32
    cache_dir: str | os.PathLike | None = None
    resume: bool = False
    progress: bool = True


def _log(settings: BenchSettings, *msg) -> None:
    if settings.progress:
        print(*msg, file=sys.stderr, flush=True)


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="row", file=sys.stderr, leave=False)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _check(settings: BenchSettings) -> None:
    if settings.gap not in ("admm", "all", "none"):
        raise ValueError(f"--gap must be 'admm', 'all' or 'none', got {settings.gap!r}")
    if not settings.methods:
        raise ValueError("--methods: no method given")
    if not settings.patterns:
        raise ValueError("--patterns: no pattern given")
    for s in settings.sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"--sparsities must be numbers in [0, 1), got {s!r}")
    if not settings.sparsities and any(":" not in p for p in settings.patterns):
        raise ValueError("--sparsities: no sparsity given for the unstructured / per-row patterns")


def _wants_gap(settings: BenchSettings, spec: MethodSpec) -> bool:
    return settings.gap == "all" or (settings.gap == "admm" and spec.is_admm)


@dataclass(frozen=True)
class RunLabels:
    """How a run is named in its results: model_name (default: the model's class name) and meta, extra
    entries for result["meta"] (e.g. the command line)."""

    model_name: str | None = None
    meta: dict | None = None


@dataclass(frozen=True)
class BenchGrams:
    """The Grams of a run: the calibration store, whether it came from the cache (hit) and how long
    loading or computing it took, and the held-out store (None without held-out windows)."""

    store: grams_mod.GramStore
    hit: bool
    seconds: float
    heldout: grams_mod.GramStore | None = None


@dataclass(frozen=True)
class Evaluation:
    """The text of the end-to-end perplexity rows: ids (n,) int64, cut into windows of seqlen tokens."""

    ids: torch.Tensor
    seqlen: int


class _LayerData:
    """One layer's weight and Grams on the compute device, loaded at the first row that needs them
    (a layer whose rows all come from the journal is never read)."""

    def __init__(self, module: nn.Module, name: str, grams: BenchGrams, device: torch.device):
        self.module, self.name, self.grams, self.device = module, name, grams, device
        self._loaded: tuple | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight (out, in), Gram (in, in), held-out Gram (in, in) or None)."""
        from ..models.discovery import get_weight

        if self._loaded is None:
            held = self.grams.heldout
            self._loaded = (get_weight(self.module).detach().to(self.device),
                            self.grams.store.gram(self.name).to(self.device),
                            held.gram(self.name).to(self.device) if held is not None else None)
        return self._loaded


def _layer_row(lay: dict, data: _LayerData, spec: MethodSpec, plan_item: tuple[str, float],
               context: tuple[BenchSettings, dict, str], key: str) -> dict:
    """Compute one layer row (after torch.manual_seed(seed), so it does not depend on earlier rows).
    context: (settings, the machine's peaks, the model's name)."""
    settings, peaks, model_name = context
    pattern, s = plan_item
    weight, G, H = data.get()
    torch.manual_seed(settings.seed)
    return {"key": key, "model": model_name, "layer": lay["name"], "block": lay["block"],
            "shape": "x".join(map(str, lay["shape"])), "group": lay["group"], "method": spec.label,
            "pattern": pattern,
            **layers_mod.run_row(weight, G, spec, pattern, s,
                                 layers_mod.RowExtras(peaks, _wants_gap(settings, spec), H))}


def layer_rows(model: nn.Module, grams: BenchGrams, settings: BenchSettings, journal: Journal,
               peaks: dict, model_name: str) -> tuple[list[dict], int]:
    """Every layer x pattern x sparsity x method row (reused from the journal where finished);
    returns (rows, how many were computed now). With grams.heldout each row also gets its
    out-of-sample error on the held-out Grams."""
    from ..models.discovery import named_layers

    modules = named_layers(model)
    device = torch.device(settings.device)
    plan = [(pat, s) for pat in settings.patterns
            for s in layers_mod.row_sparsities(pat, settings.sparsities)]
    layers = grams.store.layers
    bar = _bar(len(layers) * len(plan) * len(settings.methods), "layers", settings.progress)
    rows: list[dict] = []
    computed = 0
    try:
        for lay in layers:
            data = _LayerData(modules[lay["name"]], lay["name"], grams, device)
            for pattern, s in plan:
                for spec in settings.methods:
                    key = _key("layer", lay["name"], spec.label, spec.options, pattern, round(s, 6),
                               _wants_gap(settings, spec))
                    row = journal.get(key)
                    if row is None:
                        row = _layer_row(lay, data, spec, (pattern, s), (settings, peaks, model_name), key)
                        journal.add(row)
                        computed += 1
                    rows.append(row)
                    if bar is not None:
                        bar.set_postfix_str(f"{lay['rel']} {spec.label} err={row['error']:.3g}",
                                            refresh=False)
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows, computed


def _pruned_perplexity(model: nn.Module, calib_ids: torch.Tensor, evaluation: Evaluation,
                       run: tuple[MethodSpec, str, float], chosen: set[str],
                       settings: BenchSettings) -> tuple[float, float]:
    """(perplexity, achieved sparsity) of the model with the `chosen` layers pruned by run = (spec,
    pattern, sparsity) through prune_model; the caller restores the dense weights."""
    from ..models import prune_model

    spec, pattern, s = run
    _log(settings, f"perplexity: pruning with {spec.label}, {pattern}, sparsity {s:g}")
    rep = prune_model(model, calib_ids, sparsity=s, pattern=pattern, method=spec.method,
                      layers=lambda name, module: name in chosen, device=torch.device(settings.device),
                      gram_dtype=settings.gram_dtype, progress=settings.progress, **spec.options)
    return _perplexity(model, evaluation, settings), rep["achieved_sparsity"]


def _perplexity(model: nn.Module, evaluation: Evaluation, settings: BenchSettings) -> float:
    from ..eval import evaluate_perplexity

    return evaluate_perplexity(model, evaluation.ids, seqlen=evaluation.seqlen,
                               max_windows=settings.eval_windows, device=torch.device(settings.device),
                               progress=settings.progress)


@torch.no_grad()
def perplexity_rows(model: nn.Module, calib_ids: torch.Tensor, evaluation: Evaluation, names: list[str],
                    settings: BenchSettings, journal: Journal) -> tuple[list[dict], int]:
    """Dense perplexity, then per method x pattern x sparsity: prune the selected layers `names` with
    prune_model, evaluate, restore the dense weights. Returns (rows, how many were computed now)."""
    from ..models.discovery import get_weight, named_layers, set_weight

    modules = named_layers(model)
    dense = {n: get_weight(modules[n]).detach().clone() for n in names}
    plan = [("dense", None, "dense", 0.0)] + [
        (spec.label, spec, pat, s) for pat in settings.patterns
        for s in layers_mod.row_sparsities(pat, settings.sparsities) for spec in settings.methods]
    rows, computed = [], 0
    for label, spec, pattern, s in plan:
        key = _key("ppl", label, spec.options if spec else None, pattern, round(s, 6), evaluation.seqlen,
                   settings.eval_windows, tokens_digest(evaluation.ids))
        row = journal.get(key)
        if row is None:
            torch.manual_seed(settings.seed)
            t = time.perf_counter()
            if spec is None:
                ppl, achieved = _perplexity(model, evaluation, settings), 0.0
            else:
                try:
                    ppl, achieved = _pruned_perplexity(model, calib_ids, evaluation, (spec, pattern, s),
                                                       set(names), settings)
                finally:
                    for n, w in dense.items():
                        set_weight(modules[n], w)
            row = {"key": key, "kind": "perplexity", "method": label, "pattern": pattern, "sparsity": s,
                   "perplexity": ppl, "seconds": time.perf_counter() - t, "achieved_sparsity": achieved}
            journal.add(row)
            computed += 1
        rows.append(row)
    return rows, computed


def check_disjoint(calib: torch.Tensor, heldout: torch.Tensor) -> None:
    """ValueError when a held-out window is also a calibration window (an out-of-sample error must be
    measured on inputs the solve never saw)."""
    seen = {tuple(w.tolist()) for w in calib}
    shared = sum(1 for w in heldout if tuple(w.tolist()) in seen)
    if shared:
        raise ValueError(f"{shared} of the {heldout.shape[0]} held-out windows are calibration windows too: "
                         "draw them from other text or other windows")


def _labels(given: dict) -> RunLabels:
    unknown = sorted(set(given) - {"model_name", "meta"})
    if unknown:
        raise TypeError(f"run_bench() got unexpected keyword arguments {unknown}")
    return RunLabels(**given)


def _check_inputs(model: nn.Module, calib_ids: torch.Tensor, heldout_ids: torch.Tensor | None,
                  settings: BenchSettings, evaluation: Evaluation | None) -> tuple[torch.Tensor,
                                                                                   torch.Tensor | None]:
    """(calibration ids, held-out ids or None), validated as prune_model validates its calibration."""
    from ..models.pipeline import check_calibration

    ids = check_calibration(calib_ids, model)
    held_ids = check_calibration(heldout_ids, model) if heldout_ids is not None else None
    if held_ids is not None:
        check_disjoint(ids, held_ids)
    if settings.perplexity and evaluation is None:
        raise ValueError("perplexity needs eval_ids and seqlen")
    return ids, held_ids


def _selected_layers(model: nn.Module, settings: BenchSettings) -> tuple[list[grams_mod.LayerRef],
                                                                         dict[str, tuple[int, int]]]:
    """(the selected layers, {name: (out, in)}), every pattern and method checked against them."""
    from ..models.discovery import get_weight

    refs = grams_mod.select_layers(model, settings.layers, settings.max_layers)
    shapes = {r.name: tuple(get_weight(r.module).shape) for r in refs}
    layers_mod.check_patterns(shapes, settings.patterns)
    layers_mod.check_methods(settings.methods)
    return refs, shapes


def _load_grams(model: nn.Module, ids: torch.Tensor, held_ids: torch.Tensor | None, refs: list,
                settings: BenchSettings) -> BenchGrams:
    """The calibration (and held-out) Grams of `refs`, from the cache or computed now."""
    from ..models.loading import cache_dir

    root = Path(settings.cache_dir) if settings.cache_dir is not None else cache_dir() / "bench"
    device = torch.device(settings.device)
    t = time.perf_counter()
    store, hit = grams_mod.load_or_compute(model, ids, refs, root, device, settings.gram_dtype,
                                           settings.progress)
    seconds = time.perf_counter() - t
    _log(settings, f"Grams of {len(store.layers)} layers: {'cache hit' if hit else 'computed'} "
                   f"({seconds:.1f} s) in {store.folder}")
    held_store = None
    if held_ids is not None:
        t = time.perf_counter()
        held_store, held_hit = grams_mod.load_or_compute(model, held_ids, refs, root, device,
                                                         settings.gram_dtype, settings.progress)
        how = "cache hit" if held_hit else "computed"
        _log(settings, f"held-out Grams ({held_ids.shape[0]} windows): {how} "
                       f"({time.perf_counter() - t:.1f} s)")
    if store.index["not_called"]:
        _log(settings, f"skipped (never called by their block's forward): "
                       f"{', '.join(store.index['not_called'])}")
    return BenchGrams(store, hit, seconds, held_store)


def _gram_info(grams: BenchGrams, peaks: dict) -> dict:
    """results.json's "grams" entry."""
    store, idx = grams.store, grams.store.index
    info = {"cache": "hit" if grams.hit else "computed", "key": store.key, "folder": str(store.folder),
            "seconds": grams.seconds, "tokens": idx["tokens"], "nsamples": idx["nsamples"],
            "seqlen": idx["seqlen"], "layers": len(store.layers), "not_called": idx["not_called"],
            "groups": len({r["group"] for r in store.layers}), "build_seconds": idx["seconds"]}
    if idx["seconds"]["gram"] > 0:  # the Gram kernel's roofline (from the run that built the cache)
        info["gflops"] = idx["gram_flops"] / idx["seconds"]["gram"] / 1e9
        info["frac_matmul"] = info["gflops"] / peaks["matmul_gflops"]
    return info


def _meta(settings: BenchSettings, labels: RunLabels, model_name: str, ids: torch.Tensor,
          evaluation: Evaluation | None) -> dict:
    """results.json's "meta" entry: versions, machine, commit, settings, calibration, labels.meta."""
    from ..environment import versions

    device = torch.device(settings.device)
    return {
        "model": model_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seed": settings.seed,
        "versions": versions(), "machine": machine.describe(device), "git": machine.git_commit(),
        "settings": {"methods": [{"label": m.label, "method": m.method, "options": m.options}
                                 for m in settings.methods],
                     "sparsities": settings.sparsities, "patterns": settings.patterns,
                     "layers": settings.layers, "max_layers": settings.max_layers, "gap": settings.gap,
                     "device": str(device), "gram_dtype": str(settings.gram_dtype),
                     "perplexity": settings.perplexity, "eval_windows": settings.eval_windows,
                     "eval_seqlen": evaluation.seqlen if settings.perplexity else None},
        "calibration": {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                        "tokens_sha256": tokens_digest(ids)},
        **(labels.meta or {}),
    }


def run_bench(model: nn.Module, calib_ids: torch.Tensor, out: str | os.PathLike,
              settings: BenchSettings | None = None, eval_ids: torch.Tensor | None = None,
              seqlen: int | None = None, *, heldout_ids: torch.Tensor | None = None, **labels) -> dict:
    """Run the benchmark on `model` (a transformers causal LM) with calibration ids (N, L) int64; write
    the outputs to `out` and return the results.json object. eval_ids (n,) int64 and seqlen are needed
    for settings.perplexity. heldout_ids (M, L) int64: windows not used for calibration (no window in
    common with calib_ids: checked); every row then has its error on their Grams too ("heldout_error",
    out of sample). labels: model_name= and meta= (RunLabels: extra entries for result["meta"], e.g. the
    command line)."""
    run_labels = _labels(labels)
    settings = settings or BenchSettings()
    _check(settings)
    t0 = time.perf_counter()
    out = Path(out)
    evaluation = Evaluation(eval_ids, seqlen) if eval_ids is not None and seqlen is not None else None
    ids, held_ids = _check_inputs(model, calib_ids, heldout_ids, settings, evaluation)
    model_name = run_labels.model_name or type(model).__name__
    refs, shapes = _selected_layers(model, settings)
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)

    _log(settings, "measuring the machine's matmul throughput and copy bandwidth ...")
    # The GEMM side of the ADMM loop is in_features square; below 512 a matmul is overhead-bound and would
    # understate the machine (64^3 fp32: ~0.1 GFLOP/s here against ~60 at 1024^3).
    peaks = machine.measure(device, n=min(2048, max(512, max(s[1] for s in shapes.values()))))
    grams = _load_grams(model, ids, held_ids, refs, settings)
    # threads: BLAS splits its sums per thread (errors change in the last bits) and every timing depends
    # on it, so rows of another --threads are not reused.
    journal = Journal(out, {"grams": grams.store.key, "device": device.type, "seed": settings.seed,
                            "threads": torch.get_num_threads(),
                            "heldout": grams.heldout.key if grams.heldout is not None else None},
                      settings.resume)
    rows, computed = layer_rows(model, grams, settings, journal, peaks, model_name)
    ppl_rows, ppl_computed = [], 0
    if settings.perplexity:
        ppl_rows, ppl_computed = perplexity_rows(model, ids, evaluation,
                                                 [r["name"] for r in grams.store.layers], settings, journal)
    result = {
        "schema": report.SCHEMA,
        "meta": _meta(settings, run_labels, model_name, ids, evaluation),
        "machine": peaks,
        "grams": _gram_info(grams, peaks),
        "heldout": ({"windows": int(held_ids.shape[0]), "key": grams.heldout.key,
                     "tokens_sha256": tokens_digest(held_ids)} if grams.heldout is not None else None),
        "run": {"rows": len(rows), "computed": computed, "reused": len(rows) - computed,
                "perplexity_computed": ppl_computed, "seconds": time.perf_counter() - t0},
        "rows": rows,
        "summary": report.summarize(rows),
        "by_projection": report.summarize_by_projection(rows),
        "perplexity": ppl_rows,
    }
    report.write_outputs(out, result)
    return result
