"""Gram accumulation inside one decoder block: which selected layers share an input (one Gram per group),
in which order the block calls them, and forward pre-hooks that fill the Grams of one stage at a time.

Groups: during the block's first window (the "discovery" forward) every selected layer's inputs are
kept; layers whose inputs are the very same tensors (same storage, offset, shape, strides, dtype: q/k/v,
gate/up, GPT-2's fused c_attn alone) form a group with one accumulator, filled by the group's first layer
in module order (its leader). A 4096-wide q/k/v group costs 1/3 of three separate Grams.

Stages: the groups ordered by the block's first call of any member. Without sequential pruning all
groups form one stage (one pass over the windows fills every Gram). With sequential pruning
(prune_model(sequential=True), CLI --sequential) each group is its own stage, and a stage's Gram is
accumulated only after every earlier stage's layers were pruned, so it sees the inputs the pruned block
really produces. The rule needs no layer names: for LLaMA it gives q/k/v, then o, then gate/up, then
down; for OPT q/k/v, out_proj, fc1, fc2; for GPT-2 c_attn, attn.c_proj, c_fc, mlp.c_proj. Layers that
read the same tensor always stay together (they see identical inputs whatever is pruned before them).

Early stop: a pass for a stage ends the window's forward (by raising _StopBlock from a pre-hook) once
every leader of the stage has been called as often as in the discovery forward: sequential stage 0 then
costs little more than the block's input norm, and nothing after the last needed input is computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..gram import GramAccumulator
from .experts import ExpertProjection, input_kind, layer_input_hooks


class StopBlock(Exception):
    """Raised by a pre-hook to end a block's forward once the active stage's inputs are accumulated."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BlockPlan:
    """What the discovery forward found. group_of: layer -> its group's leader (layers the forward never
    called are absent); leaders: in call order; calls: leader -> calls per forward; in_features: leader ->
    width of its input."""

    group_of: dict[str, str]
    leaders: list[str]
    calls: dict[str, int]
    in_features: dict[str, int] = field(default_factory=dict)
    stage_of: dict[str, tuple] = field(default_factory=dict)

    def stages(self, sequential: bool) -> list[list[str]]:
        """Leaders per stage: one stage of every group, or (sequential) one stage per group, except that
        the experts of one module form one stage per projection kind (all gate/up, then all down):
        they run side by side in the block, so each sees the same earlier stages."""
        if not self.leaders:
            return []
        if not sequential:
            return [list(self.leaders)]
        out: dict[tuple, list[str]] = {}
        for g in self.leaders:
            out.setdefault(self.stage_of.get(g, (g,)), []).append(g)
        return list(out.values())

    def signature(self) -> tuple:
        """A comparable summary, so ranks can check they found the same plan."""
        return (tuple(sorted(self.group_of.items())), tuple(self.leaders), tuple(sorted(self.calls.items())))


class GramHooks:
    """Forward pre-hooks on a block's selected layers (see the module docstring).

    Use: discovery forward of one window -> plan(); then per stage begin_stage(leaders, ...), a forward
    per window (catching StopBlock), end_stage() -> the stage's accumulators. `seconds` counts the time
    spent adding to Grams (the forward passes are timed by the caller)."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device, gram_dtype: torch.dtype,
                 moe_calibration: str = "routed"):
        self.layers = layers
        self.device = device
        self.gram_dtype = gram_dtype
        self.first: dict[str, list[torch.Tensor]] | None = {n: [] for n in layers}
        self.first_order: list[str] = []
        self._plan: BlockPlan | None = None
        self.acc: dict[str, GramAccumulator] = {}
        self.active: set[str] = set()
        self.stop_early = False
        self._left = 0
        self.seconds = 0.0
        self.hooks = layer_input_hooks(layers, self._on_input, moe_calibration)

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        if self.first is not None:
            self.first[name].append(x)
            self.first_order.append(name)
        elif name in self.active:
            self._add(name, x)
            self._left -= 1
            if self.stop_early and self._left == 0:
                raise StopBlock

    def _add(self, leader: str, x: torch.Tensor) -> None:
        sync(self.device)
        t = time.perf_counter()
        self.acc[leader].add(x.detach())
        sync(self.device)
        self.seconds += time.perf_counter() - t

    def plan(self) -> BlockPlan:
        """Group the layers by the inputs of the discovery forward (call this once, after it)."""
        if self._plan is not None:
            return self._plan

        def key(name, xs):
            m = self.layers[name]
            if isinstance(m, ExpertProjection):  # an expert's inputs may be empty: group by position
                return _expert_group(name, m)
            return tuple((x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(),
                          x.dtype) for x in xs)
        leaders_by_key: dict[tuple, str] = {}
        group_of: dict[str, str] = {}
        for name, xs in self.first.items():  # module order: the leader is the group's first layer
            if xs:  # never called: left unpruned, reported by the caller
                group_of[name] = leaders_by_key.setdefault(key(name, xs), name)
        order: list[str] = []
        for name in self.first_order:
            leader = group_of[name]
            if leader not in order:
                order.append(leader)
        stage_of = {g: ("experts", *input_kind(g, self.layers[g]))
                    for g in order if isinstance(self.layers[g], ExpertProjection)}
        self._plan = BlockPlan(group_of=group_of, leaders=order,
                               calls={g: len(self.first[g]) for g in order},
                               in_features={g: int(self.first[g][0].shape[-1]) for g in order},
                               stage_of=stage_of)
        return self._plan

    @property
    def group_of(self) -> dict[str, str]:
        """layer -> its group's leader (empty before the discovery forward)."""
        return self._plan.group_of if self._plan is not None else {}

    def begin_stage(self, leaders: list[str], use_discovery_inputs: bool, stop_early: bool) -> None:
        """Create the accumulators of `leaders`; with use_discovery_inputs add the discovery forward's
        inputs to them first (valid only for the first stage: later stages must see pruned inputs)."""
        plan = self.plan()
        for g in leaders:
            self.acc[g] = GramAccumulator(plan.in_features[g], device=self.device, dtype=self.gram_dtype)
            if use_discovery_inputs:
                for x in self.first[g]:
                    self._add(g, x)
        self.first = None  # frees the discovery inputs (the plan is kept)
        self.active = set(leaders)
        self.stop_early = stop_early
        self.new_window()

    def new_window(self) -> None:
        """Call before each window's forward (resets the early-stop count)."""
        self._left = sum(self._plan.calls[g] for g in self.active) if self._plan else 0

    def end_stage(self) -> dict[str, GramAccumulator]:
        out = {g: self.acc.pop(g) for g in list(self.active)}
        self.active = set()
        return out

    def tokens(self, leader: str) -> int | None:
        """Rows accumulated so far into the Gram of `leader` (None when it has no accumulator)."""
        acc = self.acc.get(leader)
        return acc.count if acc is not None else None

    def remove(self) -> None:
        self.hooks.remove()


def _expert_group(name: str, m: ExpertProjection) -> tuple:
    """("experts", module prefix, expert, "in" | "down"): gate and up of one expert share a Gram."""
    prefix, kind = input_kind(name, m)
    return ("experts", prefix, m.expert, kind)
