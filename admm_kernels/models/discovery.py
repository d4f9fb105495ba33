"""Finding the decoder blocks of a causal LM and the prunable linear layers inside them.

Generic on purpose: the blocks are the largest ``nn.ModuleList`` whose entries all have the same class
(``model.layers`` in LLaMA/Mistral/Qwen/Gemma/Phi-3, ``model.decoder.layers`` in OPT, ``transformer.h``
in GPT-2, ``gpt_neox.layers`` in GPT-NeoX). Prunable layers are ``nn.Linear`` and transformers' GPT-2
``Conv1D`` (a linear layer whose weight is stored transposed, (in, out)).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

LayerFilter = Sequence[str] | Callable[[str, nn.Module], bool] | None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised by name so transformers stays an optional import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_prunable(module: nn.Module) -> bool:
    """True for nn.Linear (and subclasses) and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) (a view for Conv1D, whose parameter is (in, out))."""
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an (out, in) weight into the layer in place (keeps the parameter object, dtype, device)."""
    target = module.weight.data
    src = weight.t() if _is_conv1d(module) else weight
    if src.shape != target.shape:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit layer {module}")
    target.copy_(src)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks.

    Raises ValueError for encoder-decoder models and for models without a ModuleList of at least one
    identically-typed module containing a linear layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"unsupported model {type(model).__name__}: encoder-decoder models are not "
                         "supported (only decoder-only causal LMs)")
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not any(is_prunable(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"unsupported model {type(model).__name__}: found no decoder blocks; looked for the largest "
            "torch.nn.ModuleList whose entries all have the same class and contain nn.Linear (or Conv1D) "
            "layers, e.g. model.layers (LLaMA), model.decoder.layers (OPT), transformer.h (GPT-2)")
    return best


def _matches(patterns: Sequence[str], rel: str, full: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(full, p) for p in patterns)


def check_layer_filter(layers: LayerFilter) -> None:
    if layers is None or callable(layers):
        return
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise TypeError("layers must be None, a list of glob patterns or a callable(name, module), "
                        f"got {layers!r}")


def prunable_layers(block: nn.Module, prefix: str, layers: LayerFilter = None) -> dict[str, nn.Module]:
    """{name relative to the block: layer} of the selected prunable layers of one block, module order.

    layers: None = every linear; a list of glob patterns matched against the relative name
    ("self_attn.q_proj", "mlp.*") or the full name ("model.layers.3.mlp.down_proj"); or a callable
    (full_name, module) -> bool.
    """
    out = {}
    for rel, module in block.named_modules():
        if not rel or not is_prunable(module):
            continue
        full = f"{prefix}.{rel}"
        if layers is None:
            keep = True
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
