"""SparseLinear: an nn.Linear replacement that stores its weight packed (N:M or CSR) and multiplies sparse.

Storage (buffers, so `.to()` moves them and they are in the state dict): for N:M ``values`` and ``meta``,
for unstructured ``crow``, ``col`` and ``values`` (see formats.py); ``bias`` (out,) or None.
Forward: x (..., in) -> (..., out) in x's dtype, any leading batch shape.

How it computes (chosen per call from the device and the number of rows of x; `repr` says which):
  CPU, compiled kernels present (admm_kernels._C):
    2:4 (1:4-like N:M: through the CSR kernel): the sparse kernel for up to `max_sparse_batch` rows,
      else the weight is unpacked (one C++ pass) and multiplied densely. Measured single thread, 2:4
      fp32 values vs dense fp32 F.linear (benchmarks/sparse_bench.py, LLaMA-7B shapes): batch 1
      1.35-1.9x, batch 4 2.5-4x, batch 16 1.0-1.2x; fp16-stored values 2.5-2.8x at batch 1. Above ~16
      rows the dense GEMM is compute bound and 2:4's index work no longer pays.
    unstructured: the CSR kernel when the weight is >= 80 % sparse (below that CSR loses to dense GEMV).
  CPU without kernels, patterns where the kernel is slower, any other device: a dense copy of the weight
    is kept and nn.Linear's maths used ("dense fallback" in repr, with the reason).
  CUDA, 2:4 in fp16/bf16: torch's semi-structured sparse tensor (CUTLASS / cuSPARSELt) when this torch
    build has it and the shape suits it; otherwise the dense fallback.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from .. import backends
from .formats import FLOAT_DTYPES, PackedCSR, PackedNM, detect_pattern, parse_packed_pattern

log = logging.getLogger("admm_kernels")

# Rows of x up to which the CPU sparse kernels run (above: unpack + dense GEMM); see module docstring.
# (CSR at 90 %: 3.3-3.6x at batch 1, 3.7-8x at batch 4, 4.4-6.9x at batch 16, so it keeps going to 32.)
MAX_SPARSE_BATCH = {"2:4": 16, "nm": 8, "unstructured": 32}
# Unstructured weights sparser than this use the CSR kernel (90 %: 3.3x faster than dense at batch 1;
# the kernel's cost is ~1.5x a dense GEMV's per stored weight, so below ~80 % it stops paying).
CSR_MIN_SPARSITY = 0.8
# Other N:M patterns (1:4, 2:8, ...): the generic N:M kernel decodes positions value by value and loses
# to dense (measured 0.1-0.3x for 2048x4096 at batch 1-32), so at most this density they run the CSR
# kernel on an int16 index copy made once (values + 2 bytes a kept weight: 1:4 fp32 is 37 % of dense
# memory); denser ones use the dense fallback.
NM_MAX_DENSITY = 0.25


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored packed. Build with SparseLinear.from_dense(linear, pattern)."""

    def __init__(self, packed: PackedNM | PackedCSR, bias: torch.Tensor | None = None,
                 max_sparse_batch: int | None = None) -> None:
        super().__init__()
        if not isinstance(packed, (PackedNM, PackedCSR)):
            raise TypeError(f"packed must be PackedNM or PackedCSR, got {type(packed).__name__}")
        packed.validate()
        self.out_features, self.in_features = packed.shape
        if isinstance(packed, PackedNM):
            self.kind, self.n, self.m = "nm", packed.n, packed.m
        else:
            self.kind, self.n, self.m = "unstructured", 0, 0
        for name, t in packed.tensors().items():
            self.register_buffer(name, t)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        key = "2:4" if self.pattern == "2:4" else ("nm" if self.kind == "nm" else "unstructured")
        self.max_sparse_batch = MAX_SPARSE_BATCH[key] if max_sparse_batch is None else int(max_sparse_batch)
        nnz = packed.nnz if isinstance(packed, PackedCSR) else int((packed.values != 0).sum())
        self.sparsity = 1.0 - nnz / max(1, self.out_features * self.in_features)
        self._dense_cache: dict[tuple, torch.Tensor] = {}   # (device, dtype) -> dense weight (fallback)
        self._semi_cache: dict[tuple, object] = {}          # (device, dtype) -> semi-structured weight
        self._semi_failed: str = ""
        self._plans: dict[torch.device, tuple] = {}  # device -> (mode, bound kernel or None)
        # load_state_dict(assign=True) swaps the buffers: drop kernels bound to the old ones, and check the
        # new ones (the C++ kernels trust their index data).
        self.register_load_state_dict_post_hook(SparseLinear._after_load)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str | None = None, *, dtype: torch.dtype | None = None,
                   max_sparse_batch: int | None = None) -> SparseLinear:
        """Pack `linear`'s (out, in) weight. pattern: None (detect), "2:4", "N:M" or "unstructured".

        dtype: storage dtype (fp32/bf16/fp16; default the weight's). The layer is not modified.
        Raises ValueError if the weight does not have the pattern (or, with pattern=None, has no zeros).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        w = linear.weight.detach()
        if dtype is not None:
            w = w.to(dtype)
        if pattern is None:
            pattern = detect_pattern(w)
            if pattern is None:
                raise ValueError(
                    f"linear.weight {tuple(w.shape)} has no zeros; prune it first or pass "
                        "pattern='unstructured'"
                )
        stored = parse_packed_pattern(pattern)
        kind, n, m = stored.kind, stored.n, stored.m
        packed = PackedNM.pack(w, n, m) if kind == "nm" else PackedCSR.pack(w)
        bias = None if linear.bias is None else linear.bias.detach().to(w.dtype)
        return cls(packed, bias, max_sparse_batch)

    # --- views --------------------------------------------------------------------------------------
    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else "unstructured"

    @property
    def packed(self) -> PackedNM | PackedCSR:
        shape = (self.out_features, self.in_features)
        if self.kind == "nm":
            return PackedNM(self.values, self.meta, self.n, self.m, shape)
        return PackedCSR(self.crow, self.col, self.values, shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight, materialised on each access (for code that reads .weight)."""
        return self.packed.unpack()

    def _after_load(self, *args) -> None:
        self._clear_caches()
        self.packed.validate()

    def _clear_caches(self, *args) -> None:
        self._dense_cache.clear()
        self._semi_cache.clear()
        self._semi_failed = ""
        self._plans.clear()

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half(): caches (and kernels bound to the buffers) belong to the old tensors.
        self._clear_caches()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # deepcopy/pickle: the bound kernels in _plans would keep pointing at the original's buffers.
        state = dict(super().__getstate__())
        state.update(_dense_cache={}, _semi_cache={}, _plans={}, _semi_failed="")
        return state

    # --- compute selection ----------------------------------------------------------------------------
    def compute_plan(self, device: torch.device | None = None) -> tuple[str, str]:
        """(mode, reason) for inputs on `device`: mode is "sparse", "semi-structured" or "dense"."""
        device = torch.device(device) if device is not None else self.values.device
        if device.type == "cpu":
            from ..backends import cpu

            if not cpu.has_sparse_kernels():
                why = cpu.unavailable_reason() or "not built"
                return "dense", f"compiled sparse CPU kernels unavailable: {why}"
            if self.kind == "unstructured" and self.sparsity < CSR_MIN_SPARSITY:
                return "dense", (f"{self.sparsity:.0%} sparse < {CSR_MIN_SPARSITY:.0%}: "
                                 "the CSR kernel is slower than dense here")
            if self.kind == "nm" and self.pattern != "2:4":
                if self.n / self.m > NM_MAX_DENSITY:
                    return "dense", (f"{self.pattern} keeps {self.n / self.m:.0%} of the weights: "
                                     "the generic N:M kernel is slower than dense")
                return "sparse", (f"CSR kernel on an index copy for <= {self.max_sparse_batch} rows, "
                                  "unpack + dense GEMM above")
            return "sparse", f"CPU kernel for <= {self.max_sparse_batch} rows, unpack + dense GEMM above"
        if device.type == "cuda" and self.pattern == "2:4":
            why = _semi_structured_unavailable(self.dtype, self.out_features, self.in_features)
            if why:
                return "dense", why
            if self._semi_failed:
                return "dense", self._semi_failed
            return "semi-structured", "torch semi-structured 2:4 (CUTLASS/cuSPARSELt)"
        return "dense", f"no sparse kernel for {self.pattern} on {device.type}"

    def extra_repr(self) -> str:
        mode, why = self.compute_plan()
        how = f"sparse ({why})" if mode != "dense" else f"dense fallback ({why})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
                f"pattern={self.pattern}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"sparsity={self.sparsity:.1%}, compute={how}")

    # --- forward --------------------------------------------------------------------------------------
    def _dense(self, device: torch.device, dtype: torch.dtype, cache: bool) -> torch.Tensor:
        key = (device, dtype)
        w = self._dense_cache.get(key)
        if w is None:
            w = self.packed.unpack().to(device=device, dtype=dtype)
            if cache:
                self._dense_cache[key] = w
        return w

    def _kernel(self, device: torch.device):
        """A function x2 (rows, in) -> (rows, out) running the sparse kernel on `device`, with this layer's
        buffers bound (built once per device: per-call Python overhead is a measurable share of a decode
        step - SmolLM2's 576x576 layer takes ~40 us dense; the dispatcher handle is bound directly because
        resolving torch.ops.admm_kernels.<op> costs ~6 us a call)."""
        def bind(op: str):
            name, fn = backends.select(op, device)
            return getattr(torch.ops.admm_kernels, op).default if name == "cpu" else fn

        if self.kind == "nm" and (self.n, self.m) != (2, 4):
            csr = PackedCSR.pack(self.packed.unpack())  # 1:4-like N:M: CSR kernel on an index copy
            fn = bind("csr_mm")
            crow, col, vals, cols = csr.crow, csr.col, csr.values, self.in_features
            return lambda x2: fn(x2, crow, col, vals, cols)
        if self.kind == "nm":
            fn = bind("sparse_nm_mm")
            vals, meta, n, m, cols = self.values, self.meta, self.n, self.m, self.in_features
            return lambda x2: fn(x2, vals, meta, n, m, cols)
        fn = bind("csr_mm")
        crow, col, vals, cols = self.crow, self.col, self.values, self.in_features
        return lambda x2: fn(x2, crow, col, vals, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The plan (and ADMM_KERNELS_BACKEND) is resolved on the first call per device and cached.
        plan = self._plans.get(x.device)
        if plan is None:
            mode = self.compute_plan(x.device)[0]
            plan = self._plans[x.device] = (mode, self._kernel(x.device) if mode == "sparse" else None)
        mode, kernel = plan
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if kernel is not None and x2.shape[0] <= self.max_sparse_batch:
            y = kernel(x2)
            if bias is not None:
                y = y + bias
        elif mode == "semi-structured" and x.dtype == self.dtype:
            y = self._semi_forward(x2, bias)
        else:
            # Cache the dense copy only when it is the layer's normal path (fallback); a large batch on a
            # sparse layer unpacks per call so the layer keeps its small memory footprint.
            w = self._dense(x.device, x.dtype, cache=(mode == "dense"))
            y = F.linear(x2, w, bias)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _semi_forward(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        key = (x2.device, x2.dtype)
        w = self._semi_cache.get(key)
        try:
            if w is None:
                from torch.sparse import to_sparse_semi_structured

                w = to_sparse_semi_structured(self._dense(x2.device, x2.dtype, cache=False))
                self._semi_cache[key] = w
            return F.linear(x2, w, bias)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # unsupported shape/arch: fall back once
            self._plans.clear()  # re-plan: compute_plan now reports the failure
            self._semi_failed = f"semi-structured 2:4 failed ({type(e).__name__}: {str(e)[:120]})"
            log.info("admm_kernels: SparseLinear %s; using dense", self._semi_failed)
            self._semi_cache.pop(key, None)
            return F.linear(x2, self._dense(x2.device, x2.dtype, cache=True), bias)


def _semi_structured_unavailable(dtype: torch.dtype, rows: int, cols: int) -> str:
    """Why torch's semi-structured 2:4 cannot serve this weight ("" when it can)."""
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return "torch.sparse.to_sparse_semi_structured unavailable in this torch"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured 2:4 needs fp16/bf16 storage, layer is {str(dtype).replace('torch.', '')}"
    # CUTLASS/cuSPARSELt need rows % 32 == 0 and cols % 64 == 0 (checked up front instead of failing in
    # the first forward on a device that cannot handle it).
    if rows % 32 or cols % 64:
        return f"semi-structured 2:4 needs out % 32 == 0 and in % 64 == 0, got ({rows}, {cols})"
    return ""


def sparsify(model: nn.Module, pattern: str | None = None, *, min_sparsity: float = 0.5,
             dtype: torch.dtype | None = None, inplace: bool = False,
             skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every eligible nn.Linear of `model` with a SparseLinear; returns the model.

    Eligible: its weight has an N:M pattern (2:4 first; or exactly `pattern` when given), or is at least
    `min_sparsity` sparse (unstructured) - weights shared with another module (tied embeddings) and
    names listed in `skip` are left alone. dtype: storage dtype of the packed weights (default: as is).
    inplace=False (default) works on a deep copy, so `model` itself is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if pattern is not None:
        parse_packed_pattern(pattern)
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    converted = 0
    for name, layer in eligible_linears(model, pattern, min_sparsity, skip):
        set_submodule(model, name, SparseLinear.from_dense(layer, layer_pattern(layer, pattern), dtype=dtype))
        converted += 1
    log.info("admm_kernels: sparsify converted %d linear layers", converted)
    return model


def layer_pattern(layer: nn.Linear, pattern: str | None) -> str | None:
    """The pattern `layer` is packed with: `pattern` if given, else the detected one."""
    return pattern if pattern is not None else detect_pattern(layer.weight.detach())


def eligible_linears(model: nn.Module, pattern: str | None, min_sparsity: float,
                     skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the nn.Linear layers sparsify() converts (see there)."""
    from .formats import max_group_count, sparsity

    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear) or name in skip or counts.get(id(layer.weight), 0) > 1:
            continue
        w = layer.weight.detach()
        if w.dtype not in FLOAT_DTYPES or w.numel() == 0:
            continue
        if pattern is not None:
            stored = parse_packed_pattern(pattern)
            kind, n, m = stored.kind, stored.n, stored.m
            ok = (w.shape[1] % m == 0 and max_group_count(w, m) <= n) if kind == "nm" else \
                sparsity(w) >= min_sparsity
        else:
            found = detect_pattern(w)
            ok = found is not None and (found != "unstructured" or sparsity(w) >= min_sparsity)
        if ok:
            out.append((name, layer))
    return out


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """model.<name> = module for a dotted name."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
