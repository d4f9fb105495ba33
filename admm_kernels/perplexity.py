"""The perplexity arithmetic every evaluation shares: one window's summed NLL, and exp(mean NLL).

A leaf (imports only torch): the whole-model evaluation (admm_kernels.eval) and the block-by-block one
(admm_kernels.models.layerwise_eval) must compute the very same floats, so both call these two
functions and neither imports the other for them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def window_nll(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Summed next-token NLL of one window: logits (1, L, vocab), token ids x (1, L) -> float."""
    return float(nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum"))


def perplexity_from(nll: torch.Tensor, seqlen: int) -> float:
    """exp(mean NLL) from the per-window summed NLLs (float64 (windows,)), added in window order (so a
    distributed evaluation gives the very same float as one process)."""
    total = 0.0
    for v in nll.tolist():
        total += v
    return math.exp(total / (nll.numel() * (seqlen - 1)))
