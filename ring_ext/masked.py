"""The Python kernel of torch.ops.ring_ext.masked_attention and masked_attention_bwd (schemas in
csrc/ops.cpp; fakes and autograd in ring_ext/ops.py).

A call with packed documents (cu_seqlens) or a sliding window needs the placement and the key
intervals, which depend on cu_seqlens' values. Computed in the traced Python of ring_ext.attention,
torch.compile would have to guard on those values (fullgraph fails: "Could not guard on
data-dependent expression"). Computed here, inside an operator whose output shapes follow q's, the
values are read only when the op runs: a compiled graph holds one opaque call, and batches whose
document lengths differ (with the same tensor shapes) run the same graph. The op then calls the C++
op that does the work: ring_ext::attention under a context, ring_ext::fwd/bwd in one process (algo
""). Placement and intervals are cached per (scheme, cu_seqlens, window) in ring_ext/placement.py.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch

from . import masks, placement
from .layouts import empty_in_layout


class _Mask(NamedTuple):
    visible: torch.Tensor  # on the host: the CP op checks it there and copies it to q's device once
    needed: torch.Tensor | None
    rows: int
    signature: int  # of the mask description, for the cross-rank check


def _mask(
    q, cu_seqlens, sliding_window, causal, algo, rank, cp_size, ulysses_degree, cp_sliding_window, chunk,
    key_bounds,
) -> _Mask:  # fmt: skip
    """This rank's key intervals (placement.block_intervals), after checking that q holds exactly the
    tokens the placement gives this rank."""
    window = sliding_window or None
    if algo:
        s = placement.scheme_of(algo, cp_size, ulysses_degree, causal, cp_sliding_window or None)
    else:  # one process: one block of every token
        s = placement.Scheme(1, 1, "contiguous", causal, None)
    if cu_seqlens is None:
        total, cu = q.shape[1] * cp_size, None  # a dense sequence in the context's own placement
    else:
        cu = masks.check_cu_seqlens(cu_seqlens, None if algo else q.shape[1])  # one process: q is all
        total = cu[-1]
    bounds = None if key_bounds is None else masks.check_key_bounds(key_bounds, total)
    placed = placement.placed_by(s, total, cu) if algo else None  # Note [Placement balanced by key_bounds]
    visible, needed, rows, count = placement.block_intervals(
        s, rank, total, cu, window, chunk or None, bounds, placed
    )
    if q.shape[1] != count:  # only under a context: a dense or one-process q holds its count
        raise ValueError(
            f"cu_seqlens describes {total} tokens ({len(cu) - 1} documents), of which rank {rank}'s share "
            f"is {count}, but q holds {q.shape[1]}: cu_seqlens[-1] must be the packed length of the whole "
            "sequence, and q, k, v what ring_ext.shard(x, ctx, seq_dim, cu_seqlens=cu) returned"
        )
    signature = (
        zlib.crc32(repr((cu, total, window, cp_sliding_window, chunk, bounds, placed)).encode())
        if algo
        else 0
    )
    return _Mask(visible, needed, rows, signature)


def _local_lengths(q, k) -> None:
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"with cu_seqlens or sliding_window, k and v must have q's length {q.shape[1]}, got {k.shape[1]}"
        )


def masked_attention(
    q, k, v, cu_seqlens, sliding_window, scale, causal, algo, rank, cp_size, ulysses_degree,
    cp_sliding_window, ring_group, inner_group, outer_group, ulysses_group, overlap, layout, check_group,
    softcap=0.0, sinks=None, attention_chunk_size=0, key_bounds=None,
):  # fmt: skip
    if not algo:
        _local_lengths(q, k)
    m = _mask(
        q, cu_seqlens, sliding_window, causal, algo, rank, cp_size, ulysses_degree, cp_sliding_window,
        attention_chunk_size, key_bounds,
    )  # fmt: skip
    if algo:
        return torch.ops.ring_ext.attention(
            q, k, v, scale, False, algo, ring_group, inner_group, outer_group, ulysses_group, overlap,
            layout, m.visible, m.needed, m.rows, check_group, m.signature, softcap, sinks,
        )  # fmt: skip
    out, lse = torch.ops.ring_ext.fwd(
        q, k, v, scale, False, 0, 0, False, m.visible[0].to(q.device), softcap, sinks
    )
    dense = empty_in_layout(q, layout, v.shape[-1])  # Note [Output contract] in csrc/cp/attention.cpp
    if dense.stride() != out.stride():
        out = dense.copy_(out)
    return out, lse


def masked_attention_bwd(
    dout, q, k, v, out, lse, dlse, cu_seqlens, sliding_window, scale, causal, algo, rank, cp_size,
    ulysses_degree, cp_sliding_window, ring_group, inner_group, outer_group, ulysses_group, overlap,
    softcap=0.0, attention_chunk_size=0, key_bounds=None,
):  # fmt: skip
    m = _mask(
        q, cu_seqlens, sliding_window, causal, algo, rank, cp_size, ulysses_degree, cp_sliding_window,
        attention_chunk_size, key_bounds,
    )  # fmt: skip
    if algo:
        return torch.ops.ring_ext.attention_bwd(
            dout, q, k, v, out, lse, scale, False, algo, ring_group, inner_group, outer_group,
            ulysses_group, overlap, dlse, m.visible, m.needed, m.rows, softcap,
        )  # fmt: skip
    dq, dk, dv = torch.ops.ring_ext.bwd(
        dout, q, k, v, out, lse, scale, False, 0, 0, dlse, m.visible[0].to(q.device), softcap
    )
    return tuple(
        g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)
        for g, t in ((dq, q), (dk, k), (dv, v))
    )


for _device in ("CPU", "CUDA"):
    torch.library.impl("ring_ext::masked_attention", _device, masked_attention)
    torch.library.impl("ring_ext::masked_attention_bwd", _device, masked_attention_bwd)
