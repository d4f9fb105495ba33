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
hessian="admm_kernels" only). Every setting is
checked when the modifier is built (a bad method or option fails before any calibration).
After `oneshot`, `modifier.layer_report` lists per module: name, shape, sparsity, relative
reconstruction error tr(ΔGΔᵀ)/tr(WGWᵀ) on its Gram, seconds.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Literal

import torch

try:
    from compressed_tensors.utils import align_module_device, get_execution_device, update_offload_parameter
    from llmcompressor.modifiers import ModifierFactory
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
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

    _hessians: dict[torch.nn.Module, Any] = PrivateAttr(default_factory=dict)
    _num_samples: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _layer_report: list[dict] = PrivateAttr(default_factory=list)

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
        from ..models.pipeline import _validate_options  # a tiny prune_layer call: bad options fail now
        probe = next((float(v) for v in values if v is not None), 0.5)
        kw = self._method_options()
        _validate_options(probe, pattern, self.method, kw)
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
        s = self._module_sparsities[module]
        if isinstance(s, dict):
            # OWL: the base class stores {decoder layer name: sparsity}; pick this module's layer.
            name = self._module_names[module].rstrip(".")
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
        """Prune every calibrated module with prune_layer on its Gram, then write the weight back."""
        from ..prune import prune_layer

        kw = self._method_options()
        for module in list(self._num_samples):
            # The base names a module "<target>.<sub>", so a target matching the module itself ends in "."
            name = self._module_names[module].rstrip(".")
            sparsity = self._sparsity_of(module)
            samples = self._num_samples[module]
            logger.info(f"Pruning {name} with admm_kernels ({self.method}, {self.pattern}, sparsity "
                        f"{sparsity:.4g}) using {samples} samples")
            with torch.no_grad(), align_module_device(module), CompressionLogger(module) as comp_logger:
                t = time.perf_counter()
                weight = get_weight(module)
                gram = self._gram(module).to(weight.device)
                try:
                    res = prune_layer(weight, gram, sparsity=sparsity, pattern=self.pattern,
                                      method=self.method, **kw)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"module {name}: {exc}") from exc
                del gram
                comp_logger.set_results(name="ADMM", loss=res.error)
                stored = res.weight.t() if _is_conv1d(module) else res.weight  # Conv1D stores (in, out)
                seconds = time.perf_counter() - t
            update_offload_parameter(module, "weight", stored.contiguous())
            kept = int(res.mask.sum())
            self._layer_report.append({
                "name": name, "shape": list(res.weight.shape), "method": self.method, "pattern": self.pattern,
                "sparsity": 1.0 - kept / res.mask.numel(), "error": float(res.error), "seconds": seconds,
                "samples": samples})
            del self._num_samples[module]

    def on_finalize(self, state, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)  # removes the hooks (as SparseGPTModifier does)
        if self._num_samples:
            raise ValueError(f"ADMMPruningModifier failed to prune {len(self._num_samples)} calibrated "
                             "modules")
        self._hessians = {}
        self._num_samples = {}
        self._module_names = {}
        self._module_sparsities = {}
        return True


# Recipes name modifiers by class name; registering makes `ADMMPruningModifier:` resolvable in YAML.
ModifierFactory.register(ADMMPruningModifier.__name__, ADMMPruningModifier)
