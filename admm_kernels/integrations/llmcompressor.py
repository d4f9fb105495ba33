"""ADMM pruning inside llm-compressor: `ADMMPruningModifier` for `oneshot` (tested with llmcompressor 0.13.0).

    from llmcompressor import oneshot
    from admm_kernels.integrations.llmcompressor import ADMMPruningModifier

    oneshot(model=model, dataset=ds, recipe=[ADMMPruningModifier(sparsity=0.5, ignore=["re:.*lm_head"])],
            num_calibration_samples=128, max_seq_length=2048)

Importing this module registers the class with llm-compressor's ModifierFactory under its class name, so
a YAML recipe may name it (import the module before `oneshot` reads the recipe):

    sparsity_stage:
      sparsity_modifiers:
        ADMMPruningModifier: {sparsity: 0.5, mask_structure: "2:4", method: admm, ignore: ["re:.*lm_head"]}

How it runs. The class extends llm-compressor's `SparsityModifierBase`, the base of its SparseGPTModifier
and WandaPruningModifier, which owns the lifecycle: it resolves `targets`/`ignore` (and the OWL sparsity
profile) and registers a forward hook on every prunable module; the sequential pipeline runs one decoder
layer at a time over the calibration set, calls the hook with each batch's input (`calibrate_module`:
accumulate the layer's Hessian), then `compress_modules` at the end of the layer's pass (here: one
`admm_kernels.prune_layer` per module), then propagates the pruned layer's outputs to the next layer.
That is the same scheme as `admm_kernels.prune_model` (see tests_integration/llmcompressor).

The Hessian. llm-compressor's SparseGPT accumulates H = (2/n) Σ xᵀx in fp32, as a running average
(H ← H·n/(n+k) + (2/(n+k))·XᵀX per batch of k samples; n counts samples, not tokens). `prune_layer`
takes the plain sum G = Σ xᵀx (as prune_layer does). With `hessian="llmcompressor"` (default) the modifier
accumulates with llm-compressor's own function and passes G = H·n/2. The factor changes no result
beyond rounding: ADMM works on D⁻¹GD⁻¹ with D = diag(G)^½ (invariant to a positive scale up to the
1e-8 added to D), its damping and SparseGPT's are fractions of the mean diagonal, Wanda's score
ranks |W|·‖x‖ (scaled uniformly), and the reported error is relative; it is undone so stats and the
dead-input test (diag G == 0) see the same matrix as prune_model. With `hessian="admm_kernels"` the
modifier accumulates Σ xᵀx itself with `ak.GramAccumulator` (half the FLOPs: one triangle; no running
rescale; `gram_dtype="float64"` for long runs); given the same inputs it gives bit-identical Grams,
hence bit-identical weights, to `prune_model`.

Fields. Those of SparseGPTModifier: sparsity (a float, or one per target layer), sparsity_profile
("owl", with owl_m and owl_lmbda), mask_structure ("0:0" = unstructured, "N:M" with any N < M; also
"unstructured" and "per-row" here), targets, ignore, dampening_frac (passed as prune_layer's
`percdamp`; None keeps the method's default: 0.1 for ADMM as the seed paper, 0.01 for SparseGPT),
block_size (SparseGPT's `blocksize`; only method="sparsegpt" uses it), offload_hessians (keep Hessians
on the CPU between batches) and preserve_sparsity_mask (False only: prune_layer has no "keep these
weights pruned" constraint, so True raises). Plus ours: method ("admm" | "sparsegpt" | "wanda" |
"magnitude"), preset (prune_layer's ADMM presets, passed only when set), options (any further
prune_layer method option, e.g. {"iters": 40, "rho": 1.0}), hessian, gram_dtype (with
hessian="admm_kernels" only), prune_routers (False: MoE routers stay dense). Every setting is
checked when the modifier is built (a bad method or option fails before any calibration).
After `oneshot`, `modifier.layer_report` lists per module (every expert projection included): name,
shape, sparsity, relative reconstruction error tr(ΔGΔᵀ)/tr(WGWᵀ) on its Gram, seconds, samples (batches),
tokens (rows of its inputs), "fallback": "pooled" for a starved expert, and "skipped" with sparsity 0 for
a targeted module the calibration forward never called (left dense, with a warning).

Mixture of experts. Before any modifier starts, oneshot replaces every fused experts module it
recognises (the transformers 5.x classes declared with `use_experts_implementation`: Qwen2/3-MoE,
Mixtral, OLMoE, GPT-OSS, Qwen3-Next, Jamba, GraniteMoeHybrid, ...) by a `LinearExperts2D`, one
nn.Linear per expert projection named `<experts>.<e>.gate_proj|up_proj|down_proj` (llm-compressor's own
copy; the fused parameters leave the model). With oneshot's `moe_calibrate_all_experts=True` (its
default) every expert computes on every token during calibration, so its Grams hold all tokens (gate/up:
the hidden states; down: act(gate)·up of them), as `prune_model(..., moe_calibration="all")`; with
False each expert sees the tokens its router sends it, as `moe_calibration="routed"`. The experts of one
module and projection are pruned together with `ak.prune_experts`; an expert that saw fewer than
MIN_EXPERT_TOKENS tokens is solved on its module's pooled Gram, as in prune_model. An experts module
oneshot leaves fused is calibrated by the modifier's own pre-hook on it (admm_kernels.models.experts.
ExpertInputs, routing as above) and pruned in place through (out, in) views of the fused parameters
(admm_kernels.integrations.llmcompressor_moe; their Grams are always ak.GramAccumulator's, whatever
`hessian` says: llm-compressor has no Hessian for fused parameters); a fused layout it does not know
raises, naming the module
and its parameters, and one the calibration never ran raises at the end, so nothing is skipped
silently. Routers are left dense unless prune_routers=True: the linears of a decoder layer holding
experts named gate / router / shared_expert_gate or with one output per expert or a single output
(prune_model's rule); transformers' TopKRouter modules are not linears and are never targeted.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from functools import partial
from typing import Any, Literal

import torch

try:
    from compressed_tensors.offload.cache import OffloadCache
    from compressed_tensors.utils import (
        align_module_device,
        get_execution_device,
        match_named_modules,
        match_targets,
        update_offload_parameter,
    )
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modifiers import ModifierFactory
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES, SparsityModifierBase
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian, make_empty_hessian
    from llmcompressor.utils.metric_logging import CompressionLogger
    from loguru import logger
    from pydantic import Field, PrivateAttr, field_validator, model_validator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "admm_kernels.integrations.llmcompressor needs llm-compressor: "
        "pip install 'admm_kernels[llmcompressor]' (tested with llmcompressor==0.13.0); "
        f"import failed: {exc}") from exc

from ..gram import GramAccumulator
from ..models.discovery import _is_conv1d, get_weight, is_prunable
from ..patterns import parse_pattern, pattern_group
from .llmcompressor_moe import (
    FusedExpertsGrams,
    MoEModule,
    expert_position,
    find_moe_modules,
    input_kind,
    pooled_grams,
    router_names,
)

__all__ = ["ADMMPruningModifier"]

_UNSTRUCTURED = ("0:0", "unstructured", "per-layer")
_SPARSEGPT_BLOCK = 128  # SparseGPTModifier's default block_size


def _pattern_of(mask_structure: str) -> str:
    """prune_layer's pattern for a mask_structure: '0:0'/'unstructured' -> 'unstructured', 'per-row',
    'N:M' -> 'N:M' (syntax checked here; M dividing in_features is checked per layer)."""
    if not isinstance(mask_structure, str):
        raise TypeError(f"mask_structure must be a str such as '0:0', '2:4' or 'per-row', "
                        f"got {mask_structure!r}")
    s = mask_structure.strip().lower()
    if s in _UNSTRUCTURED:
        return "unstructured"
    return str(parse_pattern(s, pattern_group(s), name="mask_structure"))


class ADMMPruningModifier(SparsityModifierBase):
    """One-shot pruning with admm_kernels.prune_layer (ADMM-Grad by default) in llm-compressor's oneshot.

    See the module docstring for the fields, the Hessian scaling and the YAML name.
    """

    # SparseGPTModifier's fields (sparsity becomes optional: N:M patterns fix it to 1 - N/M)
    sparsity: float | list[float] | None = None
    dampening_frac: float | None = None
    block_size: int = _SPARSEGPT_BLOCK
    preserve_sparsity_mask: bool = False
    offload_hessians: bool = False
    # ours
    method: str = "admm"
    preset: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    hessian: Literal["llmcompressor", "admm_kernels"] = "llmcompressor"
    gram_dtype: Literal["float32", "float64"] = "float32"
    prune_routers: bool = False

    _hessians: dict[torch.nn.Module, Any] = PrivateAttr(default_factory=dict)
    _num_samples: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _tokens: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _layer_report: list[dict] = PrivateAttr(default_factory=list)
    # MoE: the model's experts modules, its routers' names, the linearized experts' positions
    # {linear: (experts name, expert, projection)}, the fused experts modules being calibrated
    # {name: (Grams, sparsity spec, hook handle)} and the linears pruned so far
    _moe: dict[str, MoEModule] = PrivateAttr(default_factory=dict)
    _routers: set[str] = PrivateAttr(default_factory=set)
    _experts: dict[torch.nn.Module, tuple[str, int, str]] = PrivateAttr(default_factory=dict)
    _fused: dict[str, tuple] = PrivateAttr(default_factory=dict)
    _pruned: set[torch.nn.Module] = PrivateAttr(default_factory=set)

    @field_validator("preserve_sparsity_mask")
    @classmethod
    def _no_preserved_mask(cls, value: bool) -> bool:
        if value:
            raise ValueError("preserve_sparsity_mask=True is not supported by ADMMPruningModifier "
                             "(prune_layer has no constraint keeping already-zero weights pruned); "
                             "use SparseGPTModifier")
        return value

    def _split_mask_structure(self, mask_structure: str) -> tuple[int, int]:
        # The base class calls this from its validator; accept our pattern names as well.
        pattern = _pattern_of(mask_structure)
        if ":" in pattern:
            n, m = pattern.split(":")
            return int(n), int(m)
        return 0, 0

    @property
    def pattern(self) -> str:
        """prune_layer's pattern: 'unstructured', 'per-row' or 'N:M'."""
        return _pattern_of(self.mask_structure)

    @model_validator(mode="after")
    def _check_settings(self) -> ADMMPruningModifier:
        pattern = self.pattern
        values = self.sparsity if isinstance(self.sparsity, list) else [self.sparsity]
        if ":" in pattern:
            n, m = (int(v) for v in pattern.split(":"))
            fixed = 1.0 - n / m
            for v in values:
                if v is not None and abs(float(v) - fixed) > 1e-9:
                    raise ValueError(f"sparsity {v} contradicts mask_structure {self.mask_structure!r}, "
                                     f"which prunes exactly 1 - {n}/{m} = {fixed:g}; give {fixed:g} or "
                                     "leave it out")
        elif self.sparsity is None:
            raise ValueError(f"sparsity is required with mask_structure {self.mask_structure!r} (a float in "
                             "[0, 1), or one per target layer)")
        if self.method != "sparsegpt" and self.block_size != _SPARSEGPT_BLOCK:
            raise ValueError(f"block_size={self.block_size} applies to method='sparsegpt' only, "
                             f"got method={self.method!r}")
        if self.hessian != "admm_kernels" and self.gram_dtype != "float32":
            raise ValueError(f"gram_dtype={self.gram_dtype!r} applies to hessian='admm_kernels' only (llm-"
                             f"compressor accumulates its Hessians in float32), got hessian={self.hessian!r}")
        from ..models.config import validate_options  # a tiny prune_layer call: bad options fail now
        probe = next((float(v) for v in values if v is not None), 0.5)
        kw = self._method_options()
        validate_options(probe, pattern, self.method, kw)
        return self

    def _method_options(self) -> dict:
        """prune_layer keyword options from preset, dampening_frac, block_size and options."""
        kw = dict(self.options)
        for field, key, value in (("preset", "preset", self.preset),
                                  ("dampening_frac", "percdamp", self.dampening_frac),
                                  ("block_size", "blocksize",
                                   self.block_size if self.method == "sparsegpt" else None)):
            if value is None:
                continue
            if key in kw and kw[key] != value:
                raise ValueError(f"options[{key!r}] = {kw[key]!r} contradicts {field}={value!r}; give one")
            kw[key] = value
        return kw

    @property
    def layer_report(self) -> list[dict]:
        """Per pruned module: name, shape, method, pattern, sparsity, error, seconds, samples."""
        return list(self._layer_report)

    # --- hook registration -----------------------------------------------------------------------------

    def on_calibration_start(self, state, event, **kwargs):
        """Register the calibration hooks: the base class's targeting (every Linear / Conv of the target
        layers, less `ignore` and embeddings), less the MoE routers unless prune_routers, plus one hook per
        fused experts module llm-compressor left fused (llmcompressor_moe.FusedExpertsGrams)."""
        model = state.model
        self._moe = find_moe_modules(model, LinearExperts2D,
                                     ignored=lambda name, module: match_targets(name, module, self.ignore))
        layer_names = [n for n, _ in match_named_modules(model, self._sequential_targets)]
        self._routers = router_names(model, self._moe, layer_names) if self._moe else set()
        for index, (layer_name, layer) in enumerate(self._target_layers.items()):
            layer_sparsity = self.sparsity[index] if isinstance(self.sparsity, list) else self.sparsity
            for rel, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
                name = f"{layer_name}.{rel}"
                if match_targets(name, module, self.ignore) or isinstance(module, torch.nn.Embedding):
                    continue
                full = name.rstrip(".")  # a target that is the module itself gives "<target>."
                if full in self._routers and not self.prune_routers:
                    logger.info(f"{full}: a MoE router, left dense (prune_routers=True prunes it)")
                    continue
                if full.endswith("lm_head"):
                    logger.warning("lm_head is a target of ADMMPruningModifier; add 're:.*lm_head' to "
                                   "`ignore` unless it is meant to be pruned")
                self._module_names[module] = name
                self._module_sparsities[module] = layer_sparsity
                position = expert_position(full, self._moe)
                if position is not None:
                    self._experts[module] = position
                self.register_hook(module, self.calibrate_module, "forward")
        self._start_fused()

    def _start_fused(self) -> None:
        """A Gram hook on every targeted experts module that is still fused. Each expert sees the tokens
        llm-compressor's calibration routes to it: all of them inside its moe_calibration_context
        (oneshot's moe_calibrate_all_experts=True, the default), else the router's choice."""
        mode = "all" if get_calibrate_all_experts_flag() else "routed"
        dtype = torch.float64 if self.gram_dtype == "float64" else torch.float32
        for name, moe in self._moe.items():
            if not moe.fused or match_targets(name, moe.module, self.ignore):
                continue
            targeted, spec = self._fused_sparsity(name)
            if not targeted:
                continue
            grams = FusedExpertsGrams(moe, mode, get_execution_device(moe.module), dtype)
            handle = self.register_hook(moe.module, grams.hook, "forward_pre", with_kwargs=True)
            self._fused[name] = (grams, spec, handle)

    def _fused_sparsity(self, name: str) -> tuple[bool, Any]:
        """(targeted, sparsity spec) of a fused experts module: its target layer's spec, or the modifier's
        own with the default targets (Linear: the experts are linears stored fused); (False, None) when
        the targets leave it out. (The spec itself is None with N:M patterns.)"""
        owners = [n for n in self._target_layers if name == n or name.startswith(f"{n}.")]
        if owners:
            index = list(self._target_layers).index(max(owners, key=len))
            return True, self.sparsity[index] if isinstance(self.sparsity, list) else self.sparsity
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if "Linear" not in targets:
            return False, None
        if isinstance(self.sparsity, list):
            raise ValueError(f"the fused experts module {name} is in none of the target layers, so a list "
                             "of per-layer sparsities gives it none; give one sparsity, or targets that "
                             "contain it (its decoder layer class)")
        return True, self.sparsity

    # --- the two hooks of SparsityModifierBase -----------------------------------------------------------

    def calibrate_module(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...],
                         _output: torch.Tensor):
        """Forward hook: add the module's input (its first argument) to its Hessian."""
        inp = args[0]
        if module not in self._num_samples:
            if not is_prunable(module):
                name = self._module_names.get(module, type(module).__name__)
                raise TypeError(f"ADMMPruningModifier prunes nn.Linear layers (and GPT-2's Conv1D); "
                                f"{name} is a {type(module).__name__}: add it to `ignore` or narrow "
                                "`targets`")
            device = get_execution_device(module)
            if self.hessian == "llmcompressor":
                self._hessians[module] = make_empty_hessian(module, device=device)
            else:
                dtype = torch.float64 if self.gram_dtype == "float64" else torch.float32
                in_features = get_weight(module).shape[1]
                self._hessians[module] = GramAccumulator(in_features, device=device, dtype=dtype)
            self._num_samples[module] = 0
            self._tokens[module] = 0
        self._tokens[module] += inp.numel() // max(1, inp.shape[-1])
        self._onload(module)
        if self.hessian == "llmcompressor":
            self._hessians[module], self._num_samples[module] = accumulate_hessian(
                inp, module, self._hessians[module], self._num_samples[module])
        else:
            acc = self._hessians[module]
            acc.add(inp.detach())
            self._num_samples[module] += inp.shape[0] if inp.dim() > 2 else 1
        self._offload(module)

    def _onload(self, module: torch.nn.Module) -> None:
        if self.offload_hessians:
            self._move(module, get_execution_device(module))

    def _offload(self, module: torch.nn.Module) -> None:
        if self.offload_hessians:
            self._move(module, torch.device("cpu"))

    def _move(self, module: torch.nn.Module, device: torch.device) -> None:
        h = self._hessians[module]
        if isinstance(h, GramAccumulator):
            h._upper = h._upper.to(device)
            h.device = torch.device(device)
        else:
            self._hessians[module] = h.to(device)

    def _gram(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's Σ xᵀx (in, in) (see the module docstring for the conversion)."""
        h = self._hessians.pop(module)
        if isinstance(h, GramAccumulator):
            return h.gram
        return h.mul_(self._num_samples[module] / 2.0)  # H = (2/n) Σ xᵀx

    def _sparsity_of(self, module: torch.nn.Module) -> float:
        return self._resolve_sparsity(self._module_sparsities[module], self._module_names[module].rstrip("."))

    def _resolve_sparsity(self, s, name: str) -> float:
        """A module's sparsity from its spec: a float, or OWL's {decoder layer name: sparsity}."""
        if isinstance(s, dict):
            # OWL: the base class stores {decoder layer name: sparsity}; pick this module's layer.
            owners = [k for k in s if name == k or name.startswith(k + ".")]
            if not owners:
                raise ValueError(f"no OWL sparsity for module {name} (layers: {sorted(s)[:4]}...)")
            s = s[max(owners, key=len)]
        if ":" in self.pattern:
            n, m = (int(v) for v in self.pattern.split(":"))
            return 1.0 - n / m
        return float(s)

    def _get_activations(self, model: torch.nn.Module, dataloader, nsamples: int = 128) -> dict:
        """OWL's per-input activation norms, as the base class computes them, without its basic pipeline.

        llm-compressor 0.13.0's version runs `run_calibration`, which fires lifecycle events while the
        session is still initialising and fails with "Cannot invoke event before initializing" for every
        sparsity modifier (SparseGPTModifier too, checked in tests_integration). Here the forward passes
        run directly, with only these hooks enabled; the statistic is the base class's: per batch,
        sqrt(Σ over batch and tokens x²) / nsamples, summed over batches, for every nn.Linear but lm_head.
        """
        from llmcompressor.modifiers.utils.hooks import HooksMixin
        from llmcompressor.pytorch.utils.helpers import tensors_to_device
        from llmcompressor.utils import calibration_forward_context

        acts: dict[str, torch.Tensor] = {}

        def save(_module, args, name: str):
            x = args[0] if isinstance(args, tuple) else args
            norm = x.detach().float().pow(2).sum(dim=tuple(range(x.dim() - 1))).sqrt() / nsamples
            acts[name] = acts[name] + norm if name in acts else norm

        hooks = {self.register_hook(mod, partial(save, name=name), "forward_pre")
                 for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and "lm_head" not in name}
        device = get_execution_device(model)
        try:
            with torch.no_grad(), HooksMixin.disable_hooks(keep=hooks), calibration_forward_context(model):
                for batch in dataloader:
                    model(**tensors_to_device(batch, device))
        finally:
            self.remove_hooks(hooks)
        return acts

    def compress_modules(self):
        """Prune every module calibrated in this pass: each linear with prune_layer on its Gram, the experts
        of one experts module and projection together with prune_experts (batched on a GPU), an expert that
        saw fewer than MIN_EXPERT_TOKENS tokens on its module's pooled Gram (as prune_model); then the
        fused experts modules calibrated in this pass, in place."""
        kw = self._method_options()
        modules = list(self._num_samples)
        grams = {m: self._gram(m) for m in modules}
        experts = {m: self._experts[m] for m in modules if m in self._experts}
        grams, starved = pooled_grams(grams, experts, {m: self._tokens[m] for m in experts})
        for job in self._jobs(modules, experts):
            self._prune_linears(job, grams, starved, kw)
            for m in job:
                del grams[m]
        for name, (fused, spec, handle) in list(self._fused.items()):
            if fused.windows:
                self._prune_fused(name, fused, spec, kw)
                self.remove_hooks({handle})
                del self._fused[name]

    def _jobs(self, modules: list, experts: dict) -> list[list]:
        """The modules in order, one per job, except that the experts of one experts module and projection
        (one shape) with one sparsity form one job."""
        jobs: list[list] = []
        where: dict[tuple, int] = {}
        for m in modules:
            if m not in experts:
                jobs.append([m])
                continue
            owner, _, proj = experts[m]
            key = (owner, proj, self._sparsity_of(m))
            if key not in where:
                where[key] = len(jobs)
                jobs.append([])
            jobs[where[key]].append(m)
        return jobs

    def _prune_linears(self, job: list, grams: dict, starved: set, kw: dict) -> None:
        from ..batched import prune_experts
        from ..prune import prune_layer

        names = [self._module_names[m].rstrip(".") for m in job]
        sparsity = self._sparsity_of(job[0])
        logger.info(f"Pruning {names[0]}{f' and {len(job) - 1} more experts' if len(job) > 1 else ''} with "
                    f"admm_kernels ({self.method}, {self.pattern}, sparsity {sparsity:.4g}) using "
                    f"{self._num_samples[job[0]]} samples")
        with torch.no_grad(), ExitStack() as stack:
            for m in job:
                stack.enter_context(align_module_device(m))
            comp_logger = stack.enter_context(CompressionLogger(job[0]))
            t = time.perf_counter()
            weights = [get_weight(m) for m in job]
            job_grams = [grams[m].to(w.device) for m, w in zip(job, weights)]
            try:
                if len(job) == 1:
                    results = [prune_layer(weights[0], job_grams[0], sparsity=sparsity, pattern=self.pattern,
                                           method=self.method, **kw)]
                else:
                    results = prune_experts(weights, job_grams, sparsity=sparsity, pattern=self.pattern,
                                            method=self.method, **kw)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"module {names[0]}: {exc}") from exc
            del job_grams
            comp_logger.set_results(name="ADMM", loss=max(r.error for r in results))
            seconds = (time.perf_counter() - t) / len(job)
        for m, name, res in zip(job, names, results):
            stored = res.weight.t() if _is_conv1d(m) else res.weight  # Conv1D stores (in, out)
            update_offload_parameter(m, "weight", stored.contiguous())
            entry = self._entry(name, res, seconds, self._num_samples.pop(m), self._tokens.pop(m))
            if m in starved:
                entry["fallback"] = "pooled"
            self._layer_report.append(entry)
            self._pruned.add(m)

    def _prune_fused(self, name: str, fused: FusedExpertsGrams, spec, kw: dict) -> None:
        """Prune every expert projection of a fused experts module, writing into views of its parameters."""
        from ..batched import prune_experts

        lay = fused.moe.layout
        sparsity = self._resolve_sparsity(spec, name)
        keys = [(e, p) for p in lay.projections for e in range(lay.num_experts)
                if not match_targets(f"{name}.{e}.{p}", fused.moe.module, self.ignore)]
        grams = {k: fused.grams[(k[0], input_kind(k[1]))].gram for k in keys}
        positions = {k: (name, k[0], k[1]) for k in keys}
        grams, starved = pooled_grams(grams, positions, {k: fused.tokens(k[0]) for k in keys})
        logger.info(f"Pruning the {lay.num_experts} fused experts of {name} with admm_kernels "
                    f"({self.method}, {self.pattern}, sparsity {sparsity:.4g}) using {fused.windows} samples")
        owners = {lay.param_name(p).rpartition(".") for p in lay.projections}
        with torch.no_grad(), ExitStack() as stack:
            for path, _, _ in owners:
                stack.enter_context(align_module_device(fused.moe.module.get_submodule(path)))
            for proj in lay.projections:
                job = [k for k in keys if k[1] == proj]
                if not job:
                    continue
                t = time.perf_counter()
                views = [fused.view(e, proj) for e, _ in job]
                try:
                    results = prune_experts(views, [grams[k].to(views[0].device) for k in job],
                                            sparsity=sparsity, pattern=self.pattern, method=self.method, **kw)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"module {name}.{job[0][0]}.{proj}: {exc}") from exc
                seconds = (time.perf_counter() - t) / len(job)
                for (e, _), view, res in zip(job, views, results):
                    view.copy_(res.weight)  # into the fused parameter
                    entry = self._entry(f"{name}.{e}.{proj}", res, seconds, fused.windows, fused.tokens(e))
                    if (e, proj) in starved:
                        entry["fallback"] = "pooled"
                    self._layer_report.append(entry)
            for path, _, leaf in owners:  # offloaded parameters: write the onloaded copy back
                owner = fused.moe.module.get_submodule(path)
                if isinstance(owner._parameters, OffloadCache):
                    update_offload_parameter(owner, leaf, owner.get_parameter(leaf).data)
        fused.reset()

    def _entry(self, name: str, res, seconds: float, samples: int, tokens: int) -> dict:
        kept = int(res.mask.sum())
        return {"name": name, "shape": list(res.weight.shape), "method": self.method, "pattern": self.pattern,
                "sparsity": 1.0 - kept / res.mask.numel(), "error": float(res.error), "seconds": seconds,
                "samples": samples, "tokens": tokens}

    def on_finalize(self, state, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)  # removes the hooks (as SparseGPTModifier does)
        if self._num_samples:
            raise ValueError(f"ADMMPruningModifier failed to prune {len(self._num_samples)} calibrated "
                             "modules")
        if self._fused:
            raise ValueError("ADMMPruningModifier: the fused experts modules "
                             + "; ".join(_describe(self._moe[n]) for n in self._fused)
                             + " were never called during calibration, so their experts were not pruned "
                               "(the calibration pipeline did not run them as modules); add them to "
                               "`ignore` to leave them dense")
        for module, name in self._module_names.items():
            if module not in self._pruned:  # hooked, but the forward never called it
                name = name.rstrip(".")
                logger.warning(f"{name} was never called during calibration: left dense")
                w = get_weight(module)
                self._layer_report.append({"name": name, "shape": list(w.shape), "method": self.method,
                                           "pattern": self.pattern, "sparsity": 0.0, "error": None,
                                           "seconds": 0.0, "samples": 0, "tokens": 0,
                                           "skipped": "not called during calibration"})
        self._hessians = {}
        self._num_samples = {}
        self._tokens = {}
        self._module_names = {}
        self._module_sparsities = {}
        self._experts = {}
        self._pruned = set()
        return True


def _describe(moe: MoEModule) -> str:
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in moe.module.named_parameters())
    return f"{moe.name} ({type(moe.module).__name__}: {shapes})"


# Recipes name modifiers by class name; registering makes `ADMMPruningModifier:` resolvable in YAML.
ModifierFactory.register(ADMMPruningModifier.__name__, ADMMPruningModifier)
