"""Mixture-of-experts support of ADMMPruningModifier (admm_kernels.integrations.llmcompressor).

llm-compressor 0.13's `oneshot` replaces every experts module it recognises (a transformers 5.x fused
experts class declared with ``use_experts_implementation``, or one with a registered replacement) by a
``LinearExperts2D``: a ModuleList of per-expert MLPs whose gate_proj / up_proj / down_proj are
``nn.Linear`` (``llmcompressor.modeling.moe.linearize_moe``, before any modifier starts). Those linears
are pruned like any other; this module names them as experts (``<experts>.<e>.<projection>``) so that
the modifier can pool the Grams of starved experts and prune each projection's experts together.

An experts module that stays fused (llm-compressor cannot linearize it) is calibrated here instead: a
forward pre-hook on it (admm_kernels.models.experts.ExpertInputs) reports each expert's input, and the
pruned weights are written into (out, in) views of the fused parameters (:class:`FusedExpertsGrams`).

Routers (the linears that score the experts: named gate / router / shared_expert_gate, or with one
output per expert or a single output, inside a decoder layer holding experts) are found by
:func:`router_names`, with admm_kernels.models.experts.is_router, the rule `prune_model` applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..gram import GramAccumulator
from ..models.experts import (
    MIN_EXPERT_TOKENS,
    ExpertInputs,
    ExpertsLayout,
    UnknownExpertsLayout,
    experts_layout,
    is_experts_module,
    is_router,
    projection_view,
)

__all__ = ["MoEModule", "FusedExpertsGrams", "find_moe_modules", "router_names", "expert_position",
           "input_kind", "pooled_grams"]


@dataclass
class MoEModule:
    """One experts module of the model: its name, the module, the number of experts and, when it is still
    fused (not linearized by llm-compressor), its layout."""

    name: str
    module: nn.Module
    num_experts: int
    layout: ExpertsLayout | None

    @property
    def fused(self) -> bool:
        return self.layout is not None


def find_moe_modules(model: nn.Module, linear_experts_cls: type,
                     ignored: Callable[[str, nn.Module], bool] = lambda name, module: False
                     ) -> dict[str, MoEModule]:
    """{name: MoEModule} of every experts module in `model`: llm-compressor's linearized ones
    (instances of `linear_experts_cls`) and fused ones (admm_kernels.models.experts.is_experts_module)
    that `ignored(name, module)` does not leave out. A fused module whose parameters fit no known layout
    raises UnknownExpertsLayout naming it and its parameters (it must never be skipped silently)."""
    found: dict[str, MoEModule] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{n}.") for n in found):
            continue  # inside an experts module found already
        if isinstance(module, linear_experts_cls):
            found[name] = MoEModule(name, module, int(module.num_experts), None)
        elif is_experts_module(module) and not ignored(name, module):
            try:
                layout = experts_layout(module, name)
            except UnknownExpertsLayout as exc:
                raise UnknownExpertsLayout(f"ADMMPruningModifier cannot prune the experts: {exc} (or add "
                                           f"{name} to `ignore` to leave its experts dense)") from exc
            found[name] = MoEModule(name, module, layout.num_experts, layout)
    return found


def router_names(model: nn.Module, moe: dict[str, MoEModule], layer_names: Iterable[str]) -> set[str]:
    """Names of the routing linears: inside the decoder layer (one of `layer_names`; the experts module's
    parent where none contains it) of an experts module, outside the experts module itself, for which
    admm_kernels.models.experts.is_router holds (name gate / router / shared_expert_gate, or an output
    size equal to that layer's number of experts or 1)."""
    layers = sorted(layer_names, key=len, reverse=True)
    scopes: dict[str, set[int]] = {}
    for name, m in moe.items():
        scope = next((ln for ln in layers if name.startswith(f"{ln}.")), name.rsplit(".", 1)[0])
        scopes.setdefault(scope, set()).add(m.num_experts)
    routers = set()
    for scope, counts in scopes.items():
        inside = model.get_submodule(scope) if scope else model
        for rel, module in inside.named_modules():
            full = f"{scope}.{rel}" if scope else rel
            if not rel or not isinstance(module, nn.Linear):
                continue
            if any(full == e or full.startswith(f"{e}.") for e in moe):
                continue  # an expert's own projection
            if is_router(rel, module, counts):
                routers.add(full)
    return routers


def expert_position(name: str, moe: dict[str, MoEModule]) -> tuple[str, int, str] | None:
    """(experts module name, expert index, projection) of a linearized expert's linear named
    "<experts>.<e>.<projection>", or None for any other module."""
    head, _, proj = name.rpartition(".")
    owner, _, index = head.rpartition(".")
    m = moe.get(owner)
    if m is None or m.fused or not index.isdigit():
        return None
    return owner, int(index), proj


def input_kind(projection: str) -> str:
    """Which input a projection reads: "down" (act(gate)·up) for down_proj, "in" (the hidden states)
    for gate and up."""
    return "down" if projection == "down_proj" else "in"


def pooled_grams(grams: dict, experts: dict, tokens: dict) -> tuple[dict, set]:
    """The Gram each expert projection is pruned on: its own, or where its expert received fewer than
    MIN_EXPERT_TOKENS tokens, the sum over its experts module's experts of their Grams of the same input
    kind (each expert counted once; gate and up share one input), as prune_model does.

    grams: {key: (in, in) Σxᵀx}; experts: {key: (experts name, expert index, projection)} for the keys
    that are expert projections; tokens: {key: tokens seen}. Returns {key: (in, in)} for every key (the
    pooled sums are shared by the starved keys that use them) and the set of the keys that fell back."""
    starved = {k for k in experts if tokens[k] < MIN_EXPERT_TOKENS}
    if not starved:
        return dict(grams), set()
    wanted = {(experts[k][0], input_kind(experts[k][2])) for k in starved}
    per_expert: dict[tuple, torch.Tensor] = {}
    for k, (owner, e, proj) in experts.items():
        kind = input_kind(proj)
        if (owner, kind) in wanted:
            per_expert.setdefault((owner, kind, e), grams[k])
    pooled: dict[tuple, torch.Tensor] = {}
    for (owner, kind, _), g in per_expert.items():
        pooled[(owner, kind)] = g.clone() if (owner, kind) not in pooled else pooled[(owner, kind)].add_(g)
    out = dict(grams)
    for k in starved:
        out[k] = pooled[(experts[k][0], input_kind(experts[k][2]))]
    return out, starved


class FusedExpertsGrams:
    """Per-expert Gram matrices Σxᵀx of one fused experts module, from ExpertInputs' reports.

    Each expert has one "in" Gram (gate and up read the same rows) and one "down" Gram (act(gate)·up of
    the same rows from the current weights). `hook` is the forward pre-hook to register (with_kwargs=True)
    through the modifier, so that llm-compressor's propagation passes, which disable its modifiers'
    hooks, add nothing. mode: "all" (every token to every expert) or "routed"."""

    def __init__(self, moe: MoEModule, mode: str, device: torch.device, dtype: torch.dtype):
        layout = moe.layout
        if layout is None:
            raise ValueError(f"{moe.name} is not a fused experts module")
        self.moe, self.mode = moe, mode
        self.windows = 0
        dims = {"in": layout.hidden, "down": layout.intermediate}
        self.grams = {(e, kind): GramAccumulator(dims[kind], device=device, dtype=dtype)
                      for e in range(layout.num_experts) for kind in ("in", "down")}
        self._inputs = ExpertInputs(moe.module, moe.name, layout, self._add, mode)
        self._inputs.remove()  # registered again by the modifier (see `hook`)

    @property
    def hook(self) -> Callable:
        return self._inputs.pre_hook

    def _add(self, name: str, x: torch.Tensor) -> None:
        head, _, proj = name.rpartition(".")
        e = int(head.rpartition(".")[2])
        if proj == "up_proj" and "gate_proj" in self.moe.layout.projections:
            return  # gate_proj reported the same rows
        if e == 0 and input_kind(proj) == "in":
            self.windows += 1
        self.grams[(e, input_kind(proj))].add(x.detach())

    def tokens(self, e: int) -> int:
        return self.grams[(e, "in")].count

    def view(self, e: int, projection: str) -> torch.Tensor:
        """(out, in) view of expert e's projection inside the fused parameter (no copy)."""
        lay = self.moe.layout
        return projection_view(self.moe.module.get_parameter(lay.param_name(projection)).data, lay, e,
                               projection)

    def reset(self) -> None:
        for acc in self.grams.values():
            acc.reset()
        self.windows = 0
