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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx=None,
    *,
    layout: str = "bshd",
    causal: bool | None = None,
    softmax_scale: float | None = None,
    num_heads: int | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v, in q's layout and dtype.

    q, k, v are this rank's shards in `layout` (see ring_ext.layouts); k/v may have fewer heads than q
    (GQA/MQA). With ctx=None this is attention over the local tensors and `causal` must be given.
    Causal is top-left aligned, as in F.scaled_dot_product_attention(is_causal=True).
    """
    check_layout(layout)
    head_dim = head_dim_of(q, layout, num_heads)
    scale = resolve_scale(softmax_scale, head_dim)
    if ctx is not None:
        raise NotImplementedError(
            "context-parallel attention (ring_ext.initialize) arrives with the ring driver; "
            "pass ctx=None for single-process attention"
        )
    if causal is None:
        raise ValueError("causal must be True or False when no context is given")
    qv, kv, vv = (to_bshd(t, layout, head_dim) for t in (q, k, v))
    out, _lse = torch.ops.ring_ext.fwd(qv, kv, vv, scale, bool(causal))
    return from_bshd(out, layout)
