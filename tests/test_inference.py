"""ring_ext.hf.generate and the sharded KV cache in one process (a one-rank Gloo world): greedy (Llama,
Qwen2 and Mistral with windows; Gemma 2's softcap, gpt-oss' sinks, DeepSeek-V3's multi-head latent
attention) and seeded sampling equal the model's own generate token for token; bad input raises ValueError naming the
argument before anything runs; the pass-Q / pass-KV rule. The multi-rank checks are in
tests/test_inference_dist.py."""

from __future__ import annotations

import pytest
import torch

import ring_ext
from ring_ext.inference import ShardedKVCache, chunk_mode

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install .[hf]")

from inference_models import MODELS, own_attention, own_generate, prompt, tiny_model  # noqa: E402

import ring_ext.hf  # noqa: E402


@pytest.fixture(scope="module")
def ctx(world):
    return ring_ext.initialize(
        ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo="megatron_cp_algo")
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_equals_the_models_own_generate(ctx, name):
    model = tiny_model(name)
    ids = prompt(2, 11)  # windows 5, 6 and 8 shorter than prompt + new tokens: the cache drops rows
    expected = own_generate(model, ids, max_new_tokens=9, do_sample=False)
    got = ring_ext.hf.generate(model, ids, ctx, max_new_tokens=9)
    assert torch.equal(got, expected), (name, got, expected)
    assert model.config._attn_implementation == own_attention(model)  # restored


def test_seeded_sampling_and_eos_equal_the_models_own_generate(ctx):
    model = tiny_model("llama", eos_token_id=5, pad_token_id=0)
    ids = prompt(3, 7, seed=3)
    settings = dict(
        max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.1
    )
    torch.manual_seed(11)
    expected = own_generate(model, ids, **settings)
    torch.manual_seed(11)
    got = ring_ext.hf.generate(model, ids, ctx, **settings)
    assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids must be"),
        (dict(input_ids=torch.zeros(1, 4)), "input_ids must be"),
        (dict(attention_mask=torch.tensor([[1, 1, 0, 1]])), "attention_mask"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2), "num_beams"),
        (dict(no_such_setting=1), "no_such_setting"),
        (dict(ctx=None), "ctx must be"),
    ],
)
def test_generate_bad_input_raises(ctx, kwargs, match):
    model = tiny_model("llama")
    call = dict(input_ids=torch.ones(1, 4, dtype=torch.long), ctx=ctx, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        ring_ext.hf.generate(model, **call)


def test_cache_bad_input_raises(ctx):
    with pytest.raises(ValueError, match="seq_len"):
        ShardedKVCache(ctx, 1)
    with pytest.raises(ValueError, match="num_layers"):
        ShardedKVCache(ctx, 0, seq_len=4)
    general = ring_ext.initialize(ring_ext.CPConfig(context_parallel_size=1, attention_mask_type="general"))
    with pytest.raises(ValueError, match="causal"):
        ShardedKVCache(general, 1, seq_len=4)
    cache = ShardedKVCache(ctx, 1, seq_len=4)
    with pytest.raises(ValueError, match="prefill every layer"):
        cache.step(1)
    kv = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k must be"):
        cache.store(0, kv[:, :3], kv)
    with pytest.raises(ValueError, match="v must be"):
        cache.store(0, kv, kv[:, :, :1])  # v's head dim may differ (MLA), its heads may not
    out = cache.prefill(0, torch.randn(1, 4, 4, 8), kv, kv)
    assert out.shape == (1, 4, 4, 8)
    with pytest.raises(ValueError, match="mode"):
        cache.step(1, mode="ring")
    step = cache.step(2)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="q must be"):
        cache.attend(0, q[:, :1], k, k, step)
    with pytest.raises(ValueError, match="float32"):
        cache.attend(0, q.double(), k, k, step)
    with pytest.raises(ValueError, match="layer"):
        cache.attend(1, q, k, k, step)
    with pytest.raises(ValueError, match="sliding_window"):
        cache.attend(0, q, k, k, step, sliding_window=0)
    with pytest.raises(ValueError, match="softcap"):
        cache.attend(0, q, k, k, step, softcap=-1.0)
    with pytest.raises(ValueError, match="sinks"):
        cache.attend(0, q, k, k, step, sinks=torch.zeros(3))  # one per q head: 4
    with pytest.raises(ValueError, match="v must be"):
        cache.attend(0, q, k, k[..., :6], step)  # the cache's v head dim
    with pytest.raises(ValueError, match="latest step"):
        cache.attend(0, q, k, k, cache.step(1) and step)


def test_chunk_mode_follows_the_bytes():
    # bf16, 128 q heads, 8 kv heads, d = 128 (Llama 3 405B): pass-Q pays off only for short chunks
    assert chunk_mode(100, 100_000, 128, 8, 128, 2) == "pass_q"
    assert chunk_mode(10_000, 100_000, 128, 8, 128, 2) == "pass_kv"
    assert chunk_mode(1000, 0, 128, 8, 128, 2) == "pass_kv"  # nothing cached: a full prefill
    # the same chunk: pass-Q with 8 K/V heads, pass-KV with 1 (MQA moves 8x less K/V)
    assert chunk_mode(1000, 100_000, 128, 8, 128, 2) == "pass_q"
    assert chunk_mode(1000, 100_000, 128, 1, 128, 2) == "pass_kv"
    # MLA (DeepSeek-V3: 128 heads, q/k head dim 192, v 128): k and v counted apart; v's narrower rows
    # shrink pass-Q's float32 partials more than pass-KV's cache, so pass-Q wins up to a larger chunk
    assert chunk_mode(42, 58, 128, 128, 192, 2, 128) == "pass_q"
    assert chunk_mode(42, 58, 128, 128, 192, 2) == "pass_kv"  # were v as wide as k


def test_planner_inference_model_against_metas_figures():
    from ring_ext.tools.planner import inference as planned

    rows = {r["seq"]: r for r in planned.meta_comparison()}
    million = rows[1 << 20]
    assert million["meta_s"] == 77.0 and million["gpus"] == 128
    assert 0.5 < million["predicted_s"] / million["meta_s"] < 2.0, million  # within 2x of the measured
    one, sixteen = (planned.predict_prefill(planned.LLAMA3_405B, 1 << 20, n)["seconds"] for n in (1, 16))
    assert 12 < one / sixteen <= 16, (one, sixteen)  # near-linear, never superlinear
    near, far = (planned.predict_decode(planned.LLAMA3_405B, s, 16)["seconds"] for s in (1 << 17, 1 << 20))
    assert near < far  # a longer cache is read every token
