"""Pruning one decoder block, on one process or on every rank of a distributed run.

Per block: a discovery forward of the rank's first window groups the selected layers by shared input and
orders them (admm_kernels.models.grams); then per stage (all groups at once, or one group at a time with
sequential pruning): each rank runs its own windows through the block to accumulate the stage's Grams,
the Grams are summed over the ranks (all-reduce in the Gram dtype), the stage's layers are assigned to
ranks by predicted cost out * in^2 (ADMM's GEMMs per iteration; balanced by longest-first), each owner
solves its layers with prune_layer and broadcasts the pruned weight and mask, and every rank writes them
into its copy of the block; finally each rank runs its windows through the pruned block to make the next
block's inputs. Every rank therefore holds the identical pruned block.

With one process (admm_kernels.models.distributed.LOCAL) the collectives are no-ops and this is exactly
the sequential pipeline of SparseGPT / Wanda / the seed paper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .block_tune import BlockTune, check_tunable, tune_block, window_loss, window_mean
from .capture import BlockCall
from .discovery import get_weight, set_weight
from .distributed import LOCAL, Comm, DistributedError, assign_by_cost
from .experts import MIN_EXPERT_TOKENS, ExpertProjection, input_kind
from .grams import BlockPlan, GramHooks, StopBlock, sync


class Progress(Protocol):
    """Where prune_block reports its steps (the pipeline's progress bars)."""

    def start_block(self, index: int, steps: int) -> None:
        """Block `index` begins; it will report `steps` steps."""

    def step(self, stage: str, postfix: str | None = None) -> None:
        """One step of the current block is done ("gram", "prune", "forward")."""


class NoProgress:
    """A Progress that shows nothing."""

    def start_block(self, index: int, steps: int) -> None:
        pass

    def step(self, stage: str, postfix: str | None = None) -> None:
        pass


@dataclass(frozen=True)
class BlockContext:
    """What every block of one run is pruned with: the names of the report entries ("BLOCKS.i.LAYER"),
    the compute device, the Gram dtype (float32 / float64), the communicator (LOCAL: one process), the
    progress sink, sequential stages, the experts' calibration ("routed" / "all"), block tuning and where
    its dense targets are allocated (`scratch(shape, dtype)`, the run's ActivationStore.empty, so they
    live where the activations do; None: beside them in memory)."""

    blocks_name: str
    device: torch.device
    gram_dtype: torch.dtype = torch.float32
    comm: Comm = LOCAL
    progress: Progress = field(default_factory=NoProgress)
    sequential: bool = False
    moe_calibration: str = "routed"
    tune: BlockTune = BlockTune()
    scratch: Callable[[tuple, torch.dtype], torch.Tensor] | None = None


@dataclass(frozen=True)
class BlockResult:
    """What prune_block produced besides the pruned weights and the next block's inputs.

    layers: one report entry per selected layer, in module order (identical on every rank); tune: the
    block tuning report ({"block", "loss_before", "loss_after"}) or None; seconds: this block's time
    in "forward", "gram", "solve" and "tune"."""

    layers: list[dict]
    tune: dict | None
    seconds: dict[str, float]


@dataclass
class _Job:
    """One prune_block call's inputs, and the seconds it has spent so far."""

    block: nn.Module
    index: int
    layers: dict[str, nn.Module]
    call: BlockCall
    acts: torch.Tensor
    solve_kwargs: dict
    ctx: BlockContext
    # block tuning's targets (the dense block's outputs, acts' shape), filled by the Gram forwards
    targets: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("forward", "gram", "solve",
                                                                             "tune"), 0.0))

    def name(self, rel: str) -> str:
        return f"{self.ctx.blocks_name}.{self.index}.{rel}"


def solver():
    """prune_layer, imported here only (one place for the pipeline), at call time so that tests can
    monkeypatch admm_kernels.prune.prune_layer."""
    from ..prune import prune_layer
    return prune_layer


def solver_batched():
    """prune_experts (admm_kernels.batched), at call time like solver()."""
    from ..batched import prune_experts
    return prune_experts


def _jobs(mine: list[str], layers: dict[str, nn.Module]) -> list[list[str]]:
    """The layers to solve, in order: one at a time, except that the experts of one module and projection
    (same shape) are one job, solved by prune_experts."""
    jobs: list[list[str]] = []
    where: dict[tuple, int] = {}
    for rel in mine:
        m = layers[rel]
        if not isinstance(m, ExpertProjection):
            jobs.append([rel])
            continue
        key = (id(m.experts), m.projection)
        if key not in where:
            where[key] = len(jobs)
            jobs.append([])
        jobs[where[key]].append(rel)
    return jobs


def prune_block(block: nn.Module, index: int, layers: dict[str, nn.Module], call: BlockCall,
                acts: torch.Tensor, solve_kwargs: dict, ctx: BlockContext, *, last: bool) -> BlockResult:
    """Prune `block` (block `index`, already on ctx.device) in place: every layer of `layers` ({name
    inside the block: module}) solved by prune_layer with solve_kwargs (sparsity, pattern, method and
    its options) on the Grams of acts (this rank's windows, (n, L, hidden)), which `call` runs through
    the block; then, unless `last`, overwrite `acts` with the pruned block's outputs (in place: the
    activations are the run's largest buffer). With ctx.tune enabled the pruned block is then fine-tuned
    towards the dense block's outputs (admm_kernels.models.block_tune). Returns the report entries, the
    tuning report and the seconds spent."""
    job = _Job(block, index, layers, call, acts, solve_kwargs, ctx)
    if ctx.tune.enabled and layers:
        check_tunable(layers, index)
        # Filled by the first stage's Gram forwards, which run the dense block on these very inputs: the
        # targets cost no pass of their own. With the loss after tuning measured in _propagate, one
        # epoch after `accurate` on SmolLM2 (70 %) went from 3.02x to 2.50x ADMM-Grad's run time.
        job.targets = (torch.empty_like(acts) if ctx.scratch is None
                       else ctx.scratch(tuple(acts.shape), acts.dtype))
    records = _calibrate_and_solve(job, last)
    out = [records[rel] if rel in records else _not_called(job, rel) for rel in layers]
    tuned = None
    if job.targets is not None:
        t = time.perf_counter()
        tuned = tune_block(block, index, layers, call, acts, job.targets, ctx.device, ctx.tune, ctx.comm,
                           measure_after=last)
        sync(ctx.device)
        job.seconds["tune"] += time.perf_counter() - t
    if not last:
        t = time.perf_counter()
        loss = _propagate(job)
        if tuned is not None:
            tuned["loss_after"] = window_mean(loss, acts.shape[0], ctx.comm, ctx.device,
                                              f"block {index}: the block loss after tuning")
        sync(ctx.device)
        job.seconds["forward"] += time.perf_counter() - t
    job.targets = None
    return BlockResult(out, tuned, job.seconds)


def _propagate(job: _Job):
    """Overwrite job.acts with the pruned block's outputs (the next block's inputs); with block tuning,
    return the sum of the windows' losses against the targets (the tuned block's loss, measured in the
    same pass), else 0.0."""
    acts, ctx, total = job.acts, job.ctx, 0.0
    with torch.no_grad():
        for j in range(acts.shape[0]):
            y = job.call(job.block, acts[j:j + 1].to(ctx.device))[0]
            if job.targets is not None:
                total = total + window_loss(y, job.targets[j])
            acts[j] = y.to(acts.device)
            ctx.progress.step("forward")
    return total


def _calibrate_and_solve(job: _Job, last: bool) -> dict[str, dict]:
    """Per stage: the Grams of the stage's groups over every window, then the solves. Returns the report
    entry of every layer the block's forward called."""
    n, ctx = job.acts.shape[0], job.ctx
    records: dict[str, dict] = {}
    if not job.layers:
        ctx.progress.start_block(job.index, 0 if last else n)
        return records
    hooks = GramHooks(job.layers, ctx.device, ctx.gram_dtype, ctx.moe_calibration)
    try:
        t = time.perf_counter()
        _forward(job.block, job.call, job.acts, 0, ctx.device, job.targets)  # discovery: groups, order
        plan = hooks.plan()
        job.seconds["forward"] += time.perf_counter() - t
        _check_same_plan(plan, job.index, ctx.comm)
        stages = plan.stages(ctx.sequential)
        ctx.progress.start_block(job.index, n * max(1, len(stages)) + len(job.layers) + (0 if last else n))
        ctx.progress.step("gram")
        for s, leaders in enumerate(stages):
            # the first stage runs the dense block: its outputs are the tuning targets when wanted
            into = job.targets if s == 0 else None
            hooks.begin_stage(leaders, use_discovery_inputs=(s == 0), stop_early=into is None)
            gram_before = hooks.seconds
            t = time.perf_counter()
            for j in range(1 if s == 0 else 0, n):
                hooks.new_window()
                _forward(job.block, job.call, job.acts, j, ctx.device, into)
                ctx.progress.step("gram")
            sync(ctx.device)
            spent = hooks.seconds - gram_before
            job.seconds["forward"] += time.perf_counter() - t - spent
            job.seconds["gram"] += spent
            records.update(_solve_stage(job, plan, leaders, hooks.end_stage(),
                                        stage=s if ctx.sequential else None))
    finally:
        hooks.remove()
    return records


def _not_called(job: _Job, rel: str) -> dict:
    """The report entry of a selected layer the block's forward never called: nothing to calibrate on."""
    w = get_weight(job.layers[rel])
    job.ctx.progress.step("prune")
    return {"name": job.name(rel), "block": job.index, "shape": list(w.shape), "group": None, "error": None,
            "seconds": 0.0, "sparsity": 0.0, "kept": w.numel(), "numel": w.numel(),
            "skipped": "not called by the block's forward"}


def _forward(block: nn.Module, call: BlockCall, acts: torch.Tensor, j: int, device: torch.device,
             into: torch.Tensor | None = None) -> None:
    """One window through the block for its hooks' sake; its output is kept in into[j] when `into` is
    given (the hooks must then let the forward finish: stop_early off)."""
    try:
        y = call(block, acts[j:j + 1].to(device))
    except StopBlock:
        if into is not None:
            raise
        return
    if into is not None:
        into[j] = y[0].to(into.device)


def _check_same_plan(plan: BlockPlan, index: int, comm: Comm) -> None:
    if not comm.distributed:
        return
    plans = comm.all_gather_objects(plan.signature(), f"block {index}: comparing layer groups")
    bad = [r for r, p in enumerate(plans) if p != plans[0]]
    if bad:
        raise DistributedError(f"{comm.describe()}: block {index}'s layers were grouped differently on ranks "
                               f"{bad} than on rank 0 (the ranks run different models or code)")


@dataclass
class _StageGrams:
    """A stage's summed Grams: grams[leader] for the groups this rank solves (a starved experts group
    holds its pooled Gram), tokens[leader] for expert groups, starved: expert groups with fewer than
    MIN_EXPERT_TOKENS tokens."""

    grams: dict[str, torch.Tensor]
    tokens: dict[str, int]
    starved: set[str]


def _solve_stage(job: _Job, plan: BlockPlan, leaders: list[str], accs: dict,
                 stage: int | None) -> dict[str, dict]:
    """Sum the stage's Grams over the ranks, solve the owned layers, broadcast every layer's result.
    Returns the report entry of every layer of the stage."""
    comm = job.ctx.comm
    members = [rel for rel in job.layers if plan.group_of.get(rel) in leaders]   # module order
    owners = assign_by_cost([_cost(job.layers[rel]) for rel in members], comm.size)
    mine = [rel for rel, o in zip(members, owners) if o == comm.rank]
    grams = _stage_grams(job, leaders, accs, {plan.group_of[rel] for rel in mine})
    records, masks = _solve_owned(job, plan, mine, grams, stage)
    if comm.distributed:
        _share_results(job, members, owners, masks)
        for recs in comm.all_gather_objects(records, f"block {job.index}: collecting the layer reports"):
            records.update(recs)
    return records


def _stage_grams(job: _Job, leaders: list[str], accs: dict, wanted: set[str]) -> _StageGrams:
    """One symmetric Gram per group, summed over the ranks, kept only for the `wanted` groups; a starved
    experts group gets the pooled Gram of its module and input kind instead (the fallback)."""
    layers, comm = job.layers, job.ctx.comm
    tokens = _token_counts(leaders, accs, layers, comm, job.index)
    starved = {g for g, c in tokens.items() if c < MIN_EXPERT_TOKENS}
    pool_keys = {input_kind(g, layers[g]) for g in starved}
    pooled: dict[tuple, torch.Tensor] = {}  # experts' pooled Gram per (module, kind)
    grams: dict[str, torch.Tensor] = {}
    for g in leaders:
        acc = accs.pop(g)
        gram = acc.gram
        del acc
        comm.all_reduce_sum_(gram, f"block {job.index}: summing the Gram of {g}")
        if g in tokens and (key := input_kind(g, layers[g])) in pool_keys:
            pooled[key] = gram.clone() if key not in pooled else pooled[key].add_(gram)
        if g in wanted:
            grams[g] = gram
        del gram
    for g in starved & set(grams):
        grams[g] = pooled[input_kind(g, layers[g])]
    return _StageGrams(grams, tokens, starved)


def _solve_owned(job: _Job, plan: BlockPlan, mine: list[str], stage_grams: _StageGrams,
                 stage: int | None) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Solve this rank's layers (experts of one projection as one batched job), write them into the
    block; returns their report entries and, when distributed, their masks (to broadcast)."""
    prune_layer, grams = solver(), stage_grams.grams
    records: dict[str, dict] = {}
    masks: dict[str, torch.Tensor] = {}
    remaining = {g: sum(1 for rel in mine if plan.group_of[rel] == g) for g in grams}
    for job_names in _jobs(mine, job.layers):
        t = time.perf_counter()
        weights = [get_weight(job.layers[rel]) for rel in job_names]
        try:
            if len(job_names) == 1:
                results = [prune_layer(weights[0], grams[plan.group_of[job_names[0]]], **job.solve_kwargs)]
            else:  # experts of one projection: batched solves
                job_grams = [grams[plan.group_of[rel]] for rel in job_names]
                results = solver_batched()(weights, job_grams, **job.solve_kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {job.name(job_names[0])}: {exc}") from exc
        for rel, res in zip(job_names, results):
            set_weight(job.layers[rel], res.weight)
            leader = plan.group_of[rel]
            remaining[leader] -= 1
            if not remaining[leader]:
                del grams[leader]  # free (in, in) as soon as its group is done
        sync(weights[0].device)
        share = (time.perf_counter() - t) / len(job_names)
        job.seconds["solve"] += share * len(job_names)
        for rel, w, res in zip(job_names, weights, results):
            records[rel] = _record(job, rel, plan.group_of[rel], w, res, share, stage_grams)
            if len(job_names) > 1:
                records[rel]["batch"] = len(job_names)
            if stage is not None:
                records[rel]["stage"] = stage
            if job.ctx.comm.distributed:
                records[rel]["rank"] = job.ctx.comm.rank
                masks[rel] = res.mask
            job.ctx.progress.step("prune", f"{rel} err={res.error:.3g}")
    return records, masks


def _record(job: _Job, rel: str, leader: str, w: torch.Tensor, res, seconds: float,
            stage_grams: _StageGrams) -> dict:
    """The report entry of a solved layer (prune_layer's result `res` for weight `w`)."""
    kept = int(res.mask.sum())
    rec = {"name": job.name(rel), "block": job.index, "shape": list(w.shape), "group": job.name(leader),
           "error": float(res.error), "seconds": seconds, "sparsity": 1.0 - kept / w.numel(), "kept": kept,
           "numel": w.numel(), "backends": res.stats.get("backends")}
    if leader in stage_grams.tokens:
        rec["tokens"] = stage_grams.tokens[leader]
        if leader in stage_grams.starved:
            rec["fallback"] = "pooled"
    return rec


def _share_results(job: _Job, members: list[str], owners: list[int], masks: dict[str, torch.Tensor]) -> None:
    """Every layer's pruned weight and mask from its owner to every rank (the same order everywhere); a
    received weight must be zero outside its mask."""
    comm = job.ctx.comm
    for rel, owner in zip(members, owners):
        module = job.layers[rel]
        w = get_weight(module)
        if owner == comm.rank:
            weight, mask = w.contiguous(), masks.pop(rel)
        else:
            weight = torch.empty(w.shape, dtype=w.dtype, device=w.device)
            mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        what = f"block {job.index}: broadcasting {rel} from rank {owner}"
        comm.broadcast_(weight, owner, what)
        comm.broadcast_(mask, owner, what)
        if owner != comm.rank:
            if bool((weight[~mask] != 0).any()):
                raise DistributedError(f"{comm.describe()}: the pruned weight of {job.name(rel)} received "
                                       f"from rank {owner} is not zero outside its mask")
            set_weight(module, weight)
            job.ctx.progress.step("prune", f"{rel} from rank {owner}")


def _token_counts(leaders: list[str], accs: dict, layers: dict[str, nn.Module], comm: Comm,
                  index: int) -> dict[str, int]:
    """{leader: tokens} of the stage's expert groups, summed over the ranks (empty for dense groups)."""
    experts = [g for g in leaders if isinstance(layers[g], ExpertProjection)]
    if not experts:
        return {}
    counts = torch.tensor([accs[g].count for g in experts], dtype=torch.float64,
                          device=accs[experts[0]].device)  # on the device: NCCL reduces device tensors
    comm.all_reduce_sum_(counts, f"block {index}: summing the experts' token counts")
    return {g: int(c) for g, c in zip(experts, counts.tolist())}


def _cost(module: nn.Module) -> float:
    """Predicted solve cost of a layer: out * in^2 (ADMM's (in, in) x (in, out) GEMM per iteration)."""
    out_f, in_f = get_weight(module).shape
    return float(out_f) * float(in_f) ** 2
