"""Matrix parameters that a block uses directly as the weight of a linear map, not through nn.Linear.

Some blocks hold weights as plain ``nn.Parameter`` s and multiply by them themselves:
``F.linear(x, self.weight[i])`` per expert (JetMoE's mixture of attention heads and experts),
``torch.einsum("ibh,hnd->ibnd", h, self.q)`` (XLNet's relative attention, (in, heads, head_dim)),
``self.x_proj_weight[:, None] @ x`` per Mamba head (Zamba), ``torch.bmm(x, self.gate_proj.transpose(1, 2))``
(shared experts kept as 3-D tensors), ``F.linear(x, self.fn.float())`` (hyper-connection mixers),
``states @ self.proj`` (a relative-position projection). Which parameter is used how cannot be read
from the module tree, so it is observed: a torch function mode (:class:`_Watch`) sees every torch
call while the model runs and, whenever an operand shares storage with a watched parameter, works out
the linear map it is used for:

- ``F.linear(x, W)``: W is the (out, in) weight, the rows of x its inputs;
- ``matmul`` / ``mm`` / ``bmm`` / ``@`` (and ``addmm`` / ``baddbmm``): ``x @ W`` uses W as (in, out),
  ``W @ x`` as (out, in) on the columns of x; W's batch dimensions (broadcast against x's) give one
  linear map per index, each fed by the rows of x at that index;
- ``einsum`` with two operands: the parameter's letters shared with x and summed are its inputs, those
  kept in the output its outputs, those in both and the output its batch (one map per index).

Each map is recorded as an (out, in) *view* of the parameter (:class:`ViewSpec`: sizes, strides and
offset into it), so pruning writes straight into the parameter. Copies that keep the layout (``.float()``
of a float32 parameter is itself; of a bf16 one a float32 copy with the same strides) are followed back
to the parameter. A parameter becomes prunable layers (:class:`ParamLinear`, one per distinct view) only
when every one of its uses is such a map and its views tile it exactly (each weight in one map); anything
else (used elementwise, as an operand of another op, with another parameter, with overlapping or partial
views, never used) keeps it dense, with the reason (:attr:`PlainLayers.refused`), and the coverage
accounting reports it (admm_kernels.models.coverage).

Discovery runs the model's own forward once on TRACE_TOKENS tokens (:func:`trace_blocks`, called by
admm_kernels.models.discovery.find_blocks when some block has such candidate parameters; the result is
kept per block). During pruning, :class:`PlainInputs` puts the same mode around the block's forward and
reports each map's input rows, as a forward pre-hook does for nn.Linear.
"""

from __future__ import annotations

import itertools
import math
import string
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# Tokens of the tracing forward: enough to reach every path a token can take in a tiny forward, few
# enough to cost nothing next to pruning.
TRACE_TOKENS = 16
# Most linear maps one operation may split into (its batch indices); more is not a weight use.
MAX_VIEWS = 4096


@dataclass(frozen=True)
class ViewSpec:
    """An (out, in) view of a parameter: as_strided(size, stride, offset elements after its first)."""

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: int

    def view(self, base: torch.Tensor) -> torch.Tensor:
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


class ParamLinear(nn.Module):
    """One linear map held in a plain parameter, as an (out, in) layer.

    Not registered in the model (kept in a plain dict, like admm_kernels.models.experts.ExpertProjection):
    it holds the module owning the parameter, the parameter's name, the view and the block whose forward
    uses it (`scope`, where PlainInputs watches). weight_view() is the (out, in) view into the parameter
    (no copy); writing into it prunes the model."""

    def __init__(self, owner: nn.Module, pname: str, spec: ViewSpec, base_stride: tuple[int, ...],
                 scope: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not submodules: no parameters of its own
        object.__setattr__(self, "scope", scope)
        self.pname = pname
        self.spec = spec
        self.base_stride = base_stride

    def parameter(self) -> nn.Parameter:
        """The parameter this layer is a view of."""
        return getattr(self.owner, self.pname)

    def view_of(self, base: torch.Tensor) -> torch.Tensor:
        """The same (out, in) view of `base`, a tensor laid out like the parameter."""
        if tuple(base.stride()) != self.base_stride:
            raise ValueError(f"{self.pname}: its tensor now has strides {tuple(base.stride())}, not the "
                             f"{self.base_stride} it had when its uses were traced")
        return self.spec.view(base)

    def weight_view(self) -> torch.Tensor:
        """(out, in) view into the parameter."""
        return self.view_of(self.parameter().data)

    def extra_repr(self) -> str:
        return f"{self.pname}, size={self.spec.size}"


@dataclass
class PlainLayers:
    """What tracing found in one block: layers {name relative to the block: ParamLinear} in module order,
    and refused {parameter name relative to the block: why it is not a linear weight}."""

    layers: dict[str, ParamLinear] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    candidates: frozenset = frozenset()  # id() of the parameters traced: a changed block is traced again


class _Refusal(Exception):
    """An operation uses a watched parameter in a way that is not one linear map of the other operand."""


def _extent(t: torch.Tensor) -> int:
    """Elements of storage spanned by t, from its first (0 when empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


@dataclass
class _Source:
    key: int                 # id() of the parameter
    lo: int                  # storage offsets this source covers: [lo, hi)
    hi: int
    delta: int               # add to a storage offset in it to get the offset from the parameter's first


class _Sources:
    """Storage -> the watched parameters in it, and same-layout copies of them (dtype casts)."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.by_ptr: dict[int, list[_Source]] = {}
        self.params: dict[int, nn.Parameter] = {}
        self.keep: list[torch.Tensor] = []    # casts stay alive while watched: their storage is not reused
        for p in params:
            self.params[id(p)] = p
            lo = p.storage_offset()
            self._add(p.untyped_storage().data_ptr(), _Source(id(p), lo, lo + _extent(p), -lo))

    def _add(self, ptr: int, src: _Source) -> None:
        if ptr:
            self.by_ptr.setdefault(ptr, []).append(src)

    def locate(self, t) -> _Source | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.numel() == 0:
            return None
        try:
            found = self.by_ptr.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, functional wrappers)
            return None
        if not found:
            return None
        lo = t.storage_offset()
        hi = lo + _extent(t)
        return next((s for s in found if s.lo <= lo and hi <= s.hi), None)

    def add_cast(self, source: _Source, before: torch.Tensor, after: torch.Tensor) -> None:
        """after: a copy of `before` (located at source) with the same sizes and strides."""
        self.keep.append(after)
        lo = after.storage_offset()
        delta = before.storage_offset() + source.delta - lo
        self._add(after.untyped_storage().data_ptr(), _Source(source.key, lo, lo + _extent(after), delta))

    def spec(self, src: _Source, w: torch.Tensor) -> ViewSpec:
        if w.dim() != 2 or 0 in w.stride():
            raise _Refusal("a linear weight that is not a plain (out, in) matrix")
        return ViewSpec(tuple(w.shape), tuple(w.stride()), w.storage_offset() + src.delta)


_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
           torch.Tensor.bmm}
_ADDMM = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm}
_EINSUM = {torch.einsum}
_CASTS = {torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.to,
          torch.Tensor.type, torch.Tensor.type_as}


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else (kwargs or {}).get(name)


def _check_view_count(ranges: list[range], what: str) -> None:
    """Refuse a product that would split into more than MAX_VIEWS linear maps (one per batch index)."""
    count = math.prod(len(r) for r in ranges)
    if count > MAX_VIEWS:
        raise _Refusal(f"{what} splitting into {count} linear maps")


def _matmul_maps(w: torch.Tensor, x: torch.Tensor, weight_first: bool
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(W (out, in) view, rows (n, in))] of ``w @ x`` (weight_first) or ``x @ w``."""
    if w.dim() < 2:
        raise _Refusal("a matrix-vector product with a parameter vector")
    if weight_first:
        wm = w                                           # (..., out, in)
        xr = (x.unsqueeze(-1) if x.dim() == 1 else x).transpose(-1, -2)  # columns as rows: (..., n, in)
    else:
        wm = w.transpose(-1, -2)                         # (..., in, out) -> (..., out, in)
        xr = x.unsqueeze(0) if x.dim() == 1 else x       # (..., m, in)
    batch = torch.broadcast_shapes(wm.shape[:-2], xr.shape[:-2])
    nd = len(batch)
    wm = wm[(None,) * (nd - (wm.dim() - 2))]
    xr = xr.expand(*batch, *xr.shape[-2:])
    ranges = [range(s) if wm.shape[d] > 1 else range(1) for d, s in enumerate(batch)]
    _check_view_count(ranges, "a batched product")
    out = []
    for idx in itertools.product(*ranges):
        sel = tuple(i if wm.shape[d] > 1 else slice(None) for d, i in enumerate(idx))
        out.append((wm[idx], xr[sel].reshape(-1, wm.shape[-1])))
    return out


def _einsum_maps(equation: str, w: torch.Tensor, x: torch.Tensor, w_first: bool
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(W (out, in) view, rows (n, in))] of a two-operand einsum of parameter w and input x."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        raise _Refusal("an einsum of more than two operands")
    ws, xs = (subs[0], subs[1]) if w_first else (subs[1], subs[0])
    if not arrow:  # implicit output: the letters that occur once, sorted
        letters = lhs.replace(",", "").replace(".", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if "..." in ws:
        raise _Refusal("an einsum with an ellipsis on the parameter")
    if "..." in xs:
        free = [c for c in string.ascii_letters if c not in eq]
        n = x.dim() - (len(xs) - 3)
        fill = "".join(free[:n])
        xs, out = xs.replace("...", fill), out.replace("...", fill)
    if len(set(ws)) != len(ws) or len(set(xs)) != len(xs) or len(ws) != w.dim() or len(xs) != x.dim():
        raise _Refusal("an einsum with a repeated index")
    size = {c: w.shape[i] for i, c in enumerate(ws)}
    ins = [c for c in ws if c in xs and c not in out]
    outs = [c for c in ws if c not in xs and c in out]
    batch = [c for c in ws if c in xs and c in out and size[c] > 1]
    if any(c not in xs and c not in out for c in ws) or any(c not in ws and c not in out for c in xs):
        raise _Refusal("an einsum summing over an index of one operand only")
    if not ins or not outs:
        raise _Refusal("an einsum that is not a linear map of the input")
    rows = [c for c in xs if c not in ins and c not in batch]
    # the parameter as (batch..., out..., in...); size-1 batch letters are indexed away, x keeps them
    ones = [c for c in ws if c not in ins and c not in outs and c not in batch]
    perm = w.permute([ws.index(c) for c in batch + outs + ins + ones])
    perm = perm[(Ellipsis,) + (0,) * len(ones)] if ones else perm
    xr = torch.einsum(f"{xs}->{''.join(batch + rows + ins)}", x)
    n_out, n_in = math.prod(size[c] for c in outs), math.prod(size[c] for c in ins)
    ranges = [range(size[c]) for c in batch]
    _check_view_count(ranges, "an einsum")
    maps = []
    for idx in itertools.product(*ranges):
        wi = perm[idx].reshape(n_out, n_in)
        if wi.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
            raise _Refusal("an einsum whose weight is no (out, in) view of the parameter")
        at = tuple(0 if x.shape[xs.index(c)] == 1 else i for c, i in zip(batch, idx))  # x broadcast
        maps.append((wi, xr[at].reshape(-1, n_in)))
    return maps


class _Watch(TorchFunctionMode):
    """A torch function mode reporting each use of a watched parameter: on_use(source, spec, rows) for a
    linear map, on_other(key, why) for anything else that reads its values."""

    def __init__(self, sources: _Sources, on_use: Callable[[_Source, ViewSpec, torch.Tensor], None],
                 on_other: Callable[[int, str], None]):
        super().__init__()
        self.sources = sources
        self.on_use = on_use
        self.on_other = on_other

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        hits = [(t, s) for t in _tensors(args, kwargs) if (s := self.sources.locate(t)) is not None]
        if hits:
            self._inspect(func, args, kwargs, hits, result)
        return result

    def _inspect(self, func, args, kwargs, hits, result) -> None:
        name = getattr(func, "__name__", repr(func))
        try:
            maps = self._maps(func, args, kwargs)
        except _Refusal as why:
            for _, s in hits:
                self.on_other(s.key, f"{why} ({name})")
            return
        except Exception as e:  # an operand layout the analysis did not foresee: never break the forward
            for _, s in hits:
                self.on_other(s.key, f"a use that could not be analysed ({name}: {type(e).__name__})")
            return
        if maps is not None:
            for src, w, rows in maps:
                try:
                    spec = self.sources.spec(src, w)
                except _Refusal as why:
                    self.on_other(src.key, f"{why} ({name})")
                    continue
                self.on_use(src, spec, rows)
            return
        outs = [result] if isinstance(result, torch.Tensor) else \
            [r for r in result if isinstance(r, torch.Tensor)] if isinstance(result, (tuple, list)) else []
        if func in _CASTS and len(hits) == 1 and len(outs) == 1:
            before, after = hits[0][0], outs[0]
            if after.shape == before.shape and after.stride() == before.stride():
                if self.sources.locate(after) is None:
                    self.sources.add_cast(hits[0][1], before, after)
                return
        for _, s in hits:  # a view (indexing, transpose, reshape) or a metadata query: not a use yet
            if any((o_src := self.sources.locate(o)) is None or o_src.key != s.key for o in outs):
                self.on_other(s.key, f"used by {name}")

    def _maps(self, func, args, kwargs) -> list[tuple[_Source, torch.Tensor, torch.Tensor]] | None:
        """The linear maps of a multiplying call, None for any other call."""
        loc = self.sources.locate
        if func in _LINEAR:
            x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
            if loc(x) is not None:
                raise _Refusal("a parameter used as the input of a linear map")
            src = loc(w)
            if src is None:
                return []
            if w.dim() != 2:
                raise _Refusal("a linear weight that is not 2-D")
            return [(src, w, x.reshape(-1, w.shape[-1]))]
        if func in _MATMUL or func in _ADDMM:
            if func in _ADDMM:
                if loc(_arg(args, kwargs, 0, "input")) is not None:
                    raise _Refusal("a parameter added to a product")
                a, b = _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
                if a is None:
                    a, b = kwargs.get("batch1"), kwargs.get("batch2")
            else:
                a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
            la, lb = loc(a), loc(b)
            if la is not None and lb is not None:
                raise _Refusal("a product of two parameters")
            if la is None and lb is None:
                return []
            src, w, x = (la, a, b) if la is not None else (lb, b, a)
            return [(src, wi, rows) for wi, rows in _matmul_maps(w, x, weight_first=la is not None)]
        if func in _EINSUM:
            equation = args[0]
            ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            found = [i for i, t in enumerate(ops) if loc(t) is not None]
            if not found:
                return []
            if len(ops) != 2 or len(found) != 1:
                raise _Refusal("an einsum of a parameter with more than one other operand or parameter")
            i = found[0]
            w, x = ops[i], ops[1 - i]
            src = loc(w)
            return [(src, wi, rows) for wi, rows in _einsum_maps(equation, w, x, w_first=i == 0)]
        return None


# ---- discovery -----------------------------------------------------------------------------------------

_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def traced(block: nn.Module) -> PlainLayers | None:
    """What trace_blocks found in `block` (None when it was not traced)."""
    return _TRACED.get(block)


def _owner_name(rel: str) -> tuple[str, str]:
    owner, _, pname = rel.rpartition(".")
    return owner, pname


@torch.no_grad()
def trace_blocks(model: nn.Module, blocks: nn.ModuleList, candidates: list[dict[str, nn.Parameter]]) -> None:
    """Trace the uses of each block's candidate parameters ({name relative to the block: parameter}) with
    one forward of the model on TRACE_TOKENS tokens; the results are kept per block (traced()). A block
    traced before with the same candidates is not traced again."""
    todo = [i for i, c in enumerate(candidates)
            if c and (traced(blocks[i]) is None
                      or traced(blocks[i]).candidates != frozenset(id(p) for p in c.values()))]
    if not todo:
        return
    params = {id(p): p for i in todo for p in candidates[i].values()}
    specs: dict[int, dict[ViewSpec, None]] = {k: {} for k in params}
    others: dict[int, list[str]] = {k: [] for k in params}
    failure = _run_traced(model, params, specs, others)
    for i in todo:
        block = blocks[i]
        found = PlainLayers(candidates=frozenset(id(p) for p in candidates[i].values()))
        for rel, p in candidates[i].items():
            if failure:
                found.refused[rel] = failure
                continue
            views, why = _resolve(p, list(specs[id(p)]), others[id(p)])
            if views is None:
                found.refused[rel] = why
                continue
            owner_rel, pname = _owner_name(rel)
            owner = block.get_submodule(owner_rel) if owner_rel else block
            for j, spec in enumerate(views):
                name = rel if len(views) == 1 else f"{rel}.{j}"
                found.layers[name] = ParamLinear(owner, pname, spec, tuple(p.stride()), block)
        _TRACED[block] = found


def _run_traced(model: nn.Module, params: dict[int, nn.Parameter], specs: dict, others: dict) -> str | None:
    """One forward of the model with the uses of `params` recorded; the reason it could not run, or None."""
    if any(p.device.type == "meta" for p in params.values()):
        return "its weights are not loaded (meta device), so its uses cannot be traced"
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else next(iter(params.values())).device
    vocab = getattr(emb, "num_embeddings", None) or TRACE_TOKENS
    ids = (torch.arange(TRACE_TOKENS) % vocab).unsqueeze(0).to(device)
    sources = _Sources(params.values())

    def on_use(src, spec, rows):
        specs[src.key][spec] = None

    def on_other(key, why):
        others[key].append(why)
    was_training = model.training
    model.eval()
    try:
        with _Watch(sources, on_use, on_other):
            try:
                model(input_ids=ids, use_cache=False)
            except TypeError:
                model(input_ids=ids)
    except Exception as e:  # any failure leaves the parameters dense, with the reason
        return f"tracing the model's forward to find its uses failed: {type(e).__name__}: {e}"[:300]
    finally:
        model.train(was_training)
    return None


def _resolve(p: nn.Parameter, views: list[ViewSpec], others: list[str]) -> tuple[list[ViewSpec] | None, str]:
    """The views of p as linear weights in storage order, when they tile it exactly; else None and why."""
    if others:
        return None, "used other than as a linear weight: " + "; ".join(sorted(set(others))[:3])
    if not views:
        return None, "never used as a linear weight in the traced forward"
    views = sorted(views, key=lambda s: (s.offset, s.stride, s.size))
    cover = torch.zeros(_extent(p), dtype=torch.uint8)
    for v in views:
        cover.as_strided(v.size, v.stride, v.offset).add_(1)
    own = cover.as_strided(tuple(p.shape), tuple(p.stride()), 0)
    if int(cover.max()) > 1:
        return None, "its uses as linear weights overlap (some weights in two linear maps)"
    if int(cover.sum()) != p.numel() or not bool(own.eq(1).all()):
        return None, "only part of it is used as a linear weight"
    return views, ""


# ---- calibration inputs ------------------------------------------------------------------------------------

class PlainInputs:
    """Reports the inputs of a block's ParamLinear layers: on_input(name, rows (n, in)) for each use of
    one of their views while the block runs (the torch function mode is pushed by a forward pre-hook on
    the block and popped by a forward hook that also runs when the forward raises)."""

    def __init__(self, scope: nn.Module, layers: dict[str, ParamLinear],
                 on_input: Callable[[str, torch.Tensor], None]):
        self.on_input = on_input
        self.names: dict[tuple[int, ViewSpec], str] = {}
        params: dict[int, nn.Parameter] = {}
        for name, m in layers.items():
            p = m.parameter()
            params[id(p)] = p
            self.names[(id(p), m.spec)] = name
        self.params = list(params.values())
        self.modes: list[_Watch] = []
        self.handles = [scope.register_forward_pre_hook(self._enter),
                        scope.register_forward_hook(self._exit, always_call=True)]

    def _use(self, src: _Source, spec: ViewSpec, rows: torch.Tensor) -> None:
        name = self.names.get((src.key, spec))
        if name is None:
            return
        if rows.numel() == 0:
            # no rows for this map in this window: an empty view of its own storage, so that grouping
            # layers by input storage never joins two maps that both saw nothing
            rows = torch.empty((1, rows.shape[-1]), dtype=rows.dtype, device=rows.device)[:0]
        self.on_input(name, rows)

    def _enter(self, module, args) -> None:
        mode = _Watch(_Sources(self.params), self._use, lambda key, why: None)  # storage moves with .to()
        mode.__enter__()
        self.modes.append(mode)

    def _exit(self, module, args, output) -> None:
        if self.modes:
            self.modes.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        while self.modes:
            self.modes.pop().__exit__(None, None, None)


def plain_input_hooks(layers: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]
                      ) -> list[PlainInputs]:
    """One PlainInputs per block among the ParamLinear layers of `layers`."""
    by_scope: dict[int, tuple[nn.Module, dict[str, ParamLinear]]] = {}
    for name, m in layers.items():
        if isinstance(m, ParamLinear):
            by_scope.setdefault(id(m.scope), (m.scope, {}))[1][name] = m
    return [PlainInputs(scope, group, on_input) for scope, group in by_scope.values()]
