"""Content digests (SHA-256) of tensors, token ids and whole models, for resumable state and caches.

Why SHA-256: measured 2026-12-02 on the project's 2-core AMD EPYC (SHA extensions), one thread, over
the 538 MB of SmolLM2-135M's fp32 parameters and buffers: sha256 0.38 s, sha1 0.34 s, blake2b 0.68 s,
md5 0.87 s, sha512 0.85 s. hashlib hashes the tensors' memory in place (no copy for contiguous CPU
tensors); model_digest on SmolLM2 took 0.39 s (0.6-0.8 s while other jobs loaded the 2 cores), i.e.
0.1-0.3 % of the embedded 4-5 minute pruning run it guards.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def update_with_tensor(h, t: torch.Tensor) -> None:
    """Feed a tensor's bytes (not its dtype or shape) into hashlib object `h` (copied to the CPU if
    needed; any dtype, bf16 included)."""
    a = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    h.update(a.data)


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    update_with_tensor(h, t)
    return h.hexdigest()


def tokens_digest(ids: torch.Tensor) -> str:
    """SHA-256 of int token ids (N, L) (dtype and shape included)."""
    return tensor_digest(ids)


def model_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of `model` (non-persistent buffers such as rotary tables
    included; tied weights once): name, dtype, shape and bytes, in module order, plus the class name.

    Whatever changes a forward pass changes this digest; the device does not. Raises ValueError for
    tensors on the meta device (they hold no data)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.device.type == "meta":
                raise ValueError(f"{kind} {name} is on the meta device (no data): load the model's weights "
                                 "first")
            h.update(f"|{kind}:{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            update_with_tensor(h, t)
    return h.hexdigest()
