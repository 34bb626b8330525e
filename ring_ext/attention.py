"""ring_ext.attention: the one entry point. Without a context it is plain attention on this process."""

from __future__ import annotations

import math

import torch

from . import ops  # noqa: F401  (fake kernels and autograd)
from .layouts import check_layout, from_bshd, head_dim_of, to_bshd


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"softmax_scale must be a finite non-zero number, got {softmax_scale!r}")
    return scale


def resolve_layout(layout: str | None, q: torch.Tensor, ctx) -> str:
    if layout is not None:
        check_layout(layout)
        return layout
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
) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v, in q's layout and dtype.

    q, k, v are this rank's shards in `layout` (see ring_ext.layouts); k/v may have fewer heads than q
    (GQA/MQA). With ctx=None this is attention over the local tensors and `causal` must be given.
    Causal is top-left aligned, as in F.scaled_dot_product_attention(is_causal=True). With a context,
    causal=None means the context's attention_mask_type (a contradicting value raises).

    layout=None picks: without a context "bshd"; with one, "bnsd" under --megatron-cp-in-bnsd, else
    MindSpeed's "sbh" for 3-D inputs and "bshd" for 4-D ones.
    """
    layout = resolve_layout(layout, q, ctx)
    head_dim = head_dim_of(q, layout, num_heads)
    scale = resolve_scale(softmax_scale, head_dim)
    if ctx is not None:
        return _cp_attention(q, k, v, ctx, layout, causal, scale, head_dim)
    if causal is None:
        raise ValueError("causal must be True or False when no context is given")
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    out, _lse = torch.ops.ring_ext.fwd(qv, kv, vv, scale, bool(causal))
    return from_bshd(out, layout)


def _cp_attention(q, k, v, ctx, layout, causal, scale, head_dim):
    """Context-parallel attention of this rank's shards; every rank reaches the same verdict on bad input."""
    if causal is not None and bool(causal) != ctx.causal:
        raise ValueError(
            f"causal={causal} contradicts the context's attention_mask_type "
            f"{ctx.config.attention_mask_type!r}; leave causal=None with a context"
        )
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    _check_shards(qv, kv, vv, ctx)
    out, _lse = torch.ops.ring_ext.attention(
        qv,
        kv,
        vv,
        scale,
        ctx.causal,
        ctx.algo,
        ctx.ring_group_name,
        ctx.inner_group_name,
        ctx.outer_group_name,
        ctx.ulysses_group_name,
        ctx.config.use_cp_send_recv_overlap,
    )
    return from_bshd(out, layout)


def _check_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> None:
    """[b, s, h, d] views of the local shards."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k and v must be [b, s, heads_kv, d] shards matching q {tuple(q.shape)}, got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    heads_q, heads_kv = q.shape[2], k.shape[2]
    if heads_q % heads_kv != 0:
        raise ValueError(f"kv heads ({heads_kv}) must divide q heads ({heads_q})")
    u = ctx.ulysses_degree
    if u > 1:
        if heads_q % u != 0:
            raise ValueError(
                f"q heads ({heads_q}) must be divisible by the Ulysses degree ({u}) of {ctx.algo}"
            )
        if heads_kv % u != 0 and u % heads_kv != 0:
            raise ValueError(
                f"kv heads ({heads_kv}) and the Ulysses degree ({u}) of {ctx.algo} must divide one another"
            )
    # The ring sees u local shards at once (hybrid) and, causal, splits them into 2 zigzag chunks.
    if ctx.sharding == "zigzag" and (q.shape[1] * u) % 2 != 0:
        raise ValueError(
            f"local sequence length {q.shape[1]} must be divisible by 2 (zigzag sharding); shard with ring_ext.shard"
        )
