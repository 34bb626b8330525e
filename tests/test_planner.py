"""The ring schedules as pure functions (csrc/cp/schedule.h via ring_ext.ring.schedule): no tensors.

The schedule says everything a rank does: the work items of every step and every transfer (hop).
These tests move blocks and gradients by the hops alone, so a dropped, duplicated or misdirected hop
fails them (test_the_checks_reject_a_broken_schedule shows it on deliberately broken schedules)."""

from __future__ import annotations

import pytest

from ring_ext.placement import chunk_order
from ring_ext.ring import schedule

ALGO = "megatron_cp_algo"
TOPOLOGIES = [(cp, w) for cp in range(1, 9) for w in range(1, cp + 1) if cp % w == 0]
# Every CP size 1-16 with every window that divides it (the schedules, not the tensors, are under test).
ALL_TOPOLOGIES = [(cp, w) for cp in range(1, 17) for w in range(1, cp + 1) if cp % w == 0]


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


def ring_rank(cp, window, rank, link, local):
    """The ring rank of rank `local` of `rank`'s `link` group (the groups of ring_ext/context.py)."""
    w = cp if window == 1 else window
    if link == "inner":  # the window of w consecutive ring ranks
        return (rank // w) * w + local
    if link == "outer":  # the ranks at the same position of every window
        return local * w + rank % w
    return local


def schedules(cp, window, causal=True):
    return [schedule(ALGO, cp, r, window, causal) for r in range(cp)]


def check_hops_match(table, cp, window):
    """Every send has its receive on the peer at the same step with the same payload (so the same tag)
    over the same group, and every receive its send; no payload twice in one step."""
    for r, steps in enumerate(table):
        for t, step in enumerate(steps):
            kinds = [h.what for h in step.hops]
            assert len(kinds) == len(set(kinds)), f"rank {r} step {t}: a payload twice: {kinds}"
            for h in step.hops:
                to = ring_rank(cp, window, r, h.link, h.send_to)
                frm = ring_rank(cp, window, r, h.link, h.recv_from)
                assert _answers(table, cp, window, t, to, h, "recv_from", r), (
                    f"rank {r} step {t}: {h.what} to {to}, which does not receive it"
                )
                assert _answers(table, cp, window, t, frm, h, "send_to", r), (
                    f"rank {r} step {t}: {h.what} from {frm}, which does not send it"
                )


def _answers(table, cp, window, step, peer, hop, field, me):
    """Whether `peer` has at `step` a hop of the same payload and group whose `field` (send_to or
    recv_from) is rank `me`."""
    return any(
        p.what == hop.what
        and p.link == hop.link
        and ring_rank(cp, window, peer, p.link, getattr(p, field)) == me
        for p in table[peer][step].hops
    )


def check_blocks_follow_hops(table, cp, window):
    """Moving K/V blocks by the kv / outer_kv hops alone puts at every step the block the schedule names."""
    held, round_start, outer_in = list(range(cp)), list(range(cp)), [None] * cp
    for t in range(cp):
        assert [table[r][t].src for r in range(cp)] == held, f"step {t}"
        arriving = [None] * cp
        for r in range(cp):
            hops = {h.what: h for h in table[r][t].hops}
            if "outer_kv" in hops:
                outer_in[r] = round_start[ring_rank(cp, window, r, "outer", hops["outer_kv"].recv_from)]
            if "kv" in hops:
                arriving[r] = held[ring_rank(cp, window, r, "inner", hops["kv"].recv_from)]
        for r in range(cp):
            if arriving[r] is None:  # a round's end: the next round starts with the outer ring's block
                arriving[r] = round_start[r] = outer_in[r]
                outer_in[r] = None
        held = arriving


def check_grads_reach_owners(table, cp, window):
    """Carrying each block's dK/dV partial by the kv_grad / grad_home hops alone, every rank's
    contribution to every block reaches the block's owner exactly once."""
    home = [[] for _ in range(cp)]  # (block, contributing rank) pairs that reached each owner
    incoming = [None] * cp
    for t in range(cp):
        sent = [[] for _ in range(cp)]
        for r in range(cp):
            step = table[r][t]
            partial = [(step.src, r)] + (incoming[r] or [])
            assert all(b == step.src for b, _ in partial), f"rank {r} step {t}: a partial met another block"
            hops = {h.what: h for h in step.hops}
            if "kv_grad" in hops:
                sent[ring_rank(cp, window, r, "inner", hops["kv_grad"].send_to)].append(partial)
            elif "grad_home" in hops:
                owner = ring_rank(cp, window, r, "ring", hops["grad_home"].send_to)
                assert owner == step.src, f"rank {r} step {t}: block {step.src}'s partial sent to {owner}"
                home[owner] += partial
            else:
                assert cp == 1, f"rank {r} step {t}: a partial with nowhere to go"
                home[r] += partial
        assert all(len(p) <= 1 for p in sent), f"step {t}: two partials for one rank"
        incoming = [p[0] if p else None for p in sent]
    assert incoming == [None] * cp, "partials still travelling after the last step"
    for b in range(cp):
        assert sorted(home[b]) == [(b, r) for r in range(cp)], f"block {b}: {sorted(home[b])}"


@pytest.mark.parametrize("cp,window", ALL_TOPOLOGIES)
@pytest.mark.parametrize("causal", [True, False])
def test_every_hop_is_matched_and_delivers(cp, window, causal):
    table = schedules(cp, window, causal)
    check_hops_match(table, cp, window)
    check_blocks_follow_hops(table, cp, window)
    check_grads_reach_owners(table, cp, window)


@pytest.mark.parametrize("cp,window", [(4, 2), (6, 3), (8, 8)])
def test_hop_counts(cp, window):
    """Per rank: cp - 1 K/V arrivals (inner or outer), the double ring's outer hops one per round but the
    last, and one gradient trip home per round."""
    w = cp if window == 1 else window
    for steps in schedules(cp, window):
        kinds = [h.what for s in steps for h in s.hops]
        assert kinds.count("kv") + kinds.count("outer_kv") == cp - 1
        assert kinds.count("outer_kv") == cp // w - 1
        assert kinds.count("grad_home") == cp // w
        assert kinds.count("kv_grad") == kinds.count("kv")


def _without(table, rank, step, what):
    steps = list(table[rank])
    s = steps[step]
    steps[step] = s._replace(hops=tuple(h for h in s.hops if h.what != what))
    return table[:rank] + [steps] + table[rank + 1 :]


def _redirected(table, rank, step, what):
    steps = list(table[rank])
    s = steps[step]
    hops = tuple(h._replace(send_to=(h.send_to + 1) % len(table)) if h.what == what else h for h in s.hops)
    steps[step] = s._replace(hops=hops)
    return table[:rank] + [steps] + table[rank + 1 :]


@pytest.mark.parametrize(
    "broken",
    [
        lambda t: _without(t, 1, 0, "kv"),  # a dropped K/V hop
        lambda t: _without(t, 2, 0, "outer_kv"),  # a dropped outer hop
        lambda t: _without(t, 0, 0, "kv_grad"),  # a dropped gradient hop
        lambda t: _without(t, 3, 1, "grad_home"),  # a gradient that never goes home
        lambda t: _redirected(t, 1, 1, "grad_home"),  # a gradient sent to the wrong rank
        lambda t: (
            [list(s) for s in t[:1]] + [[s._replace(hops=s.hops + s.hops) for s in t[1]]] + t[2:]
        ),  # dup
    ],
)
def test_the_checks_reject_a_broken_schedule(broken):
    cp, window = 4, 2
    table = broken(schedules(cp, window))
    with pytest.raises(AssertionError):
        check_hops_match(table, cp, window)
        check_blocks_follow_hops(table, cp, window)
        check_grads_reach_owners(table, cp, window)


def test_ulysses_has_no_ring_schedule():
    with pytest.raises(ValueError, match="ring schedule"):
        schedule("ulysses_cp_algo", 4, 0, 1, True)
    assert schedule("hybrid_cp_algo", 4, 1, 2, True) == schedule(ALGO, 4, 1, 2, True)


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="rank"):
        schedule(ALGO, 4, 4, 1, True)
    with pytest.raises(RuntimeError, match="window"):
        schedule(ALGO, 4, 0, 3, True)
    with pytest.raises(ValueError, match="context_parallel_algo"):
        schedule("nope", 4, 0, 1, True)
