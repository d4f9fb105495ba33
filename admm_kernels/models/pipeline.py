"""Whole-model pruning (docs/DESIGN.md, "A prune run"), as SparseGPT / Wanda / the seed paper do, on one
process or on every rank of a torch.distributed run, with the model in memory or streamed from its
checkpoint.

For each decoder block in turn: move it to the compute device; accumulate the Gram of every selected
linear's input over the calibration windows (layers sharing an input share one Gram); prune every
selected linear with prune_layer; run the windows through the *pruned* block to make the next block's
inputs; move the block back (admm_kernels.models.block, with the stages of sequential pruning in
admm_kernels.models.grams). Only one block is ever on the device.

Distributed (admm_kernels.models.distributed): the windows are split over the ranks, the Grams summed,
the layers solved by balanced owners and broadcast; every rank holds the identical pruned model. Rank 0
alone owns the resumable state (lock, verification, saves: other ranks never write), gathering the
activations from every rank when it saves them, so a saved block is one every rank finished.
Streamed (admm_kernels.models.streaming.StreamedModel): each block is read from the checkpoint just
before its turn and written out and freed as soon as it is final.

With a state folder, everything needed to continue bit-identically is saved after each block.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .._checks import check_compute_device, model_device
from .._digest import model_digest
from ..environment import versions
from ..patterns import parse_pattern, pattern_group
from .activations import ActivationStore, resolve_offload
from .block import prune_block, solver
from .block_tune import BlockTune, check_block_tune
from .capture import capture_inputs
from .coverage import check_coverage, classify_block, coverage
from .discovery import LayerFilter, block_layers, find_blocks, get_weight, select_all, set_weight
from .distributed import Comm, resolve_comm, shard, shard_counts
from .experts import MOE_CALIBRATION
from .grams import GramHooks  # noqa: F401  (admm_kernels.bench.grams imports it from here)
from .loading import max_positions
from .owl import resolve_profile
from .sparsity_profile import BlockSparsity, check_profile
from .state import PipelineState, StateLayout, fingerprint
from .streaming import StreamedModel


def check_calibration(calibration, model: nn.Module) -> torch.Tensor:
    """calibration: int token ids (N, L) (or a list of N (L,) tensors) -> int64 (N, L) CPU tensor."""
    if isinstance(calibration, (list, tuple)):
        if not calibration or not all(isinstance(t, torch.Tensor) for t in calibration):
            raise TypeError("calibration must be an int tensor (nsamples, seqlen) or a non-empty list of "
                            f"(seqlen,) int tensors, got {type(calibration).__name__}")
        if len({tuple(t.shape) for t in calibration}) != 1:
            raise ValueError("calibration windows must all have the same length, got lengths "
                             f"{sorted({t.shape[-1] for t in calibration})}")
        calibration = torch.stack([t.reshape(-1) for t in calibration])
    if not isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an int tensor (nsamples, seqlen), "
                        f"got {type(calibration).__name__}")
    if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
        raise TypeError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError("calibration must have shape (nsamples, seqlen) with both > 0, "
                         f"got {tuple(calibration.shape)}")
    ids = calibration.detach().to("cpu", torch.int64)
    limit = max_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"calibration seqlen {ids.shape[1]} exceeds the model's maximum of {limit} "
                         "positions")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"calibration token ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
    return ids


def _validate_options(sparsity: float, pattern: str, method: str, options: dict) -> None:
    """Run prune_layer once on a tiny random layer so a bad method or option fails before any work."""
    prune_layer = solver()
    group = pattern_group(pattern)
    in_f = group * 2 if group > 1 else 8
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, in_f, generator=g)
    x = torch.randn(4 * in_f, in_f, generator=g)
    prune_layer(w, x.T @ x, sparsity=sparsity, pattern=pattern, method=method, **options)


def _validate_layers(selected: list[dict[str, nn.Module]], blocks_name: str, pattern: str,
                     block_sparsity: Sequence[float]) -> None:
    """Check the pattern against every selected layer before any work (not after hours)."""
    for i, layers in enumerate(selected):
        sparsity = block_sparsity[i]
        for rel, module in layers.items():
            out_f, in_f = get_weight(module).shape
            try:
                pat = parse_pattern(pattern, in_f)
            except ValueError as exc:
                raise ValueError(f"pattern {pattern!r} is invalid for layer {blocks_name}.{i}.{rel} "
                                 f"(weight {out_f}x{in_f}): {exc}") from None
            if pat.kind != "nm" and int(sparsity * (in_f if pat.kind == "per-row" else in_f * out_f)) == 0 \
                    and sparsity > 0:
                raise ValueError(f"sparsity {sparsity} prunes no weight of layer {blocks_name}.{i}.{rel} "
                                 f"(weight {out_f}x{in_f})")


def check_prunable(model: nn.Module | StreamedModel, sparsity: float | Sequence[float], pattern: str,
                   method: str = "admm",
                   layers: LayerFilter = None, *, sparsity_profile: str = "uniform",
                   owl_m: float | None = None, owl_lambda: float | None = None, **options) -> None:
    """Raise ValueError / TypeError now if prune_model would reject these settings for this model
    (no decoder blocks, a layer pattern matching nothing, default layers covering too little of the
    blocks' weights, an unknown experts layout, N:M not dividing a layer's in_features, an unknown
    method or option, a bad sparsity profile)."""
    net = model.model if isinstance(model, StreamedModel) else model
    blocks_name, blocks = find_blocks(net)
    planned = check_profile(sparsity, sparsity_profile, len(blocks), pattern, owl_m, owl_lambda).planned()
    selected = select_all(blocks, blocks_name, layers)
    _check_coverage(net, blocks, blocks_name, selected, layers)
    _validate_layers(selected, blocks_name, pattern, planned)
    _validate_options(planned[0], pattern, method, options)


def coverage_rows(blocks: nn.ModuleList, selected: list[dict[str, nn.Module]]) -> list[list[dict]]:
    """Per block, every matrix parameter with what the selection prunes of it (admm_kernels.models.
    coverage.classify_block)."""
    rows = []
    for block, sel in zip(blocks, selected):
        every, routers = block_layers(block)
        rows.append(classify_block(block, sel, every, routers))
    return rows


def _check_coverage(net: nn.Module, blocks: nn.ModuleList, blocks_name: str,
                    selected: list[dict[str, nn.Module]], layers: LayerFilter) -> list[list[dict]]:
    rows = coverage_rows(blocks, selected)
    if layers is None:  # a layers= selection prunes less on purpose
        check_coverage(rows, blocks_name, type(net).__name__)
    return rows


def _callable_name(f) -> str:
    return getattr(f, "__qualname__", repr(f))


def run_fingerprint(model: nn.Module, ids: torch.Tensor, blocks_name: str, n_blocks: int, *, method: str,
                    pattern: str, sparsity: BlockSparsity, options: dict, layers: LayerFilter,
                    gram_dtype: torch.dtype, device: torch.device, dense_model: str | None = None,
                    world_size: int = 1, sequential: bool = False, block_tune: dict | None = None,
                    moe_calibration: str = "routed") -> dict:
    """Everything that determines a pruning run's result, as compared by `--resume`: a content digest
    of every parameter and buffer of the dense model (admm_kernels._digest.model_digest: 0.38 s for the
    538 MB of SmolLM2-135M here, ~0.1 % of the embedded run; `dense_model` when the caller has it, e.g.
    a StreamedModel's digest from its checkpoint, which is the same value), its config, the calibration
    token ids, the method, pattern, target sparsity, sparsity profile (its name and settings, and every
    block's sparsity) and options (as given, and as they run: the method's defaults and preset applied,
    so a preset or default changed by another checkout of the code is caught too), the layer selection,
    the Gram dtype, the device type, the torch thread count on the CPU (BLAS reductions are split per
    thread: 1 vs 2 threads gave perplexity 64.238 vs 64.301 for the same run), a forced kernel backend,
    the versions of the code, and -- only when not the default, so older single-process states stay
    valid -- the world size of a distributed run (the Gram sums run in another order), sequential
    pruning, block tuning (its settings) and the experts' calibration mode."""
    from .. import backends, methods

    given = dict(options)
    resolved = methods.get(method).resolve(given.pop("preset", None), given)
    extra = {}
    if world_size != 1:
        extra["world_size"] = world_size
    if sequential:
        extra["sequential"] = True
    if block_tune:
        extra["block_tune"] = block_tune
    if moe_calibration != "routed":
        extra["moe_calibration"] = moe_calibration
    return fingerprint(
        model=type(model).__name__,
        config=model.config.to_json_string() if hasattr(model, "config") else None,
        blocks=f"{blocks_name}[{n_blocks}]", dense_model=dense_model or model_digest(model),
        method=method, pattern=pattern, sparsity=sparsity.target, options=options, method_options=resolved,
        sparsity_profile=sparsity.fingerprint(),
        layers=_callable_name(layers) if callable(layers) else layers,
        calibration=ids, gram_dtype=gram_dtype, device=device.type,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        backend=os.environ.get(backends.ENV_VAR, "").strip().lower() or None,
        versions={k: v for k, v in versions().items() if k != "python"}, **extra,
    )


def _layout(selected: list[dict[str, nn.Module]], end: int, ids: torch.Tensor) -> StateLayout:
    blocks = tuple({rel: (tuple(get_weight(m).shape), str(get_weight(m).dtype)) for rel, m in sel.items()}
                   for sel in selected[:end])
    return StateLayout(blocks=blocks, windows=(int(ids.shape[0]), int(ids.shape[1])))


def _torch_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


def prune_model(model: nn.Module | StreamedModel, calibration, sparsity: float | Sequence[float] = 0.5,
                pattern: str = "unstructured", method: str = "admm", *, sparsity_profile: str = "uniform",
                owl_m: float | None = None, owl_lambda: float | None = None, layers: LayerFilter = None,
                device: torch.device | str | None = None, offload: bool | str = False,
                offload_dir: str | os.PathLike | None = None, gram_dtype: torch.dtype = torch.float32,
                sequential: bool = False, tune_epochs: int = 0, tune_lr: float = 1e-4, tune_batch: int = 4,
                moe_calibration: str = "routed", progress: bool = False,
                state_dir: str | os.PathLike | None = None,
                callback: Callable[[int, dict], None] | None = None,
                distributed: bool | Comm | None = None, **options) -> dict:
    """Prune every selected linear layer of a causal LM in place, block by block; return a report.

    model: a transformers decoder-only causal LM (any dtype; its blocks are moved to `device` one at a
        time and back), or an admm_kernels.models.StreamedModel (blocks read from the checkpoint before
        their turn, written to its output folder when final, then freed: host memory does not grow with
        the number of blocks). calibration: int token ids (nsamples, seqlen), e.g. from
        admm_kernels.protocols.calibration_windows. sparsity / pattern / method / **options: as prune_layer
        (sparsity is ignored by N:M patterns). layers: None (every nn.Linear / Conv1D and expert projection
        inside the blocks except MoE routers; never the embeddings or LM head; a model whose blocks this
        leaves more than 5 % dense for other reasons is refused, see admm_kernels.models.coverage), a list of
        glob patterns ("self_attn.*", "mlp.down_proj", "mlp.experts.*.down_proj") or a callable(full_name,
        module) -> bool. device: compute device (default: the model's; "meta" and unavailable devices are
        refused). offload: where the (nsamples, seqlen, hidden) activations live: False = on the device, True
        / "cpu" = host memory, "disk" = a file in offload_dir (default the temporary folder; see
        admm_kernels.models.activations). gram_dtype: torch.float32 or
        torch.float64. sequential: prune a block's layer groups one after the other, each group's Gram
        taken from the block with the earlier groups already pruned (q/k/v, then o, then gate/up, then
        down for LLaMA; the rule is in admm_kernels.models.grams). tune_epochs > 0: block tuning after
        each block's layer-wise solves, `tune_epochs` epochs of Adam (lr tune_lr, tune_batch windows a
        step) on the kept weights towards the dense block's outputs on the same inputs, masks unchanged
        (admm_kernels.models.block_tune; float32 models, one process; the layers' "error" stays the
        layer-wise solve's). moe_calibration: how each expert of a MoE block is calibrated: "routed"
        (default: its Gram from the tokens the router sends to it) or "all" (every token through every
        expert, for the Grams only; the block's output still follows the router); experts with fewer
        than admm_kernels.models.experts.MIN_EXPERT_TOKENS tokens use their module's pooled Gram
        (reported per layer as "tokens" and "fallback"). progress: tqdm bars over blocks and layers
        (rank 0 only).
        sparsity may also be a list of one value in [0, 1) per decoder block. sparsity_profile:
        "uniform" (every block at `sparsity`) or "owl" (Yin et al. 2024: blocks with a larger share of
        outlier Wanda scores are pruned less, the model's overall sparsity stays `sparsity`; owl_m = M,
        the outlier threshold over the block's mean score, default 5; owl_lambda = λ, the block
        sparsities span 2λ, default 0.08; one extra dense forward of the calibration data, on rank 0 of
        a distributed run, whose result every rank uses; not with a StreamedModel; unstructured and
        per-row patterns only; see admm_kernels.models.owl).
        state_dir: folder for resumable state, locked for the run (a second run on it fails at once,
        naming the holder's pid). A run started with the same settings continues from the last finished
        block with a bit-identical result. Pass the original dense model, freshly loaded: its content
        digest must equal the interrupted run's (the pruned blocks are restored from the state folder),
        and so must the calibration ids, every setting, the torch thread count and the world size (see
        run_fingerprint). Corrupt or foreign state raises StateError (a ValueError) before the model is
        touched. In a distributed run only rank 0 uses it (the others may pass anything).
        callback(block_index, report): called after each finished block (and its state save).
        distributed: None = run distributed when a torch.distributed process group with several ranks is
        initialised (every rank must call prune_model with the same arguments), False = this process
        alone, True = require a process group (admm_kernels.models.distributed.resolve_comm).

    On any exception the model is left where and as it was found: every block back on its device, no
    hooks, the original train/eval mode (weights of blocks already pruned stay pruned; with state_dir,
    rerun on a freshly loaded dense model to continue). A rank of a distributed run whose peer died or
    hung raises admm_kernels.models.distributed.DistributedError within the process group's timeout.

    Returns a JSON-able dict (the same on every rank): model, blocks, method, pattern, sparsity (the
    target: for a per-block list, its mean weighted by the blocks' selected weights), sparsity_profile
    (name, target, block_sparsity; OWL: owl_m, owl_lambda, outlier_ratios), options, nsamples, seqlen,
    block_tune (tune_epochs > 0: its settings and, per block, the mean-squared error of the block's
    outputs to the dense block's before and after tuning),
    layers (per layer: name, block, shape, group, error, seconds, sparsity;
    "stage" with sequential, "rank" (its solver) when distributed, "tokens" and "fallback" for experts),
    achieved_sparsity (over the pruned layers), coverage (admm_kernels.models.coverage: the share of
    the blocks' weight matrices pruned, the sparsity over all of them, what was left out and why),
    timings (profile, capture, forward, gram, solve, comm, state, total seconds, this rank's),
    threads
    (torch's CPU thread count, part of what makes a run reproducible), world_size, ranks (per rank:
    device, windows, timings; distributed only), versions.
    """
    t_start = time.perf_counter()
    streamed = model if isinstance(model, StreamedModel) else None
    net = streamed.model if streamed is not None else model
    blocks_name, blocks = find_blocks(net)
    if gram_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be a bool, got {sequential!r}")
    tune = check_block_tune(tune_epochs, tune_lr, tune_batch)
    ids = check_calibration(calibration, net)
    request = check_profile(sparsity, sparsity_profile, len(blocks), pattern, owl_m, owl_lambda)
    if request.name == "owl" and streamed is not None:
        raise ValueError("sparsity_profile='owl' needs a dense pass over every block before pruning, which a "
                         "StreamedModel does not support yet: load the model in memory, or give the OWL "
                         "sparsities of a previous run as a per-block list")
    if moe_calibration not in MOE_CALIBRATION:
        raise ValueError(f"moe_calibration must be one of {', '.join(MOE_CALIBRATION)}, got "
                         f"{moe_calibration!r}")
    selected = select_all(blocks, blocks_name, layers)
    matrix_rows = _check_coverage(net, blocks, blocks_name, selected, layers)
    _validate_layers(selected, blocks_name, pattern, request.planned())
    _validate_options(request.planned()[0], pattern, method, options)
    comm = resolve_comm(distributed)
    if tune.enabled and comm.distributed:
        raise ValueError("tune_epochs > 0 (block tuning) runs in one process only for now: its gradients "
                         "are not all-reduced across ranks; run without torchrun, or leave it at 0")
    home = torch.device("cpu") if streamed is not None else model_device(net)
    device = check_compute_device(device, "device") if device is not None else home
    acts_store = ActivationStore(resolve_offload(offload), device, offload_dir)
    # Blocks after the last one with selected layers need no work at all.
    end = max(i for i, sel in enumerate(selected) if sel) + 1
    n = int(ids.shape[0])
    if n < comm.size:
        raise ValueError(f"calibration has {n} windows, fewer than the {comm.size} ranks of the distributed "
                         "run: every rank needs at least one window (use more --nsamples or fewer ranks)")
    counts = shard_counts(n, comm.size)
    mine = shard(n, comm.size, comm.rank)

    block_sparsity: BlockSparsity | None = None  # the one place that says how sparse block b becomes

    def block_options(b: int) -> dict:
        return dict(sparsity=block_sparsity.of(b), pattern=pattern, method=method, **options)

    store = PipelineState(state_dir) if state_dir is not None and comm.is_main else None
    comm_before = comm.seconds
    timings = {"profile": 0.0, "capture": 0.0, "forward": 0.0, "gram": 0.0, "solve": 0.0, "tune": 0.0,
               "comm": 0.0, "state": 0.0}
    tune_reports: list[dict] = []
    was_training = net.training
    with contextlib.ExitStack() as stack:
        state, fp = None, None

        def open_state() -> dict:  # rank 0: lock, profile, fingerprint, verify; the others hear the outcome
            nonlocal state, fp
            if store is not None:
                stack.enter_context(store.lock())
            t = time.perf_counter()
            try:  # before the first block is pruned: OWL's dense pass (eval mode; no weight is changed)
                profile = resolve_profile(request, net.eval(), blocks, selected, ids, device,
                                          acts_store.device, progress, empty=acts_store.empty)
            finally:
                net.train(was_training)
            timings["profile"] = time.perf_counter() - t
            if store is None:
                return {"start": 0, "saving": False, "layers": [], "acts": None, "sparsity": profile}
            t = time.perf_counter()
            fp = run_fingerprint(net, ids, blocks_name, len(blocks), method=method, pattern=pattern,
                                 sparsity=profile, options=options, layers=layers, gram_dtype=gram_dtype,
                                 device=device, world_size=comm.size, sequential=sequential,
                                 block_tune=tune.fingerprint() if tune.enabled else None,
                                 moe_calibration=moe_calibration,
                                 dense_model=streamed.digest() if streamed is not None else None)
            state = store.load(fp, _layout(selected, end, ids))  # verified before the model is touched
            _check_state_space(state_dir, selected, state["next_block"] if state else 0, end, ids, net,
                               streamed)
            timings["state"] += time.perf_counter() - t
            if state is None:
                return {"start": 0, "saving": True, "layers": [], "acts": None, "sparsity": profile}
            rec = state["files"][state["acts_file"]]["tensors"]["hidden"] if state["acts_file"] else None
            return {"start": state["next_block"], "saving": True, "layers": list(state["report"]["layers"]),
                    "tuned": list(state["report"].get("block_tune", [])),
                    "acts": (rec["shape"], rec["dtype"]) if rec else None, "sparsity": profile}

        opened = comm.decided_by_main(open_state, "opening the state folder and the sparsity profile")
        start, saving, report_layers = opened["start"], opened["saving"], opened["layers"]
        tune_reports.extend(opened.get("tuned", []))
        block_sparsity = opened["sparsity"]
        _validate_layers(selected, blocks_name, pattern, block_sparsity.values)
        bar, loaded, full = None, None, None
        try:
            net.eval()
            with torch.no_grad():
                t = time.perf_counter()
                acts, calls = None, None
                if start < end:
                    acts, calls = capture_inputs(net, blocks, ids, device, acts_store.device,
                                                 range(0) if start else mine, empty=acts_store.empty)
                    if start:
                        shape, dtype = opened["acts"]
                        acts = acts_store.empty((len(mine), *shape[1:]), _torch_dtype(dtype))
                        saved = store.activations(state) if comm.is_main else None
                        comm.scatter_rows(saved, counts, acts, "sending the saved activations")
                        del saved
                timings["capture"] = time.perf_counter() - t

                bar = _Bars(end, min(start, end), progress and comm.is_main)
                for b in range(len(blocks) if streamed is not None else end):
                    if streamed is not None:
                        streamed.load_block(b)
                        loaded = b
                    if b < start:
                        _restore_block(store, state, b, selected[b], comm)
                    elif b < end:
                        block_report = _prune_block(
                            blocks[b], b, blocks_name, selected[b], calls[b], acts, device, gram_dtype,
                            block_options(b), last=(b == end - 1), sequential=sequential, comm=comm, bar=bar,
                            timings=timings, tune=tune, tune_reports=tune_reports,
                            moe_calibration=moe_calibration)
                        report_layers.extend(block_report)
                        if saving:
                            t = time.perf_counter()
                            more = b + 1 < end
                            if more and comm.distributed and comm.is_main and full is None:
                                full = acts_store.empty((n, *acts.shape[1:]), acts.dtype)
                            gathered = comm.gather_rows(acts, counts, full, f"block {b}: collecting the "
                                                        "activations for the state") if more else None
                            if comm.is_main:
                                saved_report = {"layers": report_layers}
                                if tune.enabled:
                                    saved_report["block_tune"] = tune_reports
                                # No name for the weights: one would keep a streamed block's memory alive
                                # through the next block, after release_block has freed the block itself.
                                state = store.save(fp, b + 1, {rel: get_weight(m) for rel, m in
                                                               selected[b].items()}, gathered, saved_report,
                                                   state)
                            timings["state"] += time.perf_counter() - t
                        bar.block_done()
                        if callback is not None:
                            callback(b, {"layers": block_report})
                    if streamed is not None:
                        streamed.block_done(b)
                        loaded = None
                if streamed is not None:
                    streamed.finish_output()
        finally:
            if loaded is not None:
                streamed.release_block(loaded)
            if bar is not None:
                bar.close()
            net.train(was_training)

    kept = sum(r["kept"] for r in report_layers)
    total = sum(r["numel"] for r in report_layers)
    timings["total"] = time.perf_counter() - t_start
    timings["comm"] = comm.seconds - comm_before  # inside collectives, waiting for other ranks included
    report = {
        "model": type(net).__name__, "blocks": len(blocks), "blocks_name": blocks_name,
        "method": method, "pattern": pattern, "sparsity": block_sparsity.target,
        "sparsity_profile": block_sparsity.report(),
        "options": fingerprint(**options), "nsamples": n, "seqlen": int(ids.shape[1]),
        "device": str(device), "offload": offload, "sequential": sequential, "streamed": streamed is not None,
        "resumed_from_block": start if state_dir and start else None,
        "layers": report_layers, "achieved_sparsity": 1.0 - kept / total if total else 0.0,
        "coverage": coverage(matrix_rows, blocks_name, report_layers),
        "timings": timings, "threads": torch.get_num_threads(), "world_size": comm.size,
        "versions": versions(),
    }
    if tune.enabled:
        report["block_tune"] = {**tune.fingerprint(), "blocks": tune_reports}
    if comm.distributed:
        report["ranks"] = comm.all_gather_objects(
            {"rank": comm.rank, "device": str(device), "windows": [mine.start, mine.stop],
             "threads": torch.get_num_threads(), "timings": timings}, "collecting the per-rank timings")
    return report


def _check_state_space(state_dir, selected: list[dict[str, nn.Module]], start: int, end: int,
                       ids: torch.Tensor, net: nn.Module, streamed: StreamedModel | None) -> None:
    """WriteError (ENOSPC) before any work when the state cannot fit on its disk: the pruned weights of
    blocks start .. end - 1 and two activation files (the state keeps the previous one until the next
    is written), (nsamples, seqlen, hidden) each."""
    from .._io import check_free_space

    weights = sum(w.numel() * w.element_size()
                  for sel in selected[start:end] for w in map(get_weight, sel.values()))
    dtype = streamed.dtype if streamed is not None else next(net.parameters()).dtype
    cfg = getattr(net, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    acts = int(ids.numel()) * int(hidden) * dtype.itemsize
    check_free_space([("the resumable state", state_dir, weights + 2 * acts)])


def _restore_block(store: PipelineState | None, state: dict | None, b: int, layers: dict[str, nn.Module],
                   comm: Comm) -> None:
    """Write a finished block's pruned weights from the state folder (read by rank 0) into every rank's
    model."""
    saved = store.block_weights(state, b) if comm.is_main else {}
    for rel, module in layers.items():
        w = get_weight(module)
        weight = saved[rel] if comm.is_main else torch.empty(w.shape, dtype=w.dtype)
        comm.broadcast_(weight, 0, f"block {b}: restoring {rel} from the state")
        set_weight(module, weight)


def _prune_block(block: nn.Module, index: int, blocks_name: str, layers: dict[str, nn.Module], call,
                 acts: torch.Tensor, device: torch.device, gram_dtype: torch.dtype, prune_kwargs: dict, *,
                 last: bool, sequential: bool, comm: Comm, bar, timings: dict, tune: BlockTune | None = None,
                 tune_reports: list | None = None, moe_calibration: str = "routed") -> list[dict]:
    """prune_block with the block on `device` only inside this call: it goes back to its own device
    whatever happens."""
    home = next(block.parameters()).device
    try:
        block.to(device)
        return prune_block(block, index, blocks_name, layers, call, acts, device, gram_dtype, prune_kwargs,
                           last=last, sequential=sequential, comm=comm, bar=bar, timings=timings,
                           tune=tune, tune_reports=tune_reports, moe_calibration=moe_calibration)
    finally:
        block.to(home)


class _Bars:
    """tqdm bars: one over blocks, one over the steps of the current block (windows and layers)."""

    def __init__(self, n_blocks: int, start: int, enabled: bool):
        self.enabled = enabled
        self.outer = self.inner = None
        if enabled:
            from tqdm.auto import tqdm
            self._tqdm = tqdm
            self.outer = tqdm(total=n_blocks, initial=start, desc="blocks", unit="block", file=sys.stderr)

    def start_block(self, index: int, steps: int) -> None:
        self.index = index
        if self.enabled:
            if self.inner is not None:
                self.inner.close()
            self.inner = self._tqdm(total=steps, desc=f"block {index}", unit="step", leave=False,
                                    file=sys.stderr)

    def step(self, stage: str, postfix: str | None = None) -> None:
        if self.inner is not None:
            self.inner.set_description_str(f"block {self.index} {stage}", refresh=False)
            if postfix:
                self.inner.set_postfix_str(postfix, refresh=False)
            self.inner.update(1)

    def block_done(self) -> None:
        if self.outer is not None:
            self.outer.update(1)

    def close(self) -> None:
        for b in (self.inner, self.outer):
            if b is not None:
                b.close()


def default_state_dir(out: str | os.PathLike) -> Path:
    """Where the CLI keeps the resumable state of a run writing to `out`: a sibling folder."""
    p = Path(out)
    return p.with_name(p.name + ".state")
