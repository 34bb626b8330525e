"""ring_ext.attention: the one entry point. Without a context it is plain attention on this process."""

from __future__ import annotations

import math

import torch

from . import ops, validation  # noqa: F401  (ops: fake kernels and autograd)
from .layouts import from_bshd, head_dim_of, to_bshd


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return validation.check_scale(softmax_scale)


def resolve_layout(layout: str | None, q: torch.Tensor, ctx) -> str:
    if layout is not None:
        validation.check_layout(layout)
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
    check_consistency: bool = False,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v, in q's layout and dtype.

    q, k, v are this rank's shards in `layout` (see ring_ext.layouts); k/v may have fewer heads than q
    (GQA/MQA). With ctx=None this is attention over the local tensors and `causal` must be given.
    Causal is top-left aligned, as in F.scaled_dot_product_attention(is_causal=True). With a context,
    causal=None means the context's attention_mask_type (a contradicting value raises).

    layout=None picks: without a context "bshd"; with one, "bnsd" under --megatron-cp-in-bnsd, else
    MindSpeed's "sbh" for 3-D inputs and "bshd" for 4-D ones.

    Bad input raises before any communication, alike on every rank (ring_ext/validation.py;
    docs/reliability.md). check_consistency=True (debug) first all-gathers a small signature of the
    call and raises ValueError on every rank if the ranks disagree, instead of hanging.
    """
    layout = resolve_layout(layout, q, ctx)
    validation.check_qkv_tensors(q, k, v, layout)
    validation.check_num_heads(q, k, v, layout, num_heads)
    head_dim = head_dim_of(q, layout, num_heads)
    scale = resolve_scale(softmax_scale, head_dim)
    if ctx is not None:
        return _cp_attention(q, k, v, ctx, layout, causal, scale, head_dim, check_consistency)
    if causal is None:
        raise ValueError("causal must be True or False when no context is given")
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    out, _lse = torch.ops.ring_ext.fwd(qv, kv, vv, scale, bool(causal))
    # fwd's output follows q's memory order; the contract is dense in the layout (one copy only
    # when q's memory order differs from its layout).
    return from_bshd(out, layout).contiguous()


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


def cp_op(qv, kv, vv, ctx, scale: float, layout: str = "bshd"):
    """torch.ops.ring_ext.attention on [b, s, h, d] views of this rank's shards with ctx's algorithm and
    groups: (out dense in `layout`, float32 lse [b, hq, s_local]). No checks: attention() makes them."""
    return torch.ops.ring_ext.attention(
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
        layout,
    )
