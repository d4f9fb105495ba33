"""Finding the decoder blocks of a causal LM and the prunable linear layers inside them.

Generic on purpose: the blocks are the model's own decoder layer list, the largest outermost
``nn.ModuleList`` whose entries contain linear layers (``model.layers`` in LLaMA/Mistral/Qwen/Gemma/Phi-3,
``model.decoder.layers`` in OPT, ``transformer.h`` in GPT-2, ``gpt_neox.layers`` in GPT-NeoX). Its
entries may differ in class: hybrid models (Jamba, Bamba, Falcon-H1, Qwen3-Next, LFM2, ...) mix
attention, Mamba, linear-attention and conv layers in one list. A list of length
``config.num_hidden_layers`` wins over a longer one (an experts list inside a tiny model's block).

Prunable layers are ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (a linear layer whose weight is stored
transposed, (in, out)) and each expert's gate/up/down projection of a fused experts module
(admm_kernels.models.experts: named ``<experts>.<e>.gate_proj`` etc., as transformers saves them).
Matrix parameters the block multiplies by itself (``F.linear(x, self.weight[i])``, ``einsum``, ``@``) are
prunable too, as one :class:`~admm_kernels.models.plain_params.ParamLinear` per linear map they hold:
find_blocks traces their uses with one short forward of the model (admm_kernels.models.plain_params),
and block_layers lists those it resolved. An experts module whose 3-D parameters fit no known layout is
an error (UnknownExpertsLayout) unless tracing resolved every one of them as linear maps.
Routers of MoE blocks (``gate``, ``router``, ``shared_expert_gate``, any linear whose output size is the
number of experts or 1, a linear inside a ``router`` module) are left out unless a ``layers`` pattern names
them.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .experts import (
    ExpertProjection,
    UnknownExpertsLayout,
    expert_projections,
    experts_layout,
    find_experts,
    is_router,
)
from .param_roles import UNUSED_MATRIX, matrix_role
from .plain_params import ParamLinear, trace_blocks, traced

LayerFilter = Sequence[str] | Callable[[str, nn.Module], bool] | None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised by name so transformers stays an optional import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_prunable(module: nn.Module) -> bool:
    """True for nn.Linear (and subclasses), GPT-2's Conv1D, one expert's projection and one linear map held
    in a plain parameter."""
    return isinstance(module, (nn.Linear, ExpertProjection, ParamLinear)) or _is_conv1d(module)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) (a view for Conv1D, whose parameter is (in, out), and for an
    expert's projection and a plain parameter's linear map, a view into the parameter)."""
    if isinstance(module, (ExpertProjection, ParamLinear)):
        return module.weight_view()
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an (out, in) weight into the layer in place (keeps the parameter object, dtype, device)."""
    target = get_weight(module)
    if weight.shape != target.shape:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit layer {module}")
    target.copy_(weight)


def _has_layers(module: nn.Module) -> bool:
    return any(is_prunable(m) or bool(find_experts(m)) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks (see the module docstring).

    Raises ValueError for encoder-decoder models and for models without a ModuleList containing linear
    layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"unsupported model {type(model).__name__}: encoder-decoder models are not "
                         "supported (only decoder-only causal LMs)")
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and _has_layers(m)]
    # Outermost only: an experts list or a vision tower's list inside a block is not the block list.
    outer = [(n, m) for n, m in candidates
             if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in candidates)]
    if not outer:
        raise ValueError(
            f"unsupported model {type(model).__name__}: found no decoder blocks; looked for the largest "
            "torch.nn.ModuleList containing nn.Linear (or Conv1D, or fused experts) layers, e.g. "
            "model.layers (LLaMA), model.decoder.layers (OPT), transformer.h (GPT-2)")
    n_layers = _config_layers(model)
    exact = [c for c in outer if len(c[1]) == n_layers]
    pool = exact or outer
    name, blocks = max(pool, key=lambda c: len(c[1]))  # first of the longest on ties (module order)
    candidates = [plain_candidates(b) for b in blocks]
    if any(candidates):
        trace_blocks(model, blocks, candidates)
    return name, blocks


def _config_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None) if cfg is not None else None):
        n = getattr(c, "num_hidden_layers", None)
        if isinstance(n, int):
            return n
    return None


_EXPERT_INDEX = re.compile(r"\.\d+\.(?=[^.]+$)")


def _matches(patterns: Sequence[str], rel: str, full: str) -> bool:
    """A glob matches the relative or full name; an expert's name also matches without its index
    ("mlp.experts.down_proj" names every expert's down_proj)."""
    names = [rel, full]
    if _EXPERT_INDEX.search(rel):
        names += [_EXPERT_INDEX.sub(".", rel), _EXPERT_INDEX.sub(".", full)]
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def check_layer_filter(layers: LayerFilter) -> None:
    if layers is None or callable(layers):
        return
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise TypeError("layers must be None, a list of glob patterns or a callable(name, module), "
                        f"got {layers!r}")


def _experts_modules(block: nn.Module) -> tuple[dict[str, tuple], dict[str, UnknownExpertsLayout]]:
    """({rel: (experts module, layout)} of the fused experts modules with a known layout, {rel: error} of
    those whose 3-D parameters fit none)."""
    known, unknown = {}, {}
    for rel, m in find_experts(block).items():
        try:
            known[rel] = (m, experts_layout(m, rel))
        except UnknownExpertsLayout as e:
            unknown[rel] = e
    return known, unknown


def plain_candidates(block: nn.Module) -> dict[str, nn.Parameter]:
    """{name relative to the block: parameter} of the block's matrix parameters that are no linear's or
    known experts module's weight and have no intended role (norm, router, SSM, conv, bias): the ones
    admm_kernels.models.plain_params traces."""
    experts, _ = _experts_modules(block)
    covered = {id(p) for rel, (m, _) in experts.items() for p in m.parameters()}
    covered |= {id(m.weight) for m in block.modules()
                if (isinstance(m, nn.Linear) or _is_conv1d(m)) and isinstance(m.weight, torch.Tensor)}
    out = {}
    for mname, module in block.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in covered and matrix_role(mname, module, pname) == UNUSED_MATRIX:
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def block_layers(block: nn.Module) -> tuple[dict[str, nn.Module], set[str]]:
    """({relative name: layer} of every prunable layer of a block, module order, expert projections at
    their experts module's place, a plain parameter's linear maps at its module's place; the names of
    its routers)."""
    experts, unknown = _experts_modules(block)
    plain = traced(block)
    plain_layers = plain.layers if plain is not None else {}
    for rel, error in unknown.items():  # usable only when tracing found every 3-D parameter's maps
        module = block.get_submodule(rel)
        names = [f"{rel}.{n}" for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        if not all(any(k == n or k.startswith(n + ".") for k in plain_layers) for n in names):
            raise error
    by_owner: dict[int, dict[str, ParamLinear]] = {}
    for name, m in plain_layers.items():
        by_owner.setdefault(id(m.owner), {})[name] = m
    # a router's outputs: one per expert, zero-computation experts included
    n_experts = {n for _, lay in experts.values()
                 for n in (lay.num_experts, lay.num_experts + lay.unused_slots)}
    # one parameter holding several maps (per expert, per head): a MoE block when routed by a router
    maps_per_param = Counter((id(m.owner), m.pname) for m in plain_layers.values())
    split = any(c > 1 for c in maps_per_param.values())
    out: dict[str, nn.Module] = {}
    routers: set[str] = set()
    for rel, module in block.named_modules():
        if rel in experts:
            out.update(expert_projections(module, rel, experts[rel][1]))
        elif rel and is_prunable(module):
            out[rel] = module
            if (experts or split) and (is_router(rel, module, n_experts) or _in_router(rel)):
                routers.add(rel)
        out.update(by_owner.get(id(module), {}))
    return out, routers


def _in_router(rel: str) -> bool:
    """A linear inside a module named like a router ("mlp.router.layer")."""
    return any(part in ("router", "shared_expert_router") for part in rel.split(".")[:-1])


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{full name: layer} of every prunable layer inside the model's blocks, expert projections included
    (they are not submodules, so model.named_modules() does not list them)."""
    blocks_name, blocks = find_blocks(model)
    return {f"{blocks_name}.{i}.{rel}": m for i, b in enumerate(blocks)
            for rel, m in block_layers(b)[0].items()}


def prunable_layers(block: nn.Module, prefix: str, layers: LayerFilter = None) -> dict[str, nn.Module]:
    """{name relative to the block: layer} of the selected prunable layers of one block, module order.

    layers: None = every linear and expert projection except the routers of MoE blocks; a list of glob
    patterns matched against the relative name ("self_attn.q_proj", "mlp.*",
    "mlp.experts.*.down_proj", or "mlp.experts.down_proj" for every expert) or the full name
    ("model.layers.3.mlp.down_proj"); or a callable (full_name, module) -> bool.
    """
    found, routers = block_layers(block)
    out = {}
    for rel, module in found.items():
        full = f"{prefix}.{rel}"
        if layers is None:
            keep = rel not in routers
        elif callable(layers):
            keep = bool(layers(full, module))
        else:
            keep = _matches(layers, rel, full)
        if keep:
            out[rel] = module
    return out


def select_all(blocks: nn.ModuleList, blocks_name: str, layers: LayerFilter = None
               ) -> list[dict[str, nn.Module]]:
    """Per block, the selected layers; raises ValueError when a pattern selects nothing anywhere."""
    check_layer_filter(layers)
    chosen = [prunable_layers(b, f"{blocks_name}.{i}", layers) for i, b in enumerate(blocks)]
    if layers is not None and not callable(layers):
        for pattern in layers:
            hit = any(_matches([pattern], rel, f"{blocks_name}.{i}.{rel}")
                      for i, sel in enumerate(chosen) for rel in sel)
            if not hit:
                names = list(prunable_layers(blocks[0], f"{blocks_name}.0", None))
                raise ValueError(f"layers pattern {pattern!r} matches no linear layer inside the blocks "
                                 f"({blocks_name}.N); the first block has: {', '.join(names)}")
    if not any(chosen):
        raise ValueError(f"layers={layers!r} selects no linear layer inside the blocks ({blocks_name}.N)")
    return chosen
