"""Packed documents and sliding windows through every algorithm on real Gloo processes, forward and
backward against the float64 oracle (tests/packed_cases.py): ring, double ring, Ulysses and hybrid;
causal and general; thd and the 4-D layouts; GQA; fp32/bf16/fp16; document lengths 0, 1, 2, fewer
than cp, more than S/cp, totals divisible by nothing, a single document; windows of 1, smaller than a
tile, around S/cp and larger than S; a dense sequence with a window; the windowed token placement
(--cp-sliding-window: contiguous pieces) under windowed and full layers. One spawn per world size.
test_halo_bytes counts what the ring moves under a window (Note [Moving only what is seen])."""

from __future__ import annotations

import pytest
import torch
from packed_cases import PackedCase, context, run_packed_case

import ring_ext
from ring_ext.testing.documents import lognormal_docs
from ring_ext.testing.spawn import run_distributed
from ring_ext.tools.planner import model as planner

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
        PackedCase((8, 16), dense=True, sliding_window=3, placement=3, layout="sbhd"),
        PackedCase(lognormal_docs(101, 7, 1), sliding_window=9, placement=9, dtype=BF16),
    ],
    3: [
        PackedCase(TINY, dtype=BF16),
        PackedCase(ONE, causal=False, sliding_window=7, layout="bnsd"),
        PackedCase(lognormal_docs(97, 11, 2), algo=ULYSSES, heads_q=6, heads_kv=3, dtype=F16),
        PackedCase(EMPTIES, algo=ULYSSES, sliding_window=2, heads_q=3, heads_kv=1, layout="sbh"),
        PackedCase((2,), heads_q=4, heads_kv=4),  # fewer tokens than ranks: padding-only ranks
        PackedCase((8, 16), dense=True, placement=4),  # a full layer on the windowed placement
        PackedCase((8, 16), dense=True, sliding_window=11, placement=11, overlap=False),  # w > S/cp
        PackedCase(TINY, causal=False, sliding_window=5, placement=5, layout="sbh"),
        PackedCase(lognormal_docs(97, 11, 2), placement=6, dtype=F16),
    ],
    4: [
        PackedCase(TINY + (70,), window=2, overlap=False),
        PackedCase(lognormal_docs(150, 9, 3), algo=HYBRID, ulysses_degree=2, dtype=BF16),
        PackedCase(EMPTIES, algo=HYBRID, ulysses_degree=2, causal=False, sliding_window=5, layout="bnsd"),
        PackedCase(EMPTIES, window=2, sliding_window=2, layout="sbh", dtype=F16),
        PackedCase(ONE, algo=ULYSSES, heads_q=8, heads_kv=4, sliding_window=16),
        PackedCase((16, 16), dense=True, algo=HYBRID, ulysses_degree=2, sliding_window=5),
        PackedCase(TINY + (70,), window=2, sliding_window=8, placement=8),
        PackedCase((16, 16), dense=True, algo=HYBRID, ulysses_degree=2, sliding_window=5, placement=5),
        PackedCase(EMPTIES, algo=ULYSSES, sliding_window=3, placement=3, heads_q=4, heads_kv=4),
    ],
    8: [
        PackedCase(lognormal_docs(203, 13, 4), window=4),
        PackedCase(TINY, window=2, causal=False, sliding_window=6, dtype=BF16),
        PackedCase(lognormal_docs(120, 5, 5), algo=HYBRID, ulysses_degree=4, heads_q=8, heads_kv=4),
        PackedCase(EMPTIES, algo=HYBRID, ulysses_degree=2, sliding_window=3, layout="sbhd"),
        PackedCase((2,), algo=ULYSSES, heads_q=8, heads_kv=8),
        PackedCase(lognormal_docs(203, 13, 4), window=4, sliding_window=20, placement=20, dtype=BF16),
        PackedCase((32, 32), dense=True, algo=HYBRID, ulysses_degree=2, sliding_window=7, placement=7),
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
    with pytest.raises(ValueError, match=r"cu_seqlens describes 48 tokens .* but q holds"):
        ring_ext.attention(local[1:], local[1:], local[1:], ctx, cu_seqlens=cu)
    with pytest.raises(ValueError, match="share of cu_seqlens"):
        ring_ext.unshard(local[1:], ctx, 0, cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch must be 1"):
        ring_ext.attention(*(local[None].expand(2, -1, -1, -1),) * 3, ctx, layout="bshd", cu_seqlens=cu)
    with pytest.raises(ValueError, match="end with the packed sequence length 48"):
        ring_ext.shard(x, ctx, 0, cu_seqlens=[0, 47])
    # One rank passes other documents: the cross-rank check turns the would-be hang into an error.
    other = torch.tensor([0, 2, 3, 3, 40, 45, 48]) if rank == 0 else cu
    mine = ring_ext.shard(x, ctx, 0, cu_seqlens=other)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ring_ext.attention(mine, mine, mine, ctx, cu_seqlens=other)
    out = ring_ext.attention(local, local, local, ctx, cu_seqlens=cu)  # the group still works
    assert out.shape == local.shape


def test_packed_bad_input_every_rank():
    run_distributed(bad_packed_calls, 3, [None], timeout_s=120)


HALO_ROWS, HEADS_KV, HEAD_DIM = 8, 1, 8  # rows per rank (L), K/V heads, head_dim


def expected_rows(rank: int, world_size: int, window: int) -> tuple[int, int]:
    """(K/V rows, K/V-gradient rows) one rank sends per layer under a causal window over contiguous
    shards of L rows: block r is seen by rank r + 1 (its last w - 1 rows, all L when w > L) and, when
    w > L + 1, by rank r + 2 (its last w - 1 - L rows), which it reaches through rank r + 1."""
    L, last = HALO_ROWS, world_size - 1
    near, far = min(window - 1, L), max(window - 1 - L, 0)
    kv = near * (rank < last) + far * (1 <= rank < last)  # own block onward; the one held at step 1
    grad = near * (rank >= 1) + far * (rank >= 2)  # the rows seen of blocks r - 1 and r - 2, home
    return kv, grad


def halo_bytes(rank: int, world_size: int, case):
    """What the ring sends in one forward and one backward, counted by sent_bytes, against the rule of
    expected_rows (contiguous shards, plain ring) and against the planner's count (every case)."""
    window, contiguous, cp_window = case
    seq = HALO_ROWS * world_size
    placement = window if contiguous else None  # --cp-sliding-window, else zigzag shards
    ctx = context(PackedCase((seq,), dense=True, placement=placement, window=cp_window), world_size)
    g = torch.Generator().manual_seed(window)
    full = [torch.randn(1, seq, h, HEAD_DIM, generator=g) for h in (2, HEADS_KV, HEADS_KV)]
    q, k, v = (ring_ext.shard(t, ctx, 1).requires_grad_() for t in full)
    before = torch.ops.ring_ext.sent_bytes()
    out = ring_ext.attention(q, k, v, ctx, layout="bshd", sliding_window=window)
    forward = torch.ops.ring_ext.sent_bytes() - before
    out.backward(torch.randn_like(out))
    backward = torch.ops.ring_ext.sent_bytes() - before - forward
    row = 2 * HEADS_KV * HEAD_DIM * 4  # a K row and a V row, float32; their gradients alike
    shape = planner.Shape(seq=seq, heads=2, head_dim=HEAD_DIM, kv_heads=HEADS_KV, dtype="fp32", window=window)
    algo = "ring" if cp_window == 1 else "double_ring"
    where = "contiguous" if contiguous else "zigzag"
    kv, grad = planner.window_rows(
        shape, planner.Scheme(algo, world_size, window=cp_window, placement=where)
    )["total"][rank]
    if contiguous and cp_window == 1:
        assert (kv, grad) == expected_rows(rank, world_size, window), (rank, case, kv, grad)
    assert (forward, backward) == (kv * row, (kv + grad) * row), (rank, case, forward, backward, kv, grad)


@pytest.mark.parametrize("world_size", [3, 4])
def test_halo_bytes(world_size):
    """Windows move only what is seen: contiguous shards under a causal window send one halo per rank
    (w <= S/cp + 1) and nothing at all for w = 1; zigzag shards and the double ring send what the
    planner counts (ring_ext.tools.planner.model.window_rows), forward and backward."""
    windows = [1, 2, 5, HALO_ROWS + 1, HALO_ROWS + 4]
    cp_windows = [1, 2] if world_size == 4 else [1]
    cases = [(w, contiguous, c) for w in windows for contiguous in (True, False) for c in cp_windows]
    run_distributed(halo_bytes, world_size, cases, timeout_s=120)
