"""Tiny random models of every decoder-only causal-LM architecture the installed transformers knows.

A coverage sweep (benchmarks/arch_coverage.py) and tests build each architecture from its *default*
config shrunk generically: the config's attributes (and its sub-configs' attributes: text, vision,
audio, ...) are walked by name pattern, every size set small (hidden 64, 2 layers, 4 heads, 2 kv heads,
head_dim 16, intermediate sizes 128, 4 experts with top-k 2, vocab 256, 128 positions, Mamba state 16;
1 layer for the encoders of other modalities)
and every per-layer list (layer_types, layers_block_type, mlp_layer_types, ...) or list of layer indices
(attn_layer_indices, moe_layers, ...) cut down to the layers kept, keeping at least one layer of each
kind (so a hybrid keeps one attention and one Mamba layer, and may get more than 2 layers). _OVERRIDES
holds the few per-family fixes that the generic rules cannot derive.

    from arch_sweep import causal_lm_architectures, shrink_config, build_tiny, TOKEN_LIMIT
"""

from __future__ import annotations

import warnings

import torch

VOCAB = 256
# Special token ids (bos, eos, pad, image, audio, ...) are moved to [TOKEN_LIMIT, VOCAB): random
# calibration tokens drawn below TOKEN_LIMIT never hit a multimodal placeholder token.
TOKEN_LIMIT = 192
# Special ids below KEEP_IDS (bos/eos/pad/unk of most families) stay: RoBERTa-like models use the pad id
# as the padding index of their position embeddings.
KEEP_IDS = 8
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
EXPERTS = 4
TOP_K = 2
MAX_POS = 128
WINDOW = 16
D_STATE = 16
LORA_RANK = 32

_HIDDEN_KEYS = {"hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "word_embed_proj_dim",
                "embedding_size", "lru_width", "input_embedding_size", "output_embedding_size",
                "backbone_hidden_size", "dim", "embed_dim", "hidden_dim", "width"}
_LAYER_KEYS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_blocks",
               "depth", "num_decoder_layers"}
_HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "attention_heads", "decoder_attention_heads",
              "swa_num_attention_heads", "index_n_heads", "linear_num_heads", "linear_num_value_heads",
              "num_heads", "encoder_attention_heads"}
_KV_KEYS = {"num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "multi_query_group_num",
            "num_query_groups", "linear_num_key_heads", "n_kv_heads"}
_HEAD_DIM_KEYS = {"head_dim", "d_head", "attention_head_dim", "kv_channels", "dim_head", "swa_head_dim",
                  "attention_head_size", "index_head_dim", "linear_head_dim", "linear_key_head_dim",
                  "linear_value_head_dim", "v_head_dim", "qk_nope_head_dim", "qk_rope_head_dim",
                  "mamba_d_head", "mamba_head_dim", "mamba_headdim", "d_rel"}
_LORA_KEYS = {"q_lora_rank", "kv_lora_rank", "o_lora_rank"}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOPK_KEYS = {"num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k", "moe_top_k",
              "num_selected_experts"}
_SHARED_KEYS = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
_GROUP_KEYS = {"n_group", "num_expert_group", "topk_group"}
_STATE_KEYS = {"state_size", "mamba_d_state", "ssm_state_size", "d_state"}
_MAMBA_HEAD_KEYS = {"mamba_n_heads", "mamba_num_heads", "n_mamba_heads"}
_SSM_GROUP_KEYS = {"n_groups", "mamba_n_groups", "mamba_ngroups"}
_WINDOW_KEYS = {"sliding_window", "attention_window_size", "sliding_window_size", "window_size",
                "local_attention", "attention_chunk_size", "local_attention_window_len"}
_POS_KEYS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
             "original_max_position_embeddings", "model_max_length", "max_source_positions",
             "max_target_positions"}
_PERIOD_KEYS = {"attn_layer_period", "expert_layer_period", "moe_layer_interval", "decoder_sparse_step",
                "interleave_moe_layer_step", "sliding_window_pattern", "_sliding_window_pattern",
                "global_attn_every_n_layers", "no_rope_layer_interval", "layer_group_size",
                "global_attn_every_n", "full_attn_every_n"}
_OFFSET_KEYS = {"attn_layer_offset", "expert_layer_offset"}
_DENSE_PREFIX_KEYS = {"first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"}
_SIZE_WORDS = ("size", "dim", "width", "hidden", "channels", "rank")
# Never touched by the generic rules (not sizes, or sizes that must keep their default).
_KEEP = {"type_vocab_size", "task_type_vocab_size", "conv_kernel", "mamba_d_conv", "conv_L_cache",
         "linear_conv_kernel_dim", "conv1d_width", "patch_size", "num_channels", "image_size",
         "conv_kernel_size", "short_conv_kernel_size", "chunk_size_feed_forward", "num_labels",
         "ple_conv_kernel_size", "block_multiple_of", "ffn_round_up_to_multiple_of", "seed",
         "position_bias_num_buckets", "position_bias_max_distance", "n_langs", "prompt_types",
         "segment_types", "num_codebooks", "axial_pos_shape", "spatial_merge_size",
         "temporal_patch_size", "in_channels", "audio_chunk_size", "audio_merge_size"}

# Sub-configs of other modalities' encoders (path words).
_SIDE_WORDS = ("vision", "audio", "image", "speech", "vq_", "perceiver", "visual")

_TABLED = (_HIDDEN_KEYS | _LAYER_KEYS | _HEAD_KEYS | _KV_KEYS | _HEAD_DIM_KEYS | _LORA_KEYS | _EXPERT_KEYS
           | _TOPK_KEYS | _SHARED_KEYS | _GROUP_KEYS | _STATE_KEYS | _MAMBA_HEAD_KEYS | _SSM_GROUP_KEYS
           | _WINDOW_KEYS | _POS_KEYS | _PERIOD_KEYS | _OFFSET_KEYS | _DENSE_PREFIX_KEYS | _KEEP
           | {"mamba_d_ssm", "rotary_dim"})

# Per-family fixes the generic rules cannot derive: {model_type: {key: value}} applied to the top-level
# dict after the generic shrink (a "text_config.KEY" key targets the sub-config).
_OVERRIDES: dict[str, dict] = {
    # Attention/local pattern given as [[kinds, repeats]].
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "attention_layers": ["global", "local"]},
    # Default configs with a single layer kind although the family is hybrid: one of each kind.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # The shared transformer is tied across hybrid layers: it needs two of them.
    "zamba": {"num_hidden_layers": 3, "attn_layer_period": 2, "attn_layer_offset": 0,
              "layers_block_type": ["hybrid", "linear_attention", "hybrid"]},
    # num_hidden_layers is derived: num_layers_per_stack * H_cycles * (L_cycles + 1).
    "hrm_text": {"num_layers_per_stack": 2, "num_hidden_layers": 2 * 2 * 4, "H_cycles": 2, "L_cycles": 3},
    # n_input + n_recurrent + n_output layers must equal num_hidden_layers.
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    # Default configs missing values their modeling code reads.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default",
                                                                   "rope_theta": 10000.0}}},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "deepseek_v2": {"n_group": 1, "topk_group": 1},
    # Sub-model layers (encoder, global, decoder) share one cache sized by a top-level count.
    "blt": {"num_hidden_layers": 16, "encoder_config.hidden_size_global": HIDDEN,
            "decoder_config.hidden_size_global": HIDDEN},
    # Axial position embeddings: dims sum to hidden, shape multiplies to the maximum length.
    "reformer": {"axial_pos_embds_dim": [HIDDEN // 2, HIDDEN // 2], "axial_pos_shape": [8, MAX_POS // 8]},
    # The cache sizes qk/v dims as hidden * factor rounded up to 64, the layers without rounding.
    "xlstm": {"hidden_size": 2 * HIDDEN, "embedding_dim": 2 * HIDDEN},
    "qwen4_exp_text": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    "qwen4_exp": {"text_config.indexer_n_heads": 4, "text_config.indexer_kv_heads": 1,
                  "text_config.indexer_head_dim": 16, "text_config.indexer_budget": 16,
                  "text_config.indexer_compress_ratio": 4},
}
# Arguments for the default config where the class defaults alone do not validate.
_INIT: dict[str, dict] = {
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
}
# Architectures that cannot be shrunk generically (the reason is raised as Unshrinkable).
_UNSHRINKABLE: dict[str, str] = {}


class Unshrinkable(ValueError):
    """This architecture's default config cannot be shrunk by the generic rules."""


def _quiet():
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def causal_lm_architectures() -> list[str]:
    """Every model type registered for AutoModelForCausalLM whose default config is not
    encoder-decoder (its class: *ForCausalLM, *LMHeadModel, or a multimodal *ForConditionalGeneration
    registered for causal LM), sorted."""
    _quiet()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            cfg = AutoConfig.for_model(model_type)
        except Exception:  # default config invalid: kept, shrink_config reports why
            out.append(model_type)
            continue
        if getattr(cfg, "is_encoder_decoder", False):
            continue
        out.append(model_type)
    return sorted(out)


class _Ids:
    """Old special token id -> new id in [TOKEN_LIMIT, VOCAB), the same old id always the same new."""

    def __init__(self, hidden_sizes: set[int] | None = None):
        self.map: dict[int, int] = {}
        # Every hidden size in the config tree: a field equal to one of them (an adapter's output
        # width, a cross-attention's input) becomes HIDDEN as they all do.
        self.hidden_sizes = hidden_sizes or set()

    def __call__(self, old):
        if isinstance(old, list):
            return [self(o) for o in old]
        if not isinstance(old, int) or isinstance(old, bool) or old < KEEP_IDS:
            return old
        if old not in self.map:
            self.map[old] = TOKEN_LIMIT + len(self.map) % (VOCAB - TOKEN_LIMIT)
        return self.map[old]


def _is_token_key(key: str) -> bool:
    if key in _TOPK_KEYS or key.startswith("num_"):
        return False
    return (key.endswith(("_token_id", "_token_ids", "_token_index", "_token")) or key in
            {"unk_index", "mask_index", "lang_id", "eod_token_id", "pad_index", "bos_index", "eos_index"})


def _layer_count(d: dict) -> tuple[str, int] | None:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_blocks"):
        v = d.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return key, v
    return None


def _layer_dict(v) -> dict[int, object] | None:
    """{layer index: value} of a dict keyed by layer indices (per_layer_config), else None."""
    if not isinstance(v, dict) or not v:
        return None
    try:
        return {int(k): x for k, x in v.items()}
    except (TypeError, ValueError):
        return None


def _per_layer(d: dict, n: int) -> tuple[dict[str, list], dict[str, list]]:
    """({key: list of length n}, {key: list of layer indices < n}) of a config dict; a string of length
    n (hybrid_override_pattern) and a dict keyed by layer index (per_layer_config) count as per-layer
    lists."""
    per, idx = {}, {}
    for key, v in d.items():
        by_layer = _layer_dict(v) if key not in ("id2label", "label2id") else None
        if by_layer is not None and all(0 <= i < n for i in by_layer):
            per[key] = [by_layer.get(i) for i in range(n)]
            continue
        if _is_token_key(key) or key.startswith("_") and key != "_sliding_window_pattern":
            continue
        if isinstance(v, str) and key.endswith("pattern") and len(v) == n and n > 1:
            per[key] = list(v)
        elif (isinstance(v, (list, tuple)) and v and len(v) <= n
              and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in v)
              and len(set(v)) == len(v) > 2 and any(w in key for w in ("layer", "idx", "ids", "indices"))):
            idx[key] = list(v)  # layer indices (moe_layers, full_attn_idxs, attn_layer_indices)
        elif isinstance(v, (list, tuple)) and len(v) == n and n > 1:
            per[key] = list(v)
        elif (isinstance(v, (list, tuple)) and v and len(v) < n
              and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in v)
              and any(w in key for w in ("layer", "idx", "ids", "indices"))):
            idx[key] = list(v)
    return per, idx


def _choose_layers(per: dict[str, list], idx: dict[str, list], n: int, dense_prefix: int,
                   shared_suffix: int = 0, min_layers: int = LAYERS) -> list[int]:
    """Indices of the layers to keep: the first layer introducing a new value in any per-layer list or
    index-list membership, at least min_layers of them (the dense prefix of first_k_dense_replace and
    the kv-sharing suffix of num_kv_shared_layers count as kinds too)."""
    def sig(i):
        return [(k, repr(v[i])) for k, v in per.items()] + [(k, i in v) for k, v in idx.items()] + \
            [("dense", i < dense_prefix), ("shared", i >= n - shared_suffix)]
    seen: set = set()
    chosen = []
    for i in range(n):
        new = [s for s in sig(i) if s not in seen]
        if new:
            chosen.append(i)
            seen.update(new)
    for i in range(n):
        if len(chosen) >= min_layers:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _ratio_size(v: int, old_hidden: int | None) -> int:
    """A size not in the tables: the same multiple of the hidden size, else HIDDEN."""
    if old_hidden and v % old_hidden == 0 and v // old_hidden <= 8:
        return HIDDEN * (v // old_hidden)
    return HIDDEN


def _shrink_dict(d: dict, ids: _Ids, path: str = "") -> dict:
    """A shrunk copy of a config dict (recursing into sub-config dicts)."""
    d = dict(d)
    old_hidden = next((d[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(d.get(k), int)),
                      None)
    layers = _layer_count(d)
    per, idx = _per_layer(d, layers[1]) if layers else ({}, {})
    expand = d.get("mamba_expand") or d.get("expand") or 2
    if not isinstance(expand, (int, float)):
        expand = 2
    mamba_like = any(k in d for k in ("state_size", "mamba_d_state", "ssm_state_size")) or \
        d.get("model_type", "") in ("mamba2",)
    out: dict = {}
    for key, v in d.items():
        if isinstance(v, dict) and key not in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
            out[key] = _shrink_dict(v, ids, f"{path}{key}.") if _looks_like_config(v) else v
            continue
        if _is_token_key(key):
            out[key] = ids(v)
            continue
        if key in ("id2label", "label2id") or key in _KEEP or isinstance(v, bool) or v is None:
            out[key] = v
            continue
        if not isinstance(v, int):
            out[key] = v
            continue
        if (v in ids.hidden_sizes and v > HIDDEN and key not in _TABLED and any(w in key for w in _SIZE_WORDS)
                and "intermediate" not in key and "ffn" not in key):
            out[key] = HIDDEN
        else:
            out[key] = _shrink_int(key, v, d, old_hidden, expand, mamba_like)
    # Layer count and per-layer lists.
    if layers:
        key, n = layers
        dense_prefix = next((d[k] for k in _DENSE_PREFIX_KEYS if isinstance(d.get(k), int)), 0)
        suffix = d.get("num_kv_shared_layers") if isinstance(d.get("num_kv_shared_layers"), int) else 0
        # Encoders of other modalities get 1 layer: a vision tower as long as the language model
        # would tie with it as "the model's block list" (real models differ in depth).
        side = any(w in path for w in _SIDE_WORDS)
        chosen = _choose_layers(per, idx, n, min(dense_prefix, n), min(suffix, n - 1),
                                min_layers=1 if side else LAYERS)
        if suffix:
            out["num_kv_shared_layers"] = sum(1 for i in chosen if i >= n - suffix)
        out[key] = len(chosen)
        for k2 in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            if k2 != key and d.get(k2) == n:
                out[k2] = len(chosen)
        for k2, v in per.items():
            new = [_shrink_layer_dict(v[i], d, out, ids) if isinstance(v[i], dict) else v[i] for i in chosen]
            if isinstance(d[k2], dict):
                int_keys = isinstance(next(iter(d[k2])), int)
                out[k2] = {(j if int_keys else str(j)): x for j, x in enumerate(new) if x is not None}
            else:
                new = [_shrink_int(k2, x, d, old_hidden, expand, mamba_like)
                       if isinstance(x, int) and not isinstance(x, bool) else x for x in new]
                out[k2] = "".join(new) if isinstance(d[k2], str) else new
        for k2, v in idx.items():
            out[k2] = [j for j, i in enumerate(chosen) if i in v]
        for k2 in _DENSE_PREFIX_KEYS:
            if isinstance(d.get(k2), int) and d[k2] > 0:
                out[k2] = sum(1 for i in chosen if i < d[k2])
    for k2 in _PERIOD_KEYS:
        if isinstance(d.get(k2), int) and not isinstance(d[k2], bool) and d[k2] > LAYERS:
            out[k2] = LAYERS
    for k2 in _OFFSET_KEYS:
        period = k2.replace("offset", "period")
        if isinstance(d.get(k2), int) and isinstance(out.get(period), int):
            out[k2] = min(d[k2], out[period] - 1)
    # Values the default config leaves to the checkpoint (None) although the modeling code needs them.
    heads = out.get("num_attention_heads")
    if isinstance(heads, int):
        if "head_dim" in d and d["head_dim"] is None:
            out["head_dim"] = HEAD_DIM
        if "num_key_value_heads" in d and d["num_key_value_heads"] is None:
            out["num_key_value_heads"] = min(heads, KV_HEADS)
        if isinstance(d.get("kv_lora_rank"), int) and "num_key_value_heads" in d:
            out["num_key_value_heads"] = heads  # multi-head latent attention: one kv head per head
    moe = any(isinstance(d.get(k), int) and d[k] > 1 for k in _EXPERT_KEYS | _TOPK_KEYS) or \
        isinstance(d.get("moe_intermediate_size"), int)
    if moe:
        for k2 in _EXPERT_KEYS | _TOPK_KEYS:
            if k2 in d and d[k2] is None:
                out[k2] = EXPERTS if k2 in _EXPERT_KEYS else TOP_K
        for k2 in _SHARED_KEYS:
            if k2 in d and d[k2] is None:
                out[k2] = 1
    # Derived sizes that must stay consistent.
    if isinstance(d.get("head_dim"), int) and d.get("head_dim") == d.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # DeepSeek-V3: the rotary embedding's size
    if isinstance(out.get("qk_nope_head_dim"), int) and isinstance(out.get("qk_rope_head_dim"), int) \
            and isinstance(d.get("qk_head_dim"), int):
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(rope, dict):
        out["rope_parameters" if "rope_parameters" in d else "rope_scaling"] = _shrink_rope(rope, out)
    return out


def _shrink_layer_dict(layer: dict, parent: dict, parent_out: dict, ids: _Ids) -> dict:
    """One layer's overrides of its parent config (per_layer_config), shrunk; a head_dim that was
    qk_nope_head_dim + qk_rope_head_dim (merged with the parent's values) stays their sum."""
    out = _shrink_dict(layer, ids)
    old, new = {**parent, **layer}, {**parent_out, **out}
    keys = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")
    if all(isinstance(old.get(k), int) for k in keys) and old[keys[0]] == old[keys[1]] + old[keys[2]]:
        if "qk_nope_head_dim" in layer and "head_dim" not in layer:
            out["qk_nope_head_dim"] = new["head_dim"] - new["qk_rope_head_dim"]
        else:
            out["head_dim"] = new["qk_nope_head_dim"] + new["qk_rope_head_dim"]
    return out


def _hidden_sizes(d: dict) -> set[int]:
    found = {v for k, v in d.items() if k in _HIDDEN_KEYS and isinstance(v, int) and not isinstance(v, bool)}
    for v in d.values():
        if isinstance(v, dict):
            found |= _hidden_sizes(v)
    return found


def _looks_like_config(v: dict) -> bool:
    return "model_type" in v or any(k in v for k in _HIDDEN_KEYS | _LAYER_KEYS)


def _shrink_int(key: str, v: int, d: dict, old_hidden, expand, mamba_like: bool) -> int:
    if key in ("mamba_d_head", "mamba_head_dim", "mamba_headdim"):
        return HEAD_DIM  # Mamba heads * head dim must equal the expanded size
    if key == "qk_rope_head_dim":
        return min(v, HEAD_DIM // 2)
    if key == "rotary_dim":
        return min(v, HEAD_DIM)
    if key.endswith(("vocab_size", "_vocab")) or key in ("unpadded_vocab_size", "vocab_size_per_layer_input"):
        return min(v, VOCAB) if v > 0 else v
    if key in _HIDDEN_KEYS:
        return HIDDEN if v > HIDDEN else v
    if key in _LAYER_KEYS:
        return min(v, LAYERS)
    if key == "num_heads" and mamba_like and isinstance(d.get("head_dim"), int):
        return max(1, int(expand * HIDDEN) // HEAD_DIM)
    if key in _HEAD_KEYS:
        return min(v, HEADS)
    if key in _KV_KEYS:
        return min(v, KV_HEADS)
    if key in _HEAD_DIM_KEYS:
        return min(v, HEAD_DIM)
    if key in _LORA_KEYS:
        return min(v, LORA_RANK)
    if key in _EXPERT_KEYS:
        return min(v, EXPERTS)
    if key in _TOPK_KEYS:
        return min(v, TOP_K)
    if key in _SHARED_KEYS:
        return min(v, 1)
    if key in _GROUP_KEYS:
        return min(v, 1)
    if key in _STATE_KEYS:
        return min(v, D_STATE)
    if key in _MAMBA_HEAD_KEYS:
        return max(1, int(expand * HIDDEN) // HEAD_DIM)
    if key in _SSM_GROUP_KEYS:
        return 1
    if key == "mamba_d_ssm":
        return int(expand * HIDDEN)
    if key in ("time_step_rank", "mamba_dt_rank"):
        return min(v, 8)
    if key in ("chunk_size", "mamba_chunk_size"):
        return min(v, 16)
    if key in _WINDOW_KEYS:
        return min(v, WINDOW)
    if key in _POS_KEYS:
        return min(v, MAX_POS)
    if key in ("index_topk", "index_topk_blocks"):
        return min(v, 16)
    if key == "zero_expert_num":
        return min(v, 2)
    if "intermediate" in key or "ffn" in key or key in ("dff", "d_inner", "dim_ff", "feed_forward_size",
                                                         "n_inner", "decoder_ffn_dim", "mlp_dim"):
        return min(v, INTERMEDIATE)
    if any(w in key for w in _SIZE_WORDS) and v > INTERMEDIATE and old_hidden:
        return _ratio_size(v, old_hidden)
    return v


def _shrink_rope(rope: dict, out: dict) -> dict:
    rope = dict(rope)
    head_dim = out.get("head_dim") if isinstance(out.get("head_dim"), int) else HEAD_DIM
    half = head_dim // 2
    for key in ("mrope_section", "mrope_sections"):
        sec = rope.get(key)
        if isinstance(sec, list) and sec and sum(sec) > half:
            total = sum(sec)
            new = [max(1, s * half // total) for s in sec]
            new[0] += half - sum(new)
            rope[key] = new
    if isinstance(rope.get("original_max_position_embeddings"), int):
        rope["original_max_position_embeddings"] = min(rope["original_max_position_embeddings"], MAX_POS)
    for key in ("short_factor", "long_factor"):
        if isinstance(rope.get(key), list):
            factor = out.get("partial_rotary_factor", 1.0) or 1.0
            rope[key] = rope[key][: max(1, int(head_dim * factor) // 2)]
    return rope


def _apply_overrides(d: dict, model_type: str) -> dict:
    for key, value in _OVERRIDES.get(model_type, {}).items():
        target = d
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return d


def shrink_config(model_type: str):
    """The default config of `model_type` shrunk to a tiny model (see the module docstring). Raises
    Unshrinkable when the default config is invalid or the family is known not to shrink."""
    _quiet()
    from transformers import AutoConfig

    if model_type in _UNSHRINKABLE:
        raise Unshrinkable(f"{model_type}: {_UNSHRINKABLE[model_type]}")
    try:
        cfg = AutoConfig.for_model(model_type, **_INIT.get(model_type, {}))
    except Exception as e:
        raise Unshrinkable(f"{model_type}: its default config is invalid: {type(e).__name__}: "
                           f"{_first_line(e)}") from e
    tree = cfg.to_dict()
    d = _shrink_dict(tree, _Ids(_hidden_sizes(tree)))
    if "is_decoder" in d:  # BERT-like classes registered for causal LM run as decoders
        d["is_decoder"] = True
    d = _apply_overrides(d, model_type)
    d.pop("transformers_version", None)
    return type(cfg).from_dict(d)


def _first_line(e: BaseException) -> str:
    """The message's first line (and the next one when the first only introduces it, as in the
    validation errors of transformers' configs)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random tiny AutoModelForCausalLM of `model_type` (shrink_config), eval mode, on the CPU, its 2-D
    weights scaled by 2 (as tiny_models.py does: correlated layer inputs, a non-trivial problem); 2-D
    weights initialised to zero are drawn at random first, so every pruned layer's zeros are the
    pruning's."""
    _quiet()
    from transformers import AutoModelForCausalLM

    config = shrink_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.is_floating_point():
                if not p.any():  # zero-initialised projections (xLSTM gates): random like the rest
                    p.normal_(0.0, 0.02)
                p.mul_(2.0)
    languages = getattr(config, "languages", None)
    if languages and hasattr(model, "set_default_language"):  # X-MOD: language adapters
        model.set_default_language(languages[0])
    return model.eval()


def tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) random token ids below TOKEN_LIMIT (no special token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TOKEN_LIMIT, (n, length), generator=g)


__all__ = ["VOCAB", "TOKEN_LIMIT", "Unshrinkable", "causal_lm_architectures", "shrink_config", "build_tiny",
           "tokens"]
