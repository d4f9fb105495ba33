"""The settings of a prune run (`PruneConfig`) and their validation against a model (`PrunePlan`).

A PruneConfig holds what decides the pruned weights: how sparse (one target, a per-block list, or a
profile), which pattern, which method with which options, which layers, the Gram dtype, sequential
stages, block tuning and the experts' calibration. Its field names are prune_model's keyword names, so
`PruneConfig(**kwargs)` takes what prune_model takes (keywords that are not settings are the method's
options). How a run executes (device, offload, progress, state folder, callback, distributed) is not
part of it: those are prune_model's own arguments.

`validate(model)` checks every setting against the model before any work and returns the `PrunePlan`
it found (the blocks, the selected layers, the sparsity request, the block tuning). Bad settings raise
admm_kernels.errors.ArgumentError / ArgumentTypeError (a ValueError / TypeError) whose `.argument`
names the field, except for the method and its options, whose errors come from prune_layer unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType

import torch
from torch import nn

from ..errors import ArgumentError, ArgumentTypeError, about
from ..patterns import parse_pattern, pattern_group
from .block import solver
from .block_tune import (
    DEFAULT_HOLDOUT,
    DEFAULT_LR,
    TUNED_PRESET,
    TUNED_SOLVER_OPTIONS,
    TUNED_SUFFIX,
    BlockTune,
    check_block_tune,
)
from .coverage import check_coverage, classify_block
from .discovery import LayerFilter, block_layers, find_blocks, get_weight, select_all
from .experts import MOE_CALIBRATION
from .sparsity_profile import ProfileRequest, check_profile
from .streaming import StreamedModel

GRAM_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, init=False)
class PruneConfig:
    """The settings of a prune run (see the module docstring); frozen, compared field by field.

    sparsity: the target in [0, 1) (ignored by N:M patterns), or one value in [0, 1) per decoder block.
    sparsity_profile: "uniform" (every block at `sparsity`) or "owl" (Yin et al. 2024: blocks with a
        larger share of outlier Wanda scores are pruned less, the model's overall sparsity stays
        `sparsity`; owl_m = M, the outlier threshold over the block's mean score, default 5; owl_lambda
        = λ, the block sparsities span 2λ, default 0.08; one extra dense forward of the calibration
        data; not with a StreamedModel; unstructured and per-row patterns only; admm_kernels.models.owl).
    pattern, method, options: as prune_layer's (options: a read-only mapping; any keyword that is not a
        field lands there, so PruneConfig(method="admm", iters=4) has options {"iters": 4}).
    layers: None (every nn.Linear / Conv1D and expert projection inside the blocks except MoE routers;
        never the embeddings or LM head; a model whose blocks this leaves more than 5 % dense for other
        reasons is refused, see admm_kernels.models.coverage), a list of glob patterns ("self_attn.*",
        "mlp.down_proj", "mlp.experts.*.down_proj") or a callable(full_name, module) -> bool.
    gram_dtype: torch.float32 or torch.float64.
    sequential: prune a block's layer groups one after the other, each group's Gram taken from the block
        with the earlier groups already pruned (admm_kernels.models.grams).
    tune_epochs > 0: block tuning after each block's solves: `tune_epochs` epochs of Adam (lr tune_lr,
        tune_batch windows a step) on the kept weights towards the dense block's outputs, masks
        unchanged (admm_kernels.models.block_tune; float32 models; distributed runs sum the gradients
        over the ranks). tune_patience > 0: early stopping: one calibration window in every tune_holdout
        (default 8) is held out, and a block's tuning stops once their loss has not improved for
        tune_patience epochs, keeping the best epoch's weights (tune_epochs is then the most).
    tune_epochs="auto": the most gain, early-stopped: at most 16 epochs, patience 2, 2
        windows a step (unless tune_patience / tune_batch are given), 1 window in 8 held out. Measured
        on SmolLM2-135M's first 4 blocks at 70 % with preset "accurate", 32 x 256 tokens, 1 CPU thread
        (benchmarks/RESULTS.md, "Block tuning: early stopping and its cost"): it ran 58 of 64
        block-epochs, ~2.3 s each (about 1.5x the tuning time of 8 epochs at 4 windows a step), and
        brought the held-out block error to 0.74-0.91x of the untuned block's, against 0.77-0.94x for
        8 epochs at 4 windows a step.
    tune_batch None: 4 windows a step (2 with tune_epochs="auto").
    tune_epochs / tune_lr / tune_batch None: off / 1e-4 / as above, unless the preset ends in "+tune":
        preset="accurate+tune" is preset "accurate" (options["preset"] holds "accurate") with the solver
        options of block_tune.TUNED_SOLVER_OPTIONS (damping 0.1) and block tuning at
        block_tune.TUNED_PRESET's settings; options and tune_* arguments given explicitly win.
    moe_calibration: "routed" (each expert's Gram from the tokens the router sends to it) or "all"
        (every token through every expert, for the Grams only); experts with fewer than
        admm_kernels.models.experts.MIN_EXPERT_TOKENS tokens use their module's pooled Gram.
    Lists are kept as given (sparsity, layers): the config is frozen, not their contents.
    """

    sparsity: float | Sequence[float]
    pattern: str
    method: str
    options: Mapping[str, object] = field(hash=False)
    sparsity_profile: str
    owl_m: float | None
    owl_lambda: float | None
    layers: LayerFilter
    gram_dtype: torch.dtype
    sequential: bool
    tune_epochs: int | str
    tune_lr: float
    tune_batch: int | None
    tune_patience: int | None
    tune_holdout: int
    moe_calibration: str

    def __init__(self, sparsity: float | Sequence[float] = 0.5, pattern: str = "unstructured",
                 method: str = "admm", *, sparsity_profile: str = "uniform", owl_m: float | None = None,
                 owl_lambda: float | None = None, layers: LayerFilter = None,
                 gram_dtype: torch.dtype = torch.float32, sequential: bool = False,
                 tune_epochs: int | str | None = None, tune_lr: float | None = None,
                 tune_batch: int | None = None, tune_patience: int | None = None,
                 tune_holdout: int = DEFAULT_HOLDOUT, moe_calibration: str = "routed",
                 options: Mapping[str, object] | None = None, **method_options: object):
        options = {**(options or {}), **method_options}
        tuning = tuned_preset(options, method)  # "accurate+tune": preset "accurate" + TUNED_PRESET's tuning
        tune_epochs = tuning.get("tune_epochs", 0) if tune_epochs is None else tune_epochs
        tune_lr = tuning.get("tune_lr", DEFAULT_LR) if tune_lr is None else tune_lr
        tune_batch = tuning.get("tune_batch") if tune_batch is None else tune_batch
        settings = dict(sparsity=sparsity, pattern=pattern, method=method,
                        options=MappingProxyType(options),
                        sparsity_profile=sparsity_profile, owl_m=owl_m, owl_lambda=owl_lambda,
                        layers=layers, gram_dtype=gram_dtype, sequential=sequential,
                        tune_epochs=tune_epochs, tune_lr=tune_lr, tune_batch=tune_batch,
                        tune_patience=tune_patience, tune_holdout=tune_holdout,
                        moe_calibration=moe_calibration)
        for name, value in settings.items():
            object.__setattr__(self, name, value)  # frozen: the one place values are set

    def keywords(self) -> dict:
        """prune_model's keyword arguments for these settings (the options spread out):
        PruneConfig(**config.keywords()) == config."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**out, **self.options}

    def __reduce__(self):  # pickle and deepcopy: a mappingproxy cannot be pickled, its dict can
        return _from_keywords, (self.keywords(),)

    def validate(self, model: nn.Module | StreamedModel) -> PrunePlan:
        """Check every setting against `model` (an nn.Module or a StreamedModel) before any work: the
        model has decoder blocks, the Gram dtype, sequential, block tuning, the sparsity and its profile,
        the experts' calibration, the layer selection and its coverage, the pattern against every
        selected layer, the method and its options (one tiny prune_layer call). Returns what it found.
        Raises ArgumentError / ArgumentTypeError naming the setting (`.argument`), or prune_layer's
        ValueError / TypeError for the method and options."""
        streamed = isinstance(model, StreamedModel)
        net = model.model if streamed else model
        blocks_name, blocks = find_blocks(net)
        if self.gram_dtype not in GRAM_DTYPES:
            raise ArgumentTypeError(f"gram_dtype must be torch.float32 or torch.float64, got "
                                    f"{self.gram_dtype}", "gram_dtype")
        if not isinstance(self.sequential, bool):
            raise ArgumentTypeError(f"sequential must be a bool, got {self.sequential!r}", "sequential")
        tune = check_block_tune(self.tune_epochs, self.tune_lr, self.tune_batch, self.tune_patience,
                                self.tune_holdout)
        request = check_profile(self.sparsity, self.sparsity_profile, len(blocks), self.pattern, self.owl_m,
                                self.owl_lambda)
        if request.name == "owl" and streamed:
            raise ArgumentError("sparsity_profile='owl' needs a dense pass over every block before pruning, "
                                "which a StreamedModel does not support yet: load the model in memory, or "
                                "give the OWL sparsities of a previous run as a per-block list",
                                "sparsity_profile")
        if self.moe_calibration not in MOE_CALIBRATION:
            raise ArgumentError(f"moe_calibration must be one of {', '.join(MOE_CALIBRATION)}, got "
                                f"{self.moe_calibration!r}", "moe_calibration")
        every = [block_layers(b) for b in blocks]  # the blocks' structure: an odd experts layout fails here
        with about("layers"):
            selected = select_all(blocks, blocks_name, self.layers)
        rows = [classify_block(b, sel, *found) for b, sel, found in zip(blocks, selected, every)]
        if self.layers is None:  # a layers= selection prunes less on purpose
            with about("layers"):  # the way out of a model covered too little: select the layers
                check_coverage(rows, blocks_name, type(net).__name__)
        validate_layers(selected, blocks_name, self.pattern, request.planned())
        validate_options(request.planned()[0], self.pattern, self.method, dict(self.options))
        return PrunePlan(blocks_name, blocks, selected, rows, request, tune)


def tuned_preset(options: dict, method: str) -> dict:
    """For options["preset"] == "NAME+tune": set the preset to NAME (in `options`), add the solver options
    the tuned path changes in `method`'s preset NAME (TUNED_SOLVER_OPTIONS, unless `options` gives them)
    and return the block tuning settings the suffix stands for (TUNED_PRESET); {} for any other preset.
    ArgumentError when nothing comes before the suffix."""
    preset = options.get("preset")
    if not isinstance(preset, str) or not preset.strip().lower().endswith(TUNED_SUFFIX):
        return {}
    name = preset.strip()[:-len(TUNED_SUFFIX)].strip()
    if not name:
        raise ArgumentError(f"preset {preset!r}: name the method's preset before {TUNED_SUFFIX!r} (e.g. "
                            f"'accurate{TUNED_SUFFIX}')", "preset")
    options["preset"] = name
    changes = TUNED_SOLVER_OPTIONS.get(str(method).strip().lower(), {}).get(name.lower(), {})
    for key, value in changes.items():
        options.setdefault(key, value)  # the tuned path's solver settings; an explicit option wins
    return dict(TUNED_PRESET)


def _from_keywords(keywords: dict) -> PruneConfig:
    return PruneConfig(**keywords)


@dataclass(frozen=True)
class PrunePlan:
    """What PruneConfig.validate found in a model: blocks_name ("model.layers") and blocks, selected[b]
    ({name inside block b: module}, the layers the run prunes), coverage_rows (per block, every matrix
    parameter and what the selection does with it: admm_kernels.models.coverage), the sparsity request
    (before OWL's pass) and the block tuning."""

    blocks_name: str
    blocks: nn.ModuleList = field(repr=False)
    selected: list[dict[str, nn.Module]] = field(repr=False)
    coverage_rows: list[list[dict]] = field(repr=False)
    request: ProfileRequest
    tune: BlockTune

    @property
    def end(self) -> int:
        """One past the last block with selected layers: the blocks after it need no work."""
        return max(i for i, sel in enumerate(self.selected) if sel) + 1


def validate_options(sparsity: float, pattern: str, method: str, options: dict) -> None:
    """Run prune_layer once on a tiny random layer so a bad method or option fails before any work."""
    prune_layer = solver()
    group = pattern_group(pattern)
    in_f = group * 2 if group > 1 else 8
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, in_f, generator=g)
    x = torch.randn(4 * in_f, in_f, generator=g)
    prune_layer(w, x.T @ x, sparsity=sparsity, pattern=pattern, method=method, **options)


def validate_layers(selected: list[dict[str, nn.Module]], blocks_name: str, pattern: str,
                    block_sparsity: Sequence[float]) -> None:
    """Check the pattern and each block's sparsity against every selected layer before any work (not
    after hours): ArgumentError naming "pattern" or "sparsity"."""
    for i, layers in enumerate(selected):
        sparsity = block_sparsity[i]
        for rel, module in layers.items():
            out_f, in_f = get_weight(module).shape
            try:
                pat = parse_pattern(pattern, in_f)
            except ValueError as exc:
                raise ArgumentError(f"pattern {pattern!r} is invalid for layer {blocks_name}.{i}.{rel} "
                                    f"(weight {out_f}x{in_f}): {exc}", "pattern") from None
            if pat.kind != "nm" and int(sparsity * (in_f if pat.kind == "per-row" else in_f * out_f)) == 0 \
                    and sparsity > 0:
                raise ArgumentError(f"sparsity {sparsity} prunes no weight of layer {blocks_name}.{i}.{rel} "
                                    f"(weight {out_f}x{in_f})", "sparsity")
