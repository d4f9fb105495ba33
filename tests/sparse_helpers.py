"""Helpers shared by the sparse tests (tests/unit/test_sparse_*.py, tests/pipeline/test_sparse_checkpoint.py):
N:M / unstructured pruned weights, a tiny LLaMA."""

from __future__ import annotations

import torch

from admm_kernels.backends import reference as ref


def nm_weight(rows: int, cols: int, n: int, m: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A random (rows, cols) weight with the n largest magnitudes of every m kept (exactly N:M)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return (w * ref.nm_mask(w.abs(), n, m)).to(dtype)


def unstructured_weight(rows: int, cols: int, sparsity: float, dtype=torch.float32,
                        seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return (w * (torch.rand(rows, cols, generator=g) >= sparsity)).to(dtype)


def has_kernels() -> bool:
    from admm_kernels.backends import cpu

    return cpu.has_sparse_kernels()


def tiny_llama(seed: int = 0, tie: bool = False, hidden: int = 64, intermediate: int = 128):
    """A random 2-layer LLaMA (vocab 96) built from a config, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=tie)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits: greedy decoding far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def prune_linears_nm(model, n: int = 2, m: int = 4, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Magnitude N:M pruning of every nn.Linear except `skip`, in place (test set-up only)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name not in skip:
                mod.weight.mul_(ref.nm_mask(mod.weight.abs(), n, m))
