"""Packed documents and sliding windows through every algorithm on real Gloo processes, forward and
backward against the float64 oracle (tests/packed_cases.py): ring, double ring, Ulysses and hybrid;
causal and general; thd and the 4-D layouts; GQA; fp32/bf16/fp16; document lengths 0, 1, 2, fewer
than cp, more than S/cp, totals divisible by nothing, a single document; windows of 1, smaller than a
tile, around S/cp and larger than S; a dense sequence with a window. One spawn per world size."""

from __future__ import annotations

import pytest
import torch
from packed_cases import PackedCase, context, lognormal_docs, run_packed_case

import ring_ext

from distributed import run_distributed

RING, ULYSSES, HYBRID = "megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

TINY = (1, 2, 0, 37, 5, 3)  # 48 tokens: empty, 1, 2 and one longer than S/cp
EMPTIES = (0, 0, 3, 20, 1, 1, 9, 0)  # 34: empty documents first and last
ONE = (61,)  # a single document of prime length

CASES = {
    1: [
        PackedCase(TINY),
        PackedCase(ONE, algo=ULYSSES, causal=False, layout="bshd", dtype=BF16),
        PackedCase(EMPTIES, sliding_window=3, layout="sbh"),
    ],
    2: [
        PackedCase(TINY),
        PackedCase(ONE, causal=False, layout="bshd", dtype=BF16, overlap=False),
        PackedCase(EMPTIES, sliding_window=4, dtype=F16, layout="sbhd"),
        PackedCase(lognormal_docs(101, 7, 1), sliding_window=40, heads_q=6, heads_kv=1),
        PackedCase(TINY, algo=ULYSSES, heads_q=4, heads_kv=2, layout="bnsd"),
        PackedCase(EMPTIES, algo=ULYSSES, causal=False, sliding_window=1, heads_q=2, heads_kv=1, dtype=BF16),
        PackedCase((8, 16), dense=True, sliding_window=3, layout="sbhd"),
        PackedCase((8, 16), dense=True, layout="thd"),  # thd without cu_seqlens: one dense sequence
        PackedCase((40,), dense=True, algo=ULYSSES, sliding_window=200, heads_q=2, heads_kv=2),
    ],
    3: [
        PackedCase(TINY, dtype=BF16),
        PackedCase(ONE, causal=False, sliding_window=7, layout="bnsd"),
        PackedCase(lognormal_docs(97, 11, 2), algo=ULYSSES, heads_q=6, heads_kv=3, dtype=F16),
        PackedCase(EMPTIES, algo=ULYSSES, sliding_window=2, heads_q=3, heads_kv=1, layout="sbh"),
        PackedCase((2,), heads_q=4, heads_kv=4),  # fewer tokens than ranks: padding-only ranks
    ],
    4: [
        PackedCase(TINY + (70,), window=2, overlap=False),
        PackedCase(lognormal_docs(150, 9, 3), algo=HYBRID, ulysses_degree=2, dtype=BF16),
        PackedCase(EMPTIES, algo=HYBRID, ulysses_degree=2, causal=False, sliding_window=5, layout="bnsd"),
        PackedCase(EMPTIES, window=2, sliding_window=2, layout="sbh", dtype=F16),
        PackedCase(ONE, algo=ULYSSES, heads_q=8, heads_kv=4, sliding_window=16),
        PackedCase((16, 16), dense=True, algo=HYBRID, ulysses_degree=2, sliding_window=5),
    ],
    8: [
        PackedCase(lognormal_docs(203, 13, 4), window=4),
        PackedCase(TINY, window=2, causal=False, sliding_window=6, dtype=BF16),
        PackedCase(lognormal_docs(120, 5, 5), algo=HYBRID, ulysses_degree=4, heads_q=8, heads_kv=4),
        PackedCase(EMPTIES, algo=HYBRID, ulysses_degree=2, sliding_window=3, layout="sbhd"),
        PackedCase((2,), algo=ULYSSES, heads_q=8, heads_kv=8),
    ],
}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_packed_gloo(world_size):
    run_distributed(run_packed_case, world_size, CASES[world_size], timeout_s=300)


def bad_packed_calls(rank: int, world_size: int, case):
    """Every rank raises the same clear error before any communication; none hangs."""
    ctx = context(PackedCase(TINY), world_size)
    cu = torch.tensor([0, 1, 3, 3, 40, 45, 48])
    x = torch.randn(48, 2, 8)
    local = ring_ext.shard(x, ctx, 0, cu_seqlens=cu)
    with pytest.raises(ValueError, match="share of cu_seqlens"):
        ring_ext.attention(local[1:], local[1:], local[1:], ctx, cu_seqlens=cu)
    with pytest.raises(ValueError, match="share of cu_seqlens"):
        ring_ext.unshard(local[1:], ctx, 0, cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch must be 1"):
        ring_ext.attention(*(local[None].expand(2, -1, -1, -1),) * 3, ctx, layout="bshd", cu_seqlens=cu)
    with pytest.raises(ValueError, match="end with the packed sequence length 48"):
        ring_ext.shard(x, ctx, 0, cu_seqlens=[0, 47])
    # One rank passes other documents: check_consistency turns the would-be hang into an error.
    other = torch.tensor([0, 2, 3, 3, 40, 45, 48]) if rank == 0 else cu
    mine = ring_ext.shard(x, ctx, 0, cu_seqlens=other)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ring_ext.attention(mine, mine, mine, ctx, cu_seqlens=other, check_consistency=True)
    out = ring_ext.attention(local, local, local, ctx, cu_seqlens=cu)  # the group still works
    assert out.shape == local.shape


def test_packed_bad_input_every_rank():
    run_distributed(bad_packed_calls, 3, [None], timeout_s=120)
