"""Catching what the decoder blocks receive: the first block's hidden states for every calibration
window, and every block's other arguments (attention mask, position ids, rotary position embeddings,
cache arguments, ...), exactly as the model's own forward builds them.

How: the blocks are temporarily replaced by parameter-free stubs that record their call and pass the
hidden states through (so `model.to(device)` then moves only the embeddings, rotary tables and head:
the dense blocks never have to fit on the device). For the first window every stub records its
arguments, because they can differ per block (Gemma 2 / Qwen sliding-window layers get another mask);
the last stub raises to stop the forward before the LM head. For the other windows the first stub
raises at once. Windows are run one at a time (batch 1), so the recorded arguments fit every window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a stub to end the model's forward early."""


@dataclass
class BlockCall:
    """How one block is called, minus its hidden states: block(h, *args, **kwargs) or
    block(hidden_states=h, **kwargs) when the model passes the hidden states by keyword."""

    args: tuple
    kwargs: dict
    by_keyword: bool
    output_form: int = 0    # what the model expects back (as_output): 0 the tensor, 1 (h,) (it indexes [0]:
    #                         older transformers), 2 (h, None), 3 (h, None, None) (it unpacks two or
    #                         three values: Bamba's layers, RWKV's blocks)
    skipped: bool = False   # the model's forward does not call this block (Mllama's cross-attention
    #                         layers without an image): the hidden states pass it unchanged
    batch_dim: int = 0      # where the block's hidden states hold the batch: 0, or 1 for sequence-first
    #                         (L, 1, hidden) (XLNet) and stream-first (S, 1, L, hidden) (Gemma-3n's AltUp)

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output hidden states for `hidden` (1, ...), both batch first whatever the block's
        own layout."""
        if self.skipped:
            return hidden
        if self.batch_dim:
            hidden = hidden.movedim(0, self.batch_dim).contiguous()
        if self.by_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        out = block_output(out)
        return out.movedim(self.batch_dim, 0) if self.batch_dim else out


def block_output(out) -> torch.Tensor:
    """The hidden states of a block's output: the tensor itself (transformers 5.x) or the first item
    of a tuple / ModelOutput (older versions)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


def _no_cache(value):
    # A cache object recorded by a block would be mutated by every later call: never keep one.
    return None if type(value).__name__.endswith("Cache") else value


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
    if args:
        hidden, rest, by_kw = args[0], tuple(_no_cache(a) for a in args[1:]), False
    elif "hidden_states" in kwargs:
        hidden, rest, by_kw = kwargs.pop("hidden_states"), (), True
    else:
        raise ValueError("cannot find the hidden states among the block's arguments "
                         f"(no positional argument and no 'hidden_states' keyword; got {sorted(kwargs)})")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3 or 1 not in hidden.shape[:2]:
        # (1, seqlen, hidden), or with more trailing dimensions (hyper-connection streams: (1, L, S, H)),
        # or the batch second: (seqlen, 1, hidden), (streams, 1, seqlen, hidden)
        raise ValueError("expected the block's hidden states as a (1, seqlen, hidden) tensor (or "
                         f"(seqlen, 1, hidden)), got {getattr(hidden, 'shape', type(hidden).__name__)}")
    return hidden, BlockCall(rest, kwargs, by_kw, batch_dim=0 if hidden.shape[0] == 1 else 1)


class _Recorder:
    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.calls: list[BlockCall | None] = [None] * n_blocks
        self.hidden: torch.Tensor | None = None
        self.all_blocks = False          # record every block (first window) or stop at block 0
        self.form = 0                    # what a stub returns: as_output(h, form)
        self.last: torch.Tensor | None = None
        self.broken = False

    def __call__(self, index: int, args: tuple, kwargs: dict):
        try:
            hidden, call = _split(args, kwargs)
        except ValueError:
            if index == 0:
                raise
            self.broken = True           # the model did not pass our output on as the hidden states
            raise _Stop from None
        if index == 0:
            self.hidden = hidden.movedim(call.batch_dim, 0)   # batch first, as the activations are kept
        elif (self.last is None or hidden.shape != self.last.shape
              or hidden.data_ptr() != self.last.data_ptr()):
            self.broken = True           # the model changed the hidden states between blocks
            raise _Stop
        if not self.all_blocks:
            self.calls[0] = call
            raise _Stop
        self.calls[index] = call
        if index == self.n_blocks - 1:
            raise _Stop
        self.last = hidden
        return as_output(hidden, self.form)


OUTPUT_FORMS = 4  # h, (h,), (h, None), (h, None, None): RWKV unpacks (hidden, state, attentions)


def as_output(hidden: torch.Tensor, form: int):
    """A block's output in the form the model expects (BlockCall.output_form): the tensor itself, or
    a tuple of it and form - 1 Nones."""
    return hidden if form == 0 else (hidden,) + (None,) * (form - 1)


class _StandIn(nn.Module):
    """A parameter-free stand-in for a block. Attributes it lacks are read from the block it replaces
    (models read e.g. layer.attention_type or layer.block_type while looping over their layers); the
    block is not registered as a submodule, so model.to() never moves it."""

    def __init__(self, original: nn.Module | None):
        super().__init__()
        self.__dict__["_original"] = original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None or name.startswith("__"):
                raise
            return getattr(original, name)


class _Stub(_StandIn):
    def __init__(self, index: int, recorder: _Recorder, original: nn.Module | None = None):
        super().__init__(original)
        self.index = index
        self.recorder = recorder

    def forward(self, *args, **kwargs):
        return self.recorder(self.index, args, kwargs)


def _run(model: nn.Module, ids: torch.Tensor, finish_ok: bool = False) -> None:
    """The model's forward on ids until a stub stops it; finish_ok: the forward may also end without a
    stop (its last blocks were not called)."""
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        return
    if not finish_ok:
        raise RuntimeError("the model's forward did not call its decoder blocks")


def _home(model: nn.Module) -> torch.device:
    # The stem's device (a streamed model's blocks are on the meta device: skipped).
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                   device: torch.device, act_device: torch.device, windows: range | None = None,
                   empty: Callable[[tuple, torch.dtype], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor | None, list[BlockCall]]:
    """Run the model's stem on the calibration windows `windows` (default: all); return (hidden, calls).

    input_ids: (N, L) int64. hidden: (len(windows), L, hidden) in the model's activation dtype, the inputs
    of block 0 for those windows in order (row i = window windows[i]), allocated by empty(shape, dtype)
    (default: torch.empty on act_device); None when windows is empty (only the calls are wanted, as on
    resume). calls[i]: how block i is called (its tensors live on `device`).
    The model is returned to its original device; the blocks are never moved (they may be on the meta
    device: a streamed model's).
    """
    n = input_ids.shape[0]
    windows = range(n) if windows is None else windows
    if empty is None:
        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=act_device)
    originals = list(blocks)
    rec = _Recorder(len(originals))
    home = _home(model)
    try:
        for i in range(len(originals)):
            blocks[i] = _Stub(i, rec, originals[i])
        model.to(device)
        ids = input_ids.to(device)
        rec.all_blocks = True
        changed, failures = False, []
        for form in range(OUTPUT_FORMS):
            rec.form, rec.broken, rec.last = form, False, None
            try:
                _run(model, ids[:1], finish_ok=True)
            except (ValueError, TypeError, AttributeError) as e:
                # e.g. unpacking two values from our one, or reading a field of an output object: the next
                # form
                failures.append(e)
                rec.broken = True
            else:
                changed |= rec.broken
            if not rec.broken:
                break
        if rec.broken:
            if changed or not failures:
                raise ValueError(f"unsupported model {type(model).__name__}: its forward modifies the hidden "
                                 "states between decoder blocks, so blocks cannot be pruned one at a time")
            first = failures[0]
            if rec.calls[0] is None:  # it failed before reaching the blocks: the model's own error
                raise first
            raise ValueError(f"unsupported model {type(model).__name__}: its forward does not take a block's "
                             "hidden states back as a tensor or a tuple starting with it (it expects more "
                             f"from each block: {type(first).__name__}: {first}), so blocks cannot be pruned "
                             "one at a time") from first
        if rec.calls[0] is None:
            raise RuntimeError("the model's forward did not call its decoder blocks")
        # Blocks the forward never called (it skips them for this input) pass the hidden states on.
        calls = [c if c is not None else BlockCall((), {}, False, skipped=True) for c in rec.calls]
        for c in calls:
            c.output_form = rec.form
        rec.all_blocks = False
        hidden = None
        for row, j in enumerate(windows):
            _run(model, ids[j:j + 1])
            h = rec.hidden
            if hidden is None:
                hidden = empty((len(windows), *h.shape[1:]), h.dtype)
            hidden[row] = h[0].to(hidden.device)
    finally:
        model.to(home)   # while the stubs are in place: moves only the stem and head back
        for i, b in enumerate(originals):
            blocks[i] = b
    return hidden, calls


class _Inject(_StandIn):
    """Stands in for block `index`: passes the hidden states through, except the last block, which returns
    the given final hidden states (so the model's own norm and head run on them)."""

    def __init__(self, index: int, last: int, final: list, form: int, original: nn.Module | None = None):
        super().__init__(original)
        self.index, self.last, self.final, self.form = index, last, final, form

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = _like(self.final[0], hidden) if self.index == self.last else hidden
        return as_output(out, self.form)


def _like(final: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """final (1, ...) in the layout of the model's hidden states: its batch moved to where hidden has it
    (BlockCall.batch_dim: a sequence-first or stream-first model)."""
    if final.shape == hidden.shape or final.dim() != hidden.dim():
        return final
    moved = final.movedim(0, 1)
    return moved if moved.shape == hidden.shape else final


@contextlib.contextmanager
def head_runner(model: nn.Module, blocks: nn.ModuleList, device: torch.device, form: int = 0,
                last: int | None = None):
    """Yields run(input_ids (1, L), final (1, L, hidden)) -> the model's logits (1, L, vocab) for one window
    whose last block produced `final`. The model's own forward runs with every block replaced by a
    pass-through and the last one (block `last`: the last the forward calls) returning `final`, so the
    final norm, head and any logit scaling are
    exactly the model's. Inside the context the stem and head are on `device`; the blocks are never moved
    (they may be on the meta device) and are back in place afterwards."""
    originals = list(blocks)
    box: list = [None]
    home = _home(model)
    try:
        for i in range(len(originals)):
            blocks[i] = _Inject(i, len(originals) - 1 if last is None else last, box, form, originals[i])
        model.to(device)

        @torch.no_grad()
        def run(input_ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
            box[0] = final.to(device)
            try:
                return model(input_ids=input_ids.to(device), use_cache=False).logits
            finally:
                box[0] = None
        yield run
    finally:
        model.to(home)   # while the pass-throughs are in place: moves only the stem and head back
        for i, b in enumerate(originals):
            blocks[i] = b


def input_hooks(layers: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> list:
    """Forward pre-hooks calling on_input(name, x) with each layer's input tensor x (its first positional
    argument; ValueError naming the layer when there is none). Returns the handles; if registering one
    fails, those already registered are removed."""
    def hook_for(name: str):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"layer {name} was called without a tensor input")
            on_input(name, x)
        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles
