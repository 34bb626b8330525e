"""Synthetic packed rows for tests and benchmarks: document lengths and their cu_seqlens."""

from __future__ import annotations

import torch


def cu_of(docs) -> list[int]:
    """cu_seqlens of document lengths."""
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    return cu


def lognormal_docs(total: int, n_docs: int, seed: int) -> tuple[int, ...]:
    """n_docs lengths >= 0 summing to total, drawn lognormal (the mixes of packed pretraining data)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.empty(n_docs).log_normal_(0.0, 1.0, generator=g)
    cuts = (weights.cumsum(0) / weights.sum() * total).round().long().tolist()
    cuts[-1] = total
    lengths, prev = [], 0
    for c in cuts:
        lengths.append(c - prev)
        prev = c
    return tuple(lengths)
