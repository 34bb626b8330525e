"""ring_ext.attention: the one entry point. Without a context it is plain attention on this process."""

from __future__ import annotations

import functools
import math
import zlib

import torch

from . import ops, packing, validation  # noqa: F401  (ops: fake kernels and autograd)
from .layouts import SEQ_DIM, from_bshd, head_dim_of, to_bshd


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return validation.check_scale(softmax_scale)


def resolve_layout(layout: str | None, q: torch.Tensor, ctx, packed: bool = False) -> str:
    if layout is not None:
        validation.check_layout(layout)
        return layout
    if packed and q.dim() == 3:
        return "thd"
    if ctx is None:
        return "bshd"
    if ctx.config.megatron_cp_in_bnsd:
        return "bnsd"
    return "sbh" if q.dim() == 3 else "bshd"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx=None,
    *,
    layout: str | None = None,
    causal: bool | None = None,
    softmax_scale: float | None = None,
    num_heads: int | None = None,
    check_consistency: bool = False,
    cu_seqlens=None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ mask]) v, in q's layout and dtype.

    q, k, v are this rank's shards in `layout` (see ring_ext.layouts); k/v may have fewer heads than q
    (GQA/MQA). With ctx=None this is attention over the local tensors and `causal` must be given.
    Causal is top-left aligned, as in F.scaled_dot_product_attention(is_causal=True). With a context,
    causal=None means the context's attention_mask_type (a contradicting value raises).

    cu_seqlens ([n_docs + 1] integers, 0 first, last = the packed length S, the same on every rank):
    packed documents; no token sees another document (ring_ext/packing.py, docs/design.md "Mask
    model"). With a context, q, k, v are what ring_ext.shard(x, ctx, seq_dim, cu_seqlens=cu) gave this
    rank; batch must be 1. sliding_window=w: a query sees keys with 0 <= pos_q - pos_k < w (causal)
    or |pos_q - pos_k| < w (general), positions inside each document; unrelated to --cp-window-size.

    layout=None picks: "thd" for 3-D inputs with cu_seqlens; without a context "bshd"; with one,
    "bnsd" under --megatron-cp-in-bnsd, else MindSpeed's "sbh" for 3-D inputs and "bshd" for 4-D ones.

    Bad input raises before any communication, alike on every rank (ring_ext/validation.py;
    docs/reliability.md). check_consistency=True (debug) first all-gathers a small signature of the
    call (cu_seqlens included) and raises ValueError on every rank if the ranks disagree, instead of
    hanging.
    """
    layout = resolve_layout(layout, q, ctx, packed=cu_seqlens is not None)
    validation.check_qkv_tensors(q, k, v, layout)
    validation.check_num_heads(q, k, v, layout, num_heads)
    head_dim = head_dim_of(q, layout, num_heads)
    scale = resolve_scale(softmax_scale, head_dim)
    window = packing.check_window(sliding_window)
    cu = None if cu_seqlens is None else packing.check_cu_seqlens(cu_seqlens)
    if ctx is not None:
        if cu is not None or window is not None or ctx.dense_needs_intervals:
            return _cp_masked(q, k, v, ctx, layout, causal, scale, head_dim, cu, window, check_consistency)
        return _cp_attention(q, k, v, ctx, layout, causal, scale, head_dim, check_consistency)
    if causal is None:
        raise ValueError("causal must be True or False when no context is given")
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    visible = None
    if cu is not None or window is not None:
        visible = _local_intervals(qv, kv, cu, bool(causal), window)
    out, _lse = torch.ops.ring_ext.fwd(
        qv, kv, vv, scale, bool(causal) and visible is None, 0, 0, False, visible
    )
    # fwd's output follows q's memory order; the contract is dense in the layout (one copy only
    # when q's memory order differs from its layout).
    return from_bshd(out, layout).contiguous()


def _local_intervals(qv, kv, cu, causal: bool, window):
    """The kernels' key intervals for one process's packed or windowed call (validated here)."""
    total = qv.shape[1]
    if kv.shape[1] != total:
        raise ValueError(
            f"with cu_seqlens or sliding_window, k and v must have q's length {total}, got {kv.shape[1]}"
        )
    if cu is not None:
        if qv.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: batch must be 1, got {qv.shape[0]}")
        packing.check_cu_seqlens(cu, total)
    return _intervals(cu if cu is not None else (0, total), causal, window).to(qv.device)


@functools.lru_cache(maxsize=32)
def _intervals(cu: tuple[int, ...], causal: bool, window) -> torch.Tensor:
    index = torch.arange(cu[-1])
    return packing.visible_keys(index, index, cu, causal, window)


def _cp_masked(q, k, v, ctx, layout, causal, scale, head_dim, cu, window, check_consistency):
    """Context-parallel attention of packed documents (cu) and/or a sliding window: the token plan's
    shards, padded to the plan's length here, with the key intervals of every source block
    (ring_ext/packing.py; Note [Per-source key intervals] in csrc/cp/ring.cpp)."""
    validation.check_causal(causal, ctx)
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    validation.check_shards(qv, kv, vv, ctx, packed=cu is not None)
    if cu is None:
        total = qv.shape[1] * ctx.cp_size  # a dense sequence in the context's own sharding
    else:
        total = cu[-1]
        if qv.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: batch must be 1, got {qv.shape[0]}")
    mine = packing.rank_tokens(ctx, total, cu)[ctx.rank]
    count = packing.real_length(mine, total)
    if qv.shape[1] != count:
        raise ValueError(
            f"q holds {qv.shape[1]} tokens but rank {ctx.rank}'s share of cu_seqlens is {count}: "
            "shard q, k, v with ring_ext.shard(x, ctx, seq_dim, cu_seqlens=cu)"
        )
    if check_consistency:
        signature = zlib.crc32(repr(cu).encode())
        validation.check_consistency(
            ctx,
            q.device,
            layout=layout,
            dtype=str(q.dtype).removeprefix("torch."),
            q=_without_seq(q, layout),  # token counts differ across ranks by the plan
            k=_without_seq(k, layout),
            scale=scale,
            causal=ctx.causal,
            algo=ctx.algo,
            cu_seqlens=signature,
            sliding_window=window or 0,
        )
    visible, needed = packing.block_intervals(ctx, total, cu, window)
    pad = len(mine) - count
    if pad:
        qv, kv, vv = (torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1) for t in (qv, kv, vv))
    out, _lse = cp_op(qv, kv, vv, ctx, scale, layout, causal=False, visible=visible, needed=needed)
    return from_bshd(out[:, :count] if pad else out, layout)


def _without_seq(t: torch.Tensor, layout: str) -> tuple[int, ...]:
    return tuple(n for i, n in enumerate(t.shape) if i != SEQ_DIM[layout])


def _cp_attention(q, k, v, ctx, layout, causal, scale, head_dim, check_consistency=False):
    """Context-parallel attention of this rank's shards; every rank reaches the same verdict on bad input."""
    validation.check_causal(causal, ctx)
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    validation.check_shards(qv, kv, vv, ctx)
    if check_consistency:
        validation.check_consistency(
            ctx,
            q.device,
            layout=layout,
            dtype=str(q.dtype).removeprefix("torch."),
            q=tuple(q.shape),
            k=tuple(k.shape),
            v=tuple(v.shape),
            scale=scale,
            causal=ctx.causal,
            algo=ctx.algo,
            overlap=ctx.config.use_cp_send_recv_overlap,
            window=ctx.config.cp_window_size,
        )
    out, _lse = cp_op(qv, kv, vv, ctx, scale, layout)
    return from_bshd(out, layout)  # a view: out is dense in layout (Note [Output contract])


def cp_op(
    qv, kv, vv, ctx, scale: float, layout: str = "bshd", causal: bool | None = None, visible=None, needed=None
):
    """torch.ops.ring_ext.attention on [b, s, h, d] views of this rank's shards with ctx's algorithm and
    groups: (out dense in `layout`, float32 lse [b, hq, s_local]). No checks: attention() makes them.
    visible, needed: the key intervals of packed documents / windows (with causal=False) and the rows
    the ring moves (packing.block_intervals)."""
    if layout == "thd":
        layout = "bshd"  # [1, t, h, d]: the memory of bshd
    return torch.ops.ring_ext.attention(
        qv,
        kv,
        vv,
        scale,
        ctx.causal if causal is None else causal,
        ctx.algo,
        ctx.ring_group_name,
        ctx.inner_group_name,
        ctx.outer_group_name,
        ctx.ulysses_group_name,
        ctx.config.use_cp_send_recv_overlap,
        layout,
        visible,
        needed,
    )
