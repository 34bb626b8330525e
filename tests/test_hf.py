"""ring_ext as a transformers attention implementation: a tiny random Llama (nothing downloaded) gives
the same logits and gradients as with PyTorch's SDPA on one process, and with context parallelism over
Gloo the same logits and gradients as the same model without it, causal and general masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install .[hf]")

import ring_ext  # noqa: E402
import ring_ext.hf  # noqa: E402

from distributed import run_distributed  # noqa: E402
from tolerances import assert_rel_l2  # noqa: E402

VOCAB = 97


def tiny_llama(seed=0, causal=True):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if not causal:  # a bidirectional variant of the same model: every key visible
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
    return model


def loss_of(logits: torch.Tensor, numel: int) -> torch.Tensor:
    return logits.square().sum() / numel  # a share of the mean over the full sequence


def logits_and_grads(model, impl, ids, positions=None, ctx=None, numel=None):
    model.config._attn_implementation = impl
    model.zero_grad()
    kwargs = {} if ctx is None else {"cp_context": ctx}
    logits = model(ids, position_ids=positions, **kwargs).logits
    loss_of(logits, numel or logits.numel()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_llama_matches_sdpa():
    name = ring_ext.hf.register()
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(model, "sdpa", ids)
    logits, grads = logits_and_grads(model, name, ids)
    assert_rel_l2(logits, ref_logits, torch.float32, "logits")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, "param grad")


@dataclasses.dataclass(frozen=True)
class HFCase:
    algo: str
    causal: bool = True
    seq: int = 32
    ulysses_degree: int | None = None


def run_hf_case(rank: int, world_size: int, case: HFCase):
    """Every rank: the model on its shard with CP; rank results compared with the model without CP."""
    name = ring_ext.hf.register()
    model = tiny_llama(causal=case.causal)
    ids = torch.randint(0, VOCAB, (2, case.seq), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(case.seq)[None].expand(2, -1)
    ref_logits, ref_grads = logits_and_grads(model, name, ids, positions)
    cfg = ring_ext.CPConfig(
        context_parallel_size=world_size,
        context_parallel_algo=case.algo,
        ulysses_degree_in_cp=case.ulysses_degree,
        attention_mask_type="causal" if case.causal else "general",
    )
    ctx = ring_ext.initialize(cfg)
    ids_l, pos_l = (ring_ext.shard(t, ctx, seq_dim=1) for t in (ids, positions))
    logits_l, grads = logits_and_grads(model, name, ids_l, pos_l, ctx, numel=ref_logits.numel())
    for g in grads:
        dist.all_reduce(g)  # each rank holds its tokens' share of every parameter's gradient
    logits = ring_ext.unshard(logits_l, ctx, seq_dim=1)
    assert_rel_l2(logits, ref_logits, torch.float32, f"{case} logits")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, f"{case} param grad")


def test_llama_with_context_parallel_matches_without():
    cases = [
        HFCase("megatron_cp_algo"),
        HFCase("megatron_cp_algo", causal=False),
        HFCase("ulysses_cp_algo"),
        HFCase("ulysses_cp_algo", causal=False),
        HFCase("hybrid_cp_algo", ulysses_degree=2),
    ]
    run_distributed(run_hf_case, 4, cases, timeout_s=300)


def test_padding_mask_is_rejected():
    ring_ext.hf.register()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4))
