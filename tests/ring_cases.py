"""One context-parallel attention case, run on every rank (tests/test_ring_dist.py,
tests/test_ulysses_dist.py, benchmarks): shard the full inputs, run forward and backward through
ring_ext.attention, unshard, compare with the float64 oracle."""

from __future__ import annotations

import dataclasses

import torch

import ring_ext
from ring_ext.layouts import SEQ_DIM, from_bshd, to_bshd
from ring_ext.reference import attention_reference

from tolerances import assert_rel_l2


@dataclasses.dataclass(frozen=True)
class Case:
    algo: str = "megatron_cp_algo"
    ulysses_degree: int | None = None  # hybrid_cp_algo only
    causal: bool = True
    window: int = 1
    overlap: bool = True
    layout: str = "bshd"
    dtype: torch.dtype = torch.float32
    batch: int = 1
    seq_per_rank: int = 8
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    seed: int = 0

    def config(self, world_size: int) -> ring_ext.CPConfig:
        return ring_ext.CPConfig(
            context_parallel_size=world_size,
            context_parallel_algo=self.algo,
            ulysses_degree_in_cp=self.ulysses_degree,
            attention_mask_type="causal" if self.causal else "general",
            cp_window_size=self.window,
            use_cp_send_recv_overlap=self.overlap,
        )


def full_inputs(case: Case, world_size: int):
    """q, k, v, dout over the whole sequence, [b, s, h, d], identical on every rank."""
    g = torch.Generator().manual_seed(case.seed)
    s = case.seq_per_rank * world_size
    shape_q = (case.batch, s, case.heads_q, case.head_dim)
    shape_kv = (case.batch, s, case.heads_kv, case.head_dim)
    q, k, v, dout = (
        torch.randn(sh, generator=g).to(case.dtype) for sh in (shape_q, shape_kv, shape_kv, shape_q)
    )
    return q, k, v, dout


def oracle(q, k, v, dout, causal):
    """float64 out, dq, dk, dv of the full sequence."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(q64, k64, v64, causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), dq, dk, dv


_CONTEXTS: dict = {}  # per worker process: (config) -> CPContext, so groups are built once per config


def context(case: Case, world_size: int):
    cfg = case.config(world_size)
    if cfg not in _CONTEXTS:
        _CONTEXTS[cfg] = ring_ext.initialize(cfg)
    return _CONTEXTS[cfg]


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A fresh contiguous tensor in layout from a [b, s, h, d] one."""
    return from_bshd(t, layout).contiguous()


def run_case(rank: int, world_size: int, case: Case):
    ctx = context(case, world_size)
    q, k, v, dout = full_inputs(case, world_size)
    seq_dim, num_heads = SEQ_DIM[case.layout], case.heads_q
    local = [ring_ext.shard(to_layout(t, case.layout), ctx, seq_dim) for t in (q, k, v, dout)]
    ql, kl, vl = (t.requires_grad_() for t in local[:3])
    kw = dict(layout=case.layout, num_heads=num_heads)
    if case.layout == "sbh":  # k/v carry heads_kv heads; one num_heads for all three is ambiguous
        kw["num_heads"] = num_heads
    out_l = ring_ext.attention(ql, kl, vl, ctx, **kw)
    out_l.backward(local[3])
    head_dim = case.head_dim
    got = [ring_ext.unshard(t.detach(), ctx, seq_dim) for t in (out_l, ql.grad, kl.grad, vl.grad)]
    got = [to_bshd(t, case.layout, head_dim) for t in got]
    expected = oracle(q, k, v, dout, case.causal)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert_rel_l2(a, e, case.dtype, f"rank {rank}/{world_size} {case} {name}")


class Block(torch.nn.Module):
    """A model block that calls ring attention: projections, attention over the context, projection."""

    def __init__(self, ctx, hidden: int, heads: int):
        super().__init__()
        self.ctx, self.heads = ctx, heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):  # x [s, b, hidden] (sbh)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(ring_ext.attention(q, k, v, self.ctx, layout="sbh", num_heads=self.heads))


def compile_case(rank: int, world_size: int, case: Case):
    """torch.compile(fullgraph=True) of Block matches eager, forward and backward."""
    ctx = context(case, world_size)
    torch.manual_seed(0)
    block = Block(ctx, 32, 4)
    x = ring_ext.shard(torch.randn(8 * world_size, 2, 32), ctx, 0)
    grads = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, block.qkv.weight.grad.clone()))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
