"""A real-weights mixture-of-experts model made offline from a dense LLaMA-family model ("upcycling").

No package ships MoE weights, so quality measurements on an MoE use this: a Mixtral with the dense
model's sizes, attention, norms, embeddings and head, every expert of block b a copy of block b's MLP
(gate and up concatenated into ``gate_up_proj``, ``down_proj``), and a random router. Mixtral
renormalises its top-k routing weights to sum to one, so the MoE computes exactly the dense model's
function (up to float rounding: the logits of SmolLM2-135M differ by ~1e-4 in fp32) while its router
splits the calibration tokens among the experts as a real one does. Pruning it tests everything that
is MoE-specific (fused layouts, routed Grams, experts with few tokens) on weights that matter.
"""

from __future__ import annotations

import torch
from torch import nn


def upcycle_to_mixtral(model: nn.Module, num_experts: int = 4, top_k: int = 2, seed: int = 0,
                       router_scale: float = 1.0) -> nn.Module:
    """A MixtralForCausalLM computing `model`'s function (see the module docstring).

    model: a transformers LLaMA-family causal LM (``model.layers[i].self_attn.{q,k,v,o}_proj``,
    ``.mlp.{gate,up,down}_proj``, SiLU). num_experts >= top_k >= 1. The router weights are
    N(0, router_scale² / hidden) from a generator seeded with `seed`. Same dtype as `model`, on the CPU.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    if not (isinstance(num_experts, int) and isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(f"need integers num_experts >= top_k >= 1, got num_experts={num_experts!r}, "
                         f"top_k={top_k!r}")
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu" or not hasattr(model, "model"):
        raise ValueError(f"upcycling needs a LLaMA-family model with SiLU MLPs, got {type(model).__name__}")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    moe_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=getattr(cfg, "rope_parameters", None), tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=num_experts, num_experts_per_tok=top_k, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=getattr(cfg, "pad_token_id", None),
        router_jitter_noise=0.0, sliding_window=None)
    dtype = next(model.parameters()).dtype
    moe = MixtralForCausalLM(moe_cfg).to(dtype).eval()
    dense_state = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".mlp." in name:
                continue
            p.copy_(dense_state[name])
        for dense, block in zip(model.model.layers, moe.model.layers):
            mlp, experts = dense.mlp, block.mlp.experts
            fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
            experts.gate_up_proj.copy_(fused.unsqueeze(0).expand_as(experts.gate_up_proj))
            experts.down_proj.copy_(mlp.down_proj.weight.unsqueeze(0).expand_as(experts.down_proj))
            router = block.mlp.gate.weight
            router.copy_(torch.randn(router.shape, generator=g) * (router_scale / cfg.hidden_size ** 0.5))
    return moe
