"""shard / unshard: each rank's part of the sequence, in the order its algorithm expects.

Both are index lists of ring_ext/placement.py applied to a tensor: shard() is index_select of this
rank's tokens, unshard() all-gathers every rank's part over the context's group and puts each token
back at its global index, the exact inverse.
"""

from __future__ import annotations

import torch

from . import collectives, masks, placement, validation


def shard_tensor(
    x: torch.Tensor, seq_dim: int, sharding: str, cp_size: int, rank: int, ulysses_degree: int = 1
) -> torch.Tensor:
    """This rank's part of a dense full sequence x (no communication, no context); sharding is
    "zigzag" or "contiguous" (ring_ext/placement.py)."""
    seq_dim = validation.check_seq_dim(x, seq_dim)
    tokens = placement.dense_tokens(sharding, cp_size, x.shape[seq_dim], ulysses_degree, f" (dim {seq_dim})")[
        rank
    ]
    return x.index_select(seq_dim, tokens.to(x.device))


def unshard_parts(
    parts: list[torch.Tensor], seq_dim: int, sharding: str, ulysses_degree: int = 1
) -> torch.Tensor:
    """The full sequence from every rank's part, parts[r] = shard_tensor(x, ..., rank=r)."""
    seq_dim = validation.check_seq_dim(parts[0], seq_dim)
    total = sum(p.shape[seq_dim] for p in parts)
    tokens = placement.dense_tokens(sharding, len(parts), total, ulysses_degree)
    for rank, (part, index) in enumerate(zip(parts, tokens)):
        if part.shape[seq_dim] != len(index):
            raise ValueError(
                f"rank {rank}'s part holds {part.shape[seq_dim]} tokens (dim {seq_dim}), "
                f"expected {len(index)}: pass what shard returned"
            )
    return _put_back(parts, [len(t) for t in tokens], tokens, seq_dim, total)


def shard(x: torch.Tensor, ctx, seq_dim: int, cu_seqlens=None, key_bounds=None) -> torch.Tensor:
    """This rank's part of the full tensor x (identical on every rank), in ctx's order. With cu_seqlens
    (packed documents, any lengths) the part is the packed placement's: this rank's tokens in
    increasing order, as many as the placement gives it (ranks may differ by a few). key_bounds (with
    cu_seqlens): the placement balances the visible pairs of this mask (a shared prompt's, image
    blocks'), and every later call on this packing (attention, whatever its own mask, and unshard)
    runs on that placement (Note [Placement balanced by key_bounds] in ring_ext/placement.py)."""
    seq_dim = validation.check_seq_dim(x, seq_dim)
    total = x.shape[seq_dim]
    cu = None if cu_seqlens is None else masks.check_cu_seqlens(cu_seqlens, total)
    bounds = None
    if key_bounds is not None:
        if cu is None:
            raise ValueError("shard's key_bounds balances a packed placement: give cu_seqlens with it")
        masks.check_key_bounds_tensor(key_bounds)
        bounds = masks.check_key_bounds(key_bounds, total)
    s = placement.scheme(ctx)
    if cu is not None:
        placement.record_placement(s, total, cu, bounds)
    mine = placement.rank_tokens(s, total, cu, f" (dim {seq_dim})", bounds)[ctx.rank]
    return x.index_select(seq_dim, mine[: placement.real_length(mine, total)].to(x.device))


def unshard(x: torch.Tensor, ctx, seq_dim: int, cu_seqlens=None) -> torch.Tensor:
    """Inverse of shard: the full sequence on every rank (all-gather over ctx.group, then every
    token back at its global index)."""
    seq_dim = validation.check_seq_dim(x, seq_dim)
    validation.check_device(x, "x", ctx)
    s = placement.scheme(ctx)
    if cu_seqlens is None:
        per_rank = 2 if s.sharding == "zigzag" else 1
        if x.shape[seq_dim] % per_rank != 0:
            raise ValueError(
                f"local sequence length {x.shape[seq_dim]} (dim {seq_dim}) must be divisible by {per_rank} "
                f"({s.sharding} sharding); pass what ring_ext.shard returned"
            )
        total = x.shape[seq_dim] * ctx.cp_size
        cu = None
    else:
        cu = masks.check_cu_seqlens(cu_seqlens)
        total = cu[-1]
    tokens = placement.rank_tokens(s, total, cu, bounds=placement.placed_by(s, total, cu))
    counts = [placement.real_length(t, total) for t in tokens]
    if x.shape[seq_dim] != counts[ctx.rank]:
        raise ValueError(
            f"x holds {x.shape[seq_dim]} tokens (dim {seq_dim}) but rank {ctx.rank}'s share of cu_seqlens "
            f"is {counts[ctx.rank]}: pass what ring_ext.shard(..., cu_seqlens=cu) returned"
        )
    pad = list(x.shape)
    pad[seq_dim] = len(tokens[0]) - counts[ctx.rank]  # all-gather needs equal shapes
    sent = torch.cat([x, x.new_zeros(pad)], dim=seq_dim) if pad[seq_dim] else x
    parts = collectives.all_gather(sent, ctx)
    return _put_back(parts, counts, tokens, seq_dim, total)


def _put_back(parts, counts, tokens, seq_dim: int, total: int) -> torch.Tensor:
    """The [.., total, ..] tensor holding parts[r]'s first counts[r] entries at the indices tokens[r]."""
    full = list(parts[0].shape)
    full[seq_dim] = total
    out = parts[0].new_empty(full)
    for index, count, part in zip(tokens, counts, parts):
        out.index_copy_(seq_dim, index[:count].to(out.device), part.narrow(seq_dim, 0, count))
    return out
