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

prune_model composes three parts around the loop over blocks: the communicator (distributed.Comm), the
block source (sources.py: in memory, or a StreamedModel) and the checkpointer (checkpoint.py: none, or
the verified state folder, whose typed ResumePoint says where the run continues). The settings are a
PruneConfig (config.py), validated against the model before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import check_compute_device
from .._digest import model_digest
from ..environment import versions
from ..errors import ArgumentError, ArgumentTypeError, about
from .activations import ActivationStore, resolve_offload
from .block import BlockContext, BlockResult, prune_block
from .block_tune import check_block_tune, check_tune_windows
from .capture import capture_inputs
from .checkpoint import NoCheckpoint, StateCheckpoint, checkpointer
from .config import PruneConfig, PrunePlan, validate_layers
from .coverage import coverage
from .discovery import LayerFilter, get_weight, set_weight
from .distributed import Comm, resolve_comm, shard, shard_counts
from .loading import max_positions
from .owl import resolve_profile
from .sources import InMemoryBlocks, StreamedBlocks, block_source
from .sparsity_profile import BlockSparsity
from .state import ResumePoint, StateLayout, fingerprint
from .streaming import StreamedModel

TIMINGS = ("profile", "capture", "forward", "gram", "solve", "tune", "comm", "state")


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


def check_prunable(model: nn.Module | StreamedModel, sparsity: float | Sequence[float], pattern: str,
                   method: str = "admm", layers: LayerFilter = None, **settings) -> None:
    """Raise ValueError / TypeError now if prune_model would reject these settings for this model
    (PruneConfig(sparsity, pattern, method, layers=layers, **settings).validate(model): no decoder
    blocks, a layer pattern matching nothing, default layers covering too little of the blocks' weights,
    an unknown experts layout, N:M not dividing a layer's in_features, an unknown method or option, a bad
    sparsity profile)."""
    PruneConfig(sparsity, pattern, method, layers=layers, **settings).validate(model)


def _callable_name(f) -> str:
    return getattr(f, "__qualname__", repr(f))


def run_fingerprint(model: nn.Module, ids: torch.Tensor, config: PruneConfig, sparsity: BlockSparsity, *,
                    blocks: str, device: torch.device, world_size: int = 1,
                    dense_model: str | None = None) -> dict:
    """Everything that determines a pruning run's result, as compared on resuming: a content digest
    of every parameter and buffer of the dense model (admm_kernels._digest.model_digest: 0.38 s for the
    538 MB of SmolLM2-135M here, ~0.1 % of the embedded run; `dense_model` when the caller has it, e.g.
    a StreamedModel's digest from its checkpoint, which is the same value), its config, its blocks
    ("model.layers[30]"), the calibration token ids, the method, pattern, target sparsity, sparsity
    profile (its name and settings, and every block's sparsity) and options (as given, and as they run:
    the method's defaults and preset applied, so a preset or default changed by another checkout of the
    code is caught too), the layer selection, the Gram dtype, the device type, the torch thread count on
    the CPU (BLAS reductions are split per thread: 1 vs 2 threads gave perplexity 64.238 vs 64.301 for
    the same run), a forced kernel backend, the versions of the code, and -- only when not the default,
    so older single-process states stay valid -- the world size of a distributed run (the Gram sums run
    in another order), sequential pruning, block tuning (its settings) and the experts' calibration
    mode."""
    from .. import backends, methods

    options = dict(config.options)
    given = dict(options)
    resolved = methods.get(config.method).resolve(given.pop("preset", None), given)
    tune = check_block_tune(config.tune_epochs, config.tune_lr, config.tune_batch, config.tune_patience,
                            config.tune_holdout)
    extra = {"world_size": world_size if world_size != 1 else None,
             "sequential": True if config.sequential else None,
             "block_tune": tune.fingerprint() if tune.enabled else None,
             "moe_calibration": config.moe_calibration if config.moe_calibration != "routed" else None}
    layers = config.layers
    return fingerprint(
        model=type(model).__name__,
        config=model.config.to_json_string() if hasattr(model, "config") else None,
        blocks=blocks, dense_model=dense_model or model_digest(model),
        method=config.method, pattern=config.pattern, sparsity=sparsity.target, options=options,
        method_options=resolved, sparsity_profile=sparsity.fingerprint(),
        layers=_callable_name(layers) if callable(layers) else layers,
        calibration=ids, gram_dtype=config.gram_dtype, device=device.type,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        backend=os.environ.get(backends.ENV_VAR, "").strip().lower() or None,
        versions={k: v for k, v in versions().items() if k != "python"},
        **{k: v for k, v in extra.items() if v is not None},
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


def prune_model(model: nn.Module | StreamedModel, calibration, config: PruneConfig | None = None, *,
                device: torch.device | str | None = None, offload: bool | str = False,
                offload_dir: str | os.PathLike | None = None, progress: bool = False,
                state_dir: str | os.PathLike | None = None,
                callback: Callable[[int, dict], None] | None = None, distributed: bool | Comm | None = None,
                **kwargs) -> dict:
    """Prune every selected linear layer of a causal LM in place, block by block; return a report.

    model: a transformers decoder-only causal LM (any dtype; its blocks are moved to `device` one at a
        time and back), or an admm_kernels.models.StreamedModel (blocks read from the checkpoint before
        their turn, written to its output folder when final, then freed). calibration: int token ids
        (nsamples, seqlen), e.g. from admm_kernels.protocols.calibration_windows.
    config / **kwargs: the settings, a PruneConfig or its fields as keywords (sparsity=0.5,
        pattern="unstructured", method="admm", sparsity_profile, owl_m, owl_lambda, layers, gram_dtype,
        sequential, tune_epochs / tune_lr / tune_batch / tune_patience / tune_holdout, moe_calibration,
        and the method's options; see PruneConfig); keywords given with a config replace its fields.
        Checked before any work.
    device: compute device (default: the model's; "meta" and unavailable devices are refused). offload:
        where the (nsamples, seqlen, hidden) activations live: False = on the device, True / "cpu" = host
        memory, "disk" = a file in offload_dir (default the temporary folder; models/activations.py).
        progress: tqdm bars over blocks and layers (rank 0 only).
    state_dir: folder for resumable state, locked for the run (a second run on it fails at once, naming
        the holder's pid). A run started with the same settings continues from the last finished block
        with a bit-identical result: pass the original dense model, freshly loaded, the same calibration
        ids, settings, torch thread count and world size (run_fingerprint). Corrupt or foreign state
        raises StateError (a ValueError) before the model is touched. Distributed: rank 0's alone.
    callback(block_index, report): called after each finished block (and its state save).
    distributed: None = run distributed when a torch.distributed process group with several ranks is
        initialised (every rank calls prune_model with the same arguments), False = this process alone,
        True = require a process group (admm_kernels.models.distributed.resolve_comm).

    On any exception the model is left where and as it was found: every block back on its device, no
    hooks, the original train/eval mode (blocks already pruned stay pruned). A rank whose peer died or
    hung raises admm_kernels.models.distributed.DistributedError within the process group's timeout.

    Returns a JSON-able dict, the same on every rank (see _report): the model, settings, the sparsity
    profile, per-layer entries (name, block, shape, group, error, seconds, sparsity, kept; "stage",
    "rank", "tokens", "fallback" where they apply), achieved_sparsity, coverage, timings, threads,
    world_size, versions (and block_tune, ranks where they apply).
    """
    t_start = time.perf_counter()
    config = _settings(config, kwargs)
    source = block_source(model)
    plan = config.validate(model)
    if callback is not None and not callable(callback):
        raise ArgumentTypeError(f"callback must be callable, got {type(callback).__name__}", "callback")
    with about("calibration"):
        ids = check_calibration(calibration, source.model)
    comm = resolve_comm(distributed)
    _check_ranks(plan, ids, comm)
    with about("device"):
        device = check_compute_device(device, "device") if device is not None else source.home
    acts_store = ActivationStore(resolve_offload(offload), device, offload_dir)
    run = _Run(config, plan, source, comm, ids, device, acts_store, checkpointer(state_dir, comm.is_main),
               progress)
    comm_before = comm.seconds
    sparsity, start = _execute(run, callback)
    run.timings["total"] = time.perf_counter() - t_start
    run.timings["comm"] = comm.seconds - comm_before  # inside collectives, waiting for other ranks included
    return _report(run, sparsity, offload, start if state_dir and start else None)


def _settings(config: PruneConfig | None, kwargs: dict) -> PruneConfig:
    """prune_model's settings: `config`, with the keywords replacing its fields, or the keywords alone."""
    if config is None:
        return PruneConfig(**kwargs)
    if not isinstance(config, PruneConfig):
        raise ArgumentTypeError(f"config must be a PruneConfig or None, got {type(config).__name__} (give "
                                "the sparsity as sparsity=...)", "config")
    return dataclasses.replace(config, **kwargs) if kwargs else config


def _check_ranks(plan: PrunePlan, ids: torch.Tensor, comm: Comm) -> None:
    """What a distributed run needs of the settings and the calibration."""
    n = int(ids.shape[0])
    if n < comm.size:
        raise ArgumentError(f"calibration has {n} windows, fewer than the {comm.size} ranks of the "
                            "distributed run: every rank needs at least one window (use more --nsamples or "
                            "fewer ranks)", "calibration")
    check_tune_windows(plan.tune, n)


@dataclass
class _Run:
    """One prune_model call: its settings and plan, the parts it composes (block source, communicator,
    checkpointer), and what it has produced so far (report entries, block tuning reports, timings)."""

    config: PruneConfig
    plan: PrunePlan
    source: InMemoryBlocks | StreamedBlocks
    comm: Comm
    ids: torch.Tensor
    device: torch.device
    acts_store: ActivationStore
    checkpoint: NoCheckpoint | StateCheckpoint
    progress: bool
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMINGS, 0.0))
    layers: list[dict] = field(default_factory=list)
    tuned: list[dict] = field(default_factory=list)
    gathered: torch.Tensor | None = None  # rank 0's (N, L, hidden) buffer for the state, distributed

    @property
    def net(self) -> nn.Module:
        return self.source.model

    @property
    def mine(self) -> range:
        """This rank's calibration windows."""
        return shard(int(self.ids.shape[0]), self.comm.size, self.comm.rank)

    @property
    def counts(self) -> list[int]:
        return shard_counts(int(self.ids.shape[0]), self.comm.size)


@dataclass(frozen=True)
class _Opened:
    """What rank 0 tells every rank before the first block: every block's sparsity, whether the state is
    saved (then every rank sends its activations after each block), where the run continues, and rank
    0's seconds for the profile and the state."""

    sparsity: BlockSparsity
    saving: bool
    resume: ResumePoint | None
    seconds: dict[str, float]


def _open(run: _Run, stack: contextlib.ExitStack, was_training: bool) -> _Opened:
    """Rank 0: lock the state, resolve the sparsity profile (OWL's dense pass, in eval mode: no weight
    is changed), verify the state against the run's fingerprint before the model is touched."""
    plan = run.plan
    run.checkpoint.lock(stack)
    t = time.perf_counter()
    try:
        sparsity = resolve_profile(plan.request, run.net.eval(), plan.blocks, plan.selected, run.ids,
                                   run.device, run.acts_store, run.progress)
    finally:
        run.net.train(was_training)
    seconds = {"profile": time.perf_counter() - t}
    if not run.checkpoint.saving:
        return _Opened(sparsity, False, None, seconds)
    t = time.perf_counter()
    resume = run.checkpoint.resume(
        lambda: run_fingerprint(run.net, run.ids, run.config, sparsity,
                                blocks=f"{plan.blocks_name}[{len(plan.blocks)}]", device=run.device,
                                world_size=run.comm.size, dense_model=run.source.dense_digest()),
        _layout(plan.selected, plan.end, run.ids))
    run.checkpoint.check_space(_state_bytes(run, resume.next_block if resume else 0))
    seconds["state"] = time.perf_counter() - t
    return _Opened(sparsity, True, resume, seconds)


def _state_bytes(run: _Run, start: int) -> int:
    """What the state still needs on its disk: the pruned weights of blocks start .. end - 1 and two
    activation files (the state keeps the previous one until the next is written), (N, L, hidden) each."""
    weights = sum(w.numel() * w.element_size()
                  for sel in run.plan.selected[start:run.plan.end] for w in map(get_weight, sel.values()))
    cfg = getattr(run.net, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    return weights + 2 * int(run.ids.numel()) * int(hidden) * run.source.dtype.itemsize


def _execute(run: _Run, callback: Callable[[int, dict], None] | None) -> tuple[BlockSparsity, int]:
    """Open the state and profile, capture the first inputs, prune block after block. Returns every
    block's sparsity and the block the run started at."""
    net, plan = run.net, run.plan
    was_training = net.training
    with contextlib.ExitStack() as stack:
        opened = run.comm.decided_by_main(lambda: _open(run, stack, was_training),
                                          "opening the state folder and the sparsity profile")
        if run.comm.is_main:
            run.timings.update(opened.seconds)
        start = opened.resume.next_block if opened.resume else 0
        if opened.resume:
            run.layers.extend(opened.resume.layers)
            run.tuned.extend(opened.resume.block_tune)
        validate_layers(plan.selected, plan.blocks_name, run.config.pattern, opened.sparsity.values)
        bar = None
        try:
            net.eval()
            with torch.no_grad():
                acts, calls = _first_inputs(run, opened.resume)
                bar = _Bars(plan.end, min(start, plan.end), run.progress and run.comm.is_main)
                ctx = BlockContext(plan.blocks_name, run.device, run.config.gram_dtype, run.comm, bar,
                                   run.config.sequential, run.config.moe_calibration, plan.tune,
                                   run.acts_store.empty)
                for b in run.source.visits(plan.end, len(plan.blocks)):
                    run.source.load(b)
                    if b < start:
                        _restore_block(run.checkpoint, b, plan.selected[b], run.comm)
                    elif b < plan.end:
                        _block(run, b, ctx, acts, calls[b], opened, callback)
                    run.source.done(b)
                run.source.finish()
        finally:
            run.source.release()
            if bar is not None:
                bar.close()
            net.train(was_training)
    return opened.sparsity, start


def _first_inputs(run: _Run, resume: ResumePoint | None) -> tuple[torch.Tensor | None, list | None]:
    """This rank's inputs of the first block to prune, (windows, L, hidden), and every block's call
    (admm_kernels.models.capture); a resumed run's inputs come from the state (read by rank 0, sent
    to every rank). (None, None) when no block is left to prune."""
    t = time.perf_counter()
    start = resume.next_block if resume else 0
    acts, calls = None, None
    if start < run.plan.end:
        acts, calls = capture_inputs(run.net, run.plan.blocks, run.ids, run.device, run.acts_store.device,
                                     range(0) if start else run.mine, empty=run.acts_store.empty)
        if start:
            shape, dtype = resume.activations
            acts = run.acts_store.empty((len(run.mine), *shape[1:]), _torch_dtype(dtype))
            saved = run.checkpoint.activations() if run.comm.is_main else None
            run.comm.scatter_rows(saved, run.counts, acts, "sending the saved activations")
            del saved
    run.timings["capture"] = time.perf_counter() - t
    return acts, calls


def _block(run: _Run, b: int, ctx: BlockContext, acts: torch.Tensor, call, opened: _Opened,
           callback: Callable[[int, dict], None] | None) -> None:
    """Prune block b (on the compute device only meanwhile), then save it and tell the callback."""
    plan = run.plan
    solve_kwargs = dict(sparsity=opened.sparsity.of(b), pattern=run.config.pattern, method=run.config.method,
                        **run.config.options)
    result: BlockResult = _prune_block(plan.blocks[b], b, plan.selected[b], call, acts, solve_kwargs, ctx,
                                       last=(b == plan.end - 1))
    for key, seconds in result.seconds.items():
        run.timings[key] += seconds
    run.layers.extend(result.layers)
    if result.tune is not None:
        run.tuned.append(result.tune)
    if opened.saving:
        _save_block(run, b, acts)
    ctx.progress.block_done()
    if callback is not None:
        callback(b, {"layers": result.layers})


def _save_block(run: _Run, b: int, acts: torch.Tensor) -> None:
    """Every rank's activations to rank 0, which records block b as finished in the state."""
    t = time.perf_counter()
    comm, more = run.comm, b + 1 < run.plan.end
    if more and comm.distributed and comm.is_main and run.gathered is None:
        run.gathered = run.acts_store.empty((int(run.ids.shape[0]), *acts.shape[1:]), acts.dtype)
    gathered = comm.gather_rows(acts, run.counts, run.gathered, f"block {b}: collecting the activations for "
                                "the state") if more else None
    if comm.is_main:
        report = {"layers": run.layers}
        if run.plan.tune.enabled:
            report["block_tune"] = run.tuned
        # No name for the weights: one would keep a streamed block's memory alive through the next block,
        # after release_block has freed the block itself.
        run.checkpoint.save(b + 1, {rel: get_weight(m) for rel, m in run.plan.selected[b].items()}, gathered,
                            report)
    run.timings["state"] += time.perf_counter() - t


def _report(run: _Run, sparsity: BlockSparsity, offload: bool | str, resumed_from: int | None) -> dict:
    """prune_model's report: model, blocks, blocks_name, method, pattern, sparsity (the target: for a
    per-block list, its mean weighted by the blocks' selected weights), sparsity_profile (name, target,
    block_sparsity; OWL: owl_m, owl_lambda, outlier_ratios), options, nsamples, seqlen, device, offload,
    sequential, streamed, resumed_from_block, layers (per layer: name, block, shape, group, error,
    seconds, sparsity, kept, numel, backends; "stage" with sequential, "rank" (its solver) when
    distributed, "tokens" and "fallback" for experts), achieved_sparsity (over the pruned layers),
    coverage (admm_kernels.models.coverage), timings (profile, capture, forward, gram, solve, tune, comm,
    state, total seconds, this rank's), threads (torch's CPU thread count, part of what makes a run
    reproducible), world_size, versions; block_tune (tune_epochs > 0: its settings and, per block, the
    mean-squared error of the block's outputs to the dense block's before and after tuning) and ranks
    (per rank: device, windows, threads, timings; distributed only)."""
    config, plan, comm = run.config, run.plan, run.comm
    kept = sum(r["kept"] for r in run.layers)
    total = sum(r["numel"] for r in run.layers)
    report = {
        "model": type(run.net).__name__, "blocks": len(plan.blocks), "blocks_name": plan.blocks_name,
        "method": config.method, "pattern": config.pattern, "sparsity": sparsity.target,
        "sparsity_profile": sparsity.report(),
        "options": fingerprint(**config.options), "nsamples": int(run.ids.shape[0]),
        "seqlen": int(run.ids.shape[1]), "device": str(run.device), "offload": offload,
        "sequential": config.sequential, "streamed": run.source.streamed, "resumed_from_block": resumed_from,
        "layers": run.layers, "achieved_sparsity": 1.0 - kept / total if total else 0.0,
        "coverage": coverage(plan.coverage_rows, plan.blocks_name, run.layers),
        "timings": run.timings, "threads": torch.get_num_threads(), "world_size": comm.size,
        "versions": versions(),
    }
    if plan.tune.enabled:
        report["block_tune"] = {**plan.tune.fingerprint(), "blocks": run.tuned}
    if comm.distributed:
        report["ranks"] = comm.all_gather_objects(
            {"rank": comm.rank, "device": str(run.device), "windows": [run.mine.start, run.mine.stop],
             "threads": torch.get_num_threads(), "timings": run.timings}, "collecting the per-rank timings")
    return report


def _restore_block(checkpoint: NoCheckpoint | StateCheckpoint, b: int, layers: dict[str, nn.Module],
                   comm: Comm) -> None:
    """Write a finished block's pruned weights from the state folder (read by rank 0) into every rank's
    model."""
    saved = checkpoint.block_weights(b) if comm.is_main else {}
    for rel, module in layers.items():
        w = get_weight(module)
        weight = saved[rel] if comm.is_main else torch.empty(w.shape, dtype=w.dtype)
        comm.broadcast_(weight, 0, f"block {b}: restoring {rel} from the state")
        set_weight(module, weight)


def _prune_block(block: nn.Module, index: int, layers: dict[str, nn.Module], call, acts: torch.Tensor,
                 solve_kwargs: dict, ctx: BlockContext, *, last: bool) -> BlockResult:
    """prune_block with the block on ctx.device only inside this call: it goes back to its own device
    whatever happens."""
    home = next(block.parameters()).device
    try:
        block.to(ctx.device)
        return prune_block(block, index, layers, call, acts, solve_kwargs, ctx, last=last)
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
