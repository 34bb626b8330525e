"""ring_ext as a transformers attention implementation: a tiny random Llama (nothing downloaded) gives
the same logits and gradients as with PyTorch's SDPA."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install .[hf]")

import ring_ext.hf  # noqa: E402

from tolerances import assert_rel_l2  # noqa: E402


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits_and_grads(model, impl, ids):
    model.config._attn_implementation = impl
    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_llama_matches_sdpa():
    name = ring_ext.hf.register()
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(model, "sdpa", ids)
    logits, grads = logits_and_grads(model, name, ids)
    assert_rel_l2(logits, ref_logits, torch.float32, "logits")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, "param grad")


def test_padding_mask_is_rejected():
    ring_ext.hf.register()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4))
