"""What every rank can rely on, over real Gloo ranks: the output is dense in the caller's layout on
every rank (shards of unequal length included), packed and windowed calls compile with fullgraph and
match eager without recompiling for new document lengths, and ranks handed different calls raise
the same ValueError by default (Note [Cross-rank check] in csrc/cp/consistency.h)."""

from __future__ import annotations

import pytest
import torch
from packed_cases import PackedCase, context

import ring_ext
from ring_ext.layouts import LAYOUTS, SEQ_DIM, from_bshd
from ring_ext.testing.spawn import run_distributed

from ring_cases import Case

# Documents whose placement gives the 4 ranks unequal token counts under every algorithm.
DOCS = (5, 9, 2, 13, 4)
ALGOS = {
    "ring": PackedCase(DOCS),
    "double_ring": PackedCase(DOCS, window=2),
    "ulysses": PackedCase(DOCS, algo="ulysses_cp_algo"),
    "hybrid": PackedCase(DOCS, algo="hybrid_cp_algo", ulysses_degree=2),
}
HEADS, HEAD_DIM = 4, 8


def _count_compiles():
    """A torch.compile backend (aot_eager) that counts the graphs it is given."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend, graphs


def dense_on_every_rank(rank: int, world: int, name: str):
    """Every layout, eager and compiled: out.is_contiguous() and out.view(-1) on every rank."""
    case = ALGOS[name]
    ctx = context(case, world)
    cu = torch.tensor(case.cu_seqlens)
    x = torch.randn(1, int(cu[-1]), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    counts = []
    for layout in LAYOUTS:
        local = ring_ext.shard(from_bshd(x, layout).contiguous(), ctx, SEQ_DIM[layout], cu_seqlens=cu)
        counts.append(local.shape[SEQ_DIM[layout]])

        def call(t, layout=layout):
            return ring_ext.attention(t, t, t, ctx, layout=layout, num_heads=HEADS, cu_seqlens=cu)

        eager = call(local)
        torch._dynamo.reset()  # one fresh graph per (algorithm, layout): no recompile limit to reach
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(local)
        for what, out in (("eager", eager), ("compiled", compiled)):
            assert out.shape == local.shape, (name, layout, what)
            assert out.is_contiguous(), (name, layout, what, rank, out.stride())
            out.view(-1)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    every = ring_ext.collectives.all_gather(torch.tensor(counts[:1]), ctx)
    assert len({int(c) for c in every}) > 1, "the case must give ranks unequal token counts"


def test_output_is_dense_on_every_rank():
    run_distributed(dense_on_every_rank, 4, list(ALGOS), timeout_s=600)


def compiled_matches_eager(rank: int, world: int, name: str):
    """fullgraph compile of a packed + windowed call (cu_seqlens a tensor) matches eager in output and
    gradients; a second batch with other document lengths of the same total runs the same graph."""
    case = ALGOS[name]
    ctx = context(case, world)
    total, g = sum(DOCS), torch.Generator().manual_seed(1)
    batches = [torch.tensor([0, 5, 14, 16, 29, 33]), torch.tensor([0, 11, 12, 20, 30, 33])]
    backend, graphs = _count_compiles()

    def block(q, k, v, cu):
        out = ring_ext.attention(q, k, v, ctx, layout="thd", cu_seqlens=cu, sliding_window=6)
        return (out * out).sum()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for cu in batches:
        full = [torch.randn(total, HEADS, HEAD_DIM, generator=g) for _ in range(3)]
        local = [ring_ext.shard(t, ctx, 0, cu_seqlens=cu) for t in full]
        results = []
        for fn in (block, compiled):
            inputs = [t.clone().requires_grad_() for t in local]
            for t in inputs:  # the shard length varies between batches under CP (by a few tokens)
                torch._dynamo.mark_dynamic(t, 0)
            loss = fn(*inputs, cu)
            results.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1, f"{name}: {len(graphs)} graphs for two batches of other document lengths"


def test_packed_and_windowed_calls_compile_and_match_eager():
    run_distributed(compiled_matches_eager, 4, list(ALGOS), timeout_s=600)


# ---- ranks handed different calls ------------------------------------------------------------

DISAGREEMENTS = [
    (algo, what)
    for algo in ("megatron_cp_algo", "ulysses_cp_algo")
    for what in ("cu_seqlens", "length", "dtype", "sliding_window")
]


def disagreeing_ranks(rank: int, world: int, item):
    """Rank 1 is handed a different call (its own batch): every rank raises the same ValueError, by
    default, and the group works on afterwards."""
    algo, what = item
    ctx = context(Case(algo=algo), world)
    heads = 6  # divisible by the Ulysses degrees 2 and 3
    g = torch.Generator().manual_seed(2)
    odd = rank == 1
    kw = {}
    if what == "cu_seqlens":  # same total, other documents
        cu = torch.tensor([0, 7, 20, 24] if odd else [0, 3, 15, 24])
        x = ring_ext.shard(torch.randn(24, heads, HEAD_DIM, generator=g), ctx, 0, cu_seqlens=cu)
        kw = dict(layout="thd", cu_seqlens=cu)
    else:
        length = 10 if (odd and what == "length") else 8
        x = torch.randn(1, length, heads, HEAD_DIM, generator=g)
        if odd and what == "dtype":
            x = x.bfloat16()
        if odd and what == "sliding_window":
            kw = dict(sliding_window=3)
        kw["layout"] = "bshd"
    with pytest.raises(
        ValueError, match="ranks of the context-parallel group passed different attention calls"
    ):
        ring_ext.attention(x, x, x, ctx, **kw)
    y = torch.randn(1, 8, heads, HEAD_DIM)
    assert ring_ext.attention(y, y, y, ctx, layout="bshd").shape == y.shape  # the group still works


@pytest.mark.parametrize("world", [2, 3])
def test_disagreeing_ranks_raise_by_default(world):
    run_distributed(disagreeing_ranks, world, DISAGREEMENTS, timeout_s=300, pg_timeout_s=30)


def opted_out(rank: int, world: int, _):
    """check_consistency=False runs no collective of its own (the call is made alike here)."""
    ctx = context(Case(), world)
    x = torch.randn(1, 8, HEADS, HEAD_DIM)
    out = ring_ext.attention(x, x, x, ctx, layout="bshd", check_consistency=False)
    torch.testing.assert_close(out, ring_ext.attention(x, x, x, ctx, layout="bshd"), rtol=0, atol=0)


def test_the_check_can_be_skipped():
    run_distributed(opted_out, 2, [None], timeout_s=120)
