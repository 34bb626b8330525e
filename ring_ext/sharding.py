"""shard / unshard: each rank's part of the sequence, in the order its algorithm expects.

    contiguous   rank r holds chunk r of cp equal chunks (general mask, Ulysses)
    zigzag       rank r holds chunks r and 2cp-1-r of 2cp equal chunks, in that order (causal ring;
                 csrc/cp/schedule.h, Note [Zigzag causal schedule])

    cp = 4, zigzag: chunks 0 1 2 3 4 5 6 7  ->  rank 0: [0 7]  rank 1: [1 6]  rank 2: [2 5]  rank 3: [3 4]

Hybrid (Ulysses degree u, ring size R = cp / u; Note [Hybrid rank layout] in context.py): the ring
member rr = r // u must see its zigzag shard (ring chunks rr and 2R-1-rr) once the all-to-all of its
Ulysses group has gathered it, so that shard is cut, in order, into u pieces and rank r holds piece
r % u. In chunks of 1/(2cp) of the sequence (ring chunk c = fine chunks c*u .. c*u+u-1):

    cp = 4, u = 2, R = 2: ring chunks 0..3 = fine chunks {0,1} {2,3} {4,5} {6,7}
      ring rank 0 holds ring chunks [0 3] = fine [0 1 6 7] -> rank 0: [0 1]  rank 1: [6 7]
      ring rank 1 holds ring chunks [1 2] = fine [2 3 4 5] -> rank 2: [2 3]  rank 3: [4 5]

With u = 1 this is the plain zigzag; with a general mask hybrid is contiguous.

unshard is the exact inverse of shard: all-gather over the context's group, then un-permute.
"""

from __future__ import annotations

import torch

from . import collectives, packing, validation


def chunk_order(mode: str, cp_size: int, rank: int, ulysses_degree: int = 1) -> list[int]:
    """Which global chunks rank holds, in local order; chunks are 1/cp (contiguous) or 1/(2cp) long."""
    if mode == "contiguous":
        return [rank]
    if mode == "zigzag":
        u = ulysses_degree
        ring_size, ring_rank = cp_size // u, rank // u
        ring_shard = [c * u + j for c in (ring_rank, 2 * ring_size - 1 - ring_rank) for j in range(u)]
        return ring_shard[2 * (rank % u) : 2 * (rank % u) + 2]
    raise ValueError(f"sharding mode must be 'contiguous' or 'zigzag', got {mode!r}")


def num_chunks(mode: str, cp_size: int) -> int:
    return 2 * cp_size if mode == "zigzag" else cp_size


def shard_tensor(
    x: torch.Tensor, seq_dim: int, mode: str, cp_size: int, rank: int, ulysses_degree: int = 1
) -> torch.Tensor:
    """This rank's part of the full sequence x (no communication)."""
    seq_dim = _check_dim(x, seq_dim)
    n = num_chunks(mode, cp_size)
    if x.shape[seq_dim] % n != 0:
        raise ValueError(
            f"sequence length {x.shape[seq_dim]} (dim {seq_dim}) must be divisible by {n} "
            f"({mode} sharding over cp_size={cp_size}); for any length pass "
            f"cu_seqlens=[0, {x.shape[seq_dim]}] (one document)"
        )
    chunks = x.chunk(n, dim=seq_dim)
    return torch.cat([chunks[c] for c in chunk_order(mode, cp_size, rank, ulysses_degree)], dim=seq_dim)


def unshard_parts(
    parts: list[torch.Tensor], seq_dim: int, mode: str, ulysses_degree: int = 1
) -> torch.Tensor:
    """The full sequence from every rank's part, parts[r] = shard_tensor(x, ..., rank=r)."""
    cp = len(parts)
    seq_dim = _check_dim(parts[0], seq_dim)
    per_rank = len(chunk_order(mode, cp, 0))
    ordered: list[torch.Tensor | None] = [None] * num_chunks(mode, cp)
    for rank, part in enumerate(parts):
        if part.shape[seq_dim] % per_rank != 0:
            raise ValueError(f"local sequence length {part.shape[seq_dim]} must be divisible by {per_rank}")
        for c, piece in zip(chunk_order(mode, cp, rank, ulysses_degree), part.chunk(per_rank, dim=seq_dim)):
            ordered[c] = piece
    return torch.cat(ordered, dim=seq_dim)


def shard(x: torch.Tensor, ctx, seq_dim: int, cu_seqlens=None) -> torch.Tensor:
    """This rank's part of the full tensor x (identical on every rank), in ctx's order. With cu_seqlens
    (packed documents, any lengths) the part is the token plan's (ring_ext/packing.py): this rank's
    tokens in increasing order, as many as the plan gives it (ranks may differ by a few)."""
    if cu_seqlens is not None:
        seq_dim = validation.check_seq_dim(x, seq_dim)
        cu = packing.check_cu_seqlens(cu_seqlens, x.shape[seq_dim])
        mine = packing.rank_tokens(ctx, cu[-1], cu)[ctx.rank]
        return x.index_select(seq_dim, mine[: packing.real_length(mine, cu[-1])].to(x.device))
    seq_dim = validation.check_shard(x, ctx, seq_dim)
    return shard_tensor(x, seq_dim, ctx.sharding, ctx.cp_size, ctx.rank, _ring_ulysses(ctx)).contiguous()


def unshard(x: torch.Tensor, ctx, seq_dim: int, cu_seqlens=None) -> torch.Tensor:
    """Inverse of shard: the full sequence on every rank (all-gather over ctx.group + un-permute)."""
    if cu_seqlens is not None:
        return _unshard_packed(x, ctx, seq_dim, packing.check_cu_seqlens(cu_seqlens))
    seq_dim = validation.check_unshard(x, ctx, seq_dim)
    parts = collectives.all_gather(x, ctx)
    return unshard_parts(parts, seq_dim, ctx.sharding, _ring_ulysses(ctx))


def _unshard_packed(x: torch.Tensor, ctx, seq_dim: int, cu: tuple[int, ...]) -> torch.Tensor:
    """unshard of a token plan's part: pad every part to the plan's length (all-gather needs equal
    shapes), gather, and put each rank's tokens back at their global indices."""
    seq_dim = validation.check_seq_dim(x, seq_dim)
    validation.check_device(x, "x", ctx)
    total = cu[-1]
    tokens = packing.rank_tokens(ctx, total, cu)
    counts = [packing.real_length(t, total) for t in tokens]
    if x.shape[seq_dim] != counts[ctx.rank]:
        raise ValueError(
            f"x holds {x.shape[seq_dim]} tokens (dim {seq_dim}) but rank {ctx.rank}'s share of cu_seqlens "
            f"is {counts[ctx.rank]}: pass what ring_ext.shard(..., cu_seqlens=cu) returned"
        )
    pad = list(x.shape)
    pad[seq_dim] = len(tokens[0]) - counts[ctx.rank]
    parts = collectives.all_gather(torch.cat([x, x.new_zeros(pad)], dim=seq_dim), ctx)
    full = list(x.shape)
    full[seq_dim] = total
    out = x.new_empty(full)
    for index, count, part in zip(tokens, counts, parts):
        out.index_copy_(seq_dim, index[:count].to(x.device), part.narrow(seq_dim, 0, count))
    return out


def _ring_ulysses(ctx) -> int:
    """The Ulysses degree inside a ring's shard: hybrid's u (1 for the plain ring and Ulysses)."""
    return ctx.ulysses_degree if ctx.algo == "hybrid_cp_algo" else 1


def _check_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim {seq_dim} is out of range for a {x.dim()}-D tensor")
    return seq_dim % x.dim()
