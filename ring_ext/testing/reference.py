"""Float64 reference implementations: the oracle every kernel and algorithm is tested against.

Plain PyTorch, O(s^2) memory, [batch, seq, heads, head_dim] tensors; mirrors csrc/common/lse_math.h.
"""

from __future__ import annotations

import math

import torch

from .. import masks


def dense_mask(seq_q: int, seq_k: int, causal: bool, q_offset: int = 0, k_offset: int = 0, device=None):
    """[seq_q, seq_k] bool, True where row i attends to key j (causal: k_offset + j <= q_offset + i)."""
    if not causal:
        return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    i = torch.arange(seq_q, device=device)[:, None] + q_offset
    j = torch.arange(seq_k, device=device)[None, :] + k_offset
    return j <= i


def packed_mask(
    q_index, k_index, cu_seqlens, causal: bool, window: int | None = None, chunk: int | None = None
):
    """[len(q_index), len(k_index)] bool, True where query q attends to key k, under the mask model of
    ring_ext/masks.py (packed documents, causal or not, a sliding window, chunks). Indices >= S are padding:
    they attend to nothing and nothing to them. (tests/test_packed.py holds the rule to its per-pair
    definition.)"""
    return masks.mask_matrix(
        torch.as_tensor(q_index), torch.as_tensor(k_index), tuple(cu_seqlens), causal, window, chunk
    )


def attention_reference(
    q,
    k,
    v,
    *,
    causal: bool,
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    mask=None,
    softcap: float | None = None,
    sinks=None,
):
    """(out, lse) in float64. q [b, sq, hq, d]; k [b, sk, hkv, d]; v [b, sk, hkv, dv]; out
    [b, sq, hq, dv]; lse [b, hq, sq], -inf if no key. mask ([sq, sk] bool, e.g. packed_mask) replaces
    causal and the offsets. softcap c: scores c * tanh(scale * q.k / c); sinks [hq]: each row's
    denominator adds exp(sinks[h]) (lse includes it; a row with no key has out 0, lse = sink).
    Differentiable: autograd through it gives the exact gradients, sinks' included."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)  # [b, sk, hq, d]: fine for an oracle
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is None:
        mask = dense_mask(q.shape[1], k.shape[1], causal, q_offset, k_offset, q.device)
    s = s.masked_fill(~mask.to(q.device), -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # [b, hq, sq]
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.double().to(q.device)[None, :, None])
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no key: 0
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def merge_reference(o1, l1, o2, l2):
    """Merge two partials over disjoint keys. o [b, s, h, d], l [b, h, s]; -inf rows stay (0, -inf)."""
    lse = torch.logaddexp(l1, l2)  # -inf with -inf gives -inf
    w1 = torch.exp(l1 - lse).nan_to_num(0.0).transpose(1, 2)[..., None]  # [b, s, h, 1]
    w2 = torch.exp(l2 - lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    return w1 * o1 + w2 * o2, lse
