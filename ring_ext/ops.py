"""Fake (meta) kernels and autograd for the torch.ops.ring_ext block operators.

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels in csrc/cpu and csrc/cuda. This file adds
only what Python must: shapes for tracing (torch.compile, opcheck) and the backward formulas.
"""

from __future__ import annotations

import torch

from . import (
    _C,  # noqa: F401  (loads the library that defines the ring_ext ops)
    masked,  # noqa: F401  (the Python kernels of masked_attention and its backward)
)
from .layouts import empty_in_layout


def _dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels copy a tensor whose head_dim is strided (block_ops.cpp); the fake mirrors it.
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_stats(q: torch.Tensor) -> torch.Tensor:
    b, s, h, _ = q.shape
    return q.new_empty((b, h, s), dtype=torch.float32)


def _empty_like_q(q: torch.Tensor, head_dim_v: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, s, h, head_dim_v] in q's memory order (block_ops.cpp, empty_like_q)."""
    if head_dim_v == q.shape[3]:
        return torch.empty_like(q, dtype=dtype)
    order = sorted(range(3), key=lambda i: -q.stride(i)) + [3]
    shape = list(q.shape[:3]) + [head_dim_v]
    back = [order.index(i) for i in range(4)]
    return q.new_empty([shape[i] for i in order], dtype=dtype).permute(back)


@torch.library.register_fake("ring_ext::fwd")
def _fwd_fake(
    q, k, v, scale, causal, q_offset=0, k_offset=0, out_fp32=False, visible=None, softcap=0.0, sinks=None
):
    q = _dim_contiguous(q)
    out = _empty_like_q(q, v.shape[-1], torch.float32 if out_fp32 else q.dtype)
    return out, _row_stats(q)


@torch.library.register_fake("ring_ext::bwd")
def _bwd_fake(
    dout, q, k, v, out, lse, scale, causal, q_offset=0, k_offset=0, dlse=None, visible=None, softcap=0.0
):
    return tuple(torch.empty_like(t, dtype=q.dtype) for t in (q, k, v))


@torch.library.register_fake("ring_ext::bwd_acc")
def _bwd_acc_fake(
    dout, q, k, v, lse, delta, scale, causal, q_offset, k_offset, dq, dk, dv, visible=None, softcap=0.0
):
    return None


@torch.library.register_fake("ring_ext::merge_")
def _merge_fake(out, lse, block_out, block_lse):
    return None


def sinks_grad(sinks, out, lse, dout, dlse) -> torch.Tensor:
    """The gradient of the sinks (Note [Softcap and sinks] in csrc/common/params.h): with p_i =
    exp(sink - lse_i) the sink's share of row i, d sink = -sum_i p_i (rowsum(dout_i * out_i) - dlse_i),
    over this process's rows. out, dout [b, s, h, dv]; lse, dlse [b, h, s]; in sinks' dtype."""
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # [b, h, s]
    if dlse is not None:
        delta = delta - dlse.float()
    share = torch.exp(sinks.float()[None, :, None] - lse)
    return -(share * delta).sum((0, 2)).to(sinks.dtype)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, q_offset, k_offset, _out_fp32, visible, softcap, sinks = _fwd_inputs(inputs)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.causal, ctx.q_offset, ctx.k_offset = scale, causal, q_offset, k_offset
    ctx.visible = visible  # int64 key intervals, not differentiable
    ctx.softcap, ctx.sinks = softcap, sinks


def _fwd_inputs(inputs):
    """fwd's inputs with the defaults of its schema filled in."""
    defaults = (0, 0, False, None, 0.0, None)  # q_offset, k_offset, out_fp32, visible, softcap, sinks
    return tuple(inputs) + defaults[len(inputs) - 5 :]


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ring_ext.bwd(
        dout.to(q.dtype),
        q,
        k,
        v,
        out,
        lse,
        ctx.scale,
        ctx.causal,
        ctx.q_offset,
        ctx.k_offset,
        dlse,
        ctx.visible,
        ctx.softcap,
    )
    dsinks = None
    if ctx.sinks is not None and ctx.needs_input_grad[10]:
        dsinks = sinks_grad(ctx.sinks, out, lse, dout, dlse)
    # One slot per input of fwd: q, k, v, scale, causal, q_offset, k_offset, out_fp32, visible,
    # softcap, sinks.
    return dq, dk, dv, None, None, None, None, None, None, None, dsinks


torch.library.register_autograd("ring_ext::fwd", _fwd_backward, setup_context=_fwd_setup_context)


# Context-parallel attention (csrc/cp): fakes and autograd. Shapes follow the local shards.
@torch.library.register_fake("ring_ext::attention")
def _attention_fake(q, k, v, scale, causal, algo, ring_group, *args, **kwargs):
    layout = _attention_args(args, kwargs)["layout"]
    return empty_in_layout(q, layout, v.shape[-1]), _row_stats(q)


@torch.library.register_fake("ring_ext::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, *args, **kwargs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# The non-tensor arguments of ring_ext::attention after q, k, v, in schema order (csrc/ops.cpp).
_ATTENTION_ARGS = tuple(a.name for a in torch.ops.ring_ext.attention.default._schema.arguments[3:])
_ATTENTION_DEFAULTS = {
    a.name: a.default_value
    for a in torch.ops.ring_ext.attention.default._schema.arguments[3:]
    if a.has_default_value()
}


def _attention_args(positional, keywords) -> dict:
    """The arguments of ring_ext::attention after (q, k, v, scale, causal, algo, group), by name."""
    named = dict(_ATTENTION_DEFAULTS)
    named.update(zip(_ATTENTION_ARGS[4:], positional))
    named.update(keywords)
    return named


# What attention takes and attention_bwd does not: the output's layout (gradients come in the
# strides of q, k, v), the cross-rank check (the backward replays a checked call) and the sinks
# (the backward needs only the final lse; their own gradient is sinks_grad's).
_FORWARD_ONLY = ("layout", "check_group", "signature", "sinks")


def _attention_setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    named = dict(_ATTENTION_DEFAULTS)
    named.update(zip(_ATTENTION_ARGS, rest))
    ctx.sinks = named["sinks"]
    ctx.args = {name: value for name, value in named.items() if name not in _FORWARD_ONLY}


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ring_ext.attention_bwd(dout.to(q.dtype), q, k, v, out, lse, dlse=dlse, **ctx.args)
    grads = [None] * len(_ATTENTION_ARGS)  # one slot per input after q, k, v
    if ctx.sinks is not None and ctx.needs_input_grad[3 + _ATTENTION_ARGS.index("sinks")]:
        grads[_ATTENTION_ARGS.index("sinks")] = sinks_grad(ctx.sinks, out, lse, dout, dlse)
    return (dq, dk, dv, *grads)


torch.library.register_autograd(
    "ring_ext::attention", _attention_backward, setup_context=_attention_setup_context
)


# Attention under a mask given by values (ring_ext/masked.py): fakes and autograd.
@torch.library.register_fake("ring_ext::masked_attention")
def _masked_attention_fake(q, k, v, cu_seqlens, sliding_window, scale, causal, algo, rank, cp_size,
                           ulysses_degree, cp_sliding_window, ring_group, inner_group, outer_group,
                           ulysses_group, overlap, layout, check_group, softcap=0.0, sinks=None,
                           attention_chunk_size=0, key_bounds=None):  # fmt: skip
    return empty_in_layout(q, layout, v.shape[-1]), _row_stats(q)


@torch.library.register_fake("ring_ext::masked_attention_bwd")
def _masked_attention_bwd_fake(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# The arguments of masked_attention in schema order (csrc/ops.cpp).
_MASKED_ARGS = tuple(a.name for a in torch.ops.ring_ext.masked_attention.default._schema.arguments)


_MASKED_DEFAULTS = {
    a.name: a.default_value
    for a in torch.ops.ring_ext.masked_attention.default._schema.arguments
    if a.has_default_value()
}


def _masked_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.cu_seqlens = cu_seqlens  # int64 values, not differentiable
    named = dict(_MASKED_DEFAULTS)
    named.update(zip(_MASKED_ARGS[4:], rest))
    ctx.sinks = named["sinks"]
    ctx.args = {name: value for name, value in named.items() if name not in _FORWARD_ONLY}


def _masked_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.ring_ext.masked_attention_bwd(
        dout.to(q.dtype), q, k, v, out, lse, dlse, ctx.cu_seqlens, **ctx.args
    )
    # One slot per input of masked_attention after q, k, v: cu_seqlens and the other arguments.
    grads = [None] * (len(_MASKED_ARGS) - 3)
    if ctx.sinks is not None and ctx.needs_input_grad[_MASKED_ARGS.index("sinks")]:
        grads[_MASKED_ARGS.index("sinks") - 3] = sinks_grad(ctx.sinks, out, lse, dout, dlse)
    return (dq, dk, dv, *grads)


torch.library.register_autograd(
    "ring_ext::masked_attention", _masked_backward, setup_context=_masked_setup_context
)


# The collectives of the Python API (ring_ext/collectives.py): shapes only.
@torch.library.register_fake("ring_ext::all_gather")
def _all_gather_fake(x, group):
    size = torch.distributed.distributed_c10d._resolve_process_group(group).size()
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(size)]


@torch.library.register_fake("ring_ext::all_reduce_")
def _all_reduce_fake(xs, group, op="sum"):
    return None
