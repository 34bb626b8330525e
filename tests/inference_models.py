"""Tiny random causal LMs from transformers configs (nothing downloaded) and their own generate, for
tests/test_inference.py and tests/test_inference_dist.py."""

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
MODELS = {  # name: (config class, settings beyond SMALL)
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (
        transformers.Qwen2Config,
        {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 6},
    ),
    "mistral": (transformers.MistralConfig, {"sliding_window": 5}),
}


def tiny_model(name: str, seed: int = 0, **overrides):
    config_class, settings = MODELS[name]
    config = config_class(**{**SMALL, **settings, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def own_generate(model, ids, **kwargs) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model.generate(ids, **kwargs)
