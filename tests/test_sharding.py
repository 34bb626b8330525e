"""shard/unshard orders (zigzag, contiguous), exact inverses, errors. Gloo all-gather is covered by
tests/test_ring_dist.py (unshard of every output)."""

from __future__ import annotations

import pytest
import torch

from ring_ext.placement import chunk_order
from ring_ext.sharding import shard_tensor, unshard_parts


def test_zigzag_order_of_the_docstring():
    assert [chunk_order("zigzag", 4, r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    x = torch.arange(16)
    assert shard_tensor(x, 0, "zigzag", 4, 1).tolist() == [2, 3, 12, 13]
    assert shard_tensor(x, 0, "contiguous", 4, 1).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("mode", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seq_dim", [0, 1, 2, -1])
def test_unshard_is_exact_inverse(mode, cp, seq_dim):
    shape = [3, 4, 5]
    shape[seq_dim] = 2 * cp * 3
    x = torch.randn(shape)
    parts = [shard_tensor(x, seq_dim, mode, cp, r) for r in range(cp)]
    assert sum(p.shape[seq_dim] for p in parts) == x.shape[seq_dim]
    assert torch.equal(unshard_parts(parts, seq_dim, mode), x)


def test_length_that_does_not_split_names_the_rule():
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_tensor(torch.zeros(2, 12), 1, "zigzag", 4, 0)
    with pytest.raises(ValueError, match="seq_dim"):
        shard_tensor(torch.zeros(2, 12), 2, "contiguous", 4, 0)
    with pytest.raises(ValueError, match="sharding must be"):
        chunk_order("striped", 4, 0)


def test_hybrid_zigzag_order_of_the_docstring():
    """cp = 4, u = 2: each Ulysses group gathers its ring member's zigzag shard in order."""
    assert [chunk_order("zigzag", 4, r, ulysses_degree=2) for r in range(4)] == [
        [0, 1],
        [6, 7],
        [2, 3],
        [4, 5],
    ]
    for u in (1, 2, 4):
        for cp in (u, 2 * u, 4 * u):
            ring_size = cp // u
            for r in range(cp):
                ring_rank = r // u
                group = [chunk_order("zigzag", cp, g, u) for g in range(ring_rank * u, ring_rank * u + u)]
                gathered = [c for part in group for c in part]
                ring_chunks = [ring_rank, 2 * ring_size - 1 - ring_rank]
                assert gathered == [c * u + j for c in ring_chunks for j in range(u)]


@pytest.mark.parametrize("cp,u", [(2, 2), (4, 2), (6, 3), (8, 4), (8, 2)])
def test_hybrid_unshard_is_exact_inverse(cp, u):
    x = torch.randn(2, 2 * cp * 3, 5)
    parts = [shard_tensor(x, 1, "zigzag", cp, r, ulysses_degree=u) for r in range(cp)]
    assert torch.equal(unshard_parts(parts, 1, "zigzag", ulysses_degree=u), x)
