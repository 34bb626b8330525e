"""Decoding and chunked prefill over a sharded KV cache (ring_ext/inference.py), over real Gloo ranks at
world sizes 1-4, against the float64 oracle: the cache is built by each algorithm's prefill (ring,
double ring, Ulysses, hybrid), dense batches and packed prompts, GQA, a full and a windowed layer; then
decode steps and chunks by pass-Q, pass-KV and the automatic choice, every output row of every step
held to the tolerance rule (ring_ext/testing/tolerances.py) against attention over the whole final
sequence under the packed mask. Cases with `variant` add a third layer with today's attention:
softcap, sinks (counted once per row, Note [Sinks: once per row]) and a v head dim of its own (MLA).
At 2 ranks also: the decode attention step compiled (fullgraph) equals eager, and every rank merges
to the same bits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ring_ext
import ring_ext.hf
from ring_ext.inference import ShardedKVCache, decode_attention
from ring_ext.testing.documents import cu_of
from ring_ext.testing.reference import attention_reference, packed_mask
from ring_ext.testing.spawn import run_distributed
from ring_ext.testing.tolerances import assert_close_to_oracle, torch_attention

from ring_cases import Case, context

# (mode, new tokens per document) after the prompt: decode, chunks both ways, the automatic choice.
STEPS = (("decode", 1), ("pass_q", 3), ("decode", 1), ("pass_kv", 5), ("auto", 2), ("decode", 1))
HEADS_Q, HEAD_DIM = 12, 8  # 12 heads split over 1-4 Ulysses ranks
SOFTCAP, HEAD_DIM_V = 2.0, 6  # the variant layer: a cap that bites (scores ~N(0, 1)), MLA's own v dim


@dataclasses.dataclass(frozen=True)
class InferCase:
    algo: str = "megatron_cp_algo"
    ulysses_degree: int | None = None
    window: int = 1  # --cp-window-size (double ring)
    docs: tuple[int, ...] | None = None  # packed prompt lengths; None: a dense prompt of 4 * cp tokens
    batch: int = 1
    sliding_window: int = 5  # layer 1's window; layer 0 is full
    heads_kv: int = 2  # GQA 6:1; Ulysses at 3 ranks takes 1 (MQA): the degree and h_kv divide one another
    seed: int = 0
    variant: bool = False  # layer 2: softcap + sinks + v head dim HEAD_DIM_V, windowed like layer 1

    def config(self, world_size: int) -> ring_ext.CPConfig:
        return Case(algo=self.algo, ulysses_degree=self.ulysses_degree, window=self.window).config(world_size)


def run_case(rank: int, world_size: int, case):
    """One spawn runs every case of a world size (spawning is the slow part)."""
    if case == "compile":
        return compiled_decode_matches_eager(rank, world_size)
    if isinstance(case, tuple):
        return generate_matches(rank, world_size, case)
    return run_infer_case(rank, world_size, case)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's whole-sequence q, k, v (float32, bshd) and its attention settings."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window: int | None
    extra: dict  # softcap and sinks (the variant layer), else empty


def make_layers(case: InferCase, total: int) -> list[Layer]:
    """Layer 0 full, layer 1 windowed (the same q, k, v); with case.variant a layer 2, windowed, with
    softcap, sinks and v's own head dim."""
    g = torch.Generator().manual_seed(case.seed)

    def qkv(head_dim_v):
        return (
            torch.randn(case.batch, total, HEADS_Q, HEAD_DIM, generator=g),
            torch.randn(case.batch, total, case.heads_kv, HEAD_DIM, generator=g),
            torch.randn(case.batch, total, case.heads_kv, head_dim_v, generator=g),
        )

    q, k, v = qkv(HEAD_DIM)
    layers = [Layer(q, k, v, None, {}), Layer(q, k, v, case.sliding_window, {})]
    if case.variant:
        extra = {"softcap": SOFTCAP, "sinks": torch.randn(HEADS_Q, generator=g)}
        layers.append(Layer(*qkv(HEAD_DIM_V), case.sliding_window, extra))
    return layers


def eager_attention(q, k, v, mask, softcap, sinks):
    """PyTorch's attention with softcap and sinks in q's dtype, as transformers' eager attention computes
    it (SDPA has neither): the variant layer's yardstick. [b, s, h, d] in and out; mask [sq, sk]."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))  # [b, sk, hq, d]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
    sink = sinks[None, :, None, None].expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], -1), dim=-1)[..., :-1]  # [b, h, sq, sk]
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def run_infer_case(rank: int, world_size: int, case: InferCase):
    ctx = context(case, world_size)
    prompt = case.docs if case.docs is not None else (4 * world_size,)
    added = [sum(n for _, n in STEPS)] * len(prompt)
    cu_final = cu_of([p + a for p, a in zip(prompt, added)])
    layers = make_layers(case, cu_final[-1])

    def index_of(docs, positions):  # token (document, position) -> its index in the final sequence
        return torch.tensor(cu_final)[docs] + positions

    packed = {} if case.docs is None else {"cu_seqlens": cu_of(prompt)}
    kwargs = {"cu_seqlens": cu_of(prompt)} if case.docs is not None else {"seq_len": prompt[0]}
    cache = ShardedKVCache(ctx, len(layers), reserve=2, **kwargs)
    prompt_index = torch.cat([torch.arange(cu_final[d], cu_final[d] + n) for d, n in enumerate(prompt)])
    got = [[] for _ in layers]  # per layer: [(final indices, output rows)]
    for i, layer in enumerate(layers):
        q_l, k_l, v_l = (
            ring_ext.shard(t[:, prompt_index], ctx, 1, **packed) for t in (layer.q, layer.k, layer.v)
        )
        out_l = cache.prefill(i, q_l, k_l, v_l, sliding_window=layer.window, **layer.extra)
        got[i].append((prompt_index, ring_ext.unshard(out_l, ctx, 1, **packed)))
    for mode, n in STEPS:
        step = cache.step(n, mode)
        index = index_of(step.docs, step.positions)
        mine = index if mode == "decode" else index[step.local]
        for i, layer in enumerate(layers):
            q, k, v = (t[:, mine] for t in (layer.q, layer.k, layer.v))
            out = cache.attend(i, q, k, v, step, sliding_window=layer.window, **layer.extra)
            got[i].append((mine, out))
    assert cache.nbytes(live_only=True) > 0
    for i, layer in enumerate(layers):
        positions = torch.arange(cu_final[-1])
        mask = packed_mask(positions, positions, cu_final, True, layer.window)
        q, k, v = layer.q, layer.k, layer.v
        expected, _ = attention_reference(q, k, v, causal=False, mask=mask, **layer.extra)
        if layer.extra:
            baseline = eager_attention(q, k, v, mask, **layer.extra)
        else:
            (baseline,) = torch_attention(q, k, v, causal=False, mask=mask)
        rows = torch.cat([r for r, _ in got[i]])
        actual = torch.cat([o for _, o in got[i]], 1)
        what = f"rank {rank}/{world_size} {case} layer {i} (window {layer.window}, {layer.extra})"
        assert_close_to_oracle(actual, expected[:, rows], baseline[:, rows], what)
    if case.sliding_window < 4 * world_size:  # the windowed layer dropped what its window cannot see
        assert cache.layers[1].nbytes(live_only=True) < cache.layers[0].nbytes(live_only=True)


def compiled_decode_matches_eager(rank: int, world_size: int):
    """The decode attention step (fwd on this rank's rows, one all-gather, the LSE merge, the sinks
    folded in) under torch.compile(fullgraph=True) equals eager, on every rank; with softcap, sinks
    and v's own head dim."""
    ctx = context(InferCase(), world_size)
    g = torch.Generator().manual_seed(rank)  # each rank its own cache rows
    same = torch.Generator().manual_seed(7)  # the same queries and sinks everywhere
    q, sinks = torch.randn(1, 2, 4, 8, generator=same), torch.randn(4, generator=same)
    k, v = torch.randn(1, 6, 2, 8, generator=g), torch.randn(1, 6, 2, HEAD_DIM_V, generator=g)
    visible = torch.tensor([[0, 1], [4, 6]])

    def step(q, k, v, visible, sinks):
        return decode_attention(q, k, v, visible, 0.35, ctx.group.group_name, ctx.cp_size, SOFTCAP, sinks)

    eager = step(q, k, v, visible, sinks)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, visible, sinks)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    every = ring_ext.collectives.all_gather(eager, ctx)
    for other in every:  # every rank merged the same partials in the same order
        torch.testing.assert_close(other, eager, rtol=0, atol=0)


CASES = {  # variant: + the softcap/sinks/MLA layer, over caches built by ring, double ring and Ulysses
    1: [InferCase(batch=2, variant=True), InferCase(docs=(7, 0, 10), variant=True)],
    2: [
        InferCase(batch=2, variant=True),
        InferCase(algo="ulysses_cp_algo", docs=(9, 4, 13), variant=True),
        InferCase(algo="hybrid_cp_algo", ulysses_degree=2, sliding_window=3),
        "compile",
    ],  # + GENERATE below (ring_ext.hf.generate), in the same spawn
    3: [
        InferCase(docs=(5, 11, 2), variant=True),
        InferCase(algo="ulysses_cp_algo", batch=2, sliding_window=4, heads_kv=1, variant=True),
    ],
    4: [
        InferCase(window=2, docs=(6, 13, 3, 9), variant=True),
        InferCase(algo="hybrid_cp_algo", ulysses_degree=2),
        InferCase(algo="ulysses_cp_algo", docs=(10, 1, 14), sliding_window=7, variant=True),
    ],
}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_decode_and_chunks_match_the_oracle(world_size):
    """Every case of CASES[world_size] in one spawn; at 2 ranks also the compiled decode step and
    ring_ext.hf.generate against the model's own generate (GENERATE)."""
    run_distributed(run_case, world_size, CASES[world_size], timeout_s=300)


# ---- ring_ext.hf.generate at 2 ranks -------------------------------------------------------------

GENERATE = [  # (algorithm, model, batch, prompt length): lengths no placement divides evenly
    ("megatron_cp_algo", "llama", 2, 13),
    ("ulysses_cp_algo", "llama", 1, 10),
    ("megatron_cp_algo", "mistral", 2, 11),  # window 5: the cache drops rows as it decodes
    ("ulysses_cp_algo", "mistral", 1, 9),
    ("megatron_cp_algo", "qwen2", 1, 12),  # layer 0 full, layer 1 windowed (6)
    ("megatron_cp_algo", "gemma2", 2, 11),  # softcap 50; layer 0 windowed (8), layer 1 full
    ("ulysses_cp_algo", "gemma2", 1, 10),
    ("megatron_cp_algo", "gpt_oss", 1, 13),  # sinks, counted once per row; layer 0 windowed (8)
    ("ulysses_cp_algo", "gpt_oss", 2, 9),
    ("megatron_cp_algo", "deepseek_v3", 2, 10),  # MLA: v head dim 12, q/k 24
    ("ulysses_cp_algo", "deepseek_v3", 1, 11),
]


def generate_matches(rank: int, world_size: int, case):
    """Greedy ring_ext.hf.generate under CP returns the model's own (no CP) generate on every rank."""
    from inference_models import own_generate, prompt, tiny_model

    algo, name, batch, seq = case
    ctx = context(InferCase(algo=algo), world_size)
    model = tiny_model(name)
    ids = prompt(batch, seq)
    expected = own_generate(model, ids, max_new_tokens=8, do_sample=False)
    got = ring_ext.hf.generate(model, ids, ctx, max_new_tokens=8)
    assert torch.equal(got, expected), (rank, case, got, expected)


try:
    import transformers  # noqa: F401

    CASES[2] = CASES[2] + GENERATE  # one spawn at 2 ranks: oracle cases, compile, generate
except ImportError:  # the hf extra is not installed: pip install .[hf]
    pass
