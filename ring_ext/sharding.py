"""shard / unshard: each rank's part of the sequence, in the order its algorithm expects.

    contiguous   rank r holds chunk r of cp equal chunks (general mask, Ulysses)
    zigzag       rank r holds chunks r and 2cp-1-r of 2cp equal chunks, in that order (causal ring;
                 csrc/ring/schedule.h, Note [Zigzag causal schedule])

    cp = 4, zigzag: chunks 0 1 2 3 4 5 6 7  ->  rank 0: [0 7]  rank 1: [1 6]  rank 2: [2 5]  rank 3: [3 4]

unshard is the exact inverse of shard: all-gather over the context's group, then un-permute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def chunk_order(mode: str, cp_size: int, rank: int) -> list[int]:
    """Which global chunks rank holds, in local order; chunks are 1/cp (contiguous) or 1/(2cp) long."""
    if mode == "contiguous":
        return [rank]
    if mode == "zigzag":
        return [rank, 2 * cp_size - 1 - rank]
    raise ValueError(f"sharding mode must be 'contiguous' or 'zigzag', got {mode!r}")


def num_chunks(mode: str, cp_size: int) -> int:
    return 2 * cp_size if mode == "zigzag" else cp_size


def shard_tensor(x: torch.Tensor, seq_dim: int, mode: str, cp_size: int, rank: int) -> torch.Tensor:
    """This rank's part of the full sequence x (no communication)."""
    seq_dim = _check_dim(x, seq_dim)
    n = num_chunks(mode, cp_size)
    if x.shape[seq_dim] % n != 0:
        raise ValueError(
            f"sequence length {x.shape[seq_dim]} (dim {seq_dim}) must be divisible by {n} "
            f"({mode} sharding over cp_size={cp_size})"
        )
    chunks = x.chunk(n, dim=seq_dim)
    return torch.cat([chunks[c] for c in chunk_order(mode, cp_size, rank)], dim=seq_dim)


def unshard_parts(parts: list[torch.Tensor], seq_dim: int, mode: str) -> torch.Tensor:
    """The full sequence from every rank's part, parts[r] = shard_tensor(x, ..., rank=r)."""
    cp = len(parts)
    seq_dim = _check_dim(parts[0], seq_dim)
    per_rank = len(chunk_order(mode, cp, 0))
    ordered: list[torch.Tensor | None] = [None] * num_chunks(mode, cp)
    for rank, part in enumerate(parts):
        if part.shape[seq_dim] % per_rank != 0:
            raise ValueError(f"local sequence length {part.shape[seq_dim]} must be divisible by {per_rank}")
        for c, piece in zip(chunk_order(mode, cp, rank), part.chunk(per_rank, dim=seq_dim)):
            ordered[c] = piece
    return torch.cat(ordered, dim=seq_dim)


def shard(x: torch.Tensor, ctx, seq_dim: int) -> torch.Tensor:
    """This rank's part of the full tensor x (identical on every rank), in ctx's order."""
    return shard_tensor(x, seq_dim, ctx.sharding, ctx.cp_size, ctx.rank).contiguous()


def unshard(x: torch.Tensor, ctx, seq_dim: int) -> torch.Tensor:
    """Inverse of shard: the full sequence on every rank (all-gather over ctx.group + un-permute)."""
    seq_dim = _check_dim(x, seq_dim)
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(ctx.cp_size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.group)
    return unshard_parts(parts, seq_dim, ctx.sharding)


def _check_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim {seq_dim} is out of range for a {x.dim()}-D tensor")
    return seq_dim % x.dim()
