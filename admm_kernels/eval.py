"""Perplexity of a causal LM on a token stream, as the SparseGPT / Wanda evaluations compute it.

The stream is cut into non-overlapping windows of seqlen tokens (a trailing partial window is
dropped); each window is one forward pass predicting seqlen-1 tokens; perplexity = exp(mean NLL over
every predicted token). Every window predicts the same number of tokens, so this equals SparseGPT's
exp(sum of window mean losses * seqlen / (windows * seqlen)).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import nn

from ._checks import check_compute_device, model_device
from .perplexity import perplexity_from, window_nll


def _as_tokens(tokens_or_text, tokenizer) -> torch.Tensor:
    if isinstance(tokens_or_text, str):
        from .data import tokenize
        if tokenizer is None:
            raise ValueError("evaluate_perplexity got text but no tokenizer: pass tokenizer= or token ids")
        return tokenize(tokens_or_text, tokenizer)
    if not isinstance(tokens_or_text, torch.Tensor):
        raise TypeError(f"tokens_or_text must be a str or an int tensor of token ids, got "
                        f"{type(tokens_or_text).__name__}")
    t = tokens_or_text
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got dtype {t.dtype}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"token ids must have shape (n,) or (1, n), got {tuple(t.shape)}")
    return t.to(torch.int64)


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (else config.vocab_size); None when neither is known."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_token_range(ids: torch.Tensor, vocab: int | None, name: str = "token ids") -> None:
    """ValueError unless every id of `ids` is in [0, vocab): an embedding lookup would raise an
    IndexError deep inside the model (or read garbage on a GPU) instead."""
    if vocab is None or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name} must be in [0, {vocab}) (the model's vocabulary size is {vocab}), got ids "
                         f"in [{int(ids.min())}, {int(ids.max())}]: {int(bad.sum())} out of range, the first "
                         f"{int(ids.reshape(-1)[first])} at position {first}; was the text tokenised with "
                         "another model's tokenizer?")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, device: torch.device | str | None = None) -> Iterator[torch.device]:
    """Inside the block the model is in eval mode on `device` (default: where it is; the meta device is
    refused); afterwards, whatever happens, it is back on its device with its training flag. Yields the
    device it runs on."""
    home = model_device(model)
    run_on = check_compute_device(device, "device") if device is not None else home
    was_training = model.training
    try:
        model.eval()
        if run_on != home:
            model.to(run_on)
        yield run_on
    finally:
        if run_on != home:
            model.to(home)
        model.train(was_training)


def evaluation_windows(model: nn.Module, tokens_or_text, seqlen: int | None, tokenizer,
                       max_windows: int | None) -> torch.Tensor:
    """The (windows, seqlen) int64 token ids evaluate_perplexity scores (validated)."""
    from .data import resolve_seqlen
    from .models.loading import max_positions

    ids = _as_tokens(tokens_or_text, tokenizer)
    check_token_range(ids, vocabulary_size(model))
    seqlen = resolve_seqlen(seqlen, max_positions(model))
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"evaluation text is too short: found {ids.numel()} tokens, need at least "
                         f"seqlen = {seqlen} tokens for one window")
    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
        n_windows = min(n_windows, max_windows)
    return ids[:n_windows * seqlen].view(n_windows, seqlen)


@dataclass(frozen=True)
class EvalPlacement:
    """Where evaluate_perplexity runs besides its device: distributed (None: split the windows over the
    ranks of an initialised torch.distributed process group, False: this process alone; see
    admm_kernels.models.distributed.resolve_comm), and for a StreamedModel where the windows' hidden
    states live: offload False = on the device, True / "cpu" = host memory, "disk" = a file in
    offload_dir (as prune_model's)."""

    distributed: object = None
    offload: bool | str = False
    offload_dir: str | os.PathLike | None = None

    @classmethod
    def of(cls, given: dict) -> EvalPlacement:
        """From evaluate_perplexity's extra keywords; TypeError naming an unknown one."""
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"evaluate_perplexity() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**given)


@torch.no_grad()
def evaluate_perplexity(model, tokens_or_text, seqlen: int | None = None, tokenizer=None,
                        max_windows: int | None = None, device: torch.device | str | None = None,
                        progress: bool = False, **placement) -> float:
    """exp(mean next-token NLL) of `model` over non-overlapping windows of `seqlen` tokens.

    model: an nn.Module causal LM, or an admm_kernels.models.StreamedModel (then evaluated block by
    block, each block read from the checkpoint and freed: memory does not grow with the model; the
    windows' hidden states live where `offload` says: False = on the device, True / "cpu", "disk" in
    offload_dir, as prune_model's).
    tokens_or_text: int token ids (n,) / (1, n), or a str (then `tokenizer` is needed). seqlen: window
    length (default: min(2048, the model's maximum)). max_windows: evaluate only the first windows.
    device: where to run (the model is moved there and back, also on errors; default: where it is;
    the meta device is refused). progress: a tqdm bar over the windows (on stderr).
    placement: distributed=, offload=, offload_dir= (EvalPlacement). distributed: None =
    split the windows over the ranks of an initialised torch.distributed process group (every rank must
    call this), False = this process alone (see admm_kernels.models.distributed.resolve_comm); the
    per-window losses are summed in window order, so the result is the same float as one process's.
    ValueError for token ids outside [0, vocabulary size).
    """
    from .models.distributed import resolve_comm
    from .models.streaming import StreamedModel

    where = EvalPlacement.of(placement)
    comm = resolve_comm(where.distributed)
    if isinstance(model, StreamedModel):
        from .models.layerwise_eval import streamed_perplexity

        windows = evaluation_windows(model.model, tokens_or_text, seqlen, tokenizer, max_windows)
        run_on = check_compute_device(device, "device") if device is not None else torch.device("cpu")
        return streamed_perplexity(model, windows, run_on, comm, where.offload, where.offload_dir, progress)
    windows = evaluation_windows(model, tokens_or_text, seqlen, tokenizer, max_windows)
    return _in_memory_perplexity(model, windows, device, comm, progress)


def _in_memory_perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device | str | None, comm,
                          progress: bool) -> float:
    """evaluate_perplexity of an in-memory model on windows (n, seqlen) int64: this rank's share of the
    windows (comm: a models.distributed.Comm), the losses summed over the ranks in window order."""
    from .models.distributed import shard

    n_windows, seqlen = windows.shape
    nll = torch.zeros(n_windows, dtype=torch.float64)
    it = shard(n_windows, comm.size, comm.rank)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="perplexity", unit="window", leave=False)
    with evaluation_mode(model, device) as run_on:  # back to its device and mode whatever happens
        for i in it:
            x = windows[i:i + 1].to(run_on)
            nll[i] = window_nll(model(input_ids=x, use_cache=False).logits, x)
    comm.all_reduce_sum_(nll, "perplexity: summing the windows' losses")
    return perplexity_from(nll, seqlen)
