"""The ring schedule seen from Python (tests, docs): csrc/ring/schedule.h through ring_ext::ring_schedule."""

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


class Step(NamedTuple):
    src: int  # the rank whose K/V block this rank holds
    items: tuple[WorkItem, ...]


def schedule(algo: str, cp_size: int, rank: int, window: int, causal: bool) -> list[Step]:
    """Every step of `rank`'s ring schedule (Note [Zigzag causal schedule], Note [Double ring schedule])."""
    flat = torch.ops.ring_ext.ring_schedule(algo, cp_size, rank, window, causal)
    steps, pos = [], 0
    while pos < len(flat):
        src, n = flat[pos], flat[pos + 1]
        pos += 2
        items = []
        for _ in range(n):
            f = flat[pos : pos + 7]
            items.append(WorkItem(f[0], f[1], f[2], f[3], bool(f[4]), f[5], f[6]))
            pos += 7
        steps.append(Step(src, tuple(items)))
    return steps
