"""The ring schedules as pure functions (csrc/ring/schedule.h via ring_ext.ring.schedule): no tensors."""

from __future__ import annotations

import pytest

from ring_ext.ring import schedule
from ring_ext.sharding import chunk_order

ALGO = "megatron_cp_algo"
TOPOLOGIES = [(cp, w) for cp in range(1, 9) for w in range(1, cp + 1) if cp % w == 0]


def srcs(cp, window, causal=True):
    return [[s.src for s in schedule(ALGO, cp, r, window, causal)] for r in range(cp)]


@pytest.mark.parametrize("cp,window", TOPOLOGIES)
def test_every_rank_sees_every_block_once_and_step0_is_local(cp, window):
    table = srcs(cp, window)
    for r in range(cp):
        assert sorted(table[r]) == list(range(cp))
        assert table[r][0] == r
    for t in range(cp):  # at each step the blocks are a permutation of the ranks: no block is duplicated
        assert sorted(table[r][t] for r in range(cp)) == list(range(cp))


@pytest.mark.parametrize("cp,window", TOPOLOGIES)
def test_blocks_move_along_inner_and_outer_rings(cp, window):
    w = cp if window == 1 else window
    table = srcs(cp, window)
    for r in range(cp):
        o, i = divmod(r, w)
        for t in range(1, cp):
            so, si = divmod(t, w)
            if si > 0:  # inner hop from the previous rank of the window
                assert table[r][t] == table[o * w + (i - 1) % w][t - 1]
            else:  # round start: the previous window's round-start block, over the outer ring
                assert table[r][t] == table[((o - 1) % (cp // w)) * w + i][t - w]


def test_double_ring_table_of_the_note():
    assert srcs(4, 2) == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]


def _pairs(item, q_chunks, kv_chunks):
    """Global (q chunk, kv chunk) pairs of an item; chunk lists are in local order."""
    return [
        (q_chunks[a], kv_chunks[b])
        for a in range(item.q_chunk, item.q_chunk + item.q_chunks)
        for b in range(item.kv_chunk, item.kv_chunk + item.kv_chunks)
    ]


@pytest.mark.parametrize("cp,window", TOPOLOGIES)
@pytest.mark.parametrize("causal", [True, False])
def test_items_cover_the_visible_chunk_pairs_exactly_once(cp, window, causal):
    mode = "zigzag" if causal else "contiguous"
    n = 2 * cp if causal else cp
    seen = {}
    for r in range(cp):
        for step in schedule(ALGO, cp, r, window, causal):
            for item in step.items:
                if item.causal:  # causal items are diagonal: same rank, local offsets 0
                    assert step.src == r and (item.q_offset, item.k_offset) == (0, 0)
                for qc, kc in _pairs(item, chunk_order(mode, cp, r), chunk_order(mode, cp, step.src)):
                    # pairs wholly masked out may appear only inside a causal item
                    seen[(qc, kc)] = seen.get((qc, kc), 0) + 1
                    assert item.causal or not causal or kc < qc, (r, step, qc, kc)
    expected = {(a, b) for a in range(n) for b in range(n) if not causal or b <= a}
    assert {p for p in seen if not causal or p[1] <= p[0]} == expected
    assert all(c == 1 for c in seen.values())


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_zigzag_balance(cp):
    """Every off-diagonal step is half a block (2 of the 4 chunk pairs) on every rank."""
    for r in range(cp):
        for step in schedule(ALGO, cp, r, 1, True)[1:]:
            assert sum(i.q_chunks * i.kv_chunks for i in step.items) == 2


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="rank"):
        schedule(ALGO, 4, 4, 1, True)
    with pytest.raises(RuntimeError, match="window"):
        schedule(ALGO, 4, 0, 3, True)
    with pytest.raises(ValueError, match="context_parallel_algo"):
        schedule("nope", 4, 0, 1, True)
