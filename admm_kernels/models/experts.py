"""Mixture-of-experts layers: every expert's projections as prunable (out, in) layers.

transformers 5.x stores the experts of a MoE block as fused 3-D parameters of one ``...Experts`` module,
not as ``nn.Linear``:

- ``gate_up_proj`` (E, 2·I, H) and ``down_proj`` (E, H, I): Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3,
  GLM-4-MoE, Granite-MoE, ERNIE-4.5-MoE, Qwen3-Next, Jamba, ... (gate rows first, then up rows);
- transposed, ``gate_up_proj`` (E, H, 2·I) and ``down_proj`` (E, I, H): Llama-4, Aria; GPT-OSS also
  interleaves gate and up columns (gate = even, up = odd) and has ``*_bias`` parameters;
- without a gate, ``up_proj`` (E, I, H) and ``down_proj`` (E, H, I): Nemotron-H;
- DBRX's flat layout: the experts module's ``mlp`` holds ``w1`` (gate), ``v1`` (up) and ``w2`` (down,
  used as ``h @ w2``), each 2-D (E·I, H);
- zero-computation experts (LongCat-Flash): a module declaring ``zero_expert_num`` = Z routes tokens to
  Z identity experts after its E computing ones, and its ``gate_up_proj`` holds E + Z slots against
  ``down_proj``'s E; the last Z slots are never read (``ExpertsLayout.unused_slots``), stay dense and are
  reported as ``unused`` (admm_kernels.models.coverage).

The layout is declared on the instance by transformers' ``use_experts_implementation`` decorator
(``is_transposed``, ``is_concatenated``, ``has_gate``, ``has_bias``); where it is not (Llama-4), it
follows from the shapes, which are unambiguous: a (E, a, b) gate_up with a (E, c, d) down is either
a = 2d, b = c (rows) or a = d, b = 2c (transposed). A module with 3-D parameters that fits neither is an
error naming it and its parameters, never a skip.

Each expert projection is an :class:`ExpertProjection`: a small handle (not registered in the model)
whose ``weight_view()`` is an (out, in) view into the fused parameter, so pruning writes straight into
it and no second copy of the experts is made. Their calibration inputs come from one forward pre-hook on
the experts module (:class:`ExpertInputs`): the tokens the router sends to expert e (or, with
``moe_calibration="all"``, every token) for gate/up, and act(gate)·up of those tokens for down,
computed from the *current* gate/up weights with the module's own gate function, so sequential pruning
sees the pruned gate/up. The block's output still comes from the module's own forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MOE_CALIBRATION = ("routed", "all")
# An expert whose Gram holds fewer calibration tokens than this (summed over the windows and ranks) is
# solved on the pooled Gram of its module's experts instead (the sum of every expert's Gram for the same
# projection kind: gate/up see every routed token's hidden state, down the experts' intermediate
# activations). A Gram of k tokens has rank <= k; fitting an (I, H) projection to a handful of tokens
# keeps whatever reproduces those tokens, not what the expert computes in general. Reported per layer
# as "tokens" and "fallback": "pooled".
MIN_EXPERT_TOKENS = 16
_FUSED_NAMES = ("gate_up_proj", "up_proj", "down_proj")
# Names of the routers' modules inside a MoE block: never pruned by default.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "shared_expert_router")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its E experts. in_proj: "gate_up_proj" (gate and up fused) or
    "up_proj" (no gate); transposed: weights stored (E, in, out) instead of (E, out, in); interleaved:
    gate/up alternate along the fused output dimension (GPT-OSS) instead of gate block then up block."""

    num_experts: int
    hidden: int
    intermediate: int
    in_proj: str
    transposed: bool
    interleaved: bool
    has_bias: bool
    unused_slots: int = 0  # gate_up slots after the E experts that no expert reads (zero-computation experts)

    @property
    def projections(self) -> tuple[str, ...]:
        if self.in_proj == "up_proj":
            return ("up_proj", "down_proj")
        return ("gate_proj", "up_proj", "down_proj")

    def param_name(self, projection: str) -> str:
        """The experts module's parameter (a dotted path) holding `projection` of every expert."""
        if self.in_proj == "flat":
            return {"gate_proj": "mlp.w1", "up_proj": "mlp.v1", "down_proj": "mlp.w2"}[projection]
        return "down_proj" if projection == "down_proj" else self.in_proj


class UnknownExpertsLayout(ValueError):
    """An experts-like module whose 3-D parameters fit no known layout."""


def _three_d(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


_FLAT = ("w1", "v1", "w2")


def _flat_params(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """DBRX's flat experts: module.mlp's 2-D w1, v1, w2 of one shape (E·I, H), E = module.num_experts."""
    mlp = getattr(module, "mlp", None)
    e = getattr(module, "num_experts", None)
    if not isinstance(mlp, nn.Module) or not isinstance(e, int) or e < 1:
        return None
    params = {n: getattr(mlp, n, None) for n in _FLAT}
    if not all(isinstance(p, nn.Parameter) and p.dim() == 2 for p in params.values()):
        return None
    shapes = {tuple(p.shape) for p in params.values()}
    return params if len(shapes) == 1 and next(iter(shapes))[0] % e == 0 else None


def is_experts_module(module: nn.Module) -> bool:
    """True for a module holding fused expert parameters: 3-D gate_up_proj / up_proj and down_proj, or
    DBRX's flat w1 / v1 / w2 in its mlp."""
    params = _three_d(module)
    fused = "down_proj" in params and ("gate_up_proj" in params or "up_proj" in params)
    return fused or _flat_params(module) is not None


def experts_layout(module: nn.Module, name: str = "experts") -> ExpertsLayout:
    """The layout of a fused experts module; UnknownExpertsLayout naming it and its parameters when the
    shapes fit no layout or contradict the declared attributes."""
    flat = _flat_params(module)
    if flat is not None:
        e = module.num_experts
        rows, hidden = flat["w1"].shape
        return ExpertsLayout(num_experts=e, hidden=hidden, intermediate=rows // e, in_proj="flat",
                             transposed=False, interleaved=False, has_bias=False)
    params = _three_d(module)
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False))

    def fail(why: str) -> UnknownExpertsLayout:
        return UnknownExpertsLayout(f"unknown experts layout in {name} ({type(module).__name__}: {shapes}): "
                                    f"{why}; prune the other layers with layers= or report the model")
    in_proj = "gate_up_proj" if "gate_up_proj" in params else "up_proj"
    if in_proj not in params or "down_proj" not in params:
        raise fail("expected gate_up_proj (or up_proj) and down_proj")
    other = sorted(set(params) - {in_proj, "down_proj"})
    if other:
        raise fail(f"3-D parameters {', '.join(other)} beside {in_proj} and down_proj")
    a_in, down = params[in_proj], params["down_proj"]
    e, a, b = a_in.shape
    e2, c, d = down.shape
    zero = getattr(module, "zero_expert_num", None)
    unused = e - e2 if isinstance(zero, int) and zero > 0 and e - e2 == zero else 0
    if e - unused != e2:
        raise fail("the two parameters hold different numbers of experts")
    factor = 2 if in_proj == "gate_up_proj" else 1
    rows = a == factor * d and b == c          # (E, k·I, H), (E, H, I)
    transposed = a == d and b == factor * c    # (E, H, k·I), (E, I, H)
    declared = getattr(module, "is_transposed", None)
    if rows and transposed:  # only when I == H with no gate: the declaration decides
        if declared is None:
            raise fail("square experts without an is_transposed declaration")
        transposed = bool(declared)
    elif not rows and not transposed:
        raise fail("the shapes fit neither (E, out, in) nor (E, in, out) storage")
    if declared is not None and bool(declared) != transposed:
        raise fail(f"is_transposed={declared} contradicts the parameter shapes")
    if getattr(module, "has_gate", True) is False and in_proj == "gate_up_proj":
        raise fail("has_gate=False with a fused gate_up_proj")
    hidden, inter = (b, d) if not transposed else (a, b // factor)
    has_bias = any(isinstance(getattr(module, f"{p}_bias", None), torch.Tensor)
                   for p in (in_proj, "down_proj"))
    interleaved = in_proj == "gate_up_proj" and getattr(module, "is_concatenated", True) is False
    return ExpertsLayout(num_experts=e2, hidden=hidden, intermediate=inter, in_proj=in_proj,
                         transposed=transposed, interleaved=interleaved, has_bias=has_bias,
                         unused_slots=unused)


def projection_view(fused: torch.Tensor, layout: ExpertsLayout, expert: int, projection: str) -> torch.Tensor:
    """(out, in) view of one expert's projection inside `fused`, the parameter layout.param_name(
    projection): (I, H) for gate/up, (H, I) for down."""
    if layout.in_proj == "flat":  # (E·I, H): expert e's rows; down is used as h @ w2, so transposed
        w = fused.view(layout.num_experts, layout.intermediate, layout.hidden)[expert]
        return w.t() if projection == "down_proj" else w
    w = fused[expert]
    if layout.transposed:
        w = w.t()  # now (out, in) like the row layout
    if projection == "down_proj" or layout.in_proj == "up_proj":
        return w
    if layout.interleaved:
        return w[0::2] if projection == "gate_proj" else w[1::2]
    inter = layout.intermediate
    return w[:inter] if projection == "gate_proj" else w[inter:]


class ExpertProjection(nn.Module):
    """One expert's gate, up or down projection of a fused experts module, as an (out, in) layer.

    Not registered in the model (it is kept in a plain dict): it holds a reference to the experts
    module, the expert index and the projection name. weight_view() is an (out, in) view of the fused
    parameter (no copy); writing into it prunes the model."""

    def __init__(self, experts: nn.Module, layout: ExpertsLayout, expert: int, projection: str):
        super().__init__()
        object.__setattr__(self, "experts", experts)  # not a submodule: no parameters of its own
        self.layout = layout
        self.expert = expert
        self.projection = projection

    def parameter(self) -> nn.Parameter:
        """The fused parameter this projection is a view of."""
        return self.experts.get_parameter(self.layout.param_name(self.projection))

    def view_of(self, base: torch.Tensor) -> torch.Tensor:
        """The same (out, in) view of `base`, a tensor shaped like the fused parameter."""
        return projection_view(base, self.layout, self.expert, self.projection)

    def weight_view(self) -> torch.Tensor:
        """(out, in) view into the fused parameter: (I, H) for gate/up, (H, I) for down."""
        return self.view_of(self.parameter().data)

    def extra_repr(self) -> str:
        return f"expert={self.expert}, projection={self.projection}"


def input_kind(name: str, m: ExpertProjection) -> tuple[str, str]:
    """(experts module prefix, "in" | "down") of an expert projection named "<prefix>.<e>.<projection>":
    gate and up read the same input ("in"), down reads act(gate)·up."""
    return name.rsplit(".", 2)[0], "down" if m.projection == "down_proj" else "in"


def expert_projections(experts: nn.Module, rel: str, layout: ExpertsLayout) -> dict[str, ExpertProjection]:
    """{"<rel>.<e>.<projection>": handle} for every expert, in expert order (gate, up, down each)."""
    return {f"{rel}.{e}.{p}": ExpertProjection(experts, layout, e, p)
            for e in range(layout.num_experts) for p in layout.projections}


def _bound_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list:
    """The experts forward's arguments in order (hidden states, then routing, if any)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return list(args) + list(kwargs.values())
    return list(bound.arguments.values())


def _gate_function(experts: nn.Module, layout: ExpertsLayout) -> Callable[[torch.Tensor], torch.Tensor]:
    """act(gate)·up from the fused gate_up output (in the stored column order), as the module computes it."""
    if layout.in_proj == "up_proj":
        return experts.act_fn
    apply_gate = getattr(experts, "_apply_gate", None)
    if layout.in_proj != "flat" and callable(apply_gate):
        return apply_gate
    # the default gate (transformers' _default_apply_gate): gate block, then up block; DBRX's _down_input
    # concatenates its two products the same way
    act = experts.mlp.activation_fn if layout.in_proj == "flat" else experts.act_fn

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return act(g) * u
    return gate


class ExpertInputs:
    """A forward pre-hook on one experts module reporting each expert's calibration inputs.

    on_input(name, x) is called for every projection of every expert on each forward of the module, with
    x of shape (tokens_e, in) (zero rows for an expert the router did not choose in this window, so every
    expert is "called" once per forward): gate and up receive the same tensor (one Gram), down receives
    act(gate)·up of the same tokens computed from the current weights. `tokens[e]` counts the rows
    reported for expert e since the last reset."""

    def __init__(self, experts: nn.Module, rel: str, layout: ExpertsLayout,
                 on_input: Callable[[str, torch.Tensor], None], mode: str = "routed",
                 wanted: Callable[[str], bool] | None = None):
        if mode not in MOE_CALIBRATION:
            raise ValueError(f"moe_calibration must be one of {MOE_CALIBRATION}, got {mode!r}")
        self.experts, self.rel, self.layout, self.mode = experts, rel, layout, mode
        self.on_input = on_input
        self.wanted = wanted or (lambda name: True)
        self.gate = _gate_function(experts, layout)
        self.tokens = [0] * layout.num_experts
        self.handle = experts.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def _routed_rows(self, inputs: list, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Per expert, the hidden-state rows it receives."""
        e_count = self.layout.num_experts
        index = inputs[1] if len(inputs) > 1 and isinstance(inputs[1], torch.Tensor) else None
        if index is not None and (index.is_floating_point() or index.is_complex()):
            raise UnknownExpertsLayout(f"{self.rel}: the experts' second argument is a {index.dtype} tensor, "
                                       "not routing indices")
        if index is None:
            # Llama-4 style: the input is already (E·T, H), every token repeated per expert and scaled by
            # its routing weight (zero where the router did not choose the expert).
            if hidden.shape[0] % e_count:
                raise UnknownExpertsLayout(f"{self.rel}: experts called without routing indices on "
                                           f"{hidden.shape[0]} rows, not a multiple of {e_count} experts")
            per = hidden.reshape(e_count, -1, hidden.shape[-1])
            if self.mode == "all":
                return list(per)
            return [p[p.abs().sum(dim=-1) != 0] for p in per]
        if self.mode == "all":
            return [hidden] * e_count
        index = index.reshape(hidden.shape[0], -1)
        return [hidden[(index == e).any(dim=-1)] for e in range(e_count)]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward pre-hook (registered at construction; public so that a host with its own hook
        registry, llm-compressor's HooksMixin, can register it instead): report each expert's rows."""
        inputs = _bound_inputs(module, args, kwargs)
        hidden = inputs[0]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        lay = self.layout
        for e, x in enumerate(self._routed_rows(inputs, hidden)):
            self.tokens[e] += int(x.shape[0])
            names = {p: f"{self.rel}.{e}.{p}" for p in lay.projections}
            for p in lay.projections[:-1]:
                if self.wanted(names[p]):
                    self.on_input(names[p], x)
            if self.wanted(names["down_proj"]):
                self.on_input(names["down_proj"], self._down_input(e, x))

    def _down_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if lay.in_proj == "flat":
            g = projection_view(self.experts.mlp.w1, lay, e, "gate_proj")
            u = projection_view(self.experts.mlp.v1, lay, e, "up_proj")
            return self.gate(torch.cat([x @ g.t(), x @ u.t()], dim=-1))
        w = getattr(self.experts, lay.in_proj)[e]
        h = x @ w if lay.transposed else x @ w.t()
        bias = getattr(self.experts, f"{lay.in_proj}_bias", None)
        if isinstance(bias, torch.Tensor):
            h = h + bias[e]
        return self.gate(h)

    def remove(self) -> None:
        self.handle.remove()


class _Handles:
    """Removable handles of layer_input_hooks (forward pre-hooks and ExpertInputs)."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def layer_input_hooks(layers: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None],
                      moe_calibration: str = "routed") -> _Handles:
    """on_input(name, x) with the input of every layer in `layers` on each forward: a forward pre-hook
    for a linear (admm_kernels.models.capture.input_hooks), one ExpertInputs per experts module for
    expert projections, one PlainInputs per block for linear maps held in plain parameters
    (admm_kernels.models.plain_params). Returns an object whose remove() takes every hook off."""
    from .capture import input_hooks
    from .plain_params import ParamLinear, plain_input_hooks

    modules = {n: m for n, m in layers.items() if not isinstance(m, (ExpertProjection, ParamLinear))}
    handles: list = input_hooks(modules, on_input)
    try:
        handles.extend(plain_input_hooks(layers, on_input))
        seen: set[int] = set()
        for name, m in layers.items():
            if isinstance(m, ExpertProjection) and id(m.experts) not in seen:
                seen.add(id(m.experts))
                handles.append(ExpertInputs(m.experts, name.rsplit(".", 2)[0], m.layout, on_input,
                                            moe_calibration, wanted=layers.__contains__))
    except BaseException:
        _Handles(handles).remove()
        raise
    return _Handles(handles)


def find_experts(block: nn.Module) -> dict[str, nn.Module]:
    """{name relative to the block: experts module} of every fused experts module, module order."""
    return {rel: m for rel, m in block.named_modules() if rel and is_experts_module(m)}


def is_router(rel: str, module: nn.Module, num_experts: set[int]) -> bool:
    """A routing layer of a MoE block: named gate/router/shared_expert_gate (the last name component) or
    a linear whose output size is the number of experts or 1. Such layers are left dense by default:
    pruning a router changes which expert every token reaches."""
    leaf = rel.rsplit(".", 1)[-1]
    if leaf in ROUTER_NAMES:
        return True
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and (w.shape[0] in num_experts or w.shape[0] == 1)
