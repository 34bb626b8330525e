"""Tiny random causal LMs from transformers configs (nothing downloaded) and their own generate, for
tests/test_inference.py and tests/test_inference_dist.py. Settings as in tests/test_hf.py."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    eos_token_id=None,  # random weights: let every row run to max_new_tokens unless a test sets one
    bos_token_id=None,
)
# multi-head latent attention (DeepSeek-V3): q/k head dim 16 + 8, v head dim 12; K/V expanded to every
# head, so as many K/V heads as q heads; a small mixture of experts
MLA = dict(
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=12,
    num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
)  # fmt: skip
MODELS = {  # name: (config class, settings beyond SMALL)
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (
        transformers.Qwen2Config,
        {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 6},
    ),
    "mistral": (transformers.MistralConfig, {"sliding_window": 5}),
    # softcap 50 (the default attn_logit_softcapping), windowed and full layers alternating
    "gemma2": (transformers.Gemma2Config, {"sliding_window": 8}),
    # sinks (s_aux), windowed and full layers alternating
    "gpt_oss": (
        transformers.GptOssConfig,
        {"sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "deepseek_v3": (transformers.DeepseekV3Config, {**MLA, "n_group": 1, "topk_group": 1}),
}
# The model's own attention that generate is compared with: eager where tests/test_hf.py compares
# with eager (SDPA has no softcap or sinks)
OWN_ATTENTION = {"gemma2": "eager", "gpt_oss": "eager", "deepseek_v3": "eager"}


def tiny_model(name: str, seed: int = 0, **overrides):
    config_class, settings = MODELS[name]
    config = config_class(**{**SMALL, **settings, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def own_attention(model) -> str:
    return OWN_ATTENTION.get(model.config.model_type, "sdpa")


def own_generate(model, ids, **kwargs) -> torch.Tensor:
    model.set_attn_implementation(own_attention(model))
    with torch.no_grad():
        return model.generate(ids, **kwargs)
