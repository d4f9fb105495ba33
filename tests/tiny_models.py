"""Tiny random causal LMs of every supported architecture, built from configs (no download).

Sizes are chosen so that every linear's in_features is a multiple of 8 (N:M patterns up to 4:8) and a
whole pipeline run takes well under a second per model. Sliding windows (Mistral, Qwen2/3, Gemma 2)
are shorter than the test sequences, so layers with different attention masks are exercised.
"""

from __future__ import annotations

import torch

VOCAB = 96
MAX_POS = 64
SLIDING = 8

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS)


def _configs() -> dict:
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**_COMMON),
        "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=SLIDING),
        "qwen2": lambda: tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=SLIDING,
                                        max_window_layers=1),
        "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=8, use_sliding_window=True,
                                        sliding_window=SLIDING, max_window_layers=1),
        "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=8, sliding_window=SLIDING,
                                          query_pre_attn_scalar=8),
        "phi3": lambda: tf.Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      original_max_position_embeddings=MAX_POS),
        "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=MAX_POS,
                                    word_embed_proj_dim=32, pad_token_id=1),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=MAX_POS,
                                      bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4,
                                             max_position_embeddings=MAX_POS),
    }


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "opt", "gpt2", "gpt_neox")

_MOE = dict(_COMMON, num_hidden_layers=2)


def _moe_configs() -> dict:
    """Mixture-of-experts and hybrid families, one per fused-experts layout (rows / transposed /
    interleaved with biases / Llama-4's pre-dispatched input) and per layer-list kind."""
    import transformers as tf

    return {
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_MOE, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, head_dim=8),
        "mixtral": lambda: tf.MixtralConfig(**_MOE, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": lambda: tf.OlmoeConfig(**_MOE, num_experts=4, num_experts_per_tok=2, eos_token_id=2,
                                        pad_token_id=1),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_MOE, moe_intermediate_size=32, num_experts=4,
                                               shared_expert_intermediate_size=64, num_experts_per_tok=2),
        "gpt_oss": lambda: tf.GptOssConfig(**_MOE, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
        "llama4": lambda: tf.Llama4TextConfig(**_MOE, intermediate_size_mlp=64, num_local_experts=4,
                                              num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=1,
                                              no_rope_layers=[1, 1]),
        "jamba": lambda: tf.JambaConfig(**dict(_MOE, num_hidden_layers=4), num_experts=4,
                                        num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                                        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                                        mamba_expand=2),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"]),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
            **_MOE, num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention"],
            mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2, mamba_chunk_size=16,
            shared_intermediate_size=64),
        "lfm2": lambda: tf.Lfm2Config(**_MOE, layer_types=["conv", "full_attention"]),
    }


def _classic_configs() -> dict:
    """Families whose blocks return a tuple the model indexes or unpacks (BLOOM, Falcon, GPT-Neo, MPT,
    GPT-1; Bamba unpacks two values)."""
    import transformers as tf

    return {
        "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=MAX_POS),
        "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                           attention_types=[[["global", "local"], 1]], window_size=SLIDING,
                                           max_position_embeddings=MAX_POS),
        "mpt": lambda: tf.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=MAX_POS),
        "openai-gpt": lambda: tf.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                 n_positions=MAX_POS),
        "bamba": lambda: tf.BambaConfig(**_MOE, attn_layer_indices=[1], mamba_d_state=8, mamba_n_heads=4,
                                        mamba_d_head=16, mamba_expand=2, mamba_chunk_size=16),
    }


CLASSIC_ARCHS = ("bloom", "falcon", "gpt_neo", "mpt", "openai-gpt", "bamba")
MOE_ARCHS = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "llama4", "jamba", "qwen3_next",
             "granitemoehybrid", "lfm2")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random tiny causal LM of architecture `arch` (one of ARCHS), eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = {**_configs(), **_moe_configs(), **_classic_configs()}[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init gives near-uniform attention; larger weights make the layers' inputs correlated
    # and the pruning problem non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def tiny_tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (95 symbols + [UNK] = VOCAB ids)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=MAX_POS)


def tiny_text(n_words: int, seed: int = 0) -> str:
    """Seeded pseudo-English text (about 6 characters = 6 tokens per word)."""
    import random

    rng = random.Random(seed)
    words = ["the", "king", "queen", "sword", "night", "love", "death", "crown", "speak", "thou",
             "art", "my", "lord", "fair", "sweet", "heaven", "blood", "time", "come", "go"]
    return " ".join(rng.choice(words) for _ in range(n_words)) + "\n"


def save_tiny_folder(root, calib_words: int, calib_seed: int, eval_words: int, eval_seed: int,
                     tokenizer=None):
    """`root`/tiny-llama (a tiny_model("llama") transformers folder with `tokenizer`, default
    tiny_tokenizer) beside `root`/calib.txt and `root`/eval.txt (tiny_text); returns `root`."""
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    (tokenizer or tiny_tokenizer()).save_pretrained(model_dir)
    (root / "calib.txt").write_text(tiny_text(calib_words, seed=calib_seed))
    (root / "eval.txt").write_text(tiny_text(eval_words, seed=eval_seed))
    return root


class Interrupt(Exception):
    """Raised by stop_after's callback: simulates a run killed after a block."""


def stop_after(block: int):
    """A prune_model callback that raises Interrupt once block `block` is finished (and saved)."""
    def callback(b, info):
        if b == block:
            raise Interrupt
    return callback


def interrupt_after_first_save(monkeypatch):
    """Patch PipelineState.save so that the first save completes and then raises KeyboardInterrupt (a
    CLI run killed right after its first block was saved). Returns the real save, for the test to put
    back before it resumes."""
    from admm_kernels.models import state as state_mod

    real_save = state_mod.PipelineState.save
    saves = []

    def crash_after_first_block(self, *a, **kw):
        result = real_save(self, *a, **kw)
        saves.append(1)
        if len(saves) == 1:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(state_mod.PipelineState, "save", crash_after_first_block)
    return real_save


def live_cpu_tensor_bytes() -> int:
    """Bytes of every distinct CPU storage a live Python tensor object holds (found through the garbage
    collector, so it counts what really exists, not what the code under test claims to hold)."""
    import gc
    import warnings

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    live = [o for o in live if type(o) in (torch.Tensor, torch.nn.Parameter)]  # no fake tensors of others
    for obj in live:
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
