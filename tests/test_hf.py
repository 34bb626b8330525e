"""ring_ext as a transformers attention implementation, always against the model's own attention
(eager or SDPA, one process, the full sequence); tiny random models built from configs, nothing
downloaded. Every architecture either matches or raises ValueError naming what it cannot honour
(ring_ext/integrations/hf.py, Note [Nothing silently wrong]); with context parallelism over Gloo the
logits and gradients match the model's own attention on the unsharded sequence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed: pip install .[hf]")

import ring_ext  # noqa: E402
import ring_ext.hf  # noqa: E402
from ring_ext.testing.spawn import run_distributed  # noqa: E402
from ring_ext.testing.tolerances import assert_rel_l2  # noqa: E402

VOCAB = 97
SEQ = 24
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
# Multi-head latent attention: q/k head dim 16 + 8 = 24, v head dim 12 (ring_ext's v head dim of its own);
# its K/V are expanded to every head, so as many K/V heads as q heads.
MLA = dict(
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=12,
    num_key_value_heads=4,
)  # fmt: skip
MLA_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
ARCHS = {  # name: (config class, settings beyond SMALL)
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, MOE),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "mistral": (transformers.MistralConfig, {}),
    "gemma2": (transformers.Gemma2Config, {}),  # attn_logit_softcapping=50 by default
    "vaultgemma": (transformers.VaultGemmaConfig, {}),  # softcap too
    "gemma3": (transformers.Gemma3TextConfig, {}),
    "gpt_oss": (transformers.GptOssConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),  # sinks
    "mimo_v2_flash": (transformers.MiMoV2FlashConfig, {}),  # sinks
    "deepseek_v3": (transformers.DeepseekV3Config, {**MLA, **MLA_MOE, "n_group": 1, "topk_group": 1}),
    "deepseek_v2": (transformers.DeepseekV2Config, {**MLA, **MLA_MOE}),
    "minicpm3": (transformers.MiniCPM3Config, MLA),
    "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, {**MLA, **MLA_MOE}),
    "cohere": (transformers.CohereConfig, {}),
    "cohere2": (transformers.Cohere2Config, {}),
    "olmo2": (transformers.Olmo2Config, {}),
    "granite": (transformers.GraniteConfig, {}),
    "starcoder2": (transformers.Starcoder2Config, {}),
    "llama4": (transformers.Llama4TextConfig, {"num_local_experts": 2, "intermediate_size_mlp": 128}),
}
QWEN_WINDOW = {"use_sliding_window": True, "max_window_layers": 1}  # layer 1 windowed

# (arch, config overrides, None = matches the model's own attention / regex of the ValueError)
MATRIX = [
    ("llama", {}, None),
    ("qwen2", {}, None),  # default use_sliding_window=False
    ("qwen2", {**QWEN_WINDOW, "sliding_window": 8}, None),
    ("qwen2", {**QWEN_WINDOW, "sliding_window": SEQ}, None),  # window = whole sequence: a no-op
    ("qwen3", {}, None),
    ("qwen2_moe", {}, None),
    ("qwen2_moe", {**QWEN_WINDOW, "sliding_window": 8}, None),  # window only in the mask: honoured
    ("phi3", {}, None),
    ("phi3", {"sliding_window": 8}, None),
    ("mistral", {"sliding_window": None}, None),
    ("mistral", {"sliding_window": 8}, None),
    ("mistral", {"sliding_window": SEQ - 1}, None),  # drops one key: honoured, not a no-op
    ("mistral", {"sliding_window": SEQ}, None),
    ("gemma2", {"sliding_window": 8}, None),  # the default softcap, 50
    ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 2.0}, None),  # a cap that bites
    ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": None}, None),
    ("gemma2", {"sliding_window": 64, "attn_logit_softcapping": None}, None),
    ("gemma3", {"sliding_window": 8}, None),
    ("gemma3", {"sliding_window": 64}, None),
    ("gpt_oss", {"sliding_window": 8}, None),  # sinks, alternating windowed and full layers
    ("gpt_oss", {"sliding_window": 64}, None),
    ("vaultgemma", {"sliding_window": 8}, None),
    ("mimo_v2_flash", {}, None),
    ("deepseek_v3", {}, None),
    ("deepseek_v2", {}, None),
    ("minicpm3", {}, None),
    ("glm4_moe_lite", {}, None),
    ("cohere", {}, None),
    ("cohere2", {"sliding_window": 8}, None),
    ("cohere2", {"sliding_window": 64}, None),
    ("olmo2", {}, None),
    ("granite", {}, None),
    ("starcoder2", {"sliding_window": None}, None),
    ("starcoder2", {"sliding_window": 8}, None),
    ("llama4", {"attention_chunk_size": 8}, None),  # chunked attention, as attention_chunk_size
    ("llama4", {"attention_chunk_size": 64}, None),
]


def tiny_model(arch="llama", seed=0, causal=True, **overrides):
    config_class, settings = ARCHS[arch]
    config = config_class(**{**SMALL, **settings, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if not causal:  # a bidirectional variant of the same model: every key visible
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
    return model


def random_ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_of(model, impl, ids, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize(("arch", "overrides", "error"), MATRIX, ids=[f"{a}-{o}" for a, o, _ in MATRIX])
def test_architecture_matches_eager_or_raises(arch, overrides, error):
    name = ring_ext.hf.register()
    model = tiny_model(arch, **overrides)
    ids = random_ids()
    if error is not None:
        with pytest.raises(ValueError, match=error):
            logits_of(model, name, ids)
        return
    reference = logits_of(model, "eager", ids)
    assert_rel_l2(logits_of(model, name, ids), reference, torch.float32, f"{arch} {overrides} logits")


def loss_of(logits: torch.Tensor, numel: int) -> torch.Tensor:
    return logits.square().sum() / numel  # a share of the mean over the full sequence


def logits_and_grads(model, impl, ids, positions=None, ctx=None, numel=None, use_cache=True):
    model.set_attn_implementation(impl)
    model.zero_grad()
    kwargs = {} if ctx is None else {"cp_context": ctx}
    logits = model(ids, position_ids=positions, use_cache=use_cache, **kwargs).logits
    loss_of(logits, numel or logits.numel()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_llama_matches_sdpa_with_gradients():
    name = ring_ext.hf.register()
    model = tiny_model("llama")
    ids = random_ids(seq=45)
    ref_logits, ref_grads = logits_and_grads(model, "sdpa", ids)
    logits, grads = logits_and_grads(model, name, ids)
    assert_rel_l2(logits, ref_logits, torch.float32, "logits")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, "param grad")


def test_all_ones_attention_mask_matches():
    name = ring_ext.hf.register()
    model, ids = tiny_model("llama"), random_ids()
    ones = torch.ones_like(ids)
    assert_rel_l2(
        logits_of(model, name, ids, attention_mask=ones), logits_of(model, "eager", ids), torch.float32
    )


def test_padding_mask_is_rejected():
    name = ring_ext.hf.register()
    model, ids = tiny_model("llama"), random_ids()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        logits_of(model, name, ids, attention_mask=padded)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask"):  # a prepared 4-D mask
        ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4))


def per_document_logits(model, ids, cu):
    """The model's own (eager) attention run on each document alone: what a packed row must give."""
    return torch.cat([logits_of(model, "eager", ids[:, a:b]) for a, b in zip(cu, cu[1:]) if b > a], dim=1)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 5}), ("qwen2", {})])
def test_packed_row_matches_each_document_alone(arch, overrides):
    """A packed row (positions restarting per document, as DataCollatorWithFlattening gives; or its
    flash-attention varlen arguments) equals the model run on every document separately."""
    name = ring_ext.hf.register()
    model, ids = tiny_model(arch, **overrides), random_ids(batch=1)
    cu = [0, 10, 11, 11, SEQ]
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])])[None]
    expected = per_document_logits(model, ids, cu)
    got = logits_of(model, name, ids, position_ids=positions, use_cache=False)
    assert_rel_l2(got, expected, torch.float32, f"{arch} packed by positions")
    varlen = torch.tensor(cu, dtype=torch.int32)
    got = logits_of(
        model, name, ids, position_ids=positions, use_cache=False, cu_seq_lens_q=varlen, cu_seq_lens_k=varlen
    )
    assert_rel_l2(got, expected, torch.float32, f"{arch} packed by cu_seq_lens")


def test_chunked_attention_in_packed_rows_is_rejected():
    """transformers chunks a packed row by its token index across documents, ring_ext each document."""
    name = ring_ext.hf.register()
    model = tiny_model("llama4", attention_chunk_size=4)
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with pytest.raises(ValueError, match="splits a packed row"):
        logits_of(model, name, random_ids(batch=1), position_ids=positions, cu_seqlens=[0, 10, 24])


def test_bad_packing_is_rejected():
    name = ring_ext.hf.register()
    model, ids = tiny_model("llama"), random_ids()
    positions = torch.cat([torch.arange(10), torch.arange(SEQ - 10)])[None].expand(2, -1)  # batch 2
    with pytest.raises(ValueError, match="batch 1"):
        logits_of(model, name, ids, position_ids=positions, use_cache=False)
    jump = torch.cat([torch.arange(10), torch.arange(SEQ - 10) + 30])[None]
    with pytest.raises(ValueError, match="jump"):
        logits_of(model, name, ids[:1], position_ids=jump, use_cache=False)
    a, b = torch.tensor([0, 10, SEQ]), torch.tensor([0, 12, SEQ])
    with pytest.raises(ValueError, match="cu_seq_lens_q == cu_seq_lens_k"):
        logits_of(model, name, ids[:1], cu_seq_lens_q=a, cu_seq_lens_k=b)


def test_attention_dropout_in_training_is_rejected():
    name = ring_ext.hf.register()
    model = tiny_model("llama", attention_dropout=0.1).train()
    model.set_attn_implementation(name)
    with pytest.raises(ValueError, match="dropout=0.1"):
        model(random_ids())


def test_kv_cache_decoding_is_rejected():
    name = ring_ext.hf.register()
    model = tiny_model("llama")
    model.set_attn_implementation(name)
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(random_ids(batch=1), max_new_tokens=2, do_sample=False)


def test_unsupported_arguments_are_rejected():
    q = torch.randn(1, 2, 4, 8)
    forward = ring_ext.hf.ring_ext_attention_forward
    module = torch.nn.Module()
    for kwargs, error in [
        ({"output_attentions": True}, "attention weights"),
        ({"position_bias": torch.zeros(1, 2, 4, 4)}, "position bias"),
        ({"head_mask": torch.ones(2)}, "head mask"),
        ({"some_new_argument": 1}, "'some_new_argument'"),
    ]:
        with pytest.raises(ValueError, match=error):
            forward(module, q, q, q, None, **kwargs)
    out, _ = forward(module, q, q, q, None, output_attentions=False, use_cache=True, softcap=None, s_aux=None)
    assert out.shape == (1, 4, 2, 8)


def test_mask_overlays_as_key_intervals_in_one_process():
    """Masks a model builds beyond causal (or/and overlays, token blocks): in one process read off as
    key intervals (one or two per row) and computed exactly; a row of three intervals raises, and so does any such
    mask with context parallelism (test_gemma3_image_with_cp_is_rejected)."""
    from transformers.masking_utils import create_causal_mask

    name = ring_ext.hf.register()
    config = tiny_model("llama").config
    config._attn_implementation = name
    embeds = torch.zeros(1, 8, 4)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    causal = torch.ones(8, 8).tril().bool()
    image = torch.zeros(8, 8, dtype=torch.bool)
    image[2:5, 2:5] = True  # tokens 2..4 see each other (an image)
    blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, -1]])
    mask = create_causal_mask(config, embeds, None, None, block_sequence_ids=blocks)
    got, _ = ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, k, v, mask, scaling=0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal | image, scale=0.5)
    torch.testing.assert_close(got, want.transpose(1, 2))
    # two intervals per row: a shared prompt (tokens 0..3) with two answers (4..5, 6..7) that see the
    # prompt and themselves; an overlay that lets every row see key 7 too
    answer = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    shared = create_causal_mask(
        config, embeds, None, None,
        and_mask_function=lambda b, h, q, kv: (answer[kv] == 0) | (answer[kv] == answer[q]),
    )  # fmt: skip
    sees_7 = torch.zeros(8, 8, dtype=torch.bool)
    sees_7[:, 7] = True
    for overlay, full in [(shared, causal & ((answer[None, :] == 0) | (answer[None, :] == answer[:, None]))),
                          (create_causal_mask(config, embeds, None, None, or_mask_function=lambda b, h, q, kv: kv == 7),
                           causal | sees_7)]:  # fmt: skip
        got, _ = ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, k, v, overlay, scaling=0.5)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=0.5)
        torch.testing.assert_close(got, want.transpose(1, 2))
    three = create_causal_mask(
        config, embeds, None, None, or_mask_function=lambda b, h, q, kv: (kv == 7) | (kv == 5)
    )
    with pytest.raises(ValueError, match="more than two intervals"):  # row 1 sees keys 0..1, 5 and 7
        ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, k, v, three)


def tiny_gemma3(seq=24, image_at=5):
    """A tiny Gemma 3 with a vision tower and one 4-token image at `image_at` (bidirectional among its
    tokens, a sliding window of 8 on the local layers): model, its inputs."""
    text = {**SMALL, "vocab_size": 300, "sliding_window": 8}
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    ids = torch.randint(0, 290, (1, seq), generator=torch.Generator().manual_seed(3))
    ids[0, image_at : image_at + 4] = 299
    inputs = {
        "input_ids": ids,
        "pixel_values": torch.randn(1, 3, 28, 28),
        "token_type_ids": (ids == 299).long(),
    }
    return model, inputs


def test_gemma3_with_an_image_matches_eager_with_gradients():
    name = ring_ext.hf.register()
    model, inputs = tiny_gemma3()
    results = []
    for impl in ("eager", name):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(**inputs).logits
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ref, ref_grads), (got, grads) = results
    model.set_attn_implementation("eager")
    with torch.no_grad():
        plain = model(**{**inputs, "token_type_ids": None}).logits
    assert (plain - ref).norm() > 1e-3 * ref.norm()  # the image's block changes the result
    assert_rel_l2(got, ref, torch.float32, "gemma3 image logits")
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, "gemma3 image param grad")


# What makes each architecture's window active (Qwen2: only with use_sliding_window).
ARCH_WINDOW = {"qwen2": QWEN_WINDOW}
# Architectures compared with their eager attention (no SDPA path, or one that ignores is_causal=False).
EAGER_ONLY = ("gemma2", "gpt_oss", "deepseek_v3", "llama4")


@dataclasses.dataclass(frozen=True)
class HFCase:
    algo: str
    causal: bool = True
    seq: int = 32
    ulysses_degree: int | None = None
    arch: str = "llama"
    sliding_window: int | None = None
    use_cache: bool = True  # False: no cache, so transformers sees the zigzag shard as packed documents
    sharded_positions: bool = True
    placement: int | None = None  # --cp-sliding-window: contiguous token placement
    error: str | None = None
    config: tuple = ()  # (name, value) settings of the model config beyond the arch's


def run_hf_case(rank: int, world_size: int, case: HFCase):
    """Every rank: the model on its shard with CP, compared with the model's own SDPA (Gemma2: eager) attention on the
    whole sequence in one process; or, for a case that cannot be honoured, the same ValueError."""
    name = ring_ext.hf.register()
    extra = (
        {}
        if case.arch == "llama"
        else {"sliding_window": case.sliding_window, **ARCH_WINDOW.get(case.arch, {})}
    )
    model = tiny_model(case.arch, causal=case.causal, **extra, **dict(case.config))
    ids = random_ids(seq=case.seq, seed=2)
    positions = torch.arange(case.seq)[None].expand(2, -1)
    ref_impl = "eager" if case.arch in EAGER_ONLY else "sdpa"  # eager ignores is_causal=False
    ref_logits, ref_grads = logits_and_grads(model, ref_impl, ids, positions)
    cfg = ring_ext.CPConfig(
        context_parallel_size=world_size,
        context_parallel_algo=case.algo,
        ulysses_degree_in_cp=case.ulysses_degree,
        attention_mask_type="causal" if case.causal else "general",
        cp_sliding_window=case.placement,
    )
    ctx = ring_ext.initialize(cfg)
    ids_l, pos_l = (ring_ext.shard(t, ctx, seq_dim=1) for t in (ids, positions))
    if not case.sharded_positions:
        pos_l = positions[:, : ids_l.shape[1]]
    numel = ref_logits.numel()
    if case.error is not None:
        with pytest.raises(ValueError, match=case.error):
            logits_and_grads(model, name, ids_l, pos_l, ctx, numel, case.use_cache)
        return
    logits_l, grads = logits_and_grads(model, name, ids_l, pos_l, ctx, numel, case.use_cache)
    for g in grads:
        dist.all_reduce(g)  # each rank holds its tokens' share of every parameter's gradient
    logits = ring_ext.unshard(logits_l, ctx, seq_dim=1)
    assert_rel_l2(logits, ref_logits, torch.float32, f"{case} logits")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, f"{case} param grad")


def test_context_parallel_matches_the_models_own_attention():
    cases = [
        HFCase("megatron_cp_algo", use_cache=False),
        HFCase("megatron_cp_algo", causal=False),
        HFCase("ulysses_cp_algo"),
        HFCase("ulysses_cp_algo", causal=False),
        HFCase("hybrid_cp_algo", ulysses_degree=2),
        # the window covers the whole 32-token sequence: a no-op, honoured
        HFCase("megatron_cp_algo", arch="mistral", sliding_window=32, use_cache=False),
        # windows smaller than the sequence, through the ring, Ulysses and hybrid
        HFCase("megatron_cp_algo", arch="mistral", sliding_window=6),
        HFCase("ulysses_cp_algo", arch="qwen2", sliding_window=5),
        HFCase("hybrid_cp_algo", ulysses_degree=2, arch="gemma2", sliding_window=9),
        # the windowed placement: a window model, and Qwen2's full layer 0 on contiguous shards
        HFCase("megatron_cp_algo", arch="mistral", sliding_window=6, placement=6),
        HFCase("hybrid_cp_algo", ulysses_degree=2, arch="qwen2", sliding_window=5, placement=5),
        HFCase("megatron_cp_algo", sharded_positions=False, error="position_ids must be"),
    ]
    run_distributed(run_hf_case, 4, cases, timeout_s=300)


def test_todays_models_match_their_eager_attention_with_gradients():
    """Gemma 2 (softcap 50 and 2, windows), gpt-oss (sinks, alternating windows) and DeepSeek-V3 (MLA:
    v head dim 12, q/k 24): logits and every parameter's gradient as the model's own eager attention."""
    name = ring_ext.hf.register()
    ids = random_ids()
    for arch, overrides in [
        ("gemma2", {"sliding_window": 8}),
        ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 2.0}),
        ("gpt_oss", {"sliding_window": 8}),
        ("deepseek_v3", {}),
        ("llama4", {"attention_chunk_size": 8}),
    ]:
        model = tiny_model(arch, **overrides).train()
        ref_logits, ref_grads = logits_and_grads(model, "eager", ids)
        logits, grads = logits_and_grads(model, name, ids)
        assert len(grads) == len(ref_grads) > 0
        assert_rel_l2(logits, ref_logits, torch.float32, f"{arch} {overrides} logits")
        for g, r in zip(grads, ref_grads):
            assert_rel_l2(g, r, torch.float32, f"{arch} {overrides} param grad")


def test_todays_models_with_cp_match_their_eager_attention():
    """The same three families at 2 ranks, ring and Ulysses: dense rows against the model's own eager
    attention on the whole sequence, and packed rows trained with CP against the same rows without."""
    cases = [
        HFCase(algo, arch=arch, sliding_window=window)
        for algo in ("megatron_cp_algo", "ulysses_cp_algo")
        for arch, window in (("gemma2", 9), ("gpt_oss", 7), ("deepseek_v3", None))
    ]
    # Llama 4's chunked attention (chunks of 6 tokens of a 32-token row on zigzag or contiguous shards)
    cases += [
        HFCase(algo, arch="llama4", config=(("attention_chunk_size", 6),))
        for algo in ("megatron_cp_algo", "ulysses_cp_algo")
    ]
    run_distributed(run_hf_case, 2, cases, timeout_s=300)
    packed = [
        ("megatron_cp_algo", "gemma2", 5),
        ("ulysses_cp_algo", "gpt_oss", 4),
        ("megatron_cp_algo", "deepseek_v3", None),
        ("ulysses_cp_algo", "deepseek_v3", None),
    ]
    run_distributed(run_hf_packed_case, 2, packed, timeout_s=300)


def run_hf_packed_case(rank: int, world_size: int, case):
    """A packed row (documents of uneven lengths, positions restarting per document) trained one step
    with CP (shard_packed_batch, packed_loss, reduce_gradients) gives the loss and parameter gradients of
    the same row without CP (per-document positions, labels shifted inside documents)."""
    algo, arch, window = case
    name = ring_ext.hf.register()
    extra = {} if window is None else {"sliding_window": window, **ARCH_WINDOW.get(arch, {})}
    model = tiny_model(arch, **extra)
    docs = [7, 1, 0, 13, 2, 10]
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    ids = random_ids(batch=1, seq=cu[-1], seed=5)
    positions = torch.cat([torch.arange(n) for n in docs])[None]
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids}

    def step(ctx, parts):
        model.set_attn_implementation(name)
        model.zero_grad()
        kwargs = {} if ctx is None else {"cp_context": ctx, "cu_seqlens": parts["cu_seqlens"]}
        logits = model(
            parts["input_ids"], position_ids=parts["position_ids"], use_cache=False, **kwargs
        ).logits
        loss = ring_ext.hf.packed_loss(logits, parts["labels"], ctx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    cfg = ring_ext.CPConfig(
        context_parallel_size=world_size,
        context_parallel_algo=algo,
        ulysses_degree_in_cp=2 if algo == "hybrid_cp_algo" else None,
    )
    ctx = ring_ext.initialize(cfg)
    whole = ring_ext.hf.shard_packed_batch(batch, None)  # the whole row, labels shifted
    ref_loss, ref_grads = step(None, whole)
    loss, _ = step(ctx, ring_ext.hf.shard_packed_batch(batch, ctx))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    ring_ext.reduce_gradients(model.parameters(), ctx)
    total = ring_ext.all_reduce(loss, ctx)
    assert_rel_l2(total, ref_loss, torch.float32, f"{case} loss")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float32, f"{case} param grad")


def test_packed_training_with_cp_matches_without():
    cases = [
        ("megatron_cp_algo", "llama", None),
        ("ulysses_cp_algo", "mistral", 4),
        ("hybrid_cp_algo", "qwen2", 6),
    ]
    run_distributed(run_hf_packed_case, 4, cases, timeout_s=300)


def test_mask_overlays_with_cp_are_rejected(world):
    """With context parallelism (a one-rank world suffices: the path is the same) a mask that is not
    ring_ext's rule raises: transformers evaluates it on the shard's own indices."""
    from transformers.masking_utils import create_causal_mask

    name = ring_ext.hf.register()
    config = tiny_model("llama").config
    config._attn_implementation = name
    ctx = ring_ext.initialize(
        ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo="megatron_cp_algo")
    )
    blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, -1]])
    mask = create_causal_mask(config, torch.zeros(1, 8, 4), None, None, block_sequence_ids=blocks)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="not with context parallelism"):
        ring_ext.hf.ring_ext_attention_forward(torch.nn.Module(), q, q, q, mask, cp_context=ctx)
