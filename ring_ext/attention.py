"""ring_ext.attention: the one entry point. Without a context it is plain attention on this process.

One call, file by file: docs/design.md, "One call from Python to the kernels".
"""

from __future__ import annotations

import math

import torch

from . import masks, ops, placement, validation  # noqa: F401  (ops: fake kernels and autograd)
from .layouts import from_bshd, resolve_layout, to_bshd


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return validation.check_scale(softmax_scale)


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
    check_consistency: bool = True,
    cu_seqlens=None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    attention_chunk_size: int | None = None,
    key_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ mask]) v, in q's layout and dtype, dense in that layout.

    q, k, v are this rank's shards in `layout` (see ring_ext.layouts); k/v may have fewer heads than q
    (GQA/MQA), and v its own head dim (multi-head latent attention: the output has v's). With
    ctx=None this is attention over the local tensors and `causal` must be given.
    Causal is top-left aligned, as in F.scaled_dot_product_attention(is_causal=True). With a context,
    causal=None means the context's attention_mask_type (a contradicting value raises).

    cu_seqlens ([n_docs + 1] integers, 0 first, last = the packed length S, the same on every rank; a
    tensor, as data loaders make it, or a list): packed documents; no token sees another document
    (ring_ext/masks.py). With a context, q, k, v are what ring_ext.shard(x, ctx, seq_dim,
    cu_seqlens=cu) gave this rank; batch must be 1. sliding_window=w: a query sees keys with
    0 <= pos_q - pos_k < w (causal) or |pos_q - pos_k| < w (general), positions inside each
    document; unrelated to --cp-window-size. Under torch.compile a tensor cu_seqlens is read only
    inside the op: batches whose document lengths differ run the same graph.

    softcap=c (Gemma 2's attn_logit_softcapping): scores become c * tanh(scale * q.k / c) before the
    softmax. sinks (gpt-oss): a float tensor [q heads], one learned logit per head with no value,
    added once to every row's softmax denominator (also under context parallelism and with packed
    documents); differentiable. docs/design.md, "Softcap and sinks".

    attention_chunk_size=c (Llama 4's chunked attention): a query sees only the keys of its own chunk
    of c positions of its document (ring_ext/masks.py); like sliding_window it shapes the mask, not the
    placement, so a chunked layer runs on the shards of the model's other layers.

    key_bounds (int64 [2, S] or [4, S], S the whole sequence as cu_seqlens counts it): any mask whose
    rows each see one or two intervals of keys, in order: token g sees keys [key_bounds[0, g],
    key_bounds[1, g]) and, with four rows, [key_bounds[2, g], key_bounds[3, g]) after them, every row
    non-decreasing in g (bidirectional image blocks, prefix-LM: ring_ext.masks.bidirectional_blocks;
    shared prompts, each answer seeing the prompt and itself: ring_ext.masks.shared_prefix). It replaces
    the causal / document / window / chunk rule (causal and cu_seqlens still pick the placement under a
    context; shard(..., key_bounds=kb) balances it by this mask), and is read only inside the op, as
    cu_seqlens is.

    layout=None picks: "thd" for 3-D inputs with cu_seqlens; without a context "bshd"; with one,
    "bnsd" under --megatron-cp-in-bnsd, else MindSpeed's "sbh" for 3-D inputs and "bshd" for 4-D ones.

    Bad input raises before any communication, alike on every rank (ring_ext/validation.py;
    docs/reliability.md). check_consistency (default True): the op's first act is one small
    all-gather of a description of the call over the CP group, and every rank raises the same
    ValueError if the ranks' calls differ (Note [Cross-rank check] in csrc/cp/consistency.h);
    False skips it.
    """
    cu = _cu_tensor(cu_seqlens)
    layout = resolve_layout(layout, q, ctx, packed=cu is not None)
    qv, kv, vv = views(q, k, v, layout, num_heads)  # [b, s, h, d], checked
    scale = resolve_scale(softmax_scale, qv.shape[-1])
    window = masks.check_window(sliding_window)
    chunk = masks.check_chunk(attention_chunk_size)
    if key_bounds is not None:
        masks.check_key_bounds_tensor(key_bounds)
        if window is not None or chunk is not None:
            raise ValueError(
                "key_bounds replaces sliding_window and attention_chunk_size: give one or the others"
            )
    cap = validation.check_softcap(softcap)
    validation.check_sinks(sinks, qv.shape[2], qv.device)
    if cu is not None and qv.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs documents into one row: batch must be 1, got {qv.shape[0]}")
    if ctx is None:
        if causal is None:
            raise ValueError("causal must be True or False when no context is given")
        if cu is None and window is None and chunk is None and key_bounds is None:
            out, _lse = torch.ops.ring_ext.fwd(qv, kv, vv, scale, bool(causal), 0, 0, False, None, cap, sinks)
            # fwd's output follows q's memory order; the contract is dense in the layout (one copy
            # only when q's memory order differs from its layout).
            return from_bshd(out, layout).contiguous()
        out, _lse = torch.ops.ring_ext.masked_attention(
            qv,
            kv,
            vv,
            cu,
            window or 0,
            scale,
            bool(causal),
            "",
            0,
            1,
            1,
            0,
            "",
            "",
            "",
            "",
            False,
            layout,
            "",
            cap,
            sinks,
            chunk or 0,
            key_bounds,
        )
        return from_bshd(out, layout)
    validation.check_causal(causal, ctx)
    masked = (
        cu is not None
        or window is not None
        or chunk is not None
        or key_bounds is not None
        or placement.scheme(ctx).needs_intervals
    )
    validation.check_shards(qv, kv, vv, ctx, packed=masked)
    check_group = ctx.group.group_name if check_consistency else ""
    if masked:
        out, _lse = torch.ops.ring_ext.masked_attention(
            qv, kv, vv, cu, window or 0, scale, ctx.causal, ctx.algo, ctx.rank, ctx.cp_size,
            ctx.ulysses_degree, ctx.config.cp_sliding_window or 0, ctx.ring_group_name,
            ctx.inner_group_name, ctx.outer_group_name, ctx.ulysses_group_name,
            ctx.config.use_cp_send_recv_overlap, layout, check_group, cap, sinks, chunk or 0, key_bounds,
        )  # fmt: skip
    else:
        out, _lse = cp_op(qv, kv, vv, ctx, scale, layout, check_group, cap, sinks)
    return from_bshd(out, layout)  # a view: out is dense in layout (Note [Output contract])


def views(q, k, v, layout: str, num_heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[b, s, h, d] views of q, k, v in `layout` (the one resolution of a call's layout), checked
    against one another."""
    validation.check_qkv_tensors(q, k, v, layout)
    head_dim, head_dim_v = validation.check_num_heads(q, k, v, layout, num_heads)
    qv, kv, vv = to_bshd(q, layout, head_dim), to_bshd(k, layout, head_dim), to_bshd(v, layout, head_dim_v)
    validation.check_bshd(qv, kv, vv)
    return qv, kv, vv


def _cu_tensor(cu_seqlens) -> torch.Tensor | None:
    """cu_seqlens as an integer tensor; a tensor's values are checked inside the op (ring_ext/masked.py),
    so that torch.compile never reads them."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        masks.check_cu_seqlens_tensor(cu_seqlens)
        return cu_seqlens
    return torch.tensor(masks.check_cu_seqlens(cu_seqlens), dtype=torch.int64)


def cp_op(
    qv,
    kv,
    vv,
    ctx,
    scale: float,
    layout: str = "bshd",
    check_group: str = "",
    softcap: float = 0.0,
    sinks=None,
):
    """torch.ops.ring_ext.attention on [b, s, h, d] views of this rank's dense shards with ctx's
    algorithm and groups: (out dense in `layout`, float32 lse [b, hq, s]). No checks but the
    cross-rank one (check_group: a group name, "" for none): attention() makes them."""
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
        check_group=check_group,
        softcap=softcap,
        sinks=sinks,
    )
