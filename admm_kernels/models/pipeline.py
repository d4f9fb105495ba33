"""Sequential whole-model pruning (SPEC §1 "Model pipeline"), as SparseGPT / Wanda / the seed paper do.

For each decoder block in turn: move it to the compute device; run the calibration windows through it
once with forward pre-hooks that add every selected linear's input to a Gram accumulator (layers that
receive the same input tensor, e.g. q/k/v or gate/up, share one accumulator); prune every selected
linear with `prune_layer`; run the windows through the *pruned* block to make the next block's inputs;
move the block back. Only one block is ever on the device. With a state folder, everything needed to
continue bit-identically is saved after each block.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .._checks import check_compute_device, model_device, parse_pattern, pattern_group
from .._digest import model_digest
from ..gram import GramAccumulator
from .capture import BlockCall, capture_inputs, input_hooks
from .discovery import LayerFilter, find_blocks, get_weight, select_all, set_weight
from .loading import max_positions
from .sparsity_profile import BlockSparsity, check_profile
from .state import PipelineState, StateLayout, fingerprint


def versions() -> dict:
    """Versions of the software that produced a result (for reports)."""
    from .. import __version__
    out = {"admm_kernels": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is needed for real models only
        pass
    return out


def check_calibration(calibration, model: nn.Module) -> torch.Tensor:
    """calibration: int token ids (N, L) (or a list of N (L,) tensors) -> int64 (N, L) CPU tensor."""
    if isinstance(calibration, (list, tuple)):
        if not calibration or not all(isinstance(t, torch.Tensor) for t in calibration):
            raise TypeError("calibration must be an int tensor (nsamples, seqlen) or a non-empty list of "
                            f"(seqlen,) int tensors, got {type(calibration).__name__}")
        if len({tuple(t.shape) for t in calibration}) != 1:
            raise ValueError("calibration windows must all have the same length, got lengths "
                             f"{sorted({t.shape[-1] for t in calibration})}")
        calibration = torch.stack([t.reshape(-1) for t in calibration])
    if not isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an int tensor (nsamples, seqlen), "
                        f"got {type(calibration).__name__}")
    if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
        raise TypeError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError("calibration must have shape (nsamples, seqlen) with both > 0, "
                         f"got {tuple(calibration.shape)}")
    ids = calibration.detach().to("cpu", torch.int64)
    limit = max_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"calibration seqlen {ids.shape[1]} exceeds the model's maximum of {limit} "
                         "positions")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"calibration token ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GramHooks:
    """Forward pre-hooks that feed each selected layer's input into a Gram accumulator.

    Grouping: during the first window every layer's inputs are kept; layers whose inputs are the very
    same tensors (same storage, offset, shape and strides: q/k/v, gate/up) form a group with one
    accumulator, filled by the group's first layer only (a 4096-wide q/k/v group costs 1/3 of three
    separate Grams)."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device, gram_dtype: torch.dtype):
        self.layers = layers
        self.device = device
        self.gram_dtype = gram_dtype
        self.first: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.group_of: dict[str, str] = {}
        self.acc: dict[str, GramAccumulator] = {}
        self.grouped = False
        self.seconds = 0.0
        self.handles = input_hooks(layers, self._on_input)

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        if not self.grouped:
            self.first[name].append(x)
        elif self.group_of.get(name) == name:
            self._add(name, x)

    def _add(self, leader: str, x: torch.Tensor) -> None:
        _sync(self.device)
        t = time.perf_counter()
        self.acc[leader].add(x.detach())
        _sync(self.device)
        self.seconds += time.perf_counter() - t

    def finish_first_window(self) -> None:
        def key(xs):
            return tuple((x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(),
                          x.dtype) for x in xs)
        leaders: dict[tuple, str] = {}
        for name, xs in self.first.items():
            if not xs:
                continue  # never called: left unpruned, reported by the caller
            k = key(xs)
            leader = leaders.setdefault(k, name)
            self.group_of[name] = leader
            if leader == name:
                self.acc[name] = GramAccumulator(xs[0].shape[-1], device=self.device, dtype=self.gram_dtype)
                for x in xs:
                    self._add(name, x)
        self.first = {}
        self.grouped = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _validate_options(sparsity: float, pattern: str, method: str, options: dict) -> None:
    """Run prune_layer once on a tiny random layer so a bad method or option fails before any work."""
    from ..prune import prune_layer

    group = pattern_group(pattern)
    in_f = group * 2 if group > 1 else 8
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, in_f, generator=g)
    x = torch.randn(4 * in_f, in_f, generator=g)
    prune_layer(w, x.T @ x, sparsity=sparsity, pattern=pattern, method=method, **options)


def _validate_layers(selected: list[dict[str, nn.Module]], blocks_name: str, pattern: str,
                     block_sparsity: Sequence[float]) -> None:
    """Check the pattern against every selected layer before any work (not after hours)."""
    for i, layers in enumerate(selected):
        sparsity = block_sparsity[i]
        for rel, module in layers.items():
            out_f, in_f = get_weight(module).shape
            try:
                pat = parse_pattern(pattern, in_f)
            except ValueError as exc:
                raise ValueError(f"pattern {pattern!r} is invalid for layer {blocks_name}.{i}.{rel} "
                                 f"(weight {out_f}x{in_f}): {exc}") from None
            if pat.kind != "nm" and int(sparsity * (in_f if pat.kind == "per-row" else in_f * out_f)) == 0 \
                    and sparsity > 0:
                raise ValueError(f"sparsity {sparsity} prunes no weight of layer {blocks_name}.{i}.{rel} "
                                 f"(weight {out_f}x{in_f})")


def check_prunable(model: nn.Module, sparsity: float | Sequence[float], pattern: str, method: str = "admm",
                   layers: LayerFilter = None, *, sparsity_profile: str = "uniform",
                   owl_m: float | None = None, owl_lambda: float | None = None, **options) -> None:
    """Raise ValueError / TypeError now if prune_model would reject these settings for this model
    (no decoder blocks, a layer pattern matching nothing, N:M not dividing a layer's in_features,
    an unknown method or option, a bad sparsity profile)."""
    blocks_name, blocks = find_blocks(model)
    planned = check_profile(sparsity, sparsity_profile, len(blocks), pattern, owl_m, owl_lambda).planned()
    _validate_layers(select_all(blocks, blocks_name, layers), blocks_name, pattern, planned)
    _validate_options(planned[0], pattern, method, options)


def _callable_name(f) -> str:
    return getattr(f, "__qualname__", repr(f))


def run_fingerprint(model: nn.Module, ids: torch.Tensor, blocks_name: str, n_blocks: int, *, method: str,
                    pattern: str, sparsity: BlockSparsity, options: dict, layers: LayerFilter,
                    gram_dtype: torch.dtype, device: torch.device) -> dict:
    """Everything that determines a pruning run's result, as compared by `--resume`: a content digest
    of every parameter and buffer of the dense model (admm_kernels._digest.model_digest: 0.38 s for the
    538 MB of SmolLM2-135M here, ~0.1 % of the embedded run), its config, the calibration token ids, the
    method, pattern, target sparsity, sparsity profile (its name and settings, and every block's
    sparsity) and options, the layer selection, the Gram dtype, the device type, the
    torch thread count on the CPU (BLAS reductions are split per thread: 1 vs 2 threads gave perplexity
    64.238 vs 64.301 for the same run), a forced kernel backend, and the versions of the code."""
    from .. import backends

    return fingerprint(
        model=type(model).__name__,
        config=model.config.to_json_string() if hasattr(model, "config") else None,
        blocks=f"{blocks_name}[{n_blocks}]", dense_model=model_digest(model),
        method=method, pattern=pattern, sparsity=sparsity.target, options=options,
        sparsity_profile=sparsity.fingerprint(),
        layers=_callable_name(layers) if callable(layers) else layers,
        calibration=ids, gram_dtype=gram_dtype, device=device.type,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        backend=os.environ.get(backends.ENV_VAR, "").strip().lower() or None,
        versions={k: v for k, v in versions().items() if k != "python"},
    )


def _layout(selected: list[dict[str, nn.Module]], end: int, ids: torch.Tensor) -> StateLayout:
    blocks = tuple({rel: (tuple(get_weight(m).shape), str(get_weight(m).dtype)) for rel, m in sel.items()}
                   for sel in selected[:end])
    return StateLayout(blocks=blocks, windows=(int(ids.shape[0]), int(ids.shape[1])))


def prune_model(model: nn.Module, calibration, sparsity: float | Sequence[float] = 0.5,
                pattern: str = "unstructured", method: str = "admm", *, sparsity_profile: str = "uniform",
                owl_m: float | None = None, owl_lambda: float | None = None,
                layers: LayerFilter = None, device: torch.device | str | None = None,
                offload: bool = False, gram_dtype: torch.dtype = torch.float32, progress: bool = False,
                state_dir: str | os.PathLike | None = None,
                callback: Callable[[int, dict], None] | None = None, **options) -> dict:
    """Prune every selected linear layer of a causal LM in place, block by block; return a report.

    model: a transformers decoder-only causal LM (any dtype; its blocks are moved to `device` one at a
        time and back). calibration: int token ids (nsamples, seqlen), e.g. from
        admm_kernels.data.calibration_windows. sparsity / pattern / method / **options: as prune_layer
        (sparsity is ignored by N:M patterns). layers: None (every nn.Linear / Conv1D inside the blocks;
        never the embeddings or LM head), a list of glob patterns ("self_attn.*", "mlp.down_proj") or a
        callable(full_name, module) -> bool. device: compute device (default: the model's; "meta" and
        unavailable devices are refused). offload: keep the (nsamples, seqlen, hidden) activations on the
        CPU instead of the device. gram_dtype: torch.float32 or torch.float64. progress: tqdm bars over
        blocks and layers.
        sparsity may also be a list of one value in [0, 1) per decoder block. sparsity_profile:
        "uniform" (every block at `sparsity`) or "owl" (Yin et al. 2024: blocks with a larger share of
        outlier Wanda scores are pruned less, the model's overall sparsity stays `sparsity`; owl_m = M,
        the outlier threshold over the block's mean score, default 5; owl_lambda = λ, the block
        sparsities span 2λ, default 0.08; one extra dense forward of the calibration data;
        unstructured and per-row patterns only; see admm_kernels.models.owl).
        state_dir: folder for resumable state, locked for the run (a second run on it fails at once,
        naming the holder's pid). A run started with the same settings continues from the last finished
        block with a bit-identical result. Pass the original dense model, freshly loaded: its content
        digest must equal the interrupted run's (the pruned blocks are restored from the state folder),
        and so must the calibration ids, every setting and the torch thread count (see run_fingerprint).
        Corrupt or foreign state raises StateError (a ValueError) before the model is touched.
        callback(block_index, report): called after each finished block (and its state save).

    On any exception the model is left where and as it was found: every block back on its device, no
    hooks, the original train/eval mode (weights of blocks already pruned stay pruned; with state_dir,
    rerun on a freshly loaded dense model to continue).

    Returns a JSON-able dict: model, blocks, method, pattern, sparsity (the target: for a per-block
    list, its mean weighted by the blocks' selected weights), sparsity_profile (name, target,
    block_sparsity; OWL: owl_m, owl_lambda, outlier_ratios), options, nsamples, seqlen,
    layers (per layer: name, block, shape, group, error, seconds, sparsity), achieved_sparsity
    (over the pruned layers), timings (profile, capture, forward, gram, solve, state, total seconds),
    threads (torch's CPU thread count, part of what makes a run reproducible), versions.
    """
    t_start = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    if gram_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    ids = check_calibration(calibration, model)
    request = check_profile(sparsity, sparsity_profile, len(blocks), pattern, owl_m, owl_lambda)
    selected = select_all(blocks, blocks_name, layers)
    _validate_layers(selected, blocks_name, pattern, request.planned())
    _validate_options(request.planned()[0], pattern, method, options)
    home = model_device(model)
    device = check_compute_device(device, "device") if device is not None else home
    act_device = torch.device("cpu") if offload else device
    # Blocks after the last one with selected layers need no work at all.
    end = max(i for i, sel in enumerate(selected) if sel) + 1

    store = PipelineState(state_dir) if state_dir is not None else None
    timings = {"profile": 0.0, "capture": 0.0, "forward": 0.0, "gram": 0.0, "solve": 0.0, "state": 0.0}
    report_layers: list[dict] = []
    start = 0
    was_training = model.training
    with store.lock() if store is not None else contextlib.nullcontext():
        state = None
        t = time.perf_counter()
        try:  # before the first block is pruned: OWL's dense pass (eval mode; no weight is changed)
            block_sparsity = request.resolve(model.eval(), blocks, selected, ids, device, act_device,
                                             progress)
        finally:
            model.train(was_training)
        _validate_layers(selected, blocks_name, pattern, block_sparsity.values)
        timings["profile"] = time.perf_counter() - t
        if store is not None:
            t = time.perf_counter()
            fp = run_fingerprint(model, ids, blocks_name, len(blocks), method=method, pattern=pattern,
                                 sparsity=block_sparsity, options=options, layers=layers,
                                 gram_dtype=gram_dtype, device=device)
            state = store.load(fp, _layout(selected, end, ids))  # verified before the model is touched
            timings["state"] += time.perf_counter() - t
        bar = None
        try:
            model.eval()
            with torch.no_grad():
                if state is not None:
                    start = state["next_block"]
                    report_layers = list(state["report"]["layers"])
                    for b in range(start):
                        for rel, w in store.block_weights(state, b).items():
                            set_weight(selected[b][rel], w)
                t = time.perf_counter()
                if start < end:
                    windows = range(0) if state is not None else None
                    acts, calls = capture_inputs(model, blocks, ids, device, act_device, windows)
                    if state is not None:
                        acts = store.activations(state).to(act_device)
                timings["capture"] = time.perf_counter() - t

                bar = _Bars(end, min(start, end), progress)
                for b in range(start, end):
                    block_report = _prune_block(
                        blocks[b], b, blocks_name, selected[b], calls[b], acts, device, gram_dtype,
                        dict(sparsity=block_sparsity.of(b), pattern=pattern, method=method, **options),
                        last=(b == end - 1), bar=bar, timings=timings)
                    report_layers.extend(block_report)
                    if store is not None:
                        t = time.perf_counter()
                        weights = {rel: get_weight(m) for rel, m in selected[b].items()}
                        state = store.save(fp, b + 1, weights, acts if b + 1 < end else None,
                                           {"layers": report_layers}, state)
                        timings["state"] += time.perf_counter() - t
                    bar.block_done()
                    if callback is not None:
                        callback(b, {"layers": block_report})
        finally:
            if bar is not None:
                bar.close()
            model.train(was_training)

    kept = sum(r["kept"] for r in report_layers)
    total = sum(r["numel"] for r in report_layers)
    timings["total"] = time.perf_counter() - t_start
    return {
        "model": type(model).__name__, "blocks": len(blocks), "blocks_name": blocks_name,
        "method": method, "pattern": pattern, "sparsity": block_sparsity.target,
        "sparsity_profile": block_sparsity.report(),
        "options": fingerprint(**options), "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
        "device": str(device), "offload": offload,
        "resumed_from_block": start if state_dir and start else None,
        "layers": report_layers, "achieved_sparsity": 1.0 - kept / total if total else 0.0,
        "timings": timings, "threads": torch.get_num_threads(), "versions": versions(),
    }


def _prune_block(block: nn.Module, index: int, blocks_name: str, layers: dict[str, nn.Module],
                 call: BlockCall, acts: torch.Tensor, device: torch.device, gram_dtype: torch.dtype,
                 prune_kwargs: dict, last: bool, bar: _Bars, timings: dict) -> list[dict]:
    """Prune one block in place and overwrite `acts` with its (pruned) outputs unless it is the last.
    The block is on `device` only inside this call: it goes back to its own device whatever happens."""
    home = next(block.parameters()).device
    try:
        block.to(device)
        return _prune_block_on_device(block, index, blocks_name, layers, call, acts, device, gram_dtype,
                                      prune_kwargs, last, bar, timings)
    finally:
        block.to(home)


def _prune_block_on_device(block: nn.Module, index: int, blocks_name: str, layers: dict[str, nn.Module],
                           call: BlockCall, acts: torch.Tensor, device: torch.device,
                           gram_dtype: torch.dtype, prune_kwargs: dict, last: bool, bar: _Bars,
                           timings: dict) -> list[dict]:
    from ..prune import prune_layer

    n = acts.shape[0]
    bar.start_block(index, (n if layers else 0) + len(layers) + (0 if last else n))
    hooks = GramHooks(layers, device, gram_dtype)
    try:
        t = time.perf_counter()
        for j in range(n if layers else 0):  # a block with nothing to prune only propagates
            call(block, acts[j:j + 1].to(device))
            if j == 0:
                hooks.finish_first_window()
            bar.step("gram")
        _sync(device)
        timings["forward"] += time.perf_counter() - t - hooks.seconds
        timings["gram"] += hooks.seconds
    finally:
        hooks.remove()

    out = []
    grams: dict[str, torch.Tensor] = {}  # one symmetric Gram per group, built once
    remaining = {}
    for rel in layers:
        leader = hooks.group_of.get(rel)
        remaining[leader] = remaining.get(leader, 0) + 1
    for rel, module in layers.items():
        full = f"{blocks_name}.{index}.{rel}"
        leader = hooks.group_of.get(rel)
        w = get_weight(module)
        if leader is None:  # the block's forward never called it: nothing to calibrate on
            out.append({"name": full, "block": index, "shape": list(w.shape), "group": None, "error": None,
                        "seconds": 0.0, "sparsity": 0.0, "kept": w.numel(), "numel": w.numel(),
                        "skipped": "not called by the block's forward"})
            bar.step("prune")
            continue
        t = time.perf_counter()
        try:
            if leader not in grams:
                grams[leader] = hooks.acc.pop(leader).gram
            res = prune_layer(w, grams[leader], **prune_kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {full}: {exc}") from exc
        set_weight(module, res.weight)
        remaining[leader] -= 1
        if not remaining[leader]:
            del grams[leader]  # free (in, in) fp32 as soon as its group is done
        _sync(device)
        seconds = time.perf_counter() - t
        timings["solve"] += seconds
        kept = int(res.mask.sum())
        out.append({"name": full, "block": index, "shape": list(w.shape),
                    "group": f"{blocks_name}.{index}.{leader}",
                    "error": float(res.error), "seconds": seconds, "sparsity": 1.0 - kept / w.numel(),
                    "kept": kept, "numel": w.numel(), "backends": res.stats.get("backends")})
        bar.step("prune", f"{rel} err={res.error:.3g}")
    del hooks

    if not last:
        t = time.perf_counter()
        for j in range(n):
            acts[j] = call(block, acts[j:j + 1].to(device))[0].to(acts.device)
            bar.step("forward")
        _sync(device)
        timings["forward"] += time.perf_counter() - t
    return out


class _Bars:
    """tqdm bars: one over blocks, one over the steps of the current block (windows and layers)."""

    def __init__(self, n_blocks: int, start: int, enabled: bool):
        self.enabled = enabled
        self.outer = self.inner = None
        if enabled:
            from tqdm.auto import tqdm
            self._tqdm = tqdm
            self.outer = tqdm(total=n_blocks, initial=start, desc="blocks", unit="block", file=sys.stderr)

    def start_block(self, index: int, steps: int) -> None:
        self.index = index
        if self.enabled:
            if self.inner is not None:
                self.inner.close()
            self.inner = self._tqdm(total=steps, desc=f"block {index}", unit="step", leave=False,
                                    file=sys.stderr)

    def step(self, stage: str, postfix: str | None = None) -> None:
        if self.inner is not None:
            self.inner.set_description_str(f"block {self.index} {stage}", refresh=False)
            if postfix:
                self.inner.set_postfix_str(postfix, refresh=False)
            self.inner.update(1)

    def block_done(self) -> None:
        if self.outer is not None:
            self.outer.update(1)

    def close(self) -> None:
        for b in (self.inner, self.outer):
            if b is not None:
                b.close()


def default_state_dir(out: str | os.PathLike) -> Path:
    """Where the CLI keeps the resumable state of a run writing to `out`: a sibling folder."""
    p = Path(out)
    return p.with_name(p.name + ".state")
