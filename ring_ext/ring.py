"""The ring schedule seen from Python (tests, docs): csrc/cp/schedule.h through ring_ext::ring_schedule."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops  # noqa: F401  (loads the library)


class WorkItem(NamedTuple):
    q_chunk: int  # local Q chunks [q_chunk, q_chunk + q_chunks)
    q_chunks: int
    kv_chunk: int  # chunks of the held K/V block
    kv_chunks: int
    causal: bool  # causal at (q_offset, k_offset) in chunks, local coordinates
    q_offset: int
    k_offset: int


class Hop(NamedTuple):
    """One send/recv pair of a step (csrc/cp/schedule.h): ranks are those of `link`'s group."""

    what: str  # "kv", "outer_kv", "kv_grad" or "grad_home"
    link: str  # "inner", "outer" or "ring"
    send_to: int
    recv_from: int


PAYLOADS = ("kv", "outer_kv", "kv_grad", "grad_home")
LINKS = ("inner", "outer", "ring")


class Step(NamedTuple):
    src: int  # the rank whose K/V block this rank holds
    items: tuple[WorkItem, ...]
    hops: tuple[Hop, ...]


def schedule(algo: str, cp_size: int, rank: int, cp_window_size: int, causal: bool) -> list[Step]:
    """Every step of `rank`'s ring schedule (Note [Zigzag causal schedule], Note [Double ring schedule])."""
    flat = torch.ops.ring_ext.ring_schedule(algo, cp_size, rank, cp_window_size, causal)
    steps, pos = [], 0
    while pos < len(flat):
        src, n_items, n_hops = flat[pos : pos + 3]
        pos += 3
        items = []
        for _ in range(n_items):
            f = flat[pos : pos + 7]
            items.append(WorkItem(f[0], f[1], f[2], f[3], bool(f[4]), f[5], f[6]))
            pos += 7
        hops = []
        for _ in range(n_hops):
            what, link, send_to, recv_from = flat[pos : pos + 4]
            hops.append(Hop(PAYLOADS[what], LINKS[link], send_to, recv_from))
            pos += 4
        steps.append(Step(src, tuple(items), tuple(hops)))
    return steps
