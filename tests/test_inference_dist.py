"""Decoding and chunked prefill over a sharded KV cache (ring_ext/inference.py), over real Gloo ranks at
world sizes 1-4, against the float64 oracle: the cache is built by each algorithm's prefill (ring,
double ring, Ulysses, hybrid), dense batches and packed prompts, GQA, a full and a windowed layer; then
decode steps and chunks by pass-Q, pass-KV and the automatic choice, every output row of every step
held to the tolerance rule (ring_ext/testing/tolerances.py) against attention over the whole final
sequence under the packed mask. At 2 ranks also: the decode attention step compiled (fullgraph)
equals eager, and every rank merges to the same bits."""

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

    def config(self, world_size: int) -> ring_ext.CPConfig:
        return Case(algo=self.algo, ulysses_degree=self.ulysses_degree, window=self.window).config(world_size)


def run_case(rank: int, world_size: int, case):
    """One spawn runs every case of a world size (spawning is the slow part)."""
    if case == "compile":
        return compiled_decode_matches_eager(rank, world_size)
    if isinstance(case, tuple):
        return generate_matches(rank, world_size, case)
    return run_infer_case(rank, world_size, case)


def run_infer_case(rank: int, world_size: int, case: InferCase):
    ctx = context(case, world_size)
    prompt = case.docs if case.docs is not None else (4 * world_size,)
    added = [sum(n for _, n in STEPS)] * len(prompt)
    cu_final = cu_of([p + a for p, a in zip(prompt, added)])
    g = torch.Generator().manual_seed(case.seed)
    shape_q = (case.batch, cu_final[-1], HEADS_Q, HEAD_DIM)
    shape_kv = (case.batch, cu_final[-1], case.heads_kv, HEAD_DIM)
    q, k, v = (
        torch.randn(shape_q, generator=g),
        torch.randn(shape_kv, generator=g),
        torch.randn(shape_kv, generator=g),
    )
    windows = (None, case.sliding_window)

    def index_of(docs, positions):  # token (document, position) -> its index in the final sequence
        return torch.tensor(cu_final)[docs] + positions

    packed = {} if case.docs is None else {"cu_seqlens": cu_of(prompt)}
    kwargs = {"cu_seqlens": cu_of(prompt)} if case.docs is not None else {"seq_len": prompt[0]}
    cache = ShardedKVCache(ctx, 2, reserve=2, **kwargs)
    prompt_index = torch.cat([torch.arange(cu_final[d], cu_final[d] + n) for d, n in enumerate(prompt)])
    got = {0: [], 1: []}  # layer -> [(final indices, output rows)]
    for layer, window in enumerate(windows):
        q_l, k_l, v_l = (ring_ext.shard(t[:, prompt_index], ctx, 1, **packed) for t in (q, k, v))
        out_l = cache.prefill(layer, q_l, k_l, v_l, sliding_window=window)
        got[layer].append((prompt_index, ring_ext.unshard(out_l, ctx, 1, **packed)))
    for mode, n in STEPS:
        step = cache.step(n, mode)
        index = index_of(step.docs, step.positions)
        mine = index if mode == "decode" else index[step.local]
        for layer, window in enumerate(windows):
            out = cache.attend(layer, q[:, mine], k[:, mine], v[:, mine], step, sliding_window=window)
            got[layer].append((mine, out))
    live = cache.nbytes(live_only=True)
    assert live > 0
    for layer, window in enumerate(windows):
        mask = packed_mask(torch.arange(cu_final[-1]), torch.arange(cu_final[-1]), cu_final, True, window)
        expected, _ = attention_reference(q, k, v, causal=False, mask=mask)
        (baseline,) = torch_attention(q, k, v, causal=False, mask=mask)
        rows = torch.cat([i for i, _ in got[layer]])
        actual = torch.cat([o for _, o in got[layer]], 1)
        what = f"rank {rank}/{world_size} {case} layer {layer} (window {window})"
        assert_close_to_oracle(actual, expected[:, rows], baseline[:, rows], what)
    if case.sliding_window < 4 * world_size:  # the windowed layer dropped what its window cannot see
        assert cache.layers[1].nbytes(live_only=True) < cache.layers[0].nbytes(live_only=True)


def compiled_decode_matches_eager(rank: int, world_size: int):
    """The decode attention step (fwd on this rank's rows, one all-gather, the LSE merge) under
    torch.compile(fullgraph=True) equals eager, on every rank."""
    ctx = context(InferCase(), world_size)
    g = torch.Generator().manual_seed(rank)  # each rank its own cache rows
    q = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(7))  # the same queries everywhere
    k, v = torch.randn(1, 6, 2, 8, generator=g), torch.randn(1, 6, 2, 8, generator=g)
    visible = torch.tensor([[0, 1], [4, 6]])

    def step(q, k, v, visible):
        return decode_attention(q, k, v, visible, 0.35, ctx.group.group_name, ctx.cp_size)

    eager = step(q, k, v, visible)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, visible)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    every = ring_ext.collectives.all_gather(eager, ctx)
    for other in every:  # every rank merged the same partials in the same order
        torch.testing.assert_close(other, eager, rtol=0, atol=0)


CASES = {
    1: [InferCase(batch=2), InferCase(docs=(7, 0, 10))],
    2: [
        InferCase(batch=2),
        InferCase(algo="ulysses_cp_algo", docs=(9, 4, 13)),
        InferCase(algo="hybrid_cp_algo", ulysses_degree=2, sliding_window=3),
        "compile",
    ],  # + GENERATE below (ring_ext.hf.generate), in the same spawn
    3: [InferCase(docs=(5, 11, 2)), InferCase(algo="ulysses_cp_algo", batch=2, sliding_window=4, heads_kv=1)],
    4: [
        InferCase(window=2, docs=(6, 13, 3, 9)),
        InferCase(algo="hybrid_cp_algo", ulysses_degree=2),
        InferCase(algo="ulysses_cp_algo", docs=(10, 1, 14), sliding_window=7),
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
