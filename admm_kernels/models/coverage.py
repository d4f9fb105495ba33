"""What share of a model's block weights a run prunes, and why the rest is left out.

A measuring tool must not report a sparsity it did not reach. Every weight matrix inside the decoder
blocks (2-D parameters, and the 3-D fused experts of MoE blocks) is classified once before any work:

- selected: the weight of a selected linear layer, of selected expert projections, or of the selected
  linear maps a plain parameter holds (admm_kernels.models.plain_params);
- left out, with a reason: ``router`` (MoE routing layers), ``norm``, ``bias`` (the experts'
  per-expert bias vectors), ``ssm`` (Mamba / linear-attention
  state parameters such as ``A_log``, ``D``, ``dt_bias``), ``conv`` (convolution kernels), ``unused``
  (the slots of zero-computation experts in a fused parameter: never read by the forward), ``layers``
  (a linear the ``layers`` selection leaves out), ``not a linear layer`` (a matrix the block uses
  directly other than as a linear map's weight, e.g. a per-layer embedding; with a "detail" saying how
  it is used, when tracing saw it).

Routers, norms, biases, SSM and conv parameters and unused slots are left dense on purpose. Anything else
left out by the default selection is a model this package does not understand: when it is more than
UNCOVERED_LIMIT of the blocks' matrix weights, the run stops before any work with an error naming the
parameters (``layers=`` / CLI ``--layers`` prunes less on purpose). After the run, ``coverage()``
counts what really was pruned (a selected layer the block's forward never called is left out too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .experts import ExpertProjection
from .param_roles import matrix_role as _reason
from .plain_params import ParamLinear, traced

# Largest share of the blocks' matrix weights that the default selection may leave out for a reason
# other than routers, norms, SSM and conv parameters before prune_model refuses the model.
UNCOVERED_LIMIT = 0.05
INTENDED = ("router", "norm", "ssm", "conv", "bias", "unused")


def _owners(layers: dict[str, nn.Module]) -> tuple[dict[int, str], dict[int, int]]:
    """id(parameter) -> the selected layer name owning it, and id(parameter holding several layers: fused
    experts, a plain parameter's linear maps) -> selected numel."""
    plain: dict[int, str] = {}
    fused: dict[int, int] = {}
    for name, m in layers.items():
        if isinstance(m, (ExpertProjection, ParamLinear)):
            p = m.parameter()
            fused[id(p)] = fused.get(id(p), 0) + m.weight_view().numel()
        else:
            plain[id(m.weight)] = name
    return plain, fused


def classify_block(block: nn.Module, selected: dict[str, nn.Module], all_layers: dict[str, nn.Module],
                   routers: set[str]) -> list[dict]:
    """Per matrix parameter of one block: {"name", "numel", "selected" (weights), "reason"}.

    selected: the layers the run will prune; all_layers: every prunable layer (admm_kernels.models.
    discovery.block_layers); routers: the router names among them."""
    chosen_plain, chosen_fused = _owners(selected)
    every_plain, every_fused = _owners(all_layers)
    found = traced(block)
    refused = found.refused if found is not None else {}
    rows = []
    for mname, module in block.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            name = f"{mname}.{pname}" if mname else pname
            n = p.numel()
            usable = every_fused.get(id(p), n)
            if usable < n:  # slots of a fused experts parameter no expert reads (zero-computation experts)
                rows.append({"name": f"{name}[unused slots]", "numel": n - usable, "selected": 0,
                             "reason": "unused"})
                n = usable
            if id(p) in chosen_plain or id(p) in chosen_fused:
                sel = chosen_fused.get(id(p), n)
                rows.append({"name": name, "numel": n, "selected": sel,
                             "reason": None if sel == n else "layers"})
                continue
            if id(p) in every_plain:
                reason = "router" if every_plain[id(p)] in routers else "layers"
            elif id(p) in every_fused:
                reason = "layers"
            else:
                reason = _reason(mname, module, pname)
            row = {"name": name, "numel": n, "selected": 0, "reason": reason}
            if name in refused:  # a matrix the block uses directly: how (admm_kernels.models.plain_params)
                row["detail"] = refused[name]
            rows.append(row)
    return rows


def _pattern(blocks_name: str, name: str) -> str:
    """model.layers.3.mlp.x -> model.layers.N.mlp.x (one line for a parameter of every block)."""
    return f"{blocks_name}.N.{name}"


def left_out(rows_per_block: Sequence[list[dict]], blocks_name: str) -> list[dict]:
    """The left-out parameters grouped over the blocks: {"name": "<blocks>.N.<param>", "blocks",
    "weights", "reason"}, largest first."""
    groups: dict[tuple, dict] = {}
    for b, rows in enumerate(rows_per_block):
        for r in rows:
            miss = r["numel"] - r["selected"]
            if miss <= 0:
                continue
            key = (r["name"], r["reason"])
            g = groups.setdefault(key, {"name": _pattern(blocks_name, r["name"]), "blocks": [], "weights": 0,
                                        "reason": r["reason"]})
            if r.get("detail") and "detail" not in g:
                g["detail"] = r["detail"]
            g["blocks"].append(b)
            g["weights"] += miss
    return sorted(groups.values(), key=lambda g: -g["weights"])


def check_coverage(rows_per_block: Sequence[list[dict]], blocks_name: str, model_name: str) -> None:
    """ValueError when the default selection leaves out more than UNCOVERED_LIMIT of the blocks' matrix
    weights for a reason other than routers, norms, SSM and conv parameters."""
    total = sum(r["numel"] for rows in rows_per_block for r in rows)
    bad = [g for g in left_out(rows_per_block, blocks_name) if g["reason"] not in INTENDED]
    missing = sum(g["weights"] for g in bad)
    if total and missing > UNCOVERED_LIMIT * total:
        names = "; ".join(f"{g['name']} ({g['weights']:,} weights in {len(g['blocks'])} blocks: "
                          f"{g['reason']}" + (f", {g['detail']}" if g.get("detail") else "") + ")"
                          for g in bad[:8])
        raise ValueError(
            f"{model_name}: the prunable layers cover only {1 - missing / total:.1%} of the blocks' weight "
            f"matrices; {missing / total:.1%} would stay dense although they are not routers, norms, SSM or "
            f"conv parameters: {names}. Pruning this model would report a sparsity it does not reach; "
            "select the layers to prune with layers= to prune less on purpose")


def coverage(rows_per_block: Sequence[list[dict]], blocks_name: str, records: Sequence[dict]) -> dict:
    """The report's "coverage": what share of the blocks' matrix weights were pruned (pruned layers'
    weights over all), the sparsity over all of them (zeros the run made / all matrix weights), and
    what was left out and why (selected layers the forward never called: "not called")."""
    total = sum(r["numel"] for rows in rows_per_block for r in rows)
    pruned = [r for r in records if r.get("error") is not None]
    covered = sum(r["numel"] for r in pruned)
    zeros = sum(r["numel"] - r["kept"] for r in pruned)
    out = left_out(rows_per_block, blocks_name)
    skipped = [r for r in records if r.get("error") is None]
    if skipped:
        by: dict[str, dict] = {}
        for r in skipped:
            name = re.sub(rf"^{re.escape(blocks_name)}\.\d+\.", f"{blocks_name}.N.", r["name"])
            g = by.setdefault(name, {"name": name, "blocks": [], "weights": 0, "reason": "not called"})
            g["blocks"].append(r["block"])
            g["weights"] += r["numel"]
        out += list(by.values())
    return {"matrix_weights": total, "pruned_weights": covered,
            "share": covered / total if total else 0.0,
            "sparsity_of_all_matrices": zeros / total if total else 0.0, "left_out": out}
