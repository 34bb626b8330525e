"""One packed-documents (and/or sliding-window) context-parallel case, run on every rank
(tests/test_packed_dist.py): shard the full packed row with cu_seqlens, forward and backward through
ring_ext.attention, unshard, compare with the float64 oracle whose mask is written per token pair
(ring_ext.testing.reference.packed_mask), with PyTorch's attention under the same mask as the yardstick
(ring_ext/testing/tolerances.py)."""

from __future__ import annotations

import dataclasses

import torch

import ring_ext
from ring_ext.layouts import SEQ_DIM, from_bshd, to_bshd
from ring_ext.testing.documents import cu_of
from ring_ext.testing.reference import attention_reference, packed_mask
from ring_ext.testing.tolerances import assert_attention, torch_attention

from ring_cases import Case, context  # one cached context per configuration, any case with .config()


@dataclasses.dataclass(frozen=True)
class PackedCase:
    docs: tuple[int, ...]  # document lengths; zeros allowed
    algo: str = "megatron_cp_algo"
    ulysses_degree: int | None = None  # hybrid_cp_algo only
    causal: bool = True
    window: int = 1  # --cp-window-size (double ring)
    sliding_window: int | None = None
    dense: bool = False  # no cu_seqlens: a dense sequence (S divisible as the sharding needs)
    placement: int | None = None  # --cp-sliding-window: contiguous token placement
    overlap: bool = True
    layout: str = "thd"
    dtype: torch.dtype = torch.float32
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    seed: int = 0

    def config(self, world_size: int) -> ring_ext.CPConfig:
        fields = ("algo", "ulysses_degree", "causal", "window", "overlap")
        config = Case(**{f: getattr(self, f) for f in fields}).config(world_size)
        return dataclasses.replace(config, cp_sliding_window=self.placement)

    @property
    def cu_seqlens(self) -> list[int]:
        return cu_of(self.docs)


def run_packed_case(rank: int, world_size: int, case: PackedCase):
    ctx = context(case, world_size)
    cu = case.cu_seqlens
    total = cu[-1]
    g = torch.Generator().manual_seed(case.seed)
    shape_q, shape_kv = (1, total, case.heads_q, case.head_dim), (1, total, case.heads_kv, case.head_dim)
    q, k, v, dout = (
        torch.randn(sh, generator=g).to(case.dtype) for sh in (shape_q, shape_kv, shape_kv, shape_q)
    )
    seq_dim = SEQ_DIM[case.layout]
    packing = {} if case.dense else {"cu_seqlens": torch.tensor(cu)}
    local = [
        ring_ext.shard(from_bshd(t, case.layout).contiguous(), ctx, seq_dim, **packing)
        for t in (q, k, v, dout)
    ]
    ql, kl, vl = (t.requires_grad_() for t in local[:3])
    out_l = ring_ext.attention(
        ql,
        kl,
        vl,
        ctx,
        layout=case.layout,
        num_heads=case.heads_q,
        sliding_window=case.sliding_window,
        check_consistency=True,
        **packing,
    )
    assert out_l.shape == ql.shape and out_l.dtype == case.dtype
    out_l.backward(local[3])
    got = [ring_ext.unshard(t.detach(), ctx, seq_dim, **packing) for t in (out_l, ql.grad, kl.grad, vl.grad)]
    got = [to_bshd(t, case.layout, case.head_dim) for t in got]
    index = torch.arange(total)
    mask = packed_mask(index, index, (0, total) if case.dense else cu, case.causal, case.sliding_window)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(q64, k64, v64, causal=False, mask=mask)
    expected = [out.detach(), *torch.autograd.grad(out, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=False, mask=mask)
    # dq rows of queries that see few keys are ill-conditioned (tolerances.assert_attention)
    assert_attention(got, expected, baseline, f"rank {rank}/{world_size} {case}", dq_rows=mask.sum(1) >= 4)
