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

import torch
from torch import nn

from .block_tune import BlockTune, check_tunable, dense_targets, tune_block
from .capture import BlockCall
from .discovery import get_weight, set_weight
from .distributed import Comm, DistributedError, assign_by_cost
from .experts import MIN_EXPERT_TOKENS, ExpertProjection, input_kind
from .grams import BlockPlan, GramHooks, StopBlock, sync


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


def prune_block(block: nn.Module, index: int, blocks_name: str, layers: dict[str, nn.Module],
                call: BlockCall, acts: torch.Tensor, device: torch.device, gram_dtype: torch.dtype,
                prune_kwargs: dict, *, last: bool, sequential: bool, comm: Comm, bar, timings: dict,
                tune: BlockTune | None = None, tune_reports: list | None = None,
                moe_calibration: str = "routed") -> list[dict]:
    """Prune `block` in place (it must already be on `device`) and, unless `last`, overwrite `acts`
    (this rank's windows, (n, L, hidden)) with the pruned block's outputs. Returns one report entry per
    selected layer, in module order (identical on every rank). With `tune` enabled the pruned block is
    then fine-tuned towards the dense block's outputs (admm_kernels.models.block_tune; its losses are
    appended to tune_reports)."""
    n = acts.shape[0]
    records: dict[str, dict] = {}
    plan = None
    targets = None
    if tune is not None and tune.enabled and layers:
        check_tunable(layers, index)
        t = time.perf_counter()
        targets = dense_targets(block, call, acts, device)  # before any hook or pruned weight
        timings["tune"] += time.perf_counter() - t
    hooks = GramHooks(layers, device, gram_dtype, moe_calibration)
    try:
        if layers:
            t = time.perf_counter()
            _forward(block, call, acts, 0, device)  # discovery: groups and call order
            plan = hooks.plan()
            timings["forward"] += time.perf_counter() - t
            _check_same_plan(plan, index, comm)
            stages = plan.stages(sequential)
            bar.start_block(index, n * max(1, len(stages)) + len(layers) + (0 if last else n))
            bar.step("gram")
            for s, leaders in enumerate(stages):
                hooks.begin_stage(leaders, use_discovery_inputs=(s == 0), stop_early=True)
                gram_before = hooks.seconds
                t = time.perf_counter()
                for j in range(1 if s == 0 else 0, n):
                    hooks.new_window()
                    _forward(block, call, acts, j, device)
                    bar.step("gram")
                sync(device)
                spent = hooks.seconds - gram_before
                timings["forward"] += time.perf_counter() - t - spent
                timings["gram"] += spent
                accs = hooks.end_stage()
                records.update(_solve_stage(leaders, accs, layers, plan, index, blocks_name, prune_kwargs,
                                            comm, bar, timings, stage=s if sequential else None))
        else:
            bar.start_block(index, 0 if last else n)
    finally:
        hooks.remove()
    del hooks

    out = []
    for rel, module in layers.items():
        if rel in records:
            out.append(records[rel])
            continue
        w = get_weight(module)  # the block's forward never called it: nothing to calibrate on
        out.append({"name": f"{blocks_name}.{index}.{rel}", "block": index, "shape": list(w.shape),
                    "group": None, "error": None, "seconds": 0.0, "sparsity": 0.0, "kept": w.numel(),
                    "numel": w.numel(), "skipped": "not called by the block's forward"})
        bar.step("prune")

    if targets is not None:
        t = time.perf_counter()
        rep = tune_block(block, index, layers, call, acts, targets, device, tune)
        del targets
        sync(device)
        timings["tune"] += time.perf_counter() - t
        if tune_reports is not None:
            tune_reports.append(rep)

    if not last:
        t = time.perf_counter()
        for j in range(n):
            acts[j] = call(block, acts[j:j + 1].to(device))[0].to(acts.device)
            bar.step("forward")
        sync(device)
        timings["forward"] += time.perf_counter() - t
    return out


def _forward(block: nn.Module, call: BlockCall, acts: torch.Tensor, j: int, device: torch.device) -> None:
    """One window through the block for its hooks' sake (the output is not needed)."""
    try:
        call(block, acts[j:j + 1].to(device))
    except StopBlock:
        pass


def _check_same_plan(plan: BlockPlan, index: int, comm: Comm) -> None:
    if not comm.distributed:
        return
    plans = comm.all_gather_objects(plan.signature(), f"block {index}: comparing layer groups")
    bad = [r for r, p in enumerate(plans) if p != plans[0]]
    if bad:
        raise DistributedError(f"{comm.describe()}: block {index}'s layers were grouped differently on ranks "
                               f"{bad} than on rank 0 (the ranks run different models or code)")


def _solve_stage(leaders: list[str], accs: dict, layers: dict[str, nn.Module], plan: BlockPlan, index: int,
                 blocks_name: str, prune_kwargs: dict, comm: Comm, bar, timings: dict,
                 stage: int | None) -> dict[str, dict]:
    """Sum the stage's Grams over the ranks, solve the owned layers, broadcast every layer's result."""
    prune_layer = solver()
    members = [rel for rel in layers if plan.group_of.get(rel) in leaders]   # module order
    owners = assign_by_cost([_cost(layers[rel]) for rel in members], comm.size)
    mine = [rel for rel, o in zip(members, owners) if o == comm.rank]
    wanted = {plan.group_of[rel] for rel in mine}
    grams: dict[str, torch.Tensor] = {}
    tokens = _token_counts(leaders, accs, layers, comm, index)
    starved = {g for g, c in tokens.items() if c < MIN_EXPERT_TOKENS}
    pool_keys = {input_kind(g, layers[g]) for g in starved}
    pooled: dict[tuple, torch.Tensor] = {}  # experts' pooled Gram per (module, kind): the fallback
    for g in leaders:  # one symmetric Gram per group, summed over the ranks, kept only where needed
        acc = accs.pop(g)
        gram = acc.gram
        del acc
        comm.all_reduce_sum_(gram, f"block {index}: summing the Gram of {g}")
        if g in tokens and (key := input_kind(g, layers[g])) in pool_keys:
            pooled[key] = gram.clone() if key not in pooled else pooled[key].add_(gram)
        if g in wanted:
            grams[g] = gram
        del gram
    for g in starved & set(grams):
        grams[g] = pooled[input_kind(g, layers[g])]
    del pooled

    records: dict[str, dict] = {}
    masks: dict[str, torch.Tensor] = {}
    remaining = {g: sum(1 for rel in mine if plan.group_of[rel] == g) for g in wanted}
    for job in _jobs(mine, layers):
        t = time.perf_counter()
        weights = [get_weight(layers[rel]) for rel in job]
        try:
            if len(job) == 1:
                results = [prune_layer(weights[0], grams[plan.group_of[job[0]]], **prune_kwargs)]
            else:  # experts of one projection: batched solves
                job_grams = [grams[plan.group_of[rel]] for rel in job]
                results = solver_batched()(weights, job_grams, **prune_kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {blocks_name}.{index}.{job[0]}: {exc}") from exc
        for rel, res in zip(job, results):
            set_weight(layers[rel], res.weight)
            leader = plan.group_of[rel]
            remaining[leader] -= 1
            if not remaining[leader]:
                del grams[leader]  # free (in, in) as soon as its group is done
        sync(weights[0].device)
        share = (time.perf_counter() - t) / len(job)
        timings["solve"] += share * len(job)
        for rel, w, res in zip(job, weights, results):
            leader = plan.group_of[rel]
            kept = int(res.mask.sum())
            rec = {"name": f"{blocks_name}.{index}.{rel}", "block": index, "shape": list(w.shape),
                   "group": f"{blocks_name}.{index}.{leader}", "error": float(res.error), "seconds": share,
                   "sparsity": 1.0 - kept / w.numel(), "kept": kept, "numel": w.numel(),
                   "backends": res.stats.get("backends")}
            if leader in tokens:
                rec["tokens"] = tokens[leader]
                if leader in starved:
                    rec["fallback"] = "pooled"
            if len(job) > 1:
                rec["batch"] = len(job)
            if stage is not None:
                rec["stage"] = stage
            if comm.distributed:
                rec["rank"] = comm.rank
                masks[rel] = res.mask
            records[rel] = rec
            bar.step("prune", f"{rel} err={res.error:.3g}")
    if not comm.distributed:
        return records

    for rel, owner in zip(members, owners):  # the same order on every rank
        module = layers[rel]
        w = get_weight(module)
        if owner == comm.rank:
            weight, mask = w.contiguous(), masks.pop(rel)
        else:
            weight = torch.empty(w.shape, dtype=w.dtype, device=w.device)
            mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        what = f"block {index}: broadcasting {rel} from rank {owner}"
        comm.broadcast_(weight, owner, what)
        comm.broadcast_(mask, owner, what)
        if owner != comm.rank:
            if bool((weight[~mask] != 0).any()):
                raise DistributedError(f"{comm.describe()}: the pruned weight of {blocks_name}.{index}.{rel} "
                                       f"received from rank {owner} is not zero outside its mask")
            set_weight(module, weight)
            bar.step("prune", f"{rel} from rank {owner}")
    for recs in comm.all_gather_objects(records, f"block {index}: collecting the layer reports"):
        records.update(recs)
    return records


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
